"""What detection and segmentation training share: settings, the dense-task trainer, saving and rebuilding models.

The training loop is classification's (``open_fastervit.train.Trainer``: DDP, AMP, optimizer and schedule, EMA,
exact resume with atomic checkpoints, NaN stop, progress bar, TensorBoard, CSV, curves, results.json); a dense task
only fills in its hooks. ``DenseTrainer`` fills the ones both dense tasks share: optimizer parameter groups from the
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

from .backbone import FasterViTBackbone
from .serialization import CheckpointError, read_weights
from .train import (
    MAX_AUTO_WARMUP_EPOCHS,
    WARMUP_EPOCHS_DIVISOR,
    RunConfig,
    Trainer,
    _log,
    _opt,
    _seed_everything,
    _subset,
    json_safe,
)

__all__ = ["DenseConfig", "DenseTrainer", "find_backbone", "inference_copy", "load_dense_model", "write_json"]


def write_json(path: str | Path, value: Any, indent: int | None = 2) -> Path:
    """Write ``value`` to ``path`` as strict JSON (NaN and infinities as null, ``json_safe``), creating the folder;
    every JSON file of the dense tasks goes through here. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(value), indent=indent, allow_nan=False))
    return path


@dataclass
class DenseConfig(RunConfig):
    """Settings shared by detection and segmentation runs (the paper's dense recipes use AdamW at lr 1e-4 for a
    batch of 16, scaled linearly to the run's global batch)."""

    # model
    model: str = _opt("fastervit_0", "backbone architecture (FasterViT)")
    num_classes: int | None = _opt(None, "number of classes; default: inferred from the train split (a recipe never "
                                         "sets it)")
    pretrained: str | None = _opt(None, "fine-tune a whole model of this task: its .safetensors or a run's last.pt")
    backbone_checkpoint: str | None = _opt(None, "backbone weights: our classification .safetensors/.pt, a model "
                                                 "folder, or an official .pth.tar (the classifier is ignored)")
    frozen_stages: int = _opt(-1, "freeze the stem (0) and stages 0..k-1 (k > 0) of the backbone; -1: none")
    norm_eval: bool = _opt(False, "keep the backbone's BatchNorms in eval mode (fixed statistics)")
    # schedule (the tasks word the help of epochs, min_lr and decay_rate for their own recipes)
    epochs: int = _opt(36, "schedule length in epochs")
    cooldown_epochs: int = _opt(0, "extra epochs at min_lr after the schedule")
    warmup_epochs: float | None = _opt(None, "linear warmup epochs (from warmup_lr); default: auto, epochs / "
                                             f"{WARMUP_EPOCHS_DIVISOR}, at most {MAX_AUTO_WARMUP_EPOCHS:g}")
    batch_size: int = _opt(2, "images per process per micro-batch")
    lr_base: float = _opt(1e-4, "learning rate at global batch lr_base_size (linear scaling)")
    lr_base_size: int = _opt(16, "global batch of lr_base")
    min_lr: float = _opt(1e-6, "learning rate the schedule ends at")
    clip_grad: float | None = _opt(None, "gradient clipping value (None: off)")
    # EMA
    model_ema: bool = _opt(False, "keep an EMA of the weights (best.safetensors: the better of raw and EMA)")
    # run
    log_interval: int = _opt(10, "optimizer steps between progress/TensorBoard updates and NaN checks")
    workers: int = _opt(1, "data-loading processes per training process")
    repeats: int = _opt(1, "passes over the train split per epoch (small datasets: more random crops per epoch)")


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


