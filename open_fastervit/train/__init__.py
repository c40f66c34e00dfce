"""The training engine: one loop for every task, on one process or many (torchrun / DDP).

``train(cfg)`` trains whatever the config's class names (``TrainConfig`` for classification, ``DetectionConfig``,
``SegmentationConfig``: ``open_fastervit.tasks``); ``fastervit train`` / ``detect train`` / ``segment train`` are
thin command lines over it. The engine (``Trainer``) owns the loop, DDP, AMP, gradient accumulation and clipping,
the EMA, exact resume with atomic checkpoints, the stop on a NaN loss, progress, CSV, TensorBoard, curves and
``results.json``; a :class:`~open_fastervit.train.task.Task` says what is trained.

Modules: ``engine`` (the loop), ``task`` (the task interface and registry), ``config`` (the shared settings),
``auto`` (settings chosen at start), ``optim`` (optimizer, schedule), ``loader`` (resumable seeded loaders),
``checkpoint`` (atomic, resumable state), ``distributed`` (process group), ``reporting`` (logs, CSV, curves,
JSON), ``run`` (the run folder, how a run ends).
"""

from typing import Any

from .. import compat
from .auto import (
    EMA_HORIZON_FRACTION,
    EMA_MAX_DECAY,
    EMA_MIN_HORIZON,
    MAX_AUTO_WARMUP_EPOCHS,
    WARMUP_EPOCHS_DIVISOR,
    auto_ema_decay,
    auto_warmup_epochs,
    cpu_threads,
    describe_auto_settings,
    resolve_schedule_settings,
)
from .config import PATH_FIELDS, RunConfig, absolute_paths, check_config, option
from .engine import Progress, Trainer, run_training, seed_everything, train
from .optim import create_optimizer, create_schedule, effective_lr, fused_optimizer_kwargs, global_batch
from .reporting import json_safe, plot_curves, write_json, write_summary_csv
from .run import RUN_OUTPUTS, RunExistsError, TrainingDiverged, TrainingInterrupted, check_output, remove_run_outputs
from .task import LoaderSpec, Task, get_task, register_task, task_for_config, task_names

__all__ = [
    "EMA_HORIZON_FRACTION",
    "EMA_MAX_DECAY",
    "EMA_MIN_HORIZON",
    "MAX_AUTO_WARMUP_EPOCHS",
    "WARMUP_EPOCHS_DIVISOR",
    "PATH_FIELDS",
    "RUN_OUTPUTS",
    "LoaderSpec",
    "Progress",
    "RunConfig",
    "RunExistsError",
    "Task",
    "Trainer",
    "TrainingDiverged",
    "TrainingInterrupted",
    "absolute_paths",
    "auto_ema_decay",
    "auto_warmup_epochs",
    "check_config",
    "check_output",
    "cpu_threads",
    "create_optimizer",
    "create_schedule",
    "describe_auto_settings",
    "effective_lr",
    "fused_optimizer_kwargs",
    "get_task",
    "global_batch",
    "json_safe",
    "option",
    "plot_curves",
    "register_task",
    "remove_run_outputs",
    "resolve_schedule_settings",
    "run_training",
    "seed_everything",
    "task_for_config",
    "task_names",
    "train",
    "write_json",
    "write_summary_csv",
]


def __getattr__(name: str) -> Any:
    """Classification's names that lived here (``TrainConfig``, its augmentation choices) keep working, with a
    deprecation warning: they are in ``open_fastervit.tasks.classification`` now."""
    return compat.moved_attribute(__name__, name)
