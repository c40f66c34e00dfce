"""Training, evaluation and prediction of FasterViT semantic segmenters (``fastervit segment train|evaluate|predict``).

``train_segmenter(SegmentationConfig(...))`` runs the training engine (``open_fastervit.train``:
torchrun DDP, exact resume from ``last.pt`` after a kill, atomic checkpoints, AMP, layer-wise lr decay, EMA,
progress bar, CSV, TensorBoard, ``curves.png``, ``results.json``) with the segmentation task of this module:
image/mask folder pairs (``SegmentationFolder``: ``ROOT/<split>/{images,masks}`` or the ADE20K layout
``ROOT/{images,annotations}/{training,validation}``), smp's UPerNet / FPN decoders on the FasterViT backbone
(``build_segmenter``), per-pixel cross-entropy (``ignore_index`` excluded), and mIoU / pixel accuracy from a
confusion matrix summed over ranks, computed on whole images in the backbone's inference form.
``best.safetensors`` holds the weights with the best mIoU.

The paper's recipe (UPerNet on ADE20K: AdamW, lr 6e-5 at batch 16, weight decay 0.01, 512 x 512 crops, 160k
iterations, poly schedule, an auxiliary FCN head on the stride-16 features with loss weight 0.4) is
``--recipe upernet_ade20k_160k``, the lr scaled linearly to the run's global batch. ``--aux-loss-weight`` adds
that training-only head to any run (0, the default elsewhere, leaves it out). A recipe never sets the dataset's
properties: the class count is inferred from the train split's masks (``config.json`` records it), and ADE20K's
label convention is the user's ``--reduce-zero-label``.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms.v2.functional import pil_to_tensor

from ...data import DatasetError, read_image
from ...predict import expand_image_entries, report_skipped
from ...train.config import option
from ...train.distributed import DistInfo
from ...train.engine import run_training
from ...train.loader import LoaderOptions, build_eval_loader
from ...train.reporting import log, write_json
from ...train.task import register_task
from ..dense import DenseConfig, DenseTask, OutputNames, inference_copy, load_dense_model
from .data import SegmentationFolder, collate_segmentation, eval_transforms, train_transforms
from .metrics import SegmentationMetric
from .visualize import overlay_mask, save_png

__all__ = ["SegmentationConfig", "evaluate_segmenter", "load_segmenter", "predict_segmenter", "train_segmenter"]

logger = logging.getLogger(__name__)


@dataclass
class SegmentationConfig(DenseConfig):
    """A semantic segmentation run; the shared fields are ``DenseConfig``'s."""

    TASK: ClassVar[str] = "segmentation"  # the recipes it takes

    num_classes: int | None = option(None, "number of classes; default: inferred from the train split's masks (the "
                                         "lines of ROOT/classes.txt, else the largest label + 1 after "
                                         "reduce_zero_label); a recipe never sets it")
    epochs: int = option(36, "schedule length in epochs (the ADE20K recipe: 127, about 160k iterations of batch 16)")
    min_lr: float = option(1e-6, "learning rate the schedule ends at (cosine by default; the ADE20K recipe's poly "
                               "decays to 0)")
    decay_rate: float = option(0.1, "poly: the power of the decay (the ADE20K recipe: 1.0, linear); multistep: the lr "
                                  "factor at each milestone")
    kind: str = option("upernet", "decoder: upernet (the paper's) or fpn (segmentation_models_pytorch)")
    data: str = option("", "root of image/mask folder pairs: ROOT/<split>/{images,masks} or the ADE20K layout "
                         "ROOT/{images,annotations}/{training,validation}")
    images: str = option("images", "name of the image folders")
    masks: str = option("masks", "name of the mask folders (class-index PNGs; 'annotations' is also found)")
    ignore_index: int = option(255, "mask value left out of the loss and the metrics")
    reduce_zero_label: bool = option(False, "ADE20K: label 0 ('other') becomes ignore_index, 1..150 become 0..149 "
                                          "(a property of the data: pass it for ADE20K, with or without a recipe)")
    crop_size: int = option(512, "training crop side in pixels")
    scale_range: list = option([0.5, 2.0], "random rescale factor range")
    hflip: float = option(0.5, "horizontal flip probability")
    vflip: float = option(0.0, "vertical flip probability (aerial and microscopy images)")
    color_jitter: float = option(0.2, "brightness/contrast/saturation jitter (0: off)")
    decoder_channels: int | None = option(None, "decoder width (UPerNet 512, FPN 256)")
    aux_loss_weight: float = option(0.0, "weight of the auxiliary FCN head's loss on the stride-16 features "
                                       "(training only; the ADE20K recipe uses 0.4); 0: no auxiliary head")
    weight_decay: float = option(0.01, "weight decay (not applied to biases, norms, layer scales)")
    lr_base: float = option(6e-5, "learning rate at global batch lr_base_size (linear scaling)")
    output: str = option("runs/segment", "output folder")

    def check(self) -> None:
        """The shared checks, then the auxiliary loss weight and UPerNet's batch size.

        Raises:
            ValueError: naming the field.
        """
        super().check()
        if not self.aux_loss_weight >= 0:
            raise ValueError(f"aux_loss_weight must be >= 0 (0: no auxiliary head), got {self.aux_loss_weight}")
        if self.kind == "upernet" and self.batch_size < 2:
            raise ValueError("upernet needs batch_size >= 2 per process in training (its pooling branch normalises "
                             "1x1 maps with BatchNorm); use kind fpn for batch 1")


