"""Where a model runs: the device, and the one precision vocabulary of every command and API.

Every entry point (training, evaluation, prediction, serving, benchmarks) names its device and its precision
through this module, so ``--amp bf16`` means the same thing everywhere:

- a *precision* is ``"fp32"``, ``"bf16"`` or ``"fp16"`` (:data:`PRECISIONS` maps it to the autocast dtype, ``None``
  for fp32);
- the ``--amp`` options say ``"none"`` for fp32 (:data:`AMP_CHOICES`); :func:`amp_dtype` maps those words, and
  the older spellings in :data:`DEPRECATED_AMP`, to the dtype;
- ``--precision`` (``predict``, ``serve``) takes a precision or ``"auto"`` (:data:`PRECISION_CHOICES`: the fastest
  form that answers as fp32), and ``--runtime`` one of :data:`RUNTIMES`;
- :func:`cpu_info` names the CPU and the instruction set flags that decide which precisions are native
  (:func:`native_cpu_precisions`).
"""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

import torch

__all__ = ["AMP_CHOICES", "AMP_DTYPES", "DEPRECATED_AMP", "PRECISIONS", "PRECISION_CHOICES", "RUNTIMES",
           "amp_dtype", "cpu_info", "default_device", "native_cpu_precisions", "resolve_device"]

#: Precision name -> autocast dtype (``None``: float32, no autocast).
PRECISIONS: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: ``--amp`` words of every command; ``none`` is fp32.
AMP_CHOICES: tuple[str, ...] = ("none", "bf16", "fp16")
#: ``--amp`` word -> autocast dtype.
AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
#: ``--precision`` words: a precision, or ``auto`` (measure the forms available and take the fastest that answers
#: as fp32).
PRECISION_CHOICES: tuple[str, ...] = ("auto", *PRECISIONS)
#: ``--runtime`` words: who runs the forward pass (``auto``: measured, see ``open_fastervit.deploy.forms``).
RUNTIMES: tuple[str, ...] = ("auto", "torch", "openvino", "onnxruntime")
#: CPU flags (``/proc/cpuinfo``) that matter for inference precisions.
CPU_FLAGS: tuple[str, ...] = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "avx512_fp16",
                              "amx_bf16", "amx_int8", "amx_fp16")
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


@lru_cache(maxsize=1)
def cpu_info() -> tuple[str, tuple[str, ...]]:
    """``(CPU model name, the flags of CPU_FLAGS it has)``, read from ``/proc/cpuinfo`` (Linux; elsewhere the
    platform's processor name and no flags)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return name, ()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            name = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break
    return name, tuple(f for f in CPU_FLAGS if f in flags)


def native_cpu_precisions(flags: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The precisions this CPU computes natively: fp32 always; bf16 with ``avx512_bf16`` or ``amx_bf16``; fp16
    with ``avx512_fp16`` or ``amx_fp16`` (without them torch's bf16 is emulated and slower than fp32)."""
    have = set(cpu_info()[1] if flags is None else flags)
    out = ["fp32"]
    if have & {"avx512_bf16", "amx_bf16"}:
        out.append("bf16")
    if have & {"avx512_fp16", "amx_fp16"}:
        out.append("fp16")
    return tuple(out)
