"""Where a model runs: the device, and the one precision vocabulary of every command and API.

Every entry point (training, evaluation, prediction, serving, benchmarks) names its device and its precision
through this module, so ``--amp bf16`` means the same thing everywhere:

- a *precision* is ``"fp32"``, ``"bf16"`` or ``"fp16"`` (:data:`PRECISIONS` maps it to the autocast dtype, ``None``
  for fp32);
- the ``--amp`` options say ``"none"`` for fp32 (:data:`AMP_CHOICES`); :func:`amp_dtype` maps those words, and
  the older spellings in :data:`DEPRECATED_AMP`, to the dtype.
"""

from __future__ import annotations

import torch

__all__ = ["AMP_CHOICES", "AMP_DTYPES", "DEPRECATED_AMP", "PRECISIONS", "amp_dtype", "default_device",
           "resolve_device"]

#: Precision name -> autocast dtype (``None``: float32, no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: ``--amp`` words of every command; ``none`` is fp32.
AMP_CHOICES: tuple[str, ...] = ("none", "bf16", "fp16")
#: ``--amp`` word -> autocast dtype.
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Spellings accepted before (with a deprecation note on the command line) and the word they mean now.
DEPRECATED_AMP: dict[str, str] = {"bfloat16": "bf16", "float16": "fp16", "fp32": "none", "float32": "none"}


def amp_dtype(word: str | None) -> torch.dtype | None:
    """The autocast dtype of an ``--amp`` word or a precision name (``None`` and ``"none"``/``"fp32"``: float32).

    Raises:
        ValueError: an unknown word, naming the accepted ones.
    """
    if word is None:
        return None
    key = str(word).strip().lower()
    key = DEPRECATED_AMP.get(key, key)
    if key in AMP_DTYPES:
        return AMP_DTYPES[key]
    if key in PRECISIONS:
        return PRECISIONS[key]
    raise ValueError(f"amp must be one of {list(AMP_CHOICES)}, got {word!r}")


def default_device() -> torch.device:
    """``cuda`` when a GPU is visible, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a ``torch.device`` (``None``: :func:`default_device`).

    Raises:
        ValueError: a string torch does not read as a device (e.g. ``"gpu"``).
    """
    if device is None:
        return default_device()
    if isinstance(device, torch.device):
        return device
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r}; expected cpu, cuda or cuda:N") from e