def open_segmentation_data(cfg: SegmentationConfig) -> tuple[Any, Any]:
    """Train and (optional) val ``SegmentationFolder``s with their transforms.

    Raises:
        DatasetError: missing or empty folders, splits with different class counts.
    """

    if not cfg.data:
        raise DatasetError("no data given: set data to a folder of image/mask pairs")
    common = dict(images=cfg.images, masks=cfg.masks, reduce_zero_label=cfg.reduce_zero_label,
                  ignore_index=cfg.ignore_index, num_classes=cfg.num_classes)
    train_tf = train_transforms(cfg.crop_size, tuple(cfg.scale_range), cfg.hflip, cfg.vflip,
                                ignore_index=cfg.ignore_index, color_jitter=cfg.color_jitter)
    train_set = SegmentationFolder(cfg.data, cfg.train_split, transforms=train_tf, **common)
    val_set = None
    if cfg.val_split:
        common["num_classes"] = cfg.num_classes or train_set.num_classes
        val_set = SegmentationFolder(cfg.data, cfg.val_split, transforms=eval_transforms(),
                                     substitute_unreadable=False, **common)
    return train_set, val_set


@torch.inference_mode()
def segment_dataset(model: nn.Module, loader: Any, device: torch.device, num_classes: int, ignore_index: int,
                    amp_dtype: torch.dtype | None = None) -> tuple[Any, int]:
    """The ``SegmentationMetric`` of ``model`` (eval mode) over ``loader``'s ``(images (B, C, H, W), masks (B, H,
    W))`` batches, and the number of images counted.

    Empty batches (``B = 0``: every pair of the batch unreadable, left out by ``collate_segmentation``) are skipped,
    so an unreadable image of an evaluation ``SegmentationFolder`` is left out, never replaced by another."""

    metric = SegmentationMetric(num_classes, ignore_index, device=device)
    count = 0
    for images, masks in loader:
        if images.shape[0] == 0:
            continue
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(images.to(device))
        metric.update(logits.float(), masks.to(device))
        count += int(images.shape[0])
    return metric, count


