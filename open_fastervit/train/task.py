"""What the engine trains: a task object, and the registry of tasks by name.

The engine (:class:`open_fastervit.train.engine.Trainer`) owns the loop and knows no task; a :class:`Task` says,
for its kind of data and model, how to

1. open the data and choose the settings that depend on it (``open_data``),
2. build the model with its initial weights (``build_model``),
3. describe its loaders (``loaders``: datasets, transforms, collate function, subsets),
4. move a batch to the device (``to_device``) and compute the loss of one micro-batch (``loss``),
5. evaluate a model on the validation loader (``evaluate``: a dict holding ``metric``, reduced over ranks),
6. describe its weights (``weights_metadata``: what a weights file records so the loader rebuilds the model).

``best.safetensors`` holds the weights with the highest ``metric``. Classification, detection and segmentation are
peers (``open_fastervit.tasks``), each registered here under its name with :func:`register_task`; the config of
a run names its task (``RunConfig.TASK``), so ``open_fastervit.train.train(cfg)`` runs any of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from .config import RunConfig
from .distributed import DistInfo

__all__ = ["LoaderSpec", "Task", "get_task", "register_task", "task_for_config", "task_names"]


@dataclass
class LoaderSpec:
    """What the engine's loaders (``open_fastervit.train.loader``) serve: a task's datasets and how to batch them.

    Attributes:
        train_set: map-style (or iterable) training dataset; its ``transform`` is set to ``train_transform``.
        train_transform: applied to each training sample (``None``: the dataset's own transforms).
        val_set: validation dataset or ``None`` (no evaluation).
        eval_transform: applied to each validation sample.
        collate_fn: joins samples into a batch (``None``: torch's default stacking).
        eval_collate_fn: joins validation samples (``None``: ``collate_fn``), e.g. leaving unreadable images out.
        train_indices: the training samples of an epoch, repeats allowed (``None``: all, once).
        val_indices: the validation samples evaluated (``None``: all).
        eval_batch_size: images per evaluation batch (``None``: the run's ``batch_size``).
        input_size: ``(C, H, W)`` of the training inputs (H, W: 0 where they vary), for DDP's unused-parameter
            probe and the run's description.
    """

    train_set: Any
    train_transform: Any
    val_set: Any = None
    eval_transform: Any = None
    collate_fn: Callable | None = None
    eval_collate_fn: Callable | None = None
    train_indices: list[int] | None = None
    val_indices: list[int] | None = None
    eval_batch_size: int | None = None
    input_size: tuple[int, int, int] = (3, 0, 0)


class Task:
    """One kind of training (image classification, detection, segmentation): data, model, loss and metric.

    The engine calls, in this order: ``open_data``, ``build_model`` (after seeding every rank alike),
    ``loaders``, ``optimizer_params``, ``start`` (after the optimizer and schedule exist), then per epoch
    ``start_epoch`` and per micro-batch ``to_device`` and ``loss`` (inside the engine's autocast), and
    ``evaluate`` on the raw and the EMA weights. A task keeps its own state (loss functions, class names,
    ground truth); the engine keeps none of it.

    Attributes:
        cfg: the run's settings; ``open_data`` may return it with data-dependent fields chosen.
        info: this process's place in the process group (device, rank, world size).
        auto_reasons: ``{field: why}`` for each setting the task chose from the data (logged, saved).
        class_names: the class names of the training data (saved with the weights), or ``None``.
        num_classes: the model's number of classes.
        reinitialised: state-dict keys left at their initial values when loading pretrained weights.
    """

    #: Registry key (``RunConfig.TASK``) and the name saved in weights files.
    name: ClassVar[str] = ""
    #: The validation metric (higher is better) that selects ``best.safetensors`` and names the result keys.
    metric: ClassVar[str] = ""
    #: How the metric is shown in plots and logs.
    metric_title: ClassVar[str] = ""
    #: The settings class of this task.
    config_class: ClassVar[type[RunConfig]] = RunConfig
    #: Whether every training input has the loaders' ``input_size`` (said in the run's log line).
    fixed_input_size: ClassVar[bool] = True

    def __init__(self, cfg: RunConfig, info: DistInfo) -> None:
        self.cfg, self.info = cfg, info
        self.auto_reasons: dict[str, str] = {}
        self.class_names: list[str] | None = None
        self.num_classes = 0
        self.reinitialised: list[str] = []

    # -- set-up
    def open_data(self) -> None:
        """Open the datasets and choose the settings that depend on them (``self.cfg``, ``self.auto_reasons``).

        Raises:
            DatasetError: missing, empty or mis-shaped data.
        """
        raise NotImplementedError

    def build_model(self) -> nn.Module:
        """The model with its initial weights (random, pretrained or a checkpoint), in training mode."""
        raise NotImplementedError

    def loaders(self, model: nn.Module) -> LoaderSpec:
        """The datasets and batching of the run's loaders (``model``: for its input configuration)."""
        raise NotImplementedError

    def optimizer_params(self, model: nn.Module, lr: float) -> nn.Module | list[dict[str, Any]]:
        """What the optimizer gets: the model (timm's grouping and layer decay) or explicit parameter groups."""
        return model

    def enable_grad_checkpointing(self, model: nn.Module) -> None:
        """Turn on activation checkpointing (``grad_checkpointing``)."""
        model.set_grad_checkpointing(True)

    def ddp_unused_parameters(self, model: nn.Module, input_size: tuple[int, ...],
                              device: torch.device) -> list[str]:
        """Names of the parameters a forward pass may leave without a gradient (DDP must be told)."""
        return []

    def start(self, num_epochs: int, ema: nn.Module | None) -> None:
        """Called once before training with the schedule length and the EMA model (``None`` without EMA)."""

    def describe(self, model: nn.Module) -> str:
        """The start of the run's log line: what is trained on what (``"training X (...) on DATA"``)."""
        params = sum(p.numel() for p in model.parameters()) / 1e6
        return f"training {self.cfg.model} ({params:.2f}M params, {self.num_classes} classes)"

    # -- steps
    def start_epoch(self, epoch: int) -> None:
        """Per-epoch switches (0-based ``epoch``)."""

    def to_device(self, batch: Any, device: torch.device) -> tuple[Any, Any]:
        """A loader batch as ``(inputs, targets)`` on ``device``."""
        raise NotImplementedError

    def loss(self, model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        """The scalar loss of one micro-batch through ``model`` (the training wrapper: DDP / compiled)."""
        raise NotImplementedError

    # -- evaluation and weights
    def evaluate(self, model: nn.Module, loader: Any, device: torch.device,
                 amp_dtype: torch.dtype | None) -> dict[str, Any]:
        """Validation metrics of ``model`` over ``loader`` (each rank its shard), reduced over ranks: a dict
        holding ``metric`` and ``count`` (images evaluated)."""
        raise NotImplementedError

    def describe_metrics(self, row: dict[str, Any]) -> list[str]:
        """Log fragments for an epoch's validation metrics (raw and ``ema_`` keys)."""
        return []

    def weights_metadata(self) -> dict[str, Any]:
        """What a weights file records besides the weights, so that the loader rebuilds the model."""
        return {"architecture": self.cfg.model}

    def checkpoint_metadata(self) -> dict[str, Any]:
        """Extra entries of the resumable ``last.pt``."""
        return {}

    def result(self) -> dict[str, Any]:
        """The task's entries of ``results.json``."""
        return {}


TaskT = TypeVar("TaskT", bound=type[Task])

#: Task name -> task class, filled by :func:`register_task` as the task modules are imported.
TASKS: dict[str, type[Task]] = {}


def register_task(cls: TaskT) -> TaskT:
    """Class decorator: make a task known under ``cls.name`` (its config's ``TASK``)."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    TASKS[cls.name] = cls
    return cls


def task_names() -> list[str]:
    """The registered task names."""
    return sorted(TASKS)


def get_task(name: str) -> type[Task]:
    """The task class registered under ``name``.

    Raises:
        ValueError: no such task, naming the registered ones.
    """
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(task_names()) or 'none registered'}")
    return TASKS[name]


def task_for_config(cfg: RunConfig) -> type[Task]:
    """The task class a config trains (``type(cfg).TASK``).

    Raises:
        ValueError: the config names no registered task.
    """
    return get_task(type(cfg).TASK)
