"""Training and fine-tuning of FasterViT (or any timm model) with the published recipe, on 1..N processes.

``train(TrainConfig(...))`` is the API; ``fastervit train`` / ``python -m open_fastervit.cli train`` (also under
``torchrun``) is a thin CLI over it whose options are generated from ``TrainConfig``. What is reused:
timm for datasets, transforms, Mixup/CutMix, losses, optimizers (AdamW, LAMB, layer-wise lr decay),
the per-iteration cosine schedule, ``ModelEmaV3`` and BatchNorm averaging; torch for DDP, AMP and
``torch.compile``; tqdm, TensorBoard and matplotlib for progress and results. What timm lacks is here
(MESA self-distillation in ``mesa.py``) or in ``data.py`` / ``checkpoint.py`` (exact resume).

A run writes into ``output``: ``last.pt`` (resumable state, every epoch and every
``checkpoint_steps`` optimizer steps; a folder already holding one is refused unless ``resume`` continues it or
``overwrite`` is set), ``last.safetensors`` / ``last_ema.safetensors`` (weights),
``best.safetensors`` (the best top-1 over epochs of the raw and the EMA weights, whichever scored higher;
``results.json`` says which as ``best_weights``), ``summary.csv``, ``curves.png``, ``tb/`` (TensorBoard),
``config.json`` (the settings used, auto ones resolved) and ``results.json``.

Defaults suit short runs on small data; the paper's ImageNet recipe comes with ``--recipe``. Fields left
unset (``None``; ``aa="auto"``) are chosen at start from the run's length and data and logged
(``resolve_auto_settings``): the EMA decay from the number of optimizer steps, the warmup from the number
of epochs, and the augmentation (RandAugment, mixup, cutmix, random erasing) from the number of training
images and epochs. A value that is set, even to the old default, is always used as given.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checkpoint import capture_rng, load_checkpoint, read_progress, restore_rng, save_checkpoint
from .data import (
    DatasetError,
    LoaderOptions,
    build_eval_loader,
    build_train_loader,
    class_names,
    describe_data,
    ensure_randaugment_compat,
    open_dataset,
    shutdown_workers,
)
from .distributed import DistInfo, average_bn_stats, cleanup, init_distributed, rank_divergence, reduce_sums
from .mesa import MesaLoss

__all__ = ["RunExistsError", "TrainConfig", "Trainer", "TrainingDiverged", "TrainingInterrupted", "run_training",
           "train"]

AMP_DTYPES = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}

#: The paper's ImageNet augmentation (``--recipe``; the auto choice for large, long runs).
PAPER_AUGMENTATION: dict[str, Any] = {"aa": "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0, "reprob": 0.25}
#: Light augmentation (random resized crop, flip, color jitter, label smoothing): the auto choice otherwise.
LIGHT_AUGMENTATION: dict[str, Any] = {"aa": None, "mixup": 0.0, "cutmix": 0.0, "reprob": 0.0}
#: The auto augmentation is the paper's from this many training images ...
FULL_AUG_MIN_IMAGES = 100_000
#: ... and this many epochs on; heavy augmentation slows learning down and only pays off on long runs.
FULL_AUG_MIN_EPOCHS = 100
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
#: Fields chosen at start when left unset, and the value that means "unset".
AUTO_FIELDS: dict[str, Any] = {"ema_decay": None, "warmup_epochs": None, "aa": "auto", "mixup": None,
                               "cutmix": None, "reprob": None}


def _opt(default: Any, help_text: str) -> Any:
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
    model: str = _opt("fastervit_0", "timm model name")
    model_kwargs: dict = _opt({}, "architecture overrides, e.g. dim, depths, window_size (CLI: JSON)")
    num_classes: int | None = _opt(None, "classifier size; default: the number of classes in the train split")
    drop_path: float | None = _opt(None, "stochastic depth rate; default: the architecture's")
    pretrained: str | None = _opt(None, "fine-tune from own weights: .safetensors or a training checkpoint")
    # data
    data: str = _opt("", "ImageFolder root with train/ and val/, an image .tar, or a timm spec (hfds/..., wds/...)")
    train_split: str = _opt("train", "training split")
    val_split: str = _opt("val", "validation split ('' to skip evaluation)")
    train_images: int = _opt(0, "train on a fixed random subset of this many images (0: all)")
    workers: int = _opt(2, "data-loading processes per training process")
    # schedule
    epochs: int = _opt(300, "cosine schedule length in epochs (warmup included)")
    cooldown_epochs: int = _opt(0, "extra epochs at min_lr after the cosine schedule")
    warmup_epochs: float | None = _opt(None, "linear warmup epochs (from warmup_lr); default: auto, epochs / 15, "
                                             "at most 20 (the paper: 20 of 300)")
    batch_size: int = _opt(128, "images per process per micro-batch")
    accum_steps: int = _opt(1, "micro-batches accumulated per optimizer step")
    lr: float | None = _opt(None, "absolute learning rate; default: lr_base * global_batch / lr_base_size")
    lr_base: float = _opt(5e-3, "learning rate at global batch lr_base_size (linear scaling)")
    lr_base_size: int = _opt(4096, "global batch of lr_base")
    min_lr: float = _opt(5e-6, "final learning rate of the cosine")
    warmup_lr: float = _opt(1e-6, "learning rate at the start of warmup")
    sched: str = _opt("cosine", "timm scheduler name, stepped every optimizer step (cosine, poly, multistep, ...)")
    decay_milestones: list | None = _opt(None, "multistep: epochs at which the lr is multiplied by decay_rate")
    decay_rate: float = _opt(0.1, "multistep: lr factor at each milestone")
    # optimizer
    opt: str = _opt("adamw", "timm optimizer name (adamw, lamb, sgd, ...)")
    weight_decay: float = _opt(0.05, "weight decay (not applied to biases, norms, layer scales)")
    opt_betas: list | None = _opt(None, "optimizer betas, e.g. 0.9 0.999")
    opt_eps: float | None = _opt(None, "optimizer epsilon")
    momentum: float = _opt(0.9, "momentum for SGD-like optimizers")
    clip_grad: float | None = _opt(5.0, "gradient clipping value (None: off)")
    clip_mode: str = _opt("norm", "gradient clipping mode: norm, value or agc")
    layer_decay: float | None = _opt(None, "layer-wise lr decay for fine-tuning, e.g. 0.8")
    # EMA
    model_ema: bool = _opt(True, "keep an EMA of the weights (best.safetensors: the better of raw and EMA)")
    ema_decay: float | None = _opt(None, "EMA decay per optimizer step; default: auto, an EMA horizon "
                                         f"1/(1-decay) of {EMA_HORIZON_FRACTION:.0%} of the optimizer steps, "
                                         f"at most {EMA_MAX_DECAY}")
    ema_warmup: bool = _opt(False, "EMA decay warmup (timm ModelEmaV3)")
    # speed
    amp: str = _opt("none", "mixed precision: none, bf16 or fp16 (with a grad scaler)")
    channels_last: bool = _opt(False, "channels_last memory format")
    grad_checkpointing: bool = _opt(False, "activation checkpointing (less memory, more compute)")
    compile: bool = _opt(False, "torch.compile the model")
    sync_bn: bool = _opt(False, "SyncBatchNorm across ranks (GPU only)")
    device: str | None = _opt(None, "cuda or cpu; default: cuda when available")
    threads: int = _opt(0, "CPU compute threads (0: auto, the CPUs left after the loader workers; "
                           "OMP_NUM_THREADS wins)")
    # run
    output: str = _opt("runs/train", "output folder")
    resume: str | None = _opt(None, "resume from a training checkpoint (file or run folder); on the command line "
                                    "the run's saved settings become the defaults and its folder the output")
    overwrite: bool = _opt(False, "train into an output folder that already holds a run (its last.pt), replacing it")
    checkpoint_steps: int = _opt(0, "also write last.pt every N optimizer steps (0: per epoch only)")
    eval_every: int = _opt(1, "evaluate every N epochs (and after the last)")
    log_interval: int = _opt(20, "optimizer steps between progress/TensorBoard updates and NaN checks")
    seed: int = _opt(0, "random seed")
    deterministic: bool = _opt(False, "deterministic algorithms (with workers=0: bit-exact resume)")
    tensorboard: bool = _opt(True, "write TensorBoard logs to OUTPUT/tb")
    progress: bool = _opt(True, "show a tqdm progress bar")

    @property
    def total_epochs(self) -> int:
        return self.epochs + self.cooldown_epochs


@dataclass
class TrainConfig(RunConfig):
    """Image classification: the shared fields plus data, augmentation and distillation settings of the paper's
    ImageNet recipe."""

    # model
    official_checkpoint: str | None = _opt(None, "fine-tune from an official .pth.tar checkpoint")
    # data
    data_dir: str | None = _opt(None, "root folder for timm dataset specs")
    img_size: int | None = _opt(None, "square input size; default: the model's pretrained cfg input size")
    val_images: int = _opt(0, "evaluate on a fixed random subset of this many images (0: all)")
    # augmentation and regularisation
    smoothing: float = _opt(0.1, "label smoothing")
    mixup: float | None = _opt(None, "mixup alpha (0: off); default: auto, 0.8 for large long runs, else 0 "
                                     "(see aa)")
    cutmix: float | None = _opt(None, "cutmix alpha (0: off); default: auto, 1.0 for large long runs, else 0 "
                                      "(see aa)")
    mixup_prob: float = _opt(1.0, "probability of applying mixup or cutmix to a batch")
    mixup_switch_prob: float = _opt(0.5, "probability of cutmix instead of mixup")
    mixup_off_epoch: int = _opt(0, "turn mixup/cutmix off from this epoch (0: never)")
    aa: str | None = _opt("auto", "timm auto-augment spec (RandAugment); None or '': off; default: auto, "
                                  f"{PAPER_AUGMENTATION['aa']} when the train split has >= {FULL_AUG_MIN_IMAGES} "
                                  f"images and epochs >= {FULL_AUG_MIN_EPOCHS}, else off")
    reprob: float | None = _opt(None, "random erasing probability; default: auto, 0.25 for large long runs, "
                                      "else 0 (see aa)")
    remode: str = _opt("pixel", "random erasing mode")
    recount: int = _opt(1, "random erasing count")
    scale: list = _opt([0.08, 1.0], "RandomResizedCrop scale range")
    ratio: list = _opt([3 / 4, 4 / 3], "RandomResizedCrop aspect-ratio range")
    hflip: float = _opt(0.5, "horizontal flip probability")
    color_jitter: float = _opt(0.4, "color jitter (used when aa is off)")
    train_interpolation: str = _opt("random", "train resize interpolation ('' : the model's)")
    augment: bool = _opt(True, "training augmentation (off: resize + center crop only, as for evaluation)")
    # MESA
    mesa: float = _opt(0.0, "MESA self-distillation coefficient (0: off; needs model_ema)")
    mesa_start: float = _opt(0.25, "fraction of training after which MESA starts")


class TrainingDiverged(FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""


class RunExistsError(ValueError):
    """The output folder already holds a training run (``last.pt``) and neither ``resume`` nor ``overwrite`` is set."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C / SIGINT (a ``KeyboardInterrupt``, so ``except KeyboardInterrupt`` still catches it),
    with where it stopped and the checkpoint to continue from.

    Attributes:
        output: the run folder (what ``--resume`` takes).
        epoch: 1-based epoch in progress; ``None`` when interrupted before training started.
        step: optimizer steps done in that epoch.
        steps_per_epoch: optimizer steps per epoch (``None`` when unknown).
        checkpoint: the last resumable checkpoint written (or resumed from), ``None`` when there is none.
    """

    def __init__(self, output: str, epoch: int | None, step: int, steps_per_epoch: int | None,
                 checkpoint: str | None) -> None:
        self.output, self.epoch, self.step = output, epoch, step
        self.steps_per_epoch, self.checkpoint = steps_per_epoch, checkpoint
        super().__init__(self.hint())

    def __reduce__(self) -> tuple[type, tuple[Any, ...]]:  # picklable despite the extra constructor arguments
        return type(self), (self.output, self.epoch, self.step, self.steps_per_epoch, self.checkpoint)

    def hint(self, command: str = "fastervit train") -> str:
        """One line: where training stopped, the last checkpoint and the command that continues the run."""
        if self.epoch is None:
            where = "interrupted before training started"
        else:
            of = f"/{self.steps_per_epoch}" if self.steps_per_epoch else ""
            where = f"interrupted at epoch {self.epoch}, step {self.step}{of}"
        if self.checkpoint is None:
            return f"{where}; no checkpoint written yet (nothing to resume): start the run again"
        in_output = Path(self.checkpoint) in (Path(self.output), Path(self.output) / "last.pt")
        # resumed from elsewhere and interrupted before the first checkpoint here: continue from that one
        target = self.output if in_output else f"{self.checkpoint} --output {self.output}"
        return f"{where}; last checkpoint: {self.checkpoint}; continue with: {command} --resume {target}"


# ---- set-up ---------------------------------------------------------------------------------------------------


def check_config(cfg: RunConfig) -> None:
    """Errors for arguments that cannot work, before anything is built (unset auto fields pass).

    Raises:
        ValueError: a value out of range or a contradictory combination, named in the message.
    """
    positive = {"epochs": cfg.epochs, "batch_size": cfg.batch_size, "accum_steps": cfg.accum_steps,
                "lr_base_size": cfg.lr_base_size, "log_interval": cfg.log_interval, "eval_every": cfg.eval_every}
    bad = [f"{k}={v}" for k, v in positive.items() if v < 1]
    non_negative = {"workers": cfg.workers, "warmup_epochs": cfg.warmup_epochs, "cooldown_epochs": cfg.cooldown_epochs,
                    "checkpoint_steps": cfg.checkpoint_steps, "train_images": cfg.train_images,
                    **{k: getattr(cfg, k) for k in ("mesa", "mixup", "cutmix", "reprob") if hasattr(cfg, k)}}
    bad += [f"{k}={v}" for k, v in non_negative.items() if v is not None and v < 0]
    if cfg.ema_decay is not None and not 0 <= cfg.ema_decay < 1:
        bad.append(f"ema_decay={cfg.ema_decay}")
    if bad:
        raise ValueError(f"invalid training arguments: {', '.join(bad)}")
    if cfg.amp not in AMP_DTYPES:
        raise ValueError(f"amp must be one of {list(AMP_DTYPES)}, got {cfg.amp!r}")
    if not isinstance(cfg, TrainConfig):
        return
    if cfg.mesa > 0 and not cfg.model_ema:
        raise ValueError("MESA distils from the EMA model: set model_ema=True or mesa=0")
    if ((cfg.mixup or 0) > 0 or (cfg.cutmix or 0) > 0) and cfg.batch_size % 2:
        raise ValueError(f"mixup/cutmix need an even batch size, got {cfg.batch_size}")
    if cfg.pretrained and cfg.official_checkpoint:
        raise ValueError("give either pretrained (own weights) or official_checkpoint, not both")


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


#: What a training run writes into its output folder (files, and the TensorBoard folder ``tb``).
RUN_OUTPUTS = ("last.pt", "last.safetensors", "last_ema.safetensors", "best.safetensors", "results.json",
               "summary.csv", "curves.png", "config.json", "tb")


def remove_run_outputs(folder: Path) -> list[str]:
    """Delete the outputs of a run (:data:`RUN_OUTPUTS`) from ``folder``, nothing else; returns the names removed.
    Used by ``overwrite``, so that e.g. an old ``last_ema.safetensors`` or old TensorBoard events cannot pass for the
    new run's."""
    removed = []
    for name in RUN_OUTPUTS:
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        removed.append(name)
    return removed


