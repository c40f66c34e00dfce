"""Our own weights as safetensors: atomic save, checked load."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from torch import nn

from .convert import CheckpointError, check_fit, load_checkpoint_file, select_weights

__all__ = ["save_weights", "load_weights", "atomic_write"]


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` then atomically rename the temp file onto ``path`` (same folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:  # the bytes reach the disk before the name does
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_weights(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s state dict to ``path`` as safetensors (atomically), with string metadata.

    The architecture name and its config are stored in the metadata when the model carries a timm
    ``pretrained_cfg``.
    """
    from safetensors.torch import save_file

    meta = {"format": "pt", "library": "open_fastervit"}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if cfg.get("architecture"):
        meta["architecture"] = str(cfg["architecture"])
    meta["num_classes"] = str(getattr(model, "num_classes", ""))
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(state, tmp, metadata=meta))


def load_weights(model: nn.Module, path: str | Path, strict: bool = True, use_ema: bool = False) -> nn.Module:
    """Load safetensors (or a checkpoint written by ``fastervit train``: its raw weights, or with ``use_ema`` its
    EMA weights) into ``model``, with clear errors."""
    try:
        state, _ = select_weights(load_checkpoint_file(path), "require" if use_ema else "avoid")
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if strict:
        try:
            check_fit(model, state, what=f"weights file {path}")
        except CheckpointError as e:
            raise CheckpointError(str(e)) from None
    model.load_state_dict(state, strict=strict)
    return model
