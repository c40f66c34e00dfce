"""Settings chosen at the start of a run from its length, when the user left them unset: the schedule's part.

Every task shares these (a task adds its own, e.g. classification's augmentation): the EMA decay from the number
of optimizer steps, the warmup from the number of epochs, and the CPU threads left after the loader workers.
A value that is set, even to the default, is always used as given; the choices are logged in one line
(:func:`describe_auto_settings`) and recorded in ``config.json`` and ``results.json``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

__all__ = ["EMA_HORIZON_FRACTION", "EMA_MAX_DECAY", "EMA_MIN_HORIZON", "MAX_AUTO_WARMUP_EPOCHS",
           "SCHEDULE_AUTO_FIELDS", "WARMUP_EPOCHS_DIVISOR", "auto_ema_decay", "auto_warmup_epochs", "cpu_threads",
           "describe_auto_settings", "is_unset", "resolve_schedule_settings"]

#: The auto EMA decay averages over this fraction of the run's optimizer steps (horizon = 1 / (1 - decay)) ...
EMA_HORIZON_FRACTION = 0.1
#: ... but over at least this many steps ...
EMA_MIN_HORIZON = 10
#: ... and at most the paper's decay (a 5000-step horizon).
EMA_MAX_DECAY = 0.9998
#: The auto warmup is epochs / WARMUP_EPOCHS_DIVISOR (the paper: 20 of 300) ...
WARMUP_EPOCHS_DIVISOR = 15
#: ... at most this many epochs.
MAX_AUTO_WARMUP_EPOCHS = 20.0
#: Schedule fields chosen at start when left unset, and the value that means "unset".
SCHEDULE_AUTO_FIELDS: dict[str, Any] = {"ema_decay": None, "warmup_epochs": None}


def is_unset(cfg: Any, name: str, unset: Any = None) -> bool:
    """Whether ``cfg.name`` holds the value that means "choose it for me" (``unset``: ``None`` for most fields)."""
    value = getattr(cfg, name)
    return value is None if unset is None else value == unset


def auto_ema_decay(total_steps: int) -> float:
    """EMA decay whose horizon ``1 / (1 - decay)`` is ``EMA_HORIZON_FRACTION`` (10 %) of the run's optimizer steps,
    at least ``EMA_MIN_HORIZON`` steps and at most ``EMA_MAX_DECAY`` (the paper's 0.9998).

    The EMA's remaining share of the random initial weights after the run is ``decay ** total_steps``, about
    ``exp(-1 / EMA_HORIZON_FRACTION) = 4.5e-5`` (e.g. 500 steps: decay 0.98, 0.98**500 = 4e-5); the fixed
    0.9998 kept 90 % of the initial weights after 500 steps.
    """
    horizon = max(float(EMA_MIN_HORIZON), EMA_HORIZON_FRACTION * max(total_steps, 0))
    return min(EMA_MAX_DECAY, 1.0 - 1.0 / horizon)


def auto_warmup_epochs(epochs: int) -> float:
    """Linear-warmup length: ``epochs / 15`` (the paper's 20 of 300), at most 20 epochs, so that a short run
    reaches its peak learning rate early instead of warming up for its whole length."""
    return min(MAX_AUTO_WARMUP_EPOCHS, epochs / WARMUP_EPOCHS_DIVISOR)


def resolve_schedule_settings(cfg: Any, steps_per_epoch: int) -> tuple[Any, dict[str, str]]:
    """``cfg`` with an unset ``warmup_epochs`` (:func:`auto_warmup_epochs`) and, when ``model_ema`` is on, an unset
    ``ema_decay`` (:func:`auto_ema_decay` of all optimizer steps, cooldown included) chosen.
    Returns it and ``{field: reason}``."""
    changes: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    if is_unset(cfg, "warmup_epochs"):
        changes["warmup_epochs"] = auto_warmup_epochs(cfg.epochs)
        reasons["warmup_epochs"] = f"{cfg.epochs} epochs / {WARMUP_EPOCHS_DIVISOR}, at most {MAX_AUTO_WARMUP_EPOCHS:g}"
    if is_unset(cfg, "ema_decay") and cfg.model_ema:
        total = steps_per_epoch * cfg.total_epochs
        changes["ema_decay"] = auto_ema_decay(total)
        horizon = 1 / (1 - changes["ema_decay"])
        reasons["ema_decay"] = (f"EMA horizon {horizon:.0f} optimizer steps: {EMA_HORIZON_FRACTION:.0%} of {total}, "
                                f"at least {EMA_MIN_HORIZON}, decay at most {EMA_MAX_DECAY}")
    return (dataclasses.replace(cfg, **changes) if changes else cfg), reasons


def describe_auto_settings(cfg: Any, reasons: dict[str, str]) -> str:
    """One log line: the auto-chosen values, grouped by reason."""
    groups: dict[str, list[str]] = {}
    for name, reason in reasons.items():
        value = getattr(cfg, name)
        groups.setdefault(reason, []).append(f"{name}={value:.6g}" if isinstance(value, float) else f"{name}={value}")
    return "auto settings (set them to override): " + "; ".join(
        f"{', '.join(values)} ({reason})" for reason, values in groups.items())


def cpu_threads(cfg: Any) -> int:
    """Intra-op threads for CPU training: ``cfg.threads``, else the CPUs this process may use minus its
    loader workers (at least 1). Oversubscribed OpenMP threads stall each other badly on small machines."""
    if cfg.threads > 0:
        return cfg.threads
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, per_process - cfg.workers)