def check_output(cfg: RunConfig) -> None:
    """Refuse to start a new run in a folder that holds another run's ``last.pt`` (it would be overwritten at the
    first checkpoint): allowed with ``resume`` continuing that very file or with ``overwrite``.

    Raises:
        RunExistsError: one line naming the run, the epoch its ``last.pt`` reached, ``--resume`` and ``--output``.
    """
    last = Path(cfg.output).expanduser() / "last.pt"
    if getattr(cfg, "overwrite", False) or not last.is_file():
        return
    if cfg.resume:
        source = Path(cfg.resume).expanduser()
        source = source / "last.pt" if source.is_dir() else source
        if source.exists() and source.resolve() == last.resolve():
            return
    progress = read_progress(last)
    if progress is None:
        reached = "unreadable"
    elif progress.get("step_in_epoch"):
        reached = f"from epoch {progress['epoch'] + 1}, step {progress['step_in_epoch']}"
    else:
        reached = f"from epoch {progress.get('epoch', 0)}"
    run = cfg.output
    raise RunExistsError(f"{run} already holds a training run (last.pt {reached}): pass --resume {run} to continue "
                         "it, or choose another --output (--overwrite replaces it)")


def global_batch(cfg: TrainConfig, world_size: int) -> int:
    """Images per optimizer step over all processes."""
    return cfg.batch_size * cfg.accum_steps * world_size


