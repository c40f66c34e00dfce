"""Training checkpoints: the full resumable state of a run, written atomically, loaded safely.

A training checkpoint (``last.pt``) is a dict of tensors and plain Python values in timm's layout
(``state_dict``, ``state_dict_ema``, ``optimizer``, ``epoch``, ...), so ``open_fastervit.load_weights``
and ``load_official_checkpoint`` read its weights and ``torch.load(weights_only=True)`` reads all of it.
Besides the weights it holds the optimizer, grad scaler and lr scheduler states, the position in the
epoch and the RNG states of Python, numpy and torch of every rank. Files are written to a temporary
name and moved into place (``open_fastervit.serialization.atomic_write``), so a run killed at any instant
leaves the previous or the new file, never a torn one.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..serialization import CheckpointError, atomic_write, load_checkpoint_file

__all__ = ["CHECKPOINT_VERSION", "NoCheckpointYet", "ResumeMismatchError", "capture_rng", "load_checkpoint",
           "read_progress", "read_training_state", "restore_rng", "save_checkpoint"]

CHECKPOINT_VERSION = 1
FORMAT = "open_fastervit.train"


class NoCheckpointYet(CheckpointError):
    """``resume`` names a run folder that holds no ``last.pt`` yet (stopped before its first checkpoint)."""


class ResumeMismatchError(CheckpointError):
    """The checkpoint to resume from was trained with another model than the one configured now."""


def capture_rng() -> dict[str, Any]:
    """RNG states of Python, numpy and torch (CPU and every CUDA device) as tensors / plain types."""
    version, mt_state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, list(mt_state), gauss],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng``."""
    version, mt_state, gauss = state["python"]
    random.setstate((version, tuple(mt_state), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write a training-state dict atomically with ``torch.save``; adds the format tag and version."""
    payload = {"format": FORMAT, "version": CHECKPOINT_VERSION, **state}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a training checkpoint (a file, or a run folder holding ``last.pt``) with ``weights_only=True``.

    Raises:
        NoCheckpointYet: a run folder (it has a ``config.json``) without ``last.pt``; the message says how to start it.
        CheckpointError: a missing, unreadable or foreign file.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "last.pt"
    if not path.exists() and path.parent.is_dir() and (path.parent / "config.json").is_file():
        folder = path.parent
        raise NoCheckpointYet(
            f"{folder} has no checkpoint yet (no {path.name}: the run stopped before its first one; last.pt is "
            "written at the end of every epoch and every checkpoint_steps optimizer steps), so there is nothing to "
            "resume: run the same command without --resume (Python: resume=None) to start it, or remove the "
            f"folder {folder} first"
        )
    state = load_checkpoint_file(path)
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a training checkpoint written by `fastervit train`")
    if state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')}, expected {CHECKPOINT_VERSION}")
    return state


def read_training_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """A training checkpoint's top-level dict with its tensors memory-mapped, not read (cheap for large files):
    for its ``progress`` or ``config``. None when the file is not a readable training checkpoint."""
    try:
        state = torch.load(Path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # any unreadable file: the caller says so
        return None
    return state if isinstance(state, dict) and state.get("format") == FORMAT else None


def read_progress(path: str | os.PathLike) -> dict[str, Any] | None:
    """The ``progress`` entry (epoch, step_in_epoch, global_step, ...) of a training checkpoint (see
    ``read_training_state``); None when unreadable."""
    progress = (read_training_state(path) or {}).get("progress")
    return dict(progress) if isinstance(progress, dict) else None
