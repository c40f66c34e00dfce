"""Settings of an image-classification run: the shared fields plus data, augmentation and MESA, and the
augmentation chosen from the data when left unset.

Defaults suit short runs on small data; the paper's ImageNet recipe comes with ``--recipe``. Fields left unset
(``None``; ``aa="auto"``) are chosen at start from the run's length and data and logged: the augmentation
(RandAugment, mixup, cutmix, random erasing) from the number of training images and epochs here, the EMA decay and
the warmup by the engine (``open_fastervit.train.auto``). A value that is set, even to the old default, is always
used as given.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from ...train.auto import SCHEDULE_AUTO_FIELDS, is_unset, resolve_schedule_settings
from ...train.config import RunConfig, option

__all__ = ["AUTO_FIELDS", "FULL_AUG_MIN_EPOCHS", "FULL_AUG_MIN_IMAGES", "LIGHT_AUGMENTATION", "PAPER_AUGMENTATION",
           "TrainConfig", "auto_augmentation", "resolve_augmentation", "resolve_auto_settings"]

#: The paper's ImageNet augmentation (``--recipe``; the auto choice for large, long runs).
PAPER_AUGMENTATION: dict[str, Any] = {"aa": "rand-m9-mstd0.5-inc1", "mixup": 0.8, "cutmix": 1.0, "reprob": 0.25}


#: Light augmentation (random resized crop, flip, color jitter, label smoothing): the auto choice otherwise.
LIGHT_AUGMENTATION: dict[str, Any] = {"aa": None, "mixup": 0.0, "cutmix": 0.0, "reprob": 0.0}


#: The auto augmentation is the paper's from this many training images ...
FULL_AUG_MIN_IMAGES = 100_000


#: ... and this many epochs on; heavy augmentation slows learning down and only pays off on long runs.
FULL_AUG_MIN_EPOCHS = 100
#: Fields chosen at start when left unset, and the value that means "unset".
AUTO_FIELDS: dict[str, Any] = {**SCHEDULE_AUTO_FIELDS, "aa": "auto", "mixup": None, "cutmix": None, "reprob": None}


@dataclass
class TrainConfig(RunConfig):
    """Image classification: the shared fields plus data, augmentation and distillation settings of the paper's
    ImageNet recipe."""

    # model
    official_checkpoint: str | None = option(None, "fine-tune from an official .pth.tar checkpoint")
    # data
    data_dir: str | None = option(None, "root folder for timm dataset specs")
    img_size: int | None = option(None, "square input size; default: the model's pretrained cfg input size")
    val_images: int = option(0, "evaluate on a fixed random subset of this many images (0: all)")
    # augmentation and regularisation
    smoothing: float = option(0.1, "label smoothing")
    mixup: float | None = option(None, "mixup alpha (0: off); default: auto, 0.8 for large long runs, else 0 "
                                     "(see aa)")
    cutmix: float | None = option(None, "cutmix alpha (0: off); default: auto, 1.0 for large long runs, else 0 "
                                      "(see aa)")
    mixup_prob: float = option(1.0, "probability of applying mixup or cutmix to a batch")
    mixup_switch_prob: float = option(0.5, "probability of cutmix instead of mixup")
    mixup_off_epoch: int = option(0, "turn mixup/cutmix off from this epoch (0: never)")
    aa: str | None = option("auto", "timm auto-augment spec (RandAugment); None or '': off; default: auto, "
                                  f"{PAPER_AUGMENTATION['aa']} when the train split has >= {FULL_AUG_MIN_IMAGES} "
                                  f"images and epochs >= {FULL_AUG_MIN_EPOCHS}, else off")
    reprob: float | None = option(None, "random erasing probability; default: auto, 0.25 for large long runs, "
                                      "else 0 (see aa)")
    remode: str = option("pixel", "random erasing mode")
    recount: int = option(1, "random erasing count")
    scale: list = option([0.08, 1.0], "RandomResizedCrop scale range")
    ratio: list = option([3 / 4, 4 / 3], "RandomResizedCrop aspect-ratio range")
    hflip: float = option(0.5, "horizontal flip probability")
    color_jitter: float = option(0.4, "color jitter (used when aa is off)")
    train_interpolation: str = option("random", "train resize interpolation ('' : the model's)")
    augment: bool = option(True, "training augmentation (off: resize + center crop only, as for evaluation)")
    # MESA
    mesa: float = option(0.0, "MESA self-distillation coefficient (0: off; needs model_ema)")
    mesa_start: float = option(0.25, "fraction of training after which MESA starts")

    TASK: ClassVar[str] = "classification"

    def positive_fields(self) -> dict[str, Any]:
        return {"img_size": self.img_size, "recount": self.recount}

    def non_negative_fields(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("mesa", "mixup", "cutmix", "reprob", "val_images", "mixup_off_epoch")}

    def check(self) -> None:
        """The shared checks, then: MESA needs the EMA, mixup/cutmix an even batch, one source of weights.

        Raises:
            ValueError: naming the field or the combination.
        """
        super().check()
        if self.mesa > 0 and not self.model_ema:
            raise ValueError("MESA distils from the EMA model: set model_ema=True or mesa=0")
        if ((self.mixup or 0) > 0 or (self.cutmix or 0) > 0) and self.batch_size % 2:
            raise ValueError(f"mixup/cutmix need an even batch size, got {self.batch_size}")
        if self.pretrained and self.official_checkpoint:
            raise ValueError("give either pretrained (own weights) or official_checkpoint, not both")


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


def resolve_augmentation(cfg: TrainConfig, train_images: int | None) -> tuple[TrainConfig, dict[str, str]]:
    """``cfg`` with unset ``aa``/``mixup``/``cutmix``/``reprob`` chosen by :func:`auto_augmentation`
    (light when ``augment`` is off; no mixup/cutmix for an odd batch). Returns it and ``{field: reason}``."""
    unset = [name for name in ("aa", "mixup", "cutmix", "reprob") if is_unset(cfg, name, AUTO_FIELDS[name])]
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


def resolve_auto_settings(cfg: TrainConfig, train_images: int | None,
                          steps_per_epoch: int) -> tuple[TrainConfig, dict[str, str]]:
    """``cfg`` with every unset auto field (``AUTO_FIELDS``) chosen for a run of ``steps_per_epoch`` optimizer
    steps per epoch on ``train_images`` images (None: unknown); set fields are kept as given.
    Returns the resolved config and ``{field: reason}`` for the fields chosen."""
    cfg, reasons = resolve_augmentation(cfg, train_images)
    cfg, more = resolve_schedule_settings(cfg, steps_per_epoch)
    return cfg, {**reasons, **more}