def effective_lr(cfg: TrainConfig, world_size: int) -> float:
    """``cfg.lr`` if given, else the recipe lr scaled linearly: lr_base * global_batch / lr_base_size."""
    if cfg.lr is not None:
        return cfg.lr
    return cfg.lr_base * global_batch(cfg, world_size) / cfg.lr_base_size


# ---- settings chosen from the run's length and data ----------------------------------------------------------


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


def auto_augmentation(train_images: int | None, epochs: int) -> tuple[dict[str, Any], str]:
    """The paper's augmentation (``PAPER_AUGMENTATION``: RandAugment, mixup 0.8, cutmix 1.0, random erasing 0.25)
    for at least ``FULL_AUG_MIN_IMAGES`` training images and ``FULL_AUG_MIN_EPOCHS`` epochs, else light
    augmentation (``LIGHT_AUGMENTATION``: crop, flip, color jitter). Returns the settings and the reason."""
    if train_images is not None and train_images >= FULL_AUG_MIN_IMAGES and epochs >= FULL_AUG_MIN_EPOCHS:
        return dict(PAPER_AUGMENTATION), (f"the paper's ImageNet augmentation ({train_images} training images "
                                          f">= {FULL_AUG_MIN_IMAGES} and {epochs} epochs >= {FULL_AUG_MIN_EPOCHS})")
    size = "an unknown number of" if train_images is None else str(train_images)
    return dict(LIGHT_AUGMENTATION), (
        f"light augmentation ({size} training images, {epochs} epochs; the paper's RandAugment/mixup/cutmix/"
        f"erasing is chosen from {FULL_AUG_MIN_IMAGES} images and {FULL_AUG_MIN_EPOCHS} epochs, or with --recipe)"
    )


def _is_unset(cfg: TrainConfig, name: str) -> bool:
    value = getattr(cfg, name)
    return value is None if AUTO_FIELDS[name] is None else value == AUTO_FIELDS[name]


def resolve_augmentation(cfg: TrainConfig, train_images: int | None) -> tuple[TrainConfig, dict[str, str]]:
    """``cfg`` with unset ``aa``/``mixup``/``cutmix``/``reprob`` chosen by :func:`auto_augmentation`
    (light when ``augment`` is off; no mixup/cutmix for an odd batch). Returns it and ``{field: reason}``."""
    unset = [name for name in ("aa", "mixup", "cutmix", "reprob") if _is_unset(cfg, name)]
    if not unset:
        return cfg, {}
    settings, reason = auto_augmentation(train_images, cfg.epochs)
    if not cfg.augment:
        settings, reason = dict(LIGHT_AUGMENTATION), "augment is off"
    elif cfg.batch_size % 2 and settings["mixup"] + settings["cutmix"] > 0:
        settings.update(mixup=0.0, cutmix=0.0)
        reason += f"; no mixup/cutmix with the odd batch size {cfg.batch_size}"
    changes = {name: settings[name] for name in unset}
    return dataclasses.replace(cfg, **changes), {name: reason for name in changes}


def resolve_schedule_settings(cfg: TrainConfig, steps_per_epoch: int) -> tuple[TrainConfig, dict[str, str]]:
    """``cfg`` with an unset ``warmup_epochs`` (:func:`auto_warmup_epochs`) and, when ``model_ema`` is on, an unset
    ``ema_decay`` (:func:`auto_ema_decay` of all optimizer steps, cooldown included) chosen.
    Returns it and ``{field: reason}``."""
    changes: dict[str, Any] = {}
    reasons: dict[str, str] = {}
    if _is_unset(cfg, "warmup_epochs"):
        changes["warmup_epochs"] = auto_warmup_epochs(cfg.epochs)
        reasons["warmup_epochs"] = f"{cfg.epochs} epochs / {WARMUP_EPOCHS_DIVISOR}, at most {MAX_AUTO_WARMUP_EPOCHS:g}"
    if _is_unset(cfg, "ema_decay") and cfg.model_ema:
        total = steps_per_epoch * cfg.total_epochs
        changes["ema_decay"] = auto_ema_decay(total)
        horizon = 1 / (1 - changes["ema_decay"])
        reasons["ema_decay"] = (f"EMA horizon {horizon:.0f} optimizer steps: {EMA_HORIZON_FRACTION:.0%} of {total}, "
                                f"at least {EMA_MIN_HORIZON}, decay at most {EMA_MAX_DECAY}")
    return (dataclasses.replace(cfg, **changes) if changes else cfg), reasons


def resolve_auto_settings(cfg: TrainConfig, train_images: int | None,
                          steps_per_epoch: int) -> tuple[TrainConfig, dict[str, str]]:
    """``cfg`` with every unset auto field (``AUTO_FIELDS``) chosen for a run of ``steps_per_epoch`` optimizer
    steps per epoch on ``train_images`` images (None: unknown); set fields are kept as given.
    Returns the resolved config and ``{field: reason}`` for the fields chosen."""
    cfg, reasons = resolve_augmentation(cfg, train_images)
    cfg, more = resolve_schedule_settings(cfg, steps_per_epoch)
    return cfg, {**reasons, **more}


def describe_auto_settings(cfg: TrainConfig, reasons: dict[str, str]) -> str:
    """One log line: the auto-chosen values, grouped by reason."""
    groups: dict[str, list[str]] = {}
    for name, reason in reasons.items():
        value = getattr(cfg, name)
        groups.setdefault(reason, []).append(f"{name}={value:.6g}" if isinstance(value, float) else f"{name}={value}")
    return "auto settings (set them to override): " + "; ".join(
        f"{', '.join(values)} ({reason})" for reason, values in groups.items())


def cpu_threads(cfg: TrainConfig) -> int:
    """Intra-op threads for CPU training: ``cfg.threads``, else the CPUs this process may use minus its
    loader workers (at least 1). Oversubscribed OpenMP threads stall each other badly on small machines."""
    if cfg.threads > 0:
        return cfg.threads
    if "OMP_NUM_THREADS" in os.environ:
        return torch.get_num_threads()
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    per_process = cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, per_process - cfg.workers)


