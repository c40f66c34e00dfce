"""The settings every training run has, whatever its task: model, data, schedule, optimizer, EMA, speed, run.

A task's config subclasses :class:`RunConfig` with its own fields and defaults (``TrainConfig`` for
classification, ``DetectionConfig``, ``SegmentationConfig``) and names its task in ``TASK``. Field names are the
recipe keys and, with ``-``, the command-line options (``fastervit train --help`` is generated from them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..runtime import AMP_DTYPES
from .auto import EMA_HORIZON_FRACTION, EMA_MAX_DECAY

__all__ = ["PATH_FIELDS", "RunConfig", "absolute_paths", "check_config", "option"]


def option(default: Any, help_text: str) -> Any:
    """A dataclass field with a CLI help text (mutable defaults get a factory)."""
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help_text})
    return field(default=default, metadata={"help": help_text})


@dataclass
class RunConfig:
    """What every training run needs, whatever the task: model, data, schedule, optimizer, EMA, speed, run.

    Field names are the recipe keys and (with ``-``) the CLI options; tasks subclass it (``TrainConfig`` for
    classification, ``DetectionConfig``, ``SegmentationConfig``) with their own fields and defaults."""

    # model
    model: str = option("fastervit_0", "timm model name")
    model_kwargs: dict = option({}, "architecture overrides, e.g. dim, depths, window_size (CLI: JSON)")
    num_classes: int | None = option(None, "classifier size; default: the number of classes in the train split")
    drop_path: float | None = option(None, "stochastic depth rate; default: the architecture's")
    pretrained: str | None = option(None, "fine-tune from own weights: .safetensors or a training checkpoint")
    # data
    data: str = option("", "ImageFolder root with train/ and val/, an image .tar, or a timm spec (hfds/..., wds/...)")
    train_split: str = option("train", "training split")
    val_split: str = option("val", "validation split ('' to skip evaluation)")
    train_images: int = option(0, "train on a fixed random subset of this many images (0: all)")
    workers: int = option(2, "data-loading processes per training process")
    # schedule
    epochs: int = option(300, "cosine schedule length in epochs (warmup included)")
    cooldown_epochs: int = option(0, "extra epochs at min_lr after the cosine schedule")
    warmup_epochs: float | None = option(None, "linear warmup epochs (from warmup_lr); default: auto, epochs / 15, "
                                             "at most 20 (the paper: 20 of 300)")
    batch_size: int = option(128, "images per process per micro-batch")
    accum_steps: int = option(1, "micro-batches accumulated per optimizer step")
    lr: float | None = option(None, "absolute learning rate; default: lr_base * global_batch / lr_base_size")
    lr_base: float = option(5e-3, "learning rate at global batch lr_base_size (linear scaling)")
    lr_base_size: int = option(4096, "global batch of lr_base")
    min_lr: float = option(5e-6, "final learning rate of the cosine")
    warmup_lr: float = option(1e-6, "learning rate at the start of warmup")
    sched: str = option("cosine", "timm scheduler name, stepped every optimizer step (cosine, poly, multistep, ...)")
    decay_milestones: list | None = option(None, "multistep: epochs at which the lr is multiplied by decay_rate")
    decay_rate: float = option(0.1, "multistep: lr factor at each milestone")
    # optimizer
    opt: str = option("adamw", "timm optimizer name (adamw, lamb, sgd, ...)")
    weight_decay: float = option(0.05, "weight decay (not applied to biases, norms, layer scales)")
    opt_betas: list | None = option(None, "optimizer betas, e.g. 0.9 0.999")
    opt_eps: float | None = option(None, "optimizer epsilon")
    momentum: float = option(0.9, "momentum for SGD-like optimizers")
    clip_grad: float | None = option(5.0, "gradient clipping value (None: off)")
    clip_mode: str = option("norm", "gradient clipping mode: norm, value or agc")
    layer_decay: float | None = option(None, "layer-wise lr decay for fine-tuning, e.g. 0.8")
    # EMA
    model_ema: bool = option(True, "keep an EMA of the weights (best.safetensors: the better of raw and EMA)")
    ema_decay: float | None = option(None, "EMA decay per optimizer step; default: auto, an EMA horizon "
                                         f"1/(1-decay) of {EMA_HORIZON_FRACTION:.0%} of the optimizer steps, "
                                         f"at most {EMA_MAX_DECAY}")
    ema_warmup: bool = option(False, "EMA decay warmup (timm ModelEmaV3)")
    # speed
    amp: str = option("none", "mixed precision: none, bf16 or fp16 (with a grad scaler)")
    channels_last: bool = option(False, "channels_last memory format")
    grad_checkpointing: bool = option(False, "activation checkpointing (less memory, more compute)")
    compile: bool = option(False, "torch.compile the model")
    sync_bn: bool = option(False, "SyncBatchNorm across ranks (GPU only)")
    device: str | None = option(None, "cuda or cpu; default: cuda when available")
    threads: int = option(0, "CPU compute threads (0: auto, the CPUs left after the loader workers; "
                           "OMP_NUM_THREADS wins)")
    # run
    output: str = option("runs/train", "output folder")
    resume: str | None = option(None, "resume from a training checkpoint (file or run folder); on the command line "
                                    "the run's saved settings become the defaults and its folder the output")
    overwrite: bool = option(False, "train into an output folder that already holds a run (its last.pt), replacing it")
    checkpoint_steps: int = option(0, "also write last.pt every N optimizer steps (0: per epoch only)")
    eval_every: int = option(1, "evaluate every N epochs (and after the last)")
    log_interval: int = option(20, "optimizer steps between progress/TensorBoard updates and NaN checks")
    seed: int = option(0, "random seed")
    deterministic: bool = option(False, "deterministic algorithms (with workers=0: bit-exact resume)")
    tensorboard: bool = option(True, "write TensorBoard logs to OUTPUT/tb")
    progress: bool = option(True, "show a tqdm progress bar (on a terminal; none when stderr is a file or pipe)")

    #: The task this config trains (the key of the task registry, ``open_fastervit.train.task``).
    TASK: ClassVar[str] = ""

    @property
    def total_epochs(self) -> int:
        """Epochs of the schedule plus the cooldown."""
        return self.epochs + self.cooldown_epochs

    def invalid_values(self) -> list[str]:
        """One message per field out of its range, naming it as its command-line option
        (``--img-size must be >= 1, got 0``); a task's config adds its own fields through
        :meth:`positive_fields` / :meth:`non_negative_fields`."""
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "accum_steps": self.accum_steps,
                    "lr_base_size": self.lr_base_size, "log_interval": self.log_interval,
                    "eval_every": self.eval_every, **self.positive_fields()}
        bad = [f"{_flag(k)} must be >= 1, got {v}" for k, v in positive.items() if v is not None and v < 1]
        non_negative = {"workers": self.workers, "warmup_epochs": self.warmup_epochs,
                        "cooldown_epochs": self.cooldown_epochs, "checkpoint_steps": self.checkpoint_steps,
                        "train_images": self.train_images, "threads": self.threads, **self.non_negative_fields()}
        bad += [f"{_flag(k)} must be >= 0, got {v}" for k, v in non_negative.items() if v is not None and v < 0]
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            bad.append(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        return bad

    def positive_fields(self) -> dict[str, Any]:
        """A task's own fields that must be >= 1 (``None``: unset, passes)."""
        return {}

    def non_negative_fields(self) -> dict[str, Any]:
        """A task's own fields that must not be negative (``None``: unset, passes)."""
        return {}

    def check(self) -> None:
        """Errors for arguments that cannot work, before anything is built (unset auto fields pass).

        Raises:
            ValueError: a value out of range or a contradictory combination, named in the message.
        """
        bad = self.invalid_values()
        if bad:
            raise ValueError(f"invalid training arguments: {'; '.join(bad)}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {list(AMP_DTYPES)}, got {self.amp!r}")


def _flag(name: str) -> str:
    """A config field as its command-line option (Python callers see the same name with ``-`` for ``_``)."""
    return "--" + name.replace("_", "-")


def check_config(cfg: RunConfig) -> None:
    """Errors for arguments that cannot work, before anything is built (unset auto fields pass): ``cfg.check()``.

    Raises:
        ValueError: a value out of range or a contradictory combination, named in the message.
    """
    cfg.check()


#: Config fields holding a file or folder given relative to the working directory (``config.json`` stores them
#: absolute, so that ``--resume RUN`` works from anywhere).
PATH_FIELDS = ("data", "data_dir", "pretrained", "official_checkpoint", "backbone_checkpoint", "train_ann", "val_ann",
               "output")


def absolute_paths(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with each :data:`PATH_FIELDS` value that names an existing path made absolute (others kept:
    dataset names, timm specs such as ``hfds/...``, unset fields)."""
    out = dict(settings)
    for key in PATH_FIELDS:
        value = out.get(key)
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            out[key] = str(Path(value).expanduser().resolve())
    return out
