"""Our own weights as safetensors (compatibility module): ``save_weights`` / ``atomic_write`` live in
``open_fastervit.serialization``; ``load_weights`` is a thin call into ``open_fastervit.loading.load_into``."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from .loading import load_into
from .serialization import atomic_write, save_weights

__all__ = ["atomic_write", "load_weights", "save_weights"]


def load_weights(model: nn.Module, path: str | Path, strict: bool = True, use_ema: bool = False) -> nn.Module:
    """Load safetensors, a checkpoint written by ``fastervit train`` (its raw weights, or with ``use_ema`` its EMA
    weights) or an official file into ``model``; the head must fit (``head="keep"``).

    Raises:
        CheckpointError: missing, corrupt or unsafe file; weights that do not fit the model (with ``strict``).
    """
    load_into(model, path, head="keep", use_ema=use_ema, strict=strict)
    return model