def fused_optimizer_kwargs(model: nn.Module | list[torch.Tensor], opt: str) -> dict[str, Any]:
    """``{"fused": True}`` for torch's Adam/AdamW when every parameter is a float tensor on CPU or CUDA, where torch
    has a fused kernel (one kernel for all tensors instead of a loop over them); else ``{}``."""
    if opt.lower() not in ("adam", "adamw"):
        return {}
    params = list(model) if isinstance(model, list) else list(model.parameters())
    ok = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return {"fused": True} if params and ok else {}


def create_optimizer(model: nn.Module | list[dict[str, Any]], cfg: Any, lr: float) -> torch.optim.Optimizer:
    """timm optimizer (AdamW, LAMB, ...) without weight decay on biases, norms and ``no_weight_decay()``
    parameters (layer scales), with layer-wise lr decay through the model's ``group_matcher`` if asked;
    Adam/AdamW use torch's fused kernel where it exists.

    ``model`` may also be a list of parameter groups (``{"params", "weight_decay", "lr_scale"}`` dicts, e.g. a
    detector's groups), used as given: weight decay and layer decay are then the groups' own."""
    from timm.optim import create_optimizer_v2

    groups = isinstance(model, list)
    params = [p for group in model for p in group["params"]] if groups else list(model.parameters())
    extra: dict[str, Any] = fused_optimizer_kwargs(params, cfg.opt)
    if cfg.opt_betas:
        extra["betas"] = tuple(cfg.opt_betas)
    if cfg.opt_eps is not None:
        extra["eps"] = cfg.opt_eps
    return create_optimizer_v2(model, opt=cfg.opt, lr=lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum,
                               filter_bias_and_bn=not groups, layer_decay=None if groups else cfg.layer_decay,
                               **extra)


def create_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int) -> tuple[Any, int]:
    """timm lr schedule stepped every optimizer step: linear warmup from ``warmup_lr``, cosine to ``min_lr``
    over ``epochs``, then ``cooldown_epochs`` at ``min_lr``. Returns (scheduler, total epochs)."""
    from timm.scheduler import create_scheduler_v2

    return create_scheduler_v2(
        optimizer, sched=cfg.sched, num_epochs=cfg.epochs, cooldown_epochs=cfg.cooldown_epochs, min_lr=cfg.min_lr,
        warmup_lr=cfg.warmup_lr, warmup_epochs=cfg.warmup_epochs, step_on_epochs=False,
        updates_per_epoch=steps_per_epoch, decay_rate=cfg.decay_rate,
        **({"decay_milestones": [int(m) for m in cfg.decay_milestones]} if cfg.decay_milestones else {}),
    )


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _log(info: DistInfo, message: str) -> None:
    if info.is_primary:
        from tqdm import tqdm

        tqdm.write(message, file=sys.stderr)


def _create_model(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module, list[str]]:
    """The model with its initial weights (``open_fastervit.load_model``: random, our weights or the official ones,
    a head of another class count re-initialised); returns it and the list of re-initialised classifier keys."""
    from .loading import load_model

    kwargs = dict(cfg.model_kwargs)
    if cfg.drop_path is not None:
        kwargs["drop_path_rate"] = cfg.drop_path
    # our weights: the EMA ones first; the official ones: their state_dict, as the authors fine-tune
    source, use_ema = (cfg.official_checkpoint, False) if cfg.official_checkpoint else (cfg.pretrained, None)
    if source:
        model = load_model(source, architecture=cfg.model, num_classes=num_classes, head="resize", use_ema=use_ema,
                           model_kwargs=kwargs)
    else:
        model = load_model(cfg.model, num_classes=num_classes, pretrained=False, model_kwargs=kwargs)
    return model.train(), list(model.weights_info.get("reinitialized", []))


def _transforms(cfg: TrainConfig, model: nn.Module) -> tuple[Any, Any, dict]:
    """timm train / eval transforms from the model's pretrained cfg (size overridden by img_size).

    Unresolved auto augmentation fields (see ``resolve_augmentation``) count as off here."""
    from timm.data import create_transform, resolve_data_config

    ensure_randaugment_compat()
    aa = cfg.aa if cfg.aa and cfg.aa.lower() not in ("auto", "none") else None
    data_cfg = resolve_data_config({"img_size": cfg.img_size} if cfg.img_size else {}, model=model)
    interpolation = cfg.train_interpolation or data_cfg["interpolation"]
    train_tf = create_transform(
        data_cfg["input_size"], is_training=True, no_aug=not cfg.augment, scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio), hflip=cfg.hflip, color_jitter=cfg.color_jitter, auto_augment=aa,
        interpolation=interpolation,
        mean=data_cfg["mean"], std=data_cfg["std"], re_prob=cfg.reprob or 0.0, re_mode=cfg.remode, re_count=cfg.recount,
    )
    eval_tf = create_transform(
        data_cfg["input_size"], is_training=False, interpolation=data_cfg["interpolation"], mean=data_cfg["mean"],
        std=data_cfg["std"], crop_pct=data_cfg["crop_pct"], crop_mode=data_cfg.get("crop_mode"),
    )
    return train_tf, eval_tf, data_cfg


def _subset(size: int, count: int, seed: int) -> list[int] | None:
    """A fixed random subset of ``count`` indices (sorted), or None for all."""
    if not count or count >= size:
        return None
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=generator)[:count].tolist())


def _open_data(cfg: TrainConfig) -> tuple[Any, Any]:
    """Train and (optional) val datasets, checked to agree on their classes."""
    train_set = open_dataset(cfg.data, cfg.train_split, is_training=True, data_dir=cfg.data_dir, seed=cfg.seed,
                             batch_size=cfg.batch_size)
    val_set = None
    if cfg.val_split:
        val_set = open_dataset(cfg.data, cfg.val_split, is_training=False, data_dir=cfg.data_dir,
                               batch_size=cfg.batch_size)
        train_names, val_names = class_names(train_set), class_names(val_set)
        if train_names and val_names and train_names != val_names:
            raise DatasetError(
                f"the {cfg.train_split!r} and {cfg.val_split!r} splits have different classes "
                f"({len(train_names)} vs {len(val_names)}; first differences "
                f"{sorted(set(train_names) ^ set(val_names))[:5]})"
            )
    return train_set, val_set


def _train_count(cfg: TrainConfig, train_set: Any) -> int | None:
    """Training images per epoch (the ``train_images`` subset when smaller), None when the dataset has no length."""
    size = len(train_set) if hasattr(train_set, "__len__") else None
    if size is None:
        return cfg.train_images or None
    return min(size, cfg.train_images) if cfg.train_images else size


def _num_classes(cfg: TrainConfig, train_set: Any) -> int:
    names = class_names(train_set)
    if cfg.num_classes is None:
        if names is None:
            raise DatasetError("cannot infer the number of classes from this dataset; pass num_classes")
        return len(names)
    if names is not None and len(names) > cfg.num_classes:
        raise DatasetError(f"the train split has {len(names)} classes but num_classes={cfg.num_classes}")
    return cfg.num_classes


def _check_sample(dataset: Any, transform: Any, in_chans: int) -> None:
    """Decode one training image through the transform: a clear error for mis-shaped data."""
    if not hasattr(dataset, "__getitem__"):
        return
    dataset.transform = transform
    image, target = dataset[0][:2]
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != in_chans:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise DatasetError(f"training samples decode to {shape}; expected ({in_chans}, H, W) images")
    if not isinstance(target, int) or target < 0:
        raise DatasetError(f"training targets must be class indices >= 0, got {target!r}")


