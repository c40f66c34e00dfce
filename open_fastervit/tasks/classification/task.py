"""Image classification as a task of the training engine: timm datasets, the paper's augmentation and losses.

What is reused: timm for datasets, transforms, Mixup/CutMix and losses (label smoothing, soft targets); MESA
self-distillation (``mesa.py``) is the part timm lacks. The model comes through the one loader
(``open_fastervit.load_model``): random, our weights or the authors', a head of another class count
re-initialised. Evaluation is top-1 / top-5 / loss (``open_fastervit.validate.evaluate``), summed over ranks;
``best.safetensors`` holds the weights with the best top-1.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.data import Mixup, create_transform, resolve_data_config
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn

from ...data import DatasetError, class_names, describe_data, ensure_randaugment_compat, eval_transform, open_dataset
from ...labels import ReadableImages, no_readable_image, readable_collate
from ...loading import load_model
from ...train.distributed import reduce_sums
from ...train.loader import subset_indices
from ...train.reporting import log
from ...train.task import LoaderSpec, Task, register_task
from ...validate import evaluate
from .config import TrainConfig, resolve_augmentation
from .mesa import MesaLoss

__all__ = ["ClassificationTask", "check_sample", "classes_without_readable_images", "classification_transforms",
           "create_classifier", "infer_num_classes", "open_classification_data", "probe_unused_parameters",
           "train_count"]


def create_classifier(cfg: TrainConfig, num_classes: int) -> tuple[nn.Module, list[str]]:
    """The classifier with its initial weights (``open_fastervit.load_model``: random, our weights or the official ones,
    a head of another class count re-initialised); returns it and the list of re-initialised classifier keys."""
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


def classification_transforms(cfg: TrainConfig, model: nn.Module) -> tuple[Any, Any, dict]:
    """timm train / eval transforms from the model's pretrained cfg (size overridden by img_size).

    Unresolved auto augmentation fields (see ``resolve_augmentation``) count as off here."""
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
    eval_tf = eval_transform(data_cfg)  # timm's, resampling only the cropped region
    return train_tf, eval_tf, data_cfg


def open_classification_data(cfg: TrainConfig) -> tuple[Any, Any]:
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


def train_count(cfg: TrainConfig, train_set: Any) -> int | None:
    """Training images per epoch (the ``train_images`` subset when smaller), None when the dataset has no length."""
    size = len(train_set) if hasattr(train_set, "__len__") else None
    if size is None:
        return cfg.train_images or None
    return min(size, cfg.train_images) if cfg.train_images else size


def infer_num_classes(cfg: TrainConfig, train_set: Any) -> int:
    names = class_names(train_set)
    if cfg.num_classes is None:
        if names is None:
            raise DatasetError("cannot infer the number of classes from this dataset; pass num_classes")
        return len(names)
    if names is not None and len(names) > cfg.num_classes:
        raise DatasetError(f"the train split has {len(names)} classes but num_classes={cfg.num_classes}")
    return cfg.num_classes


def check_sample(dataset: Any, transform: Any, in_chans: int) -> None:
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


def classes_without_readable_images(train_set: Any, indices: list[int] | None = None) -> list[str]:
    """Names of the classes whose every training image (of ``indices``, default all) is flagged unreadable by
    ``SkipUnreadable`` so far; empty for datasets that do not flag images or do not list their samples."""
    bad = getattr(train_set, "bad", None)
    base = getattr(train_set, "dataset", train_set)
    samples = getattr(getattr(base, "reader", None), "samples", None)
    names = class_names(train_set)
    if not isinstance(bad, torch.Tensor) or not samples or not names or not bool(bad.any()):
        return []
    chosen = range(len(samples)) if indices is None else sorted(set(indices))
    total, flagged = [0] * len(names), [0] * len(names)
    for index in chosen:
        target = int(samples[index][1])
        if 0 <= target < len(names):
            total[target] += 1
            flagged[target] += int(bad[index])
    return [name for name, t, f in zip(names, total, flagged) if t and f == t]


def probe_unused_parameters(model: nn.Module, input_size: tuple[int, ...], device: torch.device) -> list[str]:
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


@register_task
class ClassificationTask(Task):
    """Image classification (the paper's ImageNet training and fine-tuning, on any labelled image data)."""

    name = "classification"
    metric = "top1"
    metric_title = "top-1 (%)"
    config_class = TrainConfig
    cfg: TrainConfig

    def open_data(self) -> None:
        cfg = self.cfg
        self.train_set, self.val_set = open_classification_data(cfg)
        self.num_classes = infer_num_classes(cfg, self.train_set)
        self.cfg, self.auto_reasons = resolve_augmentation(cfg, train_count(cfg, self.train_set))
        self.class_names = class_names(self.train_set)
        # scored images are the ones really read: an unreadable val image is left out, never replaced
        if self.val_set is not None and hasattr(self.val_set, "reader") and hasattr(self.val_set, "__len__"):
            self.val_set = ReadableImages(self.val_set)
        self.unreadable_classes: list[str] = []

    def build_model(self) -> nn.Module:
        model, self.reinitialised = create_classifier(self.cfg, self.num_classes)
        if self.reinitialised:
            log(self.info, f"classifier {', '.join(self.reinitialised)} re-initialised for {self.num_classes} "
                           "classes")
        return model

    def loaders(self, model: nn.Module) -> LoaderSpec:
        cfg = self.cfg
        train_tf, eval_tf, self.data_cfg = classification_transforms(cfg, model)
        check_sample(self.train_set, train_tf, self.data_cfg["input_size"][0])
        size = len(self.train_set) if hasattr(self.train_set, "__len__") else 0
        val_size = len(self.val_set) if self.val_set is not None and hasattr(self.val_set, "__len__") else 0
        self.train_indices = subset_indices(size, cfg.train_images, cfg.seed)
        eval_collate = readable_collate if isinstance(self.val_set, ReadableImages) else None
        return LoaderSpec(train_set=self.train_set, train_transform=train_tf, val_set=self.val_set,
                          eval_transform=eval_tf, train_indices=self.train_indices, eval_collate_fn=eval_collate,
                          val_indices=subset_indices(val_size, cfg.val_images, cfg.seed),
                          input_size=tuple(self.data_cfg["input_size"]))

    def ddp_unused_parameters(self, model: nn.Module, input_size: tuple[int, ...],
                              device: torch.device) -> list[str]:
        """From FasterViT's window geometry (no probe pass), else one eval-mode backward pass."""
        if hasattr(model, "unused_parameters"):
            return model.unused_parameters(tuple(input_size[-2:]))
        return probe_unused_parameters(model, input_size, device)

    def start(self, num_epochs: int, ema: nn.Module | None) -> None:
        """Mixup/CutMix, the loss (label smoothing or soft targets) and MESA's start epoch."""
        cfg = self.cfg
        self.ema_model = ema
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.smoothing,
                               num_classes=self.num_classes)
        self.criterion = MesaLoss(self._base_loss(), cfg.mesa)
        self.mesa_start_epoch = int(cfg.mesa_start * num_epochs) if cfg.mesa > 0 else None

    def _base_loss(self) -> nn.Module:
        if self.mixup is not None:
            return SoftTargetCrossEntropy()
        if self.cfg.smoothing > 0:
            return LabelSmoothingCrossEntropy(smoothing=self.cfg.smoothing)
        return nn.CrossEntropyLoss()

    def describe(self, model: nn.Module) -> str:
        return f"{super().describe(model)} on {describe_data(self.cfg.data)}"

    def start_epoch(self, epoch: int) -> None:
        """Mixup off from ``mixup_off_epoch``, MESA on from its start epoch."""
        cfg = self.cfg
        if self.mixup is not None and cfg.mixup_off_epoch and epoch >= cfg.mixup_off_epoch:
            self.mixup.mixup_enabled = False
        self.criterion.active = self.mesa_start_epoch is not None and epoch >= self.mesa_start_epoch

    def to_device(self, batch: Any, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(images (B, 3, H, W), class indices (B,))`` on ``device`` (channels_last when asked)."""
        images, targets, *_ = batch
        memory = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory)
        return images, targets.to(device, non_blocking=True)

    def loss(self, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mixup/CutMix (when on), then the criterion of ``model(inputs)``; with MESA active, also distilled from
        the EMA model's outputs."""
        if self.mixup is not None:
            inputs, targets = self.mixup(inputs, targets)
        logits = model(inputs)
        teacher = None
        if self.criterion.active:
            with torch.no_grad():
                teacher = self.ema_model(inputs)
        return self.criterion(logits, targets, teacher)

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device,
                 amp_dtype: torch.dtype | None) -> dict[str, Any]:
        """Top-1/top-5 (%) and loss on the val split, each rank on its shard, reduced over ranks: ``count`` images
        scored, ``val_skipped`` unreadable ones left out (never replaced by other images).

        Raises:
            DatasetError: no val image of any rank could be read (names the folder and the first files).
        """
        try:
            local = evaluate(model, loader, device=device, amp_dtype=amp_dtype)
        except ValueError as e:
            if "empty loader" not in str(e):
                raise
            local = {"top1": 0.0, "top5": 0.0, "loss": 0.0, "count": 0}  # this rank read no image of its shard
        n = local["count"]
        bad = getattr(self.val_set, "bad", None)
        skipped = float(bad.sum()) if isinstance(bad, torch.Tensor) else 0.0
        top1, top5, loss, count, skipped = reduce_sums(
            [local["top1"] * n, local["top5"] * n, local["loss"] * n, n, skipped], self.info)
        if count == 0:
            raise no_readable_image(self.val_set, getattr(self.val_set, "root", None) or self.cfg.val_split)
        return {"top1": top1 / count, "top5": top5 / count, "loss": loss / count, "count": int(count),
                "val_skipped": int(skipped)}

    def describe_metrics(self, row: dict[str, Any]) -> list[str]:
        parts = []
        if "top1" in row:
            parts.append(f"top-1 {row['top1']:.2f} top-5 {row['top5']:.2f} on {row['count']} val images")
            if row.get("val_skipped"):
                names = self.val_set.skipped()[:3] if isinstance(self.val_set, ReadableImages) else []
                parts.append(f"{row['val_skipped']} unreadable val images skipped (e.g. {', '.join(names)})")
        if "ema_top1" in row:
            parts.append(f"EMA top-1 {row['ema_top1']:.2f}")
        self._warn_unreadable_classes()
        return parts

    def _warn_unreadable_classes(self) -> None:
        """Warn (once per class) about classes none of whose training images could be read so far: the model
        learns nothing of them. Known at the end of the first epoch (finding it at the start would mean decoding
        the whole training set once more)."""
        names = classes_without_readable_images(self.train_set, self.train_indices)
        new = [n for n in names if n not in self.unreadable_classes]
        if new:
            self.unreadable_classes.extend(new)
            log(self.info, f"warning: class(es) {', '.join(new)} have no readable training image (every one is "
                           "unreadable and skipped): the model learns nothing of them")

    def weights_metadata(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"architecture": self.cfg.model}
        if self.cfg.model_kwargs:
            meta["model_kwargs"] = dict(self.cfg.model_kwargs)
        if self.cfg.img_size:
            meta["img_size"] = str(self.cfg.img_size)
        return meta

    def result(self) -> dict[str, Any]:
        return {"head_reinitialised": self.reinitialised, "classes_without_readable_images": self.unreadable_classes}