class DenseTrainer(Trainer):
    """The shared hooks of detection and segmentation training; tasks add data, model, loss and evaluation.

    Subclasses set ``task`` (``"detection"`` / ``"segmentation"``), ``metric`` and implement ``_build_datasets``,
    ``_build_model``, ``_collate``, ``_to_device``, ``_forward_loss``, ``evaluate`` and ``_param_groups``.
    """

    task = "dense"

    # -- set-up

    def _setup_data_and_model(self) -> None:
        from .data import LoaderOptions, build_eval_loader, build_train_loader
        from .train import describe_auto_settings, resolve_schedule_settings

        cfg, info = self.cfg, self.info
        self.train_set, self.val_set = self._build_datasets()
        self.class_names = list(self.train_set.class_names)
        cfg, inferred = self._resolve_num_classes(cfg)
        self.cfg, self.num_classes = cfg, int(cfg.num_classes)
        _seed_everything(cfg.seed)  # same initial weights on every rank
        model = self._build_model()
        self.reinitialised = []
        if cfg.pretrained:
            self._load_pretrained(model, cfg.pretrained)
        self.build_config = dict(model.build_config)
        self.data_cfg = {"input_size": self._input_size()}
        options = LoaderOptions(workers=cfg.workers, pin_memory=self.device.type == "cuda")
        indices = _subset(len(self.train_set), cfg.train_images, cfg.seed) or list(range(len(self.train_set)))
        if cfg.repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {cfg.repeats}")
        self.samples_per_epoch = len(indices) * cfg.repeats
        self.train_loader = build_train_loader(
            self.train_set, self.train_set.transforms, cfg.batch_size, options, world_size=info.world_size,
            rank=info.rank, accum_steps=cfg.accum_steps, seed=cfg.seed, indices=indices * cfg.repeats,
            collate_fn=self._collate())
        self.steps_per_epoch = self.train_loader.steps_per_epoch
        self.val_loader = None
        if self.val_set is not None:
            self.val_loader = build_eval_loader(self.val_set, self.val_set.transforms, 1, options,
                                                world_size=info.world_size, rank=info.rank,
                                                collate_fn=self._collate())
        cfg, reasons = resolve_schedule_settings(cfg, self.steps_per_epoch)
        reasons = {**inferred, **reasons}
        self.cfg, self.auto_reasons = cfg, reasons
        if reasons:
            _log(info, describe_auto_settings(cfg, reasons))
        self.model = self._place_model(model)
        self.ema = None
        if cfg.model_ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)
        self.train_model = self._wrap_model(self.model)
        _seed_everything(cfg.seed + info.rank)  # per-rank augmentation / drop-path randomness

    def _resolve_num_classes(self, cfg: Any) -> tuple[Any, dict[str, str]]:
        """``cfg`` with ``num_classes`` set: the train split's class count when unset (recorded in config.json and
        the auto settings), else the given one checked against it: fewer is an error, more a warning (outputs that
        never see a label). Returns the config and ``{"num_classes": why}`` when inferred."""
        found = len(self.class_names)
        if cfg.num_classes is None:
            return replace(cfg, num_classes=found), {"num_classes": f"the classes of the "
                                                                                f"{cfg.train_split!r} split"}
        if cfg.num_classes < found:
            raise ValueError(f"num_classes={cfg.num_classes} but the {cfg.train_split!r} split has {found} classes "
                             f"({', '.join(self.class_names[:10])}{', ...' if found > 10 else ''}); leave "
                             "--num-classes out to use the data's count")
        if cfg.num_classes > found:
            _log(self.info, f"warning: num_classes={cfg.num_classes} but the {cfg.train_split!r} split has {found} "
                            f"class(es): {cfg.num_classes - found} output(s) never see a label; leave --num-classes "
                            "out to use the data's count")
        return cfg, {}

    def _backbone_kwargs(self) -> dict[str, Any]:
        """Arguments of ``create_backbone`` from the settings (the checkpoint is loaded, not recorded)."""
        cfg = self.cfg
        kwargs: dict[str, Any] = {"frozen_stages": cfg.frozen_stages, "norm_eval": cfg.norm_eval,
                                  "model_kwargs": dict(cfg.model_kwargs)}
        if cfg.drop_path is not None:
            kwargs["drop_path_rate"] = cfg.drop_path
        return kwargs

    def _backbone(self) -> FasterViTBackbone:
        from .backbone import create_backbone

        return create_backbone(self.cfg.model, checkpoint=self.cfg.backbone_checkpoint, **self._backbone_kwargs())

    def _load_pretrained(self, model: nn.Module, source: str) -> None:
        """Whole-model weights of this task (fine-tuning): a class count that differs leaves those head layers
        freshly initialised (reported)."""
        state, meta = read_weights(resolve_weights_path(source), ema="prefer")
        own = model.state_dict()
        fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        skipped = sorted(k for k in state if k in own and own[k].shape != state[k].shape)
        missing = sorted(set(own) - set(fitting))
        if not fitting:
            raise CheckpointError(f"{source} holds no weights of this {self.task} model")
        model.load_state_dict(fitting, strict=False)
        self.reinitialised = missing
        if skipped or missing:
            _log(self.info, f"loaded {len(fitting)} tensors from {source}; {len(missing)} left as initialised "
                            f"(e.g. {(skipped or missing)[0]}: another class count)")

    def _input_size(self) -> tuple[int, int, int]:
        return (3, 0, 0)

    def _optimizer_params(self) -> list[dict[str, Any]]:
        return self._param_groups()

    def _ddp_unused(self, model: nn.Module) -> list[str]:
        return geometry_dependent_parameters(model)

    def _enable_grad_checkpointing(self, model: nn.Module) -> None:
        find_backbone(model).set_grad_checkpointing(True)

    def _setup_criterion(self) -> None:
        self.mixup = None
        self.criterion = None
        self.mesa_start_epoch = None

    def _start_epoch(self, epoch: int) -> None:
        pass

    def _state(self) -> dict[str, Any]:
        return {**super()._state(), **self._weights_metadata()}

    def _weights_metadata(self) -> dict[str, Any]:
        return {"task": self.task, "architecture": self.cfg.model, "build_config": self.build_config}

    def _describe_run(self) -> str:
        cfg, info = self.cfg, self.info
        params = sum(p.numel() for p in self.model.parameters()) / 1e6
        return (f"training {self.build_config.get('kind')} on {cfg.model} ({params:.2f}M params, {self.num_classes} "
                f"classes, {self.samples_per_epoch} training samples per epoch): {info.world_size} process(es) x batch "
                f"{cfg.batch_size} x accum {cfg.accum_steps} = global batch {self.global_batch}, lr {self.lr:.3g}, "
                f"{self.steps_per_epoch} steps/epoch, {self.num_epochs} epochs, device {self.device}"
                + (f" ({torch.get_num_threads()} threads)" if self.device.type == "cpu" else ""))

    def _finish(self) -> dict[str, Any]:
        result = super()._finish()
        result["task"] = self.task
        result["build_config"] = self.build_config
        result.pop("head_reinitialised", None)
        result["reinitialised"] = self.reinitialised
        if self.info.is_primary:
            write_json(self.out / "results.json", result)
        return result

    # -- task hooks

    def _build_datasets(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def _build_model(self) -> nn.Module:
        raise NotImplementedError

    def _collate(self) -> Any:
        raise NotImplementedError

    def _param_groups(self) -> list[dict[str, Any]]:
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
    from .serialization import check_fit, ema_mode

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
    if task == "detection":
        from .detection.models import detector_from_config as from_config
    else:
        from .segmentation.models import segmenter_from_config as from_config
    model = from_config(config)
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