def _unused_parameters(model: nn.Module, input_size: tuple[int, ...], device: torch.device) -> list[str]:
    """Parameters that receive no gradient at this input size (one eval-mode pass, no RNG, no BN update).

    An any-resolution FasterViT leaves the carrier-token weights of a stage unused when its map holds a
    single window; DDP must be told (``find_unused_parameters``) or it waits for their gradients forever.
    """
    was_training = model.training
    model.eval()
    try:
        model(torch.zeros(1, *input_size, device=device)).float().sum().backward()
        unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return unused


# ---- results ------------------------------------------------------------------------------------------------


def json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None (null), so the file is strict JSON (JavaScript's ``JSON.parse``
    rejects NaN); the Python result dict keeps its NaNs."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_summary_csv(history: list[dict[str, Any]], path: Path) -> None:
    """One row per epoch (columns: the union of the rows' keys, in first-seen order), written atomically."""
    from .weights import atomic_write

    columns = list(dict.fromkeys(key for row in history for key in row))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)

    atomic_write(path, write)


def plot_curves(history: list[dict[str, Any]], curve: list[list[float]], steps_per_epoch: int, path: Path,
                metric: str = "top1", metric_title: str = "top-1 (%)") -> None:
    """PNG of the training curves with matplotlib's Agg backend: loss, the validation ``metric`` (raw and EMA)
    and lr against epochs.

    Train loss and lr are drawn per logging interval (``curve``), validation metrics per epoch.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(13, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    loss_axis, top1_axis, lr_axis = figure.subplots(1, 3)
    if curve:
        steps, losses, lrs = zip(*curve)
        epochs = [step / max(steps_per_epoch, 1) for step in steps]
        loss_axis.plot(epochs, losses, label="train loss", linewidth=1)
        lr_axis.plot(epochs, lrs, label="lr", linewidth=1)
    name = metric_title.split(" (")[0]
    series = [(loss_axis, "loss", "val loss"), (loss_axis, "ema_loss", "EMA val loss"),
              (top1_axis, metric, name), (top1_axis, f"ema_{metric}", f"EMA {name}")]
    for axis, key, label in series:
        points = [(row["epoch"], row[key]) for row in history if key in row]
        if points:
            axis.plot(*zip(*points), marker="o", markersize=3, label=label)
    for axis, title in ((loss_axis, "loss"), (top1_axis, metric_title), (lr_axis, "learning rate")):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    figure.savefig(path, dpi=110)


# ---- the run --------------------------------------------------------------------------------------------------


@dataclass
class _Progress:
    """Position in training, saved in every checkpoint."""

    epoch: int = 0  # current (0-based) epoch
    step_in_epoch: int = 0  # optimizer steps done in the current epoch
    global_step: int = 0
    best_top1: float = -math.inf  # the selection score of best.safetensors (top-1 of the better weights)
    best_epoch: int = -1
    best_weights: str = ""  # "raw" or "ema": which weights best.safetensors holds
    best_raw_top1: float = math.nan  # raw and EMA top-1 of the best epoch
    best_ema_top1: float = math.nan
    loss_sum: float = 0.0  # running sums of the current epoch (for the CSV)
    loss_count: int = 0
    history: list = field(default_factory=list)  # one dict per epoch (summary.csv)
    curve: list = field(default_factory=list)  # [global_step, train loss, lr] every log_interval steps


class Trainer:
    """One training run: built from a config, then ``fit()``.

    The machinery (DDP, AMP, optimizer and lr schedule, EMA, gradient accumulation and clipping, exact resume with
    atomic checkpoints, NaN detection, progress bar, TensorBoard, CSV, curves and results.json) is shared by every
    task; a task changes only the hooks: ``_setup_data_and_model`` (datasets, loaders, model, ``class_names``),
    ``_to_device`` (a batch), ``_forward_loss``, ``evaluate`` (a dict holding ``metric``), ``_describe_metrics``,
    ``_weights_metadata``, ``_optimizer_params`` and ``_ddp_unused``. This class is image classification; detection
    and segmentation subclass it (``open_fastervit.detection.train``, ``open_fastervit.segmentation.train``).
    """

    #: The validation metric (higher is better) that selects best.safetensors and names the result keys.
    metric = "top1"
    #: How the metric is shown (plots and logs).
    metric_title = "top-1 (%)"

    def __init__(self, cfg: TrainConfig, info: DistInfo) -> None:
        self.cfg, self.info, self.device = cfg, info, info.device
        self.out = Path(cfg.output)
        check_output(cfg)
        self.started = time.perf_counter()
        self.auto_reasons: dict[str, str] = {}  # {field: why} for the settings chosen at start
        self.progress = _Progress()
        self.class_names: list[str] | None = None
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=info.device)  # any NaN/inf loss unchecked
        self._setup_determinism()
        self._setup_data_and_model()
        self._setup_optimization()
        self.resumed_from: str | None = None
        self.last_checkpoint: str | None = None  # the newest resumable state: written here, or resumed from
        if cfg.resume:
            self._resume(cfg.resume)
        if info.is_primary:
            if getattr(cfg, "overwrite", False) and not cfg.resume:
                remove_run_outputs(self.out)  # no file of the replaced run survives to be mistaken for this one's
            self.out.mkdir(parents=True, exist_ok=True)
            settings = absolute_paths(asdict(self.cfg))  # `--resume RUN` works from any working directory
            (self.out / "config.json").write_text(json.dumps(settings, indent=2))  # auto fields resolved
        self.writer = self._tensorboard()

    # -- set-up

    def _setup_determinism(self) -> None:
        cfg = self.cfg
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.benchmark = False
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        elif self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.amp = cfg.amp
        if self.amp == "fp16" and self.device.type != "cuda":
            _log(self.info, "note: fp16 AMP needs a GPU; training in float32 on CPU (use --amp bf16 to try bf16)")
            self.amp = "none"
        self.amp_dtype = AMP_DTYPES[self.amp]

    def _setup_data_and_model(self) -> None:
        cfg, info = self.cfg, self.info
        self.train_set, self.val_set = _open_data(cfg)
        self.num_classes = _num_classes(cfg, self.train_set)
        cfg, self.auto_reasons = resolve_augmentation(cfg, _train_count(cfg, self.train_set))
        self.cfg = cfg
        _seed_everything(cfg.seed)  # same initial weights on every rank
        model, self.reinitialised = _create_model(cfg, self.num_classes)
        if self.reinitialised:
            _log(info, f"classifier {', '.join(self.reinitialised)} re-initialised for {self.num_classes} classes")
        self.class_names = class_names(self.train_set)
        train_tf, eval_tf, self.data_cfg = _transforms(cfg, model)
        _check_sample(self.train_set, train_tf, self.data_cfg["input_size"][0])
        self._build_loaders(train_tf, eval_tf)
        cfg, reasons = resolve_schedule_settings(cfg, self.steps_per_epoch)
        self.cfg, self.auto_reasons = cfg, {**self.auto_reasons, **reasons}
        if self.auto_reasons:
            _log(info, describe_auto_settings(cfg, self.auto_reasons))
        self.model = self._place_model(model)
        self.ema = None
        if cfg.model_ema:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(self.model, decay=cfg.ema_decay, use_warmup=cfg.ema_warmup)
        self.train_model = self._wrap_model(self.model)
        _seed_everything(cfg.seed + info.rank)  # per-rank augmentation / drop-path randomness

    def _build_loaders(self, train_tf: Any, eval_tf: Any) -> None:
        cfg, info = self.cfg, self.info
        options = LoaderOptions(workers=cfg.workers, pin_memory=self.device.type == "cuda")
        self.train_loader = build_train_loader(
            self.train_set, train_tf, cfg.batch_size, options, world_size=info.world_size, rank=info.rank,
            accum_steps=cfg.accum_steps, seed=cfg.seed,
            indices=_subset(len(self.train_set) if hasattr(self.train_set, "__len__") else 0, cfg.train_images,
                            cfg.seed),
        )
        self.steps_per_epoch = self.train_loader.steps_per_epoch
        self.val_loader = None
        if self.val_set is not None:
            size = len(self.val_set) if hasattr(self.val_set, "__len__") else 0
            self.val_loader = build_eval_loader(
                self.val_set, eval_tf, cfg.batch_size, options, world_size=info.world_size, rank=info.rank,
                indices=_subset(size, cfg.val_images, cfg.seed),
            )

    def _place_model(self, model: nn.Module) -> nn.Module:
        cfg = self.cfg
        if cfg.sync_bn and self.info.distributed:
            if self.device.type != "cuda":
                raise ValueError("sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU kernel)")
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model.to(self.device)
        if cfg.channels_last:
            model.to(memory_format=torch.channels_last)
        if cfg.grad_checkpointing:
            self._enable_grad_checkpointing(model)
        return model

    def _enable_grad_checkpointing(self, model: nn.Module) -> None:
        model.set_grad_checkpointing(True)

    def _ddp_unused(self, model: nn.Module) -> list[str]:
        """Parameters that get no gradient (DDP must be told): from FasterViT's geometry, else a probe pass."""
        size = self.data_cfg["input_size"]
        if hasattr(model, "unused_parameters"):  # FasterViT: from the window geometry, no probe pass
            return model.unused_parameters(tuple(size[-2:]))
        return _unused_parameters(model, size, self.device)  # any other timm model: one eval-mode backward pass

    def _wrap_model(self, model: nn.Module) -> nn.Module:
        """DDP and/or torch.compile around the model (EMA, eval and checkpoints use the bare model)."""
        wrapped = model
        if self.info.distributed:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            unused = self._ddp_unused(model)
            if unused:
                _log(self.info, f"{len(unused)} parameter tensors may get no gradient (e.g. {unused[0]}); "
                                "DDP will skip them")
            wrapped = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=bool(unused))
        if self.cfg.compile:
            wrapped = torch.compile(wrapped)
        return wrapped

    def _setup_optimization(self) -> None:
        cfg, info = self.cfg, self.info
        self.global_batch = global_batch(cfg, info.world_size)
        self.lr = effective_lr(cfg, info.world_size)
        self.optimizer = create_optimizer(self._optimizer_params(), cfg, self.lr)
        self.scheduler, self.num_epochs = create_schedule(self.optimizer, cfg, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp == "fp16")
        self._setup_criterion()
        _log(info, self._describe_run())

    def _optimizer_params(self) -> nn.Module | list[dict[str, Any]]:
        """What the optimizer gets: the model (timm's grouping and layer decay) or explicit parameter groups."""
        return self.model

    def _setup_criterion(self) -> None:
        cfg = self.cfg
        self.mixup = self._mixup()
        self.criterion = MesaLoss(self._task_loss(), cfg.mesa)
        self.mesa_start_epoch = int(cfg.mesa_start * self.num_epochs) if cfg.mesa > 0 else None

    def _describe_run(self) -> str:
        cfg, info = self.cfg, self.info
        return (f"training {cfg.model} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f}M params, "
                f"{self.num_classes} classes) on {describe_data(cfg.data)}: {info.world_size} process(es) x "
                f"batch {cfg.batch_size} x accum {cfg.accum_steps} = global batch {self.global_batch}, "
                f"lr {self.lr:.3g}, {self.steps_per_epoch} steps/epoch, {self.num_epochs} epochs, "
                f"input {tuple(self.data_cfg['input_size'])}, device {self.device}"
                + (f" ({torch.get_num_threads()} threads)" if self.device.type == "cpu" else ""))

    def _mixup(self) -> Any:
        cfg = self.cfg
        if cfg.mixup <= 0 and cfg.cutmix <= 0:
            return None
        from timm.data import Mixup

        return Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                     switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.smoothing, num_classes=self.num_classes)

    def _task_loss(self) -> nn.Module:
        from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

        if self.mixup is not None:
            return SoftTargetCrossEntropy()
        if self.cfg.smoothing > 0:
            return LabelSmoothingCrossEntropy(smoothing=self.cfg.smoothing)
        return nn.CrossEntropyLoss()

    def _tensorboard(self) -> Any:
        if not (self.cfg.tensorboard and self.info.is_primary):
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.out / "tb"), purge_step=self.progress.global_step or None)

    # -- checkpoints

    def _state(self) -> dict[str, Any]:
        p = self.progress
        return {
            "arch": self.cfg.model,
            "state_dict": self.model.state_dict(),
            "state_dict_ema": self.ema.module.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "progress": asdict(p),
            "global_batch": self.global_batch,
            "world_size": self.info.world_size,
            "config": asdict(self.cfg),
            "class_names": self.class_names,
            "epoch": p.epoch,
        }

    def _gather_rng(self) -> list[dict[str, Any]]:
        """RNG state of every rank (rank order), for exact resume."""
        state = capture_rng()
        if not self.info.distributed:
            return [state]
        import torch.distributed as dist

        states: list[Any] = [None] * self.info.world_size
        dist.all_gather_object(states, state)
        return states

    def save(self) -> None:
        """Write ``last.pt`` (all ranks take part in gathering RNG; rank 0 writes)."""
        self._raise_if_diverged()
        rng = self._gather_rng()
        if self.info.is_primary:
            save_checkpoint(self.out / "last.pt", {**self._state(), "rng": rng})
        self.last_checkpoint = str(self.out / "last.pt")

    def _save_weights(self, name: str, model: nn.Module, weights: str | None = None) -> str:
        from .weights import save_weights

        path = self.out / name
        if self.info.is_primary:
            meta: dict[str, Any] = {"epoch": str(self.progress.epoch), **self._weights_metadata()}
            if weights:
                meta["selected_weights"] = weights  # "raw" or "ema"
            if self.class_names:
                meta["class_names"] = list(self.class_names)
            save_weights(model, path, metadata=meta)
        return str(path)

    def _weights_metadata(self) -> dict[str, Any]:
        """What a weights file records besides the weights, so that the loader rebuilds the model."""
        meta: dict[str, Any] = {"architecture": self.cfg.model}
        if self.cfg.model_kwargs:
            meta["model_kwargs"] = dict(self.cfg.model_kwargs)
        if self.cfg.img_size:
            meta["img_size"] = str(self.cfg.img_size)
        return meta

    def _resume(self, source: str) -> None:
        state = load_checkpoint(source)
        self.model.load_state_dict(state["state_dict"])
        if self.ema is not None:
            if state.get("state_dict_ema") is None:
                raise ValueError(f"{source} has no EMA weights but model_ema is on")
            self.ema.module.load_state_dict(state["state_dict_ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.progress = _Progress(**state["progress"])
        if self.progress.step_in_epoch and state["global_batch"] != self.global_batch:
            raise ValueError(
                f"{source} stopped mid-epoch with global batch {state['global_batch']}; resume with the same "
                f"global batch (now {self.global_batch}) so the data order continues"
            )
        rng = state["rng"]
        if len(rng) == self.info.world_size:
            restore_rng(rng[self.info.rank])
        else:
            _log(self.info, f"note: checkpoint from {len(rng)} process(es); RNG re-seeded for {self.info.world_size}")
            _seed_everything(self.cfg.seed + self.info.rank + self.progress.global_step)
        self.resumed_from = str(source)
        self.last_checkpoint = str(Path(source) / "last.pt" if Path(source).is_dir() else source)
        _log(self.info, f"resumed from {source}: epoch {self.progress.epoch + 1}, step {self.progress.step_in_epoch}"
                        f"/{self.steps_per_epoch}, global step {self.progress.global_step}")

    # -- training

    def _raise_if_diverged(self) -> None:
        """Stop on a non-finite loss seen on any rank since the last check (never saving diverged weights).

        Every rank calls this at the same points (log steps, checkpoints, epoch ends), so all stop together.
        """
        if reduce_sums([float(self.nonfinite)], self.info)[0] > 0:
            p = self.progress
            raise TrainingDiverged(
                f"the loss became NaN/inf in epoch {p.epoch + 1}, by optimizer step {p.global_step} (lr "
                f"{self._current_lr():.3g}); training stopped. The last good checkpoint is {self.out / 'last.pt'}: "
                "resume from it with a lower lr, a longer warmup, gradient clipping, or bf16 instead of fp16"
            )

    def _current_lr(self) -> float:
        return max(group["lr"] for group in self.optimizer.param_groups)

    def _forward_loss(self, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            logits = self.train_model(images)
            teacher = None
            if self.criterion.active:
                with torch.no_grad():
                    teacher = self.ema.module(images)
            return self.criterion(logits, targets, teacher)

    def _optimizer_step(self) -> None:
        cfg = self.cfg
        if cfg.clip_grad:
            from timm.utils import dispatch_clip_grad

            self.scaler.unscale_(self.optimizer)
            dispatch_clip_grad(self.model.parameters(), cfg.clip_grad, mode=cfg.clip_mode)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.progress.global_step += 1
        self.progress.step_in_epoch += 1
        if self.ema is not None:
            self.ema.update(self.model, step=self.progress.global_step)
        self.scheduler.step_update(num_updates=self.progress.global_step)

    def _batches(self, epoch: int) -> Any:
        """This epoch's micro-batches from the resume position, moved to the device."""
        start = self.progress.step_in_epoch * self.cfg.accum_steps
        for batch in self.train_loader.epoch(epoch, start):
            yield self._to_device(batch)

    def _to_device(self, batch: Any) -> tuple[Any, Any]:
        """A loader batch as ``(inputs, targets)`` on the training device."""
        images, targets, *_ = batch
        memory = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=memory)
        return images, targets.to(self.device, non_blocking=True)

    def _start_epoch(self, epoch: int) -> None:
        """Per-epoch switches: mixup off from ``mixup_off_epoch``, MESA on from its start epoch."""
        cfg = self.cfg
        if self.mixup is not None and cfg.mixup_off_epoch and epoch >= cfg.mixup_off_epoch:
            self.mixup.mixup_enabled = False
        self.criterion.active = self.mesa_start_epoch is not None and epoch >= self.mesa_start_epoch

    def train_epoch(self, epoch: int) -> None:
        from tqdm import tqdm

        cfg, p = self.cfg, self.progress
        self.train_model.train()
        self._start_epoch(epoch)
        bar = tqdm(total=self.steps_per_epoch, initial=p.step_in_epoch, desc=f"epoch {epoch + 1}/{self.num_epochs}",
                   unit="step", disable=not (cfg.progress and self.info.is_primary), dynamic_ncols=True, leave=True)
        try:
            self._train_steps(epoch, bar)
        finally:  # also on Ctrl-C: the bar ends its line before any message
            bar.close()

    def _train_steps(self, epoch: int, bar: Any) -> None:
        """The optimizer steps of ``epoch`` from the resume position (``train_epoch``'s loop)."""
        cfg, p = self.cfg, self.progress
        running = torch.zeros(2, dtype=torch.float64, device=self.device)  # loss sum, count since last log
        tick, tick_step = time.perf_counter(), p.global_step
        for micro, (images, targets) in enumerate(self._batches(epoch)):
            if self.mixup is not None:
                images, targets = self.mixup(images, targets)
            last_micro = (micro + 1) % cfg.accum_steps == 0
            sync = nullcontext() if last_micro or not self.info.distributed else self.train_model.no_sync()
            with sync:
                loss = self._forward_loss(images, targets)
                self.scaler.scale(loss / cfg.accum_steps).backward()
            loss = loss.detach()
            self.nonfinite |= ~torch.isfinite(loss)
            running += torch.stack([loss.double().nan_to_num(0.0), torch.ones((), dtype=torch.float64,
                                                                              device=self.device)])
            if not last_micro:
                continue
            self._optimizer_step()
            bar.update(1)
            logged = p.global_step % cfg.log_interval == 0 or p.step_in_epoch == self.steps_per_epoch
            if logged:
                tick, tick_step = self._log_step(bar, running, tick, tick_step)
                running.zero_()
            if cfg.checkpoint_steps and p.global_step % cfg.checkpoint_steps == 0 and \
                    p.step_in_epoch < self.steps_per_epoch:
                self.save()

    def _log_step(self, bar: Any, running: torch.Tensor, tick: float, tick_step: int) -> tuple[float, int]:
        """Progress bar, TensorBoard and the NaN check, every ``log_interval`` optimizer steps."""
        self._raise_if_diverged()
        p = self.progress
        loss_sum, count = reduce_sums(running.tolist(), self.info)
        p.loss_sum += loss_sum
        p.loss_count += int(count)
        now = time.perf_counter()
        images_per_s = (p.global_step - tick_step) * self.global_batch / max(now - tick, 1e-9)
        loss, lr = loss_sum / max(count, 1), self._current_lr()
        p.curve.append([p.global_step, loss, lr])
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.0f}", refresh=False)
        if self.writer is not None:
            self.writer.add_scalar("train/loss", loss, p.global_step)
            self.writer.add_scalar("train/lr", lr, p.global_step)
            self.writer.add_scalar("train/images_per_s", images_per_s, p.global_step)
        return now, p.global_step

    def evaluate(self, model: nn.Module) -> dict[str, Any]:
        """Top-1/top-5/loss on the val split, each rank on its shard, reduced over ranks."""
        from .validate import evaluate

        local = evaluate(model, self.val_loader, device=self.device, amp_dtype=self.amp_dtype)
        n = local["count"]
        top1, top5, loss, count = reduce_sums([local["top1"] * n, local["top5"] * n, local["loss"] * n, n], self.info)
        return {"top1": top1 / count, "top5": top5 / count, "loss": loss / count, "count": int(count)}

    def end_epoch(self, epoch: int, epoch_seconds: float, images: int) -> dict[str, Any]:
        """BN averaging, evaluation, history row, checkpoints."""
        p = self.progress
        average_bn_stats(self.model, self.info)
        if self.ema is not None:
            average_bn_stats(self.ema.module, self.info)
        row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": p.loss_sum / max(p.loss_count, 1),
                               "lr": self._current_lr(), "seconds": epoch_seconds,
                               "images_per_s": images / max(epoch_seconds, 1e-9)}
        last = epoch + 1 == self.num_epochs
        if self.val_loader is not None and ((epoch + 1) % self.cfg.eval_every == 0 or last):
            row.update(self.evaluate(self.model))
            if self.ema is not None:
                row.update({f"ema_{k}": v for k, v in self.evaluate(self.ema.module).items()
                            if k != "count" and isinstance(v, (int, float))})
        row["skipped_images"] = self._skipped_count()
        kind, score = self._select(row)
        p.history.append(row)
        p.epoch, p.step_in_epoch, p.loss_sum, p.loss_count = epoch + 1, 0, 0.0, 0
        if not math.isnan(score) and score > p.best_top1:
            p.best_top1, p.best_epoch, p.best_weights = score, epoch + 1, kind
            p.best_raw_top1, p.best_ema_top1 = row.get(self.metric, math.nan), row.get(f"ema_{self.metric}", math.nan)
            self._save_weights("best.safetensors", self.ema.module if kind == "ema" else self.model,
                               weights=kind)
        self._save_weights("last.safetensors", self.model)
        if self.ema is not None:
            self._save_weights("last_ema.safetensors", self.ema.module)
        self.save()
        self._report_epoch(row)
        return row

    def _select(self, row: dict[str, Any]) -> tuple[str, float]:
        """The better of this epoch's raw and EMA weights by val top-1 (EMA on a tie): ``("raw" | "ema", score)``;
        also written into ``row`` as ``selected_weights`` / ``selected_top1``. Without a val split the latest
        weights (EMA when on) win with score ``-train_loss``; epochs without evaluation score NaN."""
        m = self.metric
        candidates = [(name, row[key]) for name, key in (("ema", f"ema_{m}"), ("raw", m)) if key in row]
        candidates = [(name, top1) for name, top1 in candidates if not math.isnan(top1)]
        if candidates:
            kind, score = max(candidates, key=lambda item: item[1])  # max keeps the first (EMA) on a tie
            row["selected_weights"], row[f"selected_{m}"] = kind, score
            return kind, score
        kind = "ema" if self.ema is not None else "raw"
        return kind, (-row["train_loss"] if self.val_loader is None else math.nan)

    def _skipped_count(self) -> int:
        bad = getattr(self.train_set, "bad", None)  # SkipUnreadable and the dense datasets: a flag per image
        local = float(bad.sum()) if isinstance(bad, torch.Tensor) else 0.0
        return int(reduce_sums([local], self.info)[0])

    def _skipped_names(self) -> list[str]:
        skipped = getattr(self.train_set, "skipped", None)
        return list(skipped()) if callable(skipped) else []

    def _describe_metrics(self, row: dict[str, Any]) -> list[str]:
        """Log fragments for an epoch's validation metrics."""
        parts = []
        if "top1" in row:
            parts.append(f"top-1 {row['top1']:.2f} top-5 {row['top5']:.2f}")
        if "ema_top1" in row:
            parts.append(f"EMA top-1 {row['ema_top1']:.2f}")
        return parts

    def _report_epoch(self, row: dict[str, Any]) -> None:
        if not self.info.is_primary:
            return
        parts = [f"epoch {row['epoch']}/{self.num_epochs}: train loss {row['train_loss']:.4f}",
                 *self._describe_metrics(row)]
        if "selected_weights" in row and self.ema is not None:
            parts.append(f"better: {row['selected_weights']}")
        parts.append(f"{row['images_per_s']:.0f} img/s")
        _log(self.info, ", ".join(parts))
        if row["skipped_images"]:
            names = self._skipped_names()[:5]
            _log(self.info, f"warning: skipped {row['skipped_images']} unreadable training images, e.g. {names}")
        if self.writer is not None:
            for key, value in row.items():
                if key not in ("epoch", "count") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"epoch/{key}", value, row["epoch"])
            self.writer.flush()
        write_summary_csv(self.progress.history, self.out / "summary.csv")

    def fit(self) -> dict[str, Any]:
        p = self.progress
        try:
            while p.epoch < self.num_epochs:
                epoch, start_step, started = p.epoch, p.step_in_epoch, time.perf_counter()
                self.train_epoch(epoch)
                self._raise_if_diverged()
                images = (self.steps_per_epoch - start_step) * self.global_batch
                self.end_epoch(epoch, time.perf_counter() - started, images)
        except BaseException:  # Ctrl-C included: TensorBoard gets what was logged
            if self.writer is not None:
                self.writer.close()
            raise
        finally:  # loader workers stop now, not at some later garbage collection
            shutdown_workers(self.train_loader)
            shutdown_workers(self.val_loader)
        return self._finish()

    def interrupted(self) -> TrainingInterrupted:
        """What a Ctrl-C now means: the position reached and the checkpoint to resume from."""
        p = self.progress
        return TrainingInterrupted(str(self.out), min(p.epoch + 1, self.num_epochs), p.step_in_epoch,
                                   self.steps_per_epoch, self.last_checkpoint)

    def _finish(self) -> dict[str, Any]:
        p = self.progress
        divergence = rank_divergence(self.model, self.info)
        curves = self.out / "curves.png"
        if self.info.is_primary:
            plot_curves(p.history, p.curve, self.steps_per_epoch, curves, self.metric, self.metric_title)
            if self.writer is not None:
                self.writer.close()
        final = p.history[-1] if p.history else {}
        m = self.metric  # the progress fields named *_top1 hold this metric's scores
        result = {
            "metric": m,
            f"best_{m}": p.best_top1 if math.isfinite(p.best_top1) else math.nan,
            "best_epoch": p.best_epoch,
            "best_weights": p.best_weights or None,  # "raw" or "ema": the weights in best.safetensors
            f"best_raw_{m}": p.best_raw_top1,  # raw and EMA scores of the best epoch
            f"best_ema_{m}": p.best_ema_top1,
            f"final_{m}": final.get(f"selected_{m}", math.nan),  # the better of raw and EMA in the last epoch
            "final_weights": final.get("selected_weights"),
            "final": final,
            "best_checkpoint": str(self.out / "best.safetensors"),
            "last_checkpoint": str(self.out / "last.safetensors"),
            "ema_checkpoint": str(self.out / "last_ema.safetensors") if self.ema is not None else None,
            "resume_checkpoint": str(self.out / "last.pt"),
            "summary_csv": str(self.out / "summary.csv"),
            "curves_png": str(curves),
            "tensorboard": str(self.out / "tb") if self.writer is not None else None,
            "seconds": time.perf_counter() - self.started,
            "epochs": self.num_epochs,
            "global_step": p.global_step,
            "global_batch": self.global_batch,
            "lr": self.lr,
            "world_size": self.info.world_size,
            "rank_divergence": divergence,
            "skipped_images": self._skipped_count(),
            "head_reinitialised": self.reinitialised,
            "resumed_from": self.resumed_from,
            "auto_settings": {name: {"value": getattr(self.cfg, name), "reason": reason}
                              for name, reason in self.auto_reasons.items()},
        }
        if self.info.is_primary:
            (self.out / "results.json").write_text(json.dumps(json_safe(result), indent=2))
        return result


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (or fine-tune / resume) as configured; returns the result summary (also in results.json).

    Runs under ``torchrun`` as one DDP rank per process. Raises ``DatasetError`` / ``ValueError`` /
    ``CheckpointError`` before training for bad data or arguments (``RunExistsError`` for an output folder holding
    another run's ``last.pt`` without ``resume`` / ``overwrite``), ``TrainingDiverged`` on a NaN loss and
    ``TrainingInterrupted`` (a ``KeyboardInterrupt``) on Ctrl-C.
    """
    check_config(cfg)
    return run_training(Trainer, cfg)


def run_training(trainer: type[Trainer], cfg: Any) -> dict[str, Any]:
    """Run ``trainer(cfg, info).fit()`` in this process (one DDP rank under ``torchrun``): process group, CPU threads
    and determinism set up and restored afterwards whatever happens.

    Raises:
        TrainingInterrupted: on Ctrl-C / SIGINT (a ``KeyboardInterrupt``), naming the epoch and step reached, the
            last checkpoint and the ``--resume`` that continues the run.
        RunExistsError: ``output`` holds another run's ``last.pt`` (see ``check_output``).
    """
    check_output(cfg)  # before the process group: a clear error, not a hang of the other ranks
    info = init_distributed(cfg.device)
    deterministic, threads = torch.are_deterministic_algorithms_enabled(), torch.get_num_threads()
    if info.device.type == "cpu":
        torch.set_num_threads(cpu_threads(cfg))
    ok, run = False, None
    try:
        run = trainer(cfg, info)
        result = run.fit()
        ok = True
        return result
    except KeyboardInterrupt as err:
        if isinstance(err, TrainingInterrupted):
            raise
        if run is not None:
            raise run.interrupted() from None
        resumable = str(cfg.resume) if cfg.resume else None
        raise TrainingInterrupted(str(cfg.output), None, 0, None, resumable) from None
    finally:
        torch.use_deterministic_algorithms(deterministic)
        torch.set_num_threads(threads)
        cleanup(info, barrier=ok)