def _all_reduce(confusion: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        dist.all_reduce(confusion)
    return confusion


@register_task
class SegmentationTask(DenseTask):
    """Semantic segmentation as a task of the engine (see the module docstring)."""

    name = "segmentation"
    metric = "mIoU"
    metric_title = "mIoU"
    config_class = SegmentationConfig
    cfg: SegmentationConfig

    def build_datasets(self) -> tuple[Any, Any]:
        return open_segmentation_data(self.cfg)

    def resolve_num_classes(self, cfg: Any) -> tuple[Any, dict[str, str]]:
        """As ``DenseTask``'s, with a given ``num_classes`` checked against the labels of the train masks:
        labels at or above it (their pairs were left out) are an error, a count above the labels' a warning."""
        cfg, inferred = super().resolve_num_classes(cfg)
        top = self.train_set.max_label
        if inferred:
            return cfg, {"num_classes": f"the {cfg.train_split!r} masks" + (", reduce_zero_label"
                                                                              if cfg.reduce_zero_label else "")}
        if top is None:
            return cfg, inferred
        dropped = sum(1 for p in self.train_set.problems if p.kind == "label_out_of_range")
        if top >= cfg.num_classes:
            raise ValueError(f"num_classes={cfg.num_classes} but the {cfg.train_split!r} masks hold labels up to {top}"
                             f" ({top + 1} classes, reduce_zero_label={cfg.reduce_zero_label}): {dropped} pair(s) "
                             f"would be left out; leave --num-classes out to infer {top + 1}")
        if top + 1 < cfg.num_classes:
            log(self.info, f"warning: num_classes={cfg.num_classes} but the {cfg.train_split!r} masks hold labels "
                            f"0..{top} only ({top + 1} classes, reduce_zero_label={cfg.reduce_zero_label}): classes "
                            f"{top + 1}..{cfg.num_classes - 1} never occur; leave --num-classes out to infer "
                            f"{top + 1}" + ("" if cfg.reduce_zero_label else " (ADE20K masks need "
                                                                               "--reduce-zero-label)"))
        return cfg, inferred

    def build_dense_model(self) -> nn.Module:
        from .models import build_segmenter  # here: models import segmentation_models_pytorch (slow to load)

        cfg = self.cfg
        backbone_kwargs = self.backbone_kwargs()
        if cfg.backbone_checkpoint:
            backbone_kwargs["checkpoint"] = cfg.backbone_checkpoint
        num_classes = cfg.num_classes or self.train_set.num_classes
        self.num_classes = num_classes
        return build_segmenter(cfg.kind, cfg.model, num_classes, backbone_kwargs=backbone_kwargs,
                               decoder_channels=cfg.decoder_channels, aux_head=cfg.aux_loss_weight > 0)

    def input_size(self) -> tuple[int, int, int]:
        return (3, self.cfg.crop_size, self.cfg.crop_size)

    def collate_fn(self) -> Any:
        return functools.partial(collate_segmentation, ignore_index=self.cfg.ignore_index)

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        from .models import segmenter_param_groups  # here: see build_dense_model

        return segmenter_param_groups(model, lr, self.cfg.weight_decay, self.cfg.layer_decay)

    @staticmethod
    def model_from_config(config: dict[str, Any]) -> nn.Module:
        from .models import segmenter_from_config  # here: see build_dense_model

        return segmenter_from_config(config)

    def to_device(self, batch: Any, device: torch.device) -> tuple[Any, Any]:
        """``(images (B, 3, H, W), masks (B, H, W))`` on ``device``."""
        images, masks = batch
        memory = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        images = images.to(device, non_blocking=True).contiguous(memory_format=memory)
        return images, masks.to(device, non_blocking=True)

    def loss(self, model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        """Per-pixel cross-entropy of ``images (B, 3, H, W)`` against ``targets (B, H, W)`` (``ignore_index`` left
        out), plus ``aux_loss_weight`` times the auxiliary head's cross-entropy when that weight is > 0."""
        weight = float(self.cfg.aux_loss_weight)
        if weight > 0:
            logits, aux = model(inputs, return_aux=True)
        else:
            logits, aux = model(inputs), None
        loss = F.cross_entropy(logits.float(), targets, ignore_index=self.cfg.ignore_index)
        if aux is not None:
            loss = loss + weight * F.cross_entropy(aux.float(), targets, ignore_index=self.cfg.ignore_index)
        return loss

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device,
                 amp_dtype: torch.dtype | None) -> dict[str, Any]:
        """mIoU, pixel accuracy and per-class IoU of ``model`` on the val split (whole images, inference form of
        the backbone; each rank its shard, confusion matrices summed). Unreadable images are left out (logged);
        ``count`` is the number of images evaluated."""
        was_training = model.training
        try:
            metric, count = segment_dataset(inference_copy(model), loader, device, self.num_classes,
                                            self.cfg.ignore_index, amp_dtype)
        finally:
            model.train(was_training)
        _all_reduce(metric.confusion, self.info)
        evaluated = _all_reduce(torch.tensor([count], dtype=torch.int64, device=metric.confusion.device), self.info)
        values = metric.compute()
        row: dict[str, Any] = {"mIoU": values["mIoU"], "pixel_accuracy": values["pixel_accuracy"],
                               "mean_accuracy": values["mean_accuracy"], "count": int(evaluated.item())}
        for name, iou in zip(self.class_names, values["per_class_iou"]):
            row[f"IoU_{name}"] = iou
        return row

    def describe_metrics(self, row: dict[str, Any]) -> list[str]:
        parts = []
        if "mIoU" in row:
            parts.append(f"mIoU {row['mIoU']:.4f} pixel acc {row['pixel_accuracy']:.4f}")
        if "ema_mIoU" in row:
            parts.append(f"EMA mIoU {row['ema_mIoU']:.4f}")
        return parts


def train_segmenter(cfg: SegmentationConfig) -> dict[str, Any]:
    """Train (or fine-tune / resume) a segmenter as configured; returns the summary (also ``results.json``).

    Raises:
        DatasetError: missing/empty data; ValueError: bad settings; CheckpointError: unusable weights;
        TrainingDiverged: a NaN loss (the last good checkpoint is kept).
    """
    cfg.check()
    return run_training(SegmentationTask, cfg)


def load_segmenter(source: str | Path, *, device: str | torch.device | None = None,
                   use_ema: bool | None = None) -> nn.Module:
    """A segmenter trained by ``fastervit segment train``, from its weights file, ``last.pt`` or run folder (eval
    mode; ``class_names`` attribute). Raises CheckpointError for missing, corrupt or other-task files."""
    return load_dense_model(source, "segmentation", device=device, use_ema=use_ema)


def evaluate_segmenter(source: str | Path, data: str | Path, split: str = "val", *, images: str = "images",
                       masks: str = "masks", ignore_index: int = 255, reduce_zero_label: bool = False,
                       json_path: str | Path | None = None, device: str | None = None, fuse: bool = True,
                       workers: int = 1) -> dict[str, Any]:
    """mIoU, pixel accuracy and per-class IoU of a trained segmenter on one split (whole images). An image that
    fails to decode is left out of the metrics (a logged warning), never replaced by another.

    Returns:
        ``{"mIoU", "pixel_accuracy", "mean_accuracy", "per_class_iou": {name: IoU}}``, also written to
        ``json_path`` when given.

    Raises:
        CheckpointError, DatasetError: unusable weights or data.
    """

    device_ = torch.device(device or "cpu")
    model = load_segmenter(source, device=device_)
    num_classes = int(model.build_config["num_classes"])
    dataset = SegmentationFolder(data, split, images=images, masks=masks, transforms=eval_transforms(),
                                 reduce_zero_label=reduce_zero_label, ignore_index=ignore_index,
                                 num_classes=num_classes, substitute_unreadable=False)
    loader = build_eval_loader(dataset, dataset.transforms, 1, LoaderOptions(workers=workers),
                               collate_fn=functools.partial(collate_segmentation, ignore_index=ignore_index))
    runner = inference_copy(model) if fuse else model
    metric, count = segment_dataset(runner, loader, device_, num_classes, ignore_index)
    if count < len(dataset):
        logger.warning("%d of %d image(s) could not be read and were left out of the evaluation: %s",
                       len(dataset) - count, len(dataset), ", ".join(dataset.skipped()))
    values = metric.compute()
    names = model.class_names or [f"class_{i}" for i in range(num_classes)]
    out = {"mIoU": values["mIoU"], "pixel_accuracy": values["pixel_accuracy"],
           "mean_accuracy": values["mean_accuracy"],
           "per_class_iou": {name: iou for name, iou in zip(names, values["per_class_iou"])}}
    if json_path:
        write_json(json_path, out)  # a class absent from the split has IoU NaN: null in the file
    return out


@torch.inference_mode()
def predict_segmenter(source: str | Path, inputs: list[str | Path], output: str | Path, *, recursive: bool = False,
                      on_error: Callable[[Path, str], Any] | None = None, device: str | None = None,
                      fuse: bool = True, alpha: float = 0.5) -> dict[str, Any]:
    """Segment image files and folders of them (listed by ``open_fastervit.predict.expand_images``: a folder's
    images, its sub-folders too with ``recursive``): write ``<name>_mask.png`` (class indices, 8-bit, or 16-bit for
    more than 256 classes) and ``<name>_overlay.png`` (colours over the image) per image, and ``predictions.json``
    (per image: the files and the pixel share of each class). The outputs of an image found in a sub-folder go to
    the same sub-folder of ``output`` (``photos/a/x.jpg`` -> ``OUTPUT/a/x_mask.png``); ``x_2``... only when two
    inputs would write the same file (``x.jpg`` and ``x.png``, or files of the same name given from two places).

    An image that cannot be read or segmented is skipped: ``on_error(path, message)`` is called for it (the message
    names the file), or without ``on_error`` a warning is logged; it is listed in the summary's ``skipped``.

    Returns:
        ``{"images": number segmented, "json": path, "skipped": [message, ...]}``.

    Raises:
        CheckpointError: unusable weights; ImageReadError (a ValueError): an input that does not exist, a folder
            without images.
    """

    entries = expand_image_entries(inputs, recursive=recursive)  # before loading the model: a bad input fails fast
    device_ = torch.device(device or "cpu")
    model = load_segmenter(source, device=device_)
    runner = inference_copy(model) if fuse else model
    num_classes = int(model.build_config["num_classes"])
    names = model.class_names or [f"class_{i}" for i in range(num_classes)]
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    skipped: list[str] = []
    stems = OutputNames()
    for path, relative in entries:
        try:
            image = pil_to_tensor(read_image(path)).float().div(255)
            prediction = runner(image[None].to(device_))[0].argmax(0).cpu()
        except (ValueError, FileNotFoundError) as err:  # ImageDecodeError, too small an image
            report_skipped(path, err, skipped, on_error, logger)
            continue
        stem = out_dir / stems.unique(relative)
        stem.parent.mkdir(parents=True, exist_ok=True)
        mask_path, overlay_path = stem.with_name(f"{stem.name}_mask.png"), stem.with_name(f"{stem.name}_overlay.png")
        array = prediction.numpy().astype("uint8" if num_classes <= 256 else "uint16")
        Image.fromarray(array).save(mask_path)
        save_png(overlay_mask(image, prediction, num_classes, alpha=alpha), overlay_path)
        shares = torch.bincount(prediction.flatten(), minlength=num_classes).float() / prediction.numel()
        records.append({"file_name": str(path), "mask": str(mask_path), "overlay": str(overlay_path),
                        "class_share": {names[i]: round(float(s), 6) for i, s in enumerate(shares) if s > 0}})
    json_path = write_json(out_dir / "predictions.json", records, indent=1)
    return {"images": len(records), "json": str(json_path), "skipped": skipped}
