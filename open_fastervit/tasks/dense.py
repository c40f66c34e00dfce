"""What detection and segmentation share as tasks: settings, the shared task parts, saving and rebuilding models.

The training loop is the engine's (``open_fastervit.train.Trainer``: DDP, AMP, optimizer and schedule, EMA,
exact resume with atomic checkpoints, NaN stop, progress bar, TensorBoard, CSV, curves, results.json); a task
says what is trained. ``DenseTask`` holds what both dense tasks share: optimizer parameter groups from the
model builder (no weight decay on biases and norms, layer-wise lr decay over the backbone), the backbone's
geometry-dependent parameters for DDP, the weights file's metadata (task and build arguments, so that
``load_dense_model`` rebuilds the model from the file alone), and evaluation in the backbone's inference form.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..backbone import FasterViTBackbone
from ..serialization import CheckpointError, check_fit, ema_mode, read_weights
from ..train.auto import MAX_AUTO_WARMUP_EPOCHS, WARMUP_EPOCHS_DIVISOR
from ..train.config import RunConfig, option
from ..train.loader import subset_indices
from ..train.reporting import log
from ..train.task import LoaderSpec, Task, get_task

__all__ = ["DenseConfig", "DenseTask", "OutputNames", "find_backbone", "geometry_dependent_parameters",
           "inference_copy", "load_dense_model", "resolve_weights_path"]


@dataclass
class DenseConfig(RunConfig):
    """Settings shared by detection and segmentation runs (the paper's dense recipes use AdamW at lr 1e-4 for a
    batch of 16, scaled linearly to the run's global batch)."""

    # model
    model: str = option("fastervit_0", "backbone architecture (FasterViT)")
    num_classes: int | None = option(None, "number of classes; default: inferred from the train split (a recipe never "
                                         "sets it)")
    pretrained: str | None = option(None, "fine-tune a whole model of this task: its .safetensors or a run's last.pt")
    backbone_checkpoint: str | None = option(None, "backbone weights: our classification .safetensors/.pt, a model "
                                                 "folder, or an official .pth.tar (the classifier is ignored)")
    frozen_stages: int = option(-1, "freeze the stem (0) and stages 0..k-1 (k > 0) of the backbone; -1: none")
    norm_eval: bool = option(False, "keep the backbone's BatchNorms in eval mode (fixed statistics)")
    # schedule (the tasks word the help of epochs, min_lr and decay_rate for their own recipes)
    epochs: int = option(36, "schedule length in epochs")
    cooldown_epochs: int = option(0, "extra epochs at min_lr after the schedule")
    warmup_epochs: float | None = option(None, "linear warmup epochs (from warmup_lr); default: auto, epochs / "
                                             f"{WARMUP_EPOCHS_DIVISOR}, at most {MAX_AUTO_WARMUP_EPOCHS:g}")
    batch_size: int = option(2, "images per process per micro-batch")
    lr_base: float = option(1e-4, "learning rate at global batch lr_base_size (linear scaling)")
    lr_base_size: int = option(16, "global batch of lr_base")
    min_lr: float = option(1e-6, "learning rate the schedule ends at")
    clip_grad: float | None = option(None, "gradient clipping value (None: off)")
    # EMA
    model_ema: bool = option(False, "keep an EMA of the weights (best.safetensors: the better of raw and EMA)")
    # run
    log_interval: int = option(10, "optimizer steps between progress/TensorBoard updates and NaN checks")
    workers: int = option(1, "data-loading processes per training process")
    repeats: int = option(1, "passes over the train split per epoch (small datasets: more random crops per epoch)")


def find_backbone(model: nn.Module) -> FasterViTBackbone:
    """The ``FasterViTBackbone`` inside a detector or segmenter.

    Raises:
        ValueError: the model holds none (or several).
    """
    found = [m for m in model.modules() if isinstance(m, FasterViTBackbone)]
    if len(found) != 1:
        raise ValueError(f"expected one FasterViTBackbone inside {type(model).__name__}, found {len(found)}")
    return found[0]


def inference_copy(model: nn.Module) -> nn.Module:
    """A copy of a dense model in eval mode whose backbone is in its inference form (``FasterViTBackbone.fuse``:
    folded norms, fused activations, packed weights); the heads are unchanged. Outputs equal the model's to fp32
    rounding; the original is untouched."""
    with torch.inference_mode(False):  # the snapshot's buffers stay normal tensors even when called under it
        clone = copy.deepcopy(model).eval()
        find_backbone(clone).fuse()
    return clone


def geometry_dependent_parameters(model: nn.Module) -> list[str]:
    """Names of the trainable backbone parameters a forward pass may leave unused: FasterViT's carrier-token
    weights are used only where a stage's map holds more than one window, which varies with the (multi-scale)
    input size. DDP needs ``find_unused_parameters`` for them."""
    backbone = find_backbone(model)
    prefix = next(name for name, m in model.named_modules() if m is backbone)
    return [f"{prefix}.{name}" for name, p in backbone.named_parameters()
            if p.requires_grad and ("carrier" in name or ".ct_" in name or name.startswith("ct_"))]


class DenseTask(Task):
    """What detection and segmentation share as tasks of the engine; each adds data, model, loss and evaluation.

    Subclasses set ``name``, ``metric`` and ``metric_title`` and implement ``build_datasets``, ``build_dense_model``,
    ``collate_fn``, ``param_groups``, ``to_device``, ``loss`` and ``evaluate``; they may refine
    ``resolve_num_classes`` and ``input_size``.
    """

    cfg: DenseConfig
    fixed_input_size = False  # multi-scale resizing and random crops

    # -- set-up

    def open_data(self) -> None:
        self.train_set, self.val_set = self.build_datasets()
        self.class_names = list(self.train_set.class_names)
        cfg, self.auto_reasons = self.resolve_num_classes(self.cfg)
        self.cfg, self.num_classes = cfg, int(cfg.num_classes)

    def build_model(self) -> nn.Module:
        model = self.build_dense_model()
        self.reinitialised = []
        if self.cfg.pretrained:
            self.load_pretrained(model, self.cfg.pretrained)
        self.build_config = dict(model.build_config)
        self.model = model
        return model

    def loaders(self, model: nn.Module) -> LoaderSpec:
        cfg = self.cfg
        if cfg.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {cfg.repeats}")
        indices = subset_indices(len(self.train_set), cfg.train_images, cfg.seed) or list(range(len(self.train_set)))
        self.samples_per_epoch = len(indices) * cfg.repeats
        return LoaderSpec(train_set=self.train_set, train_transform=self.train_set.transforms, val_set=self.val_set,
                          eval_transform=self.val_set.transforms if self.val_set is not None else None,
                          collate_fn=self.collate_fn(), train_indices=indices * cfg.repeats, eval_batch_size=1,
                          input_size=self.input_size())

    def resolve_num_classes(self, cfg: Any) -> tuple[Any, dict[str, str]]:
        """``cfg`` with ``num_classes`` set: the train split's class count when unset (recorded in config.json and
        the auto settings), else the given one checked against it: fewer is an error, more a warning (outputs that
        never see a label). Returns the config and ``{"num_classes": why}`` when inferred.

        Raises:
            ValueError: ``num_classes`` below the data's class count.
        """
        found = len(self.class_names or [])
        names = self.class_names or []
        if cfg.num_classes is None:
            return replace(cfg, num_classes=found), {"num_classes": f"the classes of the {cfg.train_split!r} split"}
        if cfg.num_classes < found:
            raise ValueError(f"num_classes={cfg.num_classes} but the {cfg.train_split!r} split has {found} classes "
                             f"({', '.join(names[:10])}{', ...' if found > 10 else ''}); leave "
                             "--num-classes out to use the data's count")
        if cfg.num_classes > found:
            log(self.info, f"warning: num_classes={cfg.num_classes} but the {cfg.train_split!r} split has {found} "
                           f"class(es): {cfg.num_classes - found} output(s) never see a label; leave --num-classes "
                           "out to use the data's count")
        return cfg, {}

    def backbone_kwargs(self) -> dict[str, Any]:
        """Arguments of ``create_backbone`` from the settings (the checkpoint is loaded, not recorded)."""
        cfg = self.cfg
        kwargs: dict[str, Any] = {"frozen_stages": cfg.frozen_stages, "norm_eval": cfg.norm_eval,
                                  "model_kwargs": dict(cfg.model_kwargs)}
        if cfg.drop_path is not None:
            kwargs["drop_path_rate"] = cfg.drop_path
        return kwargs

    def load_pretrained(self, model: nn.Module, source: str) -> None:
        """Whole-model weights of this task (fine-tuning): a class count that differs leaves those head layers
        freshly initialised (reported).

        Raises:
            CheckpointError: the file holds no weights of this model.
        """
        state, meta = read_weights(resolve_weights_path(source), ema="prefer")
        own = model.state_dict()
        fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
        missing = sorted(set(own) - set(fitting))
        if not fitting:
            raise CheckpointError(f"{source} holds no weights of this {self.name} model")
        model.load_state_dict(fitting, strict=False)
        self.reinitialised = missing
        if skipped or missing:
            log(self.info, f"loaded {len(fitting)} tensors from {source}; {len(missing)} left as initialised "
                           f"(e.g. {(skipped or missing)[0]}: another class count)")

    def input_size(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the training inputs (0 where they vary)."""
        return (3, 0, 0)

    def optimizer_params(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        return self.param_groups(model, lr)

    def ddp_unused_parameters(self, model: nn.Module, input_size: tuple[int, ...],
                              device: torch.device) -> list[str]:
        return geometry_dependent_parameters(model)

    def enable_grad_checkpointing(self, model: nn.Module) -> None:
        find_backbone(model).set_grad_checkpointing(True)

    def describe(self, model: nn.Module) -> str:
        params = sum(p.numel() for p in model.parameters()) / 1e6
        return (f"training {self.build_config.get('kind')} on {self.cfg.model} ({params:.2f}M params, "
                f"{self.num_classes} classes, {self.samples_per_epoch} training samples per epoch)")

    def weights_metadata(self) -> dict[str, Any]:
        return {"task": self.name, "architecture": self.cfg.model, "build_config": self.build_config}

    def checkpoint_metadata(self) -> dict[str, Any]:
        return self.weights_metadata()

    def result(self) -> dict[str, Any]:
        return {"task": self.name, "build_config": self.build_config, "reinitialised": self.reinitialised}

    # -- the task's own parts

    def build_datasets(self) -> tuple[Any, Any]:
        """Train and (optional) val datasets with their transforms and ``class_names``."""
        raise NotImplementedError

    def build_dense_model(self) -> nn.Module:
        """The detector or segmenter (with a ``build_config`` dict attribute)."""
        raise NotImplementedError

    def collate_fn(self) -> Any:
        """The loaders' collate function."""
        raise NotImplementedError

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        """Optimizer parameter groups (weight decay, layer-wise lr decay over the backbone)."""
        raise NotImplementedError

    @staticmethod
    def model_from_config(config: dict[str, Any]) -> nn.Module:
        """Rebuild the model from the ``build_config`` a weights file records."""
        raise NotImplementedError


def resolve_weights_path(source: str | Path) -> Path:
    """A weights file from a file or a run folder (``best.safetensors``, else ``last.safetensors``, else ``last.pt``).

    Raises:
        CheckpointError: nothing usable there.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors", "last.pt", "model.safetensors"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} holds no best.safetensors, last.safetensors or last.pt")
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    return path


def load_dense_model(source: str | Path, task: str, *, device: str | torch.device | None = None,
                     use_ema: bool | None = None) -> nn.Module:
    """Rebuild a detector or segmenter from a weights file written by its training run, and load the weights.

    Args:
        source: a ``.safetensors`` written by ``fastervit detect|segment train``, its ``last.pt``, or the run folder.
        task: ``"detection"`` or ``"segmentation"`` (a file of the other task is an error).
        use_ema: for training checkpoints: True the EMA weights, False the raw ones, None the EMA ones if present.

    Returns:
        The model in eval mode with ``class_names`` and ``weights_info`` attributes.

    Raises:
        CheckpointError: missing/corrupt file, a file of another task or without build arguments, weights that do
            not fit.
    """
    path = resolve_weights_path(source)
    state, meta = read_weights(path, ema=ema_mode(use_ema))
    found = meta.get("task")
    if found != task:
        raise CheckpointError(f"{path} is {'a ' + found if found else 'not a'} {'' if found else 'dense '}model file"
                              f"{'' if found else ' (no task recorded)'}; expected a {task} model")
    config = meta.get("build_config")
    if isinstance(config, str):
        config = json.loads(config)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} records no build arguments (build_config)")
    model = get_task(task).model_from_config(config)
    check_fit(model, state, what=str(path))
    model.load_state_dict(state)
    names = meta.get("class_names")
    model.class_names = list(names) if isinstance(names, list) else None
    categories = meta.get("category_ids")  # detection: the COCO category id of each label 1..K
    model.category_ids = [int(c) for c in categories] if isinstance(categories, list) else None
    model.weights_info = {"file": str(path), "weights": meta.get("weights"), "task": task}
    if device is not None:
        model = model.to(device)
    return model.eval()


class OutputNames:
    """Output file stems, one per input image, as paths relative to the output folder: the input's relative path
    without its suffix (``sub/tile`` for ``sub/tile.jpg`` found by a recursive listing, ``tile`` for a file given),
    or ``tile_2``, ``tile_3``... in the same folder when two inputs would share one (``a.jpg`` and ``a.png``, or
    files of the same name given from two places), so no output overwrites another."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def unique(self, relative: Path) -> Path:
        """The stem path for an input whose outputs belong at ``relative`` (its path relative to the folder it was
        listed from, or its name)."""
        relative = Path(relative)
        folder, n = relative.parent, 1
        while (folder / (relative.stem if n == 1 else f"{relative.stem}_{n}")).as_posix() in self.used:
            n += 1
        stem = folder / (relative.stem if n == 1 else f"{relative.stem}_{n}")
        self.used.add(stem.as_posix())
        return stem
