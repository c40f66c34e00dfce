"""Training, evaluation and prediction of FasterViT detectors (``fastervit detect train|evaluate|predict``).

``train_detector(DetectionConfig(...))`` runs the training engine (``open_fastervit.train``:
torchrun DDP, exact resume from ``last.pt`` after a kill, atomic checkpoints, AMP, layer-wise lr decay, EMA,
progress bar, CSV, TensorBoard, ``curves.png``, ``results.json``) with the detection task of this module: COCO
data (``CocoDetection``) or instance-mask folders (``InstanceMaskFolder``), torchvision detectors
(``build_detector``), the sum of the detector's losses, and COCO box / mask AP (pycocotools) computed in the
backbone's inference form. ``best.safetensors`` holds the weights with the best box mAP.

Data layouts (``data`` = ROOT):

* COCO: images in ``ROOT/<split>/`` and annotations in ``ROOT/annotations/instances_<split>.json`` (override with
  ``train_ann`` / ``val_ann``), as COCO 2017 (``train2017``) and ``trees-neon``;
* instance folders: ``ROOT/<split>/images/*`` with ``ROOT/<split>/instances/*`` (integer instance ids, one
  class), as ``nuclei-dsb2018``.

The paper's recipe (Cascade Mask R-CNN 3x on COCO: AdamW, lr 1e-4 at batch 16, weight decay 0.05, multi-scale
short side 480-800, 36 epochs with lr steps at 27 and 33) is ``--recipe mask_rcnn_3x_coco``, the lr scaled
linearly to the run's global batch; see ``open_fastervit.tasks.detection.models`` for how torchvision's Mask R-CNN
differs from the paper's Cascade head.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import nn
from torchvision.transforms.v2.functional import pil_to_tensor

from ...data import DatasetError, read_image
from ...predict import expand_image_entries, report_skipped
from ...train.config import option
from ...train.distributed import DistInfo
from ...train.engine import run_training
from ...train.loader import LoaderOptions, build_eval_loader
from ...train.reporting import write_json
from ...train.task import register_task
from ..dense import DenseConfig, DenseTask, OutputNames, inference_copy, load_dense_model
from .data import (
    CocoDetection,
    InstanceMaskFolder,
    NoMasksError,
    collate_detection,
    eval_transforms,
    instance_folder_to_coco,
    quiet_coco,
    train_transforms,
)
from .metrics import coco_evaluate, to_coco_results
from .models import build_detector, detector_from_config, detector_param_groups
from .visualize import draw_detections, save_png

__all__ = ["DetectionConfig", "evaluate_detector", "load_detector", "predict_detector", "train_detector"]

logger = logging.getLogger(__name__)

#: The paper's multi-scale training short sides (480..800 in steps of 32).
PAPER_MIN_SIZES = list(range(480, 801, 32))
METRIC_KEYS = ("mAP", "mAP50", "mAP75")


@dataclass
class DetectionConfig(DenseConfig):
    """A detection / instance-segmentation run; the shared fields are ``DenseConfig``'s."""

    TASK: ClassVar[str] = "detection"  # the recipes it takes

    num_classes: int | None = option(None, "number of object classes (background excluded); default: the train "
                                         "split's categories (a recipe never sets it)")
    epochs: int = option(36, "schedule length in epochs (the paper's 3x schedule: 36)")
    min_lr: float = option(1e-6, "learning rate the cosine schedule (the default sched) ends at; multistep (the 3x "
                               "recipe's) ignores it")
    decay_rate: float = option(0.1, "multistep: the lr factor at each milestone (the 3x recipe: 0.1 at epochs 27, 33)")
    kind: str = option("mask_rcnn", "detector: mask_rcnn (needs instance masks: polygons/RLE or instance folders), "
                                  "faster_rcnn, retinanet or fcos (torchvision)")
    data: str = option("", "COCO root (ROOT/<split>/ + ROOT/annotations/instances_<split>.json) or an instance-mask "
                         "folder root (ROOT/<split>/images + ROOT/<split>/instances)")
    train_ann: str | None = option(None, "COCO json of the train split (default: "
                                        "ROOT/annotations/instances_<split>.json)")
    val_ann: str | None = option(None, "COCO json of the val split (default: ROOT/annotations/instances_<split>.json)")
    min_size: list = option(PAPER_MIN_SIZES, "short side(s) of the resized input in pixels: one drawn per training "
                                           "batch; evaluation uses the last")
    max_size: int = option(1333, "cap on the long side of the resized input, pixels")
    hflip: float = option(0.5, "horizontal flip probability")
    vflip: float = option(0.0, "vertical flip probability (aerial and microscopy images)")
    crop: str | None = option(None, "random crop: None, 'iou' (SSD IoU crop) or 'random' (30-100% of the area)")
    fpn_channels: int = option(256, "channels of the feature pyramid")
    anchor_sizes: list | None = option(None, "anchor size per pyramid level in pixels (default 32..512)")
    box_head_channels: int | None = option(None, "R-CNNs: width of the box head's two-layer MLP (default 1024)")
    mask_head_channels: int | None = option(None, "Mask R-CNN: channels of the mask head (default 256)")
    rois_per_image: int = option(512, "R-CNNs: sampled RoIs per image for the box head loss (torchvision: 512)")
    detections_per_img: int = option(100, "detections kept per image")
    score_thresh: float = option(0.05, "detections scoring below are dropped, in validation too (the usual COCO "
                                     "practice: 0.05; predict may lower it)")
    output: str = option("runs/detect", "output folder")


def _split_data(root: Path, split: str, ann: str | None, masks: bool, transforms: Any) -> Any:
    """The dataset of one split: COCO json when there is one, else an instance-mask folder."""

    if ann is None and (root / split / "instances").is_dir() and (root / split / "images").is_dir():
        return InstanceMaskFolder(root, split, transforms)
    ann_file = Path(ann) if ann else root / "annotations" / f"instances_{split}.json"
    if not ann_file.is_file():
        raise DatasetError(f"no annotations for split {split!r}: {ann_file} does not exist (and {root / split} holds "
                           "no images/ + instances/ folders); pass the json (train: --train-ann / --val-ann; "
                           "evaluate: --ann)")
    images = root / split if (root / split).is_dir() else root
    return CocoDetection(images, ann_file, transforms, masks=masks)


def open_detection_data(cfg: DetectionConfig, masks: bool) -> tuple[Any, Any]:
    """Train and (optional) val datasets with their transforms.

    Raises:
        DatasetError: missing data, no usable image, or train and val splits with different categories.
    """

    if not cfg.data:
        raise DatasetError("no data given: set data to a COCO root or an instance-mask folder root")
    root = Path(cfg.data).expanduser()
    if not root.is_dir():
        raise DatasetError(f"data folder {root} does not exist")
    train_tf = train_transforms(hflip=cfg.hflip, vflip=cfg.vflip, crop=cfg.crop)
    train_set = _split_data(root, cfg.train_split, cfg.train_ann, masks, train_tf)
    val_set = None
    if cfg.val_split:
        val_set = _split_data(root, cfg.val_split, cfg.val_ann, masks, eval_transforms())
        if list(val_set.class_names) != list(train_set.class_names):
            raise DatasetError(f"the {cfg.train_split!r} and {cfg.val_split!r} splits have different categories: "
                               f"{train_set.class_names} vs {val_set.class_names}")
    return train_set, val_set  # the datasets log their own findings


def ground_truth(dataset: Any) -> Any:
    """The pycocotools ``COCO`` ground truth of a dataset as it loads it: a COCO dataset's annotations as cleaned at
    construction (``CocoDetection.evaluation_coco``), an instance folder's masks written as a temporary json."""
    if hasattr(dataset, "evaluation_coco"):
        return dataset.evaluation_coco()

    with tempfile.TemporaryDirectory() as tmp:
        path = instance_folder_to_coco(dataset.root, dataset.split, Path(tmp) / "gt.json")
        return quiet_coco(json.loads(Path(path).read_text()))


@torch.inference_mode()
def detect_dataset(model: nn.Module, loader: Any, device: torch.device, label_to_category: dict[int, int],
                   masks: bool, amp_dtype: torch.dtype | None = None) -> tuple[list[dict[str, Any]], list[int]]:
    """COCO results of ``model`` (eval mode) over ``loader``'s ``(images, targets)`` batches, and the ids of the
    images evaluated. An unreadable image is replaced by the dataset with a readable neighbour; that repeat is
    dropped here, so the unreadable image is left out of the evaluation (not counted as missed) and no image is
    counted twice."""

    results: list[dict[str, Any]] = []
    seen: list[int] = []
    for images, targets in loader:
        ids = [int(t["image_id"]) for t in targets]
        keep = [i for i, image_id in enumerate(ids) if image_id not in seen]
        if not keep:
            continue
        seen += [ids[i] for i in keep]
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            outputs = model([images[i].to(device) for i in keep])
        outputs = [{k: v.float() if v.is_floating_point() else v for k, v in out.items()} for out in outputs]
        results += to_coco_results(outputs, [ids[i] for i in keep], label_to_category, masks=masks)
    return results, seen


def _gather(local: tuple[list[dict[str, Any]], list[int]], info: DistInfo) -> tuple[list[dict[str, Any]], list[int]]:
    """Every rank's (results, image ids) joined."""
    if not info.distributed:
        return local

    parts: list[Any] = [None] * info.world_size
    dist.all_gather_object(parts, local)
    return [r for part in parts for r in part[0]], [i for part in parts for i in part[1]]


def flat_metrics(metrics: dict[str, dict[str, float]]) -> dict[str, float]:
    """``{"bbox": {"mAP": ...}}`` -> ``{"bbox_mAP": ...}`` (one CSV / TensorBoard column each)."""
    return {f"{iou}_{key}": float(value) for iou, values in metrics.items() for key, value in values.items()}


@register_task
class DetectionTask(DenseTask):
    """Object detection / instance segmentation as a task of the engine (see the module docstring)."""

    name = "detection"
    metric = "bbox_mAP"
    metric_title = "box mAP"
    config_class = DetectionConfig
    cfg: DetectionConfig

    def build_datasets(self) -> tuple[Any, Any]:
        self.with_masks = self.cfg.kind.replace("-", "_") == "mask_rcnn"
        try:  # a boxes-only json is refused before anything about its annotations is reported
            train_set, val_set = open_detection_data(self.cfg, masks=self.with_masks)
        except NoMasksError as err:
            raise DatasetError(f"{err}; kind mask_rcnn needs instance masks: use --kind faster_rcnn, retinanet or "
                               "fcos for boxes only") from None
        if val_set is not None:
            self.val_gt = ground_truth(val_set)
            self.iou_types = ("bbox", "segm") if self.with_masks else ("bbox",)
        return train_set, val_set

    def build_dense_model(self) -> nn.Module:
        cfg = self.cfg
        backbone_kwargs = self.backbone_kwargs()
        if cfg.backbone_checkpoint:
            backbone_kwargs["checkpoint"] = cfg.backbone_checkpoint
        extra: dict[str, Any] = {}
        if cfg.kind.replace("-", "_") in ("mask_rcnn", "faster_rcnn"):
            extra = {"box_detections_per_img": cfg.detections_per_img, "box_score_thresh": cfg.score_thresh,
                     "box_batch_size_per_image": cfg.rois_per_image, "box_head_channels": cfg.box_head_channels}
            if cfg.kind.replace("-", "_") == "mask_rcnn":
                extra["mask_head_channels"] = cfg.mask_head_channels
        else:
            extra = {"detections_per_img": cfg.detections_per_img, "score_thresh": cfg.score_thresh}
        if cfg.box_head_channels is not None and "box_head_channels" not in extra:
            raise ValueError(f"box_head_channels applies to faster_rcnn and mask_rcnn, not {cfg.kind}")
        min_size = tuple(int(s) for s in cfg.min_size)
        return build_detector(cfg.kind, cfg.model, self.num_classes, min_size=min_size if len(min_size) > 1
                              else min_size[0], max_size=cfg.max_size, backbone_kwargs=backbone_kwargs,
                              fpn_channels=cfg.fpn_channels, anchor_sizes=cfg.anchor_sizes, **extra)

    def input_size(self) -> tuple[int, int, int]:
        return (3, int(self.cfg.min_size[-1]), int(self.cfg.max_size))

    def collate_fn(self) -> Any:
        return collate_detection

    def param_groups(self, model: nn.Module, lr: float) -> list[dict[str, Any]]:
        return detector_param_groups(model, lr, self.cfg.weight_decay, self.cfg.layer_decay)

    @staticmethod
    def model_from_config(config: dict[str, Any]) -> nn.Module:
        return detector_from_config(config)

    def to_device(self, batch: Any, device: torch.device) -> tuple[Any, Any]:
        """``(list of images (3, H, W), list of target dicts)`` on ``device``."""
        images, targets = batch
        images = [image.to(device, non_blocking=True) for image in images]
        targets = [{k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in t.items()}
                   for t in targets]
        return images, targets

    def loss(self, model: nn.Module, inputs: Any, targets: Any) -> torch.Tensor:
        """The sum of the detector's losses (RPN, box, class, mask), in float32."""
        losses = model(inputs, targets)
        return sum(loss.float() for loss in losses.values())

    def evaluate(self, model: nn.Module, loader: Any, device: torch.device,
                 amp_dtype: torch.dtype | None) -> dict[str, Any]:
        """COCO AP of ``model`` on the val split (inference form of the backbone; each rank its shard)."""

        was_training = model.training
        try:
            results, seen = detect_dataset(inference_copy(model), loader, device, self.val_set.label_to_category,
                                           self.with_masks, amp_dtype)
        finally:
            model.train(was_training)
        results, seen = _gather((results, seen), self.info)
        metrics = coco_evaluate(self.val_gt, results, self.iou_types, image_ids=sorted(set(seen)))
        return {**flat_metrics(metrics), "count": len(set(seen))}

    def weights_metadata(self) -> dict[str, Any]:
        return {**super().weights_metadata(), "category_ids": list(self.train_set.category_ids)}

    def describe_metrics(self, row: dict[str, Any]) -> list[str]:
        parts = []
        for prefix, name in (("", ""), ("ema_", "EMA ")):
            if f"{prefix}bbox_mAP" in row:
                text = f"{name}box mAP {row[f'{prefix}bbox_mAP']:.3f} mAP50 {row[f'{prefix}bbox_mAP50']:.3f}"
                if f"{prefix}segm_mAP" in row:
                    text += f", mask mAP {row[f'{prefix}segm_mAP']:.3f}"
                parts.append(text)
        return parts


def train_detector(cfg: DetectionConfig) -> dict[str, Any]:
    """Train (or fine-tune / resume) a detector as configured; returns the summary (also ``results.json``).

    Raises:
        DatasetError: missing/empty data, boxes-only data for mask_rcnn; ValueError: bad settings;
        CheckpointError: unusable weights; TrainingDiverged: a NaN loss (the last good checkpoint is kept).
    """
    cfg.check()
    return run_training(DetectionTask, cfg)


def load_detector(source: str | Path, *, device: str | torch.device | None = None,
                  use_ema: bool | None = None) -> nn.Module:
    """A detector trained by ``fastervit detect train``, from its weights file, ``last.pt`` or run folder (eval
    mode; ``class_names`` attribute). Raises CheckpointError for missing, corrupt or other-task files."""
    return load_dense_model(source, "detection", device=device, use_ema=use_ema)


def evaluate_detector(source: str | Path, data: str | Path, split: str = "val", *, ann_file: str | None = None,
                      json_path: str | Path | None = None, device: str | None = None, fuse: bool = True,
                      workers: int = 1) -> dict[str, dict[str, float]]:
    """COCO box (and mask) mAP, mAP50, mAP75 of a trained detector on one split.

    Returns:
        ``{"bbox": {"mAP", "mAP50", "mAP75", ...}, "segm": {...}}`` (segm for Mask R-CNN), also written to
        ``json_path`` when given.

    Raises:
        CheckpointError, DatasetError: unusable weights or data.
    """

    device_ = torch.device(device or "cpu")
    model = load_detector(source, device=device_)
    masks = model.build_config["kind"] == "mask_rcnn"
    try:
        dataset = _split_data(Path(data).expanduser(), split, ann_file, masks, eval_transforms())
    except NoMasksError as err:
        logger.warning("%s: box AP only", err)
        masks = False
        dataset = _split_data(Path(data).expanduser(), split, ann_file, masks, eval_transforms())
    if model.class_names and list(dataset.class_names) != list(model.class_names):
        logger.warning("the data's categories %s differ from the model's %s", dataset.class_names, model.class_names)
    loader = build_eval_loader(dataset, dataset.transforms, 1, LoaderOptions(workers=workers),
                               collate_fn=collate_detection)
    runner = inference_copy(model) if fuse else model
    results, seen = detect_dataset(runner, loader, device_, dataset.label_to_category, masks)
    iou_types = ("bbox", "segm") if masks else ("bbox",)
    metrics = coco_evaluate(ground_truth(dataset), results, iou_types, image_ids=seen)
    out = {iou: dict(values) for iou, values in metrics.items()}
    if json_path:
        write_json(json_path, out)
    return out


def set_score_threshold(detector: nn.Module, threshold: float) -> None:
    """Let ``detector`` keep detections down to ``threshold`` (its own threshold, set at training, drops lower ones
    before the caller sees them): R-CNN ``roi_heads.score_thresh``, RetinaNet/FCOS ``score_thresh``."""
    heads = getattr(detector, "roi_heads", None)
    target = heads if heads is not None and hasattr(heads, "score_thresh") else detector
    if hasattr(target, "score_thresh"):
        target.score_thresh = min(float(target.score_thresh), float(threshold))


@torch.inference_mode()
def check_detector_input(detector: nn.Module, image: torch.Tensor, name: str) -> None:
    """Refuse an image that the detector's own resize would squeeze to nothing.

    torchvision's detection transform (``detector.transform``) scales the short side to ``min_size`` and caps the
    long side at ``max_size``, so its work is bounded whatever the input; but a very elongated image (1 x 8000) then
    gets a side of 0 pixels and torchvision fails deep inside. Checked before the forward pass.

    Raises:
        ValueError: a side of ``image`` ``(C, H, W)`` would be resized below 1 pixel; the message names ``name``.
    """
    transform = getattr(detector, "transform", None)
    if transform is None:
        return
    height, width = (int(n) for n in image.shape[-2:])
    short, long = min(height, width), max(height, width)
    scale = min(float(transform.min_size[-1]) / short, float(transform.max_size) / long)
    if int(short * scale) < 1:
        raise ValueError(f"{name}: {width}x{height} pixels is too elongated to detect on: the detector resizes its "
                         f"long side to at most {transform.max_size} px, which leaves {short * scale:.2f} px for the "
                         "short side")


def predict_detector(source: str | Path, inputs: list[str | Path], output: str | Path, *,
                     score_threshold: float = 0.5, recursive: bool = False,
                     on_error: Callable[[Path, str], Any] | None = None, device: str | None = None,
                     fuse: bool = True) -> dict[str, Any]:
    """Detect objects in image files and folders of them (listed by ``open_fastervit.predict.expand_images``: a
    folder's images, its sub-folders too with ``recursive``); write one PNG per image with the boxes (and masks)
    drawn and ``detections.json`` (COCO-style results with ``file_name``; boxes ``[x, y, w, h]`` in pixels). The PNG
    of an image found in a sub-folder goes to the same sub-folder of ``output`` (``photos/a/x.jpg`` ->
    ``OUTPUT/a/x.png``); ``x_2``... only when two inputs would write the same file.

    An image that cannot be read or run is skipped: ``on_error(path, message)`` is called for it (the message names
    the file), or without ``on_error`` a warning is logged; it is listed in the summary's ``skipped``.

    Returns:
        ``{"images": n, "detections": total above the threshold, "json": path, "pngs": [paths], "skipped": [...]}``.

    Raises:
        CheckpointError: unusable weights; ImageReadError (a ValueError): an input that does not exist, a folder
            without images.
    """

    entries = expand_image_entries(inputs, recursive=recursive)  # before loading the model: a bad input fails fast
    device_ = torch.device(device or "cpu")
    model = load_detector(source, device=device_)
    runner = inference_copy(model) if fuse else model
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    masks = model.build_config["kind"] == "mask_rcnn"
    categories = getattr(model, "category_ids", None) or list(range(1, model.build_config["num_classes"] + 1))
    labels = {label: int(cid) for label, cid in enumerate(categories, start=1)}
    set_score_threshold(runner, score_threshold)
    results: list[dict[str, Any]] = []
    pngs: list[str] = []
    skipped: list[str] = []
    names = OutputNames()
    for image_id, (path, relative) in enumerate(entries, start=1):
        try:
            image = pil_to_tensor(read_image(path)).float().div(255)
            check_detector_input(model, image, str(path))
            output_ = runner([image.to(device_)])[0]
        except (ValueError, FileNotFoundError) as err:  # ImageDecodeError, too small an image
            report_skipped(path, err, skipped, on_error, logger)
            continue
        output_ = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in output_.items()}
        keep = output_["scores"] >= score_threshold
        kept = {k: v[keep] for k, v in output_.items()}
        for entry in to_coco_results([kept], [image_id], labels, masks=masks):
            entry["file_name"] = str(path)
            if model.class_names:
                entry["category_name"] = model.class_names[categories.index(entry["category_id"])]
            results.append(entry)
        png = out_dir / f"{names.unique(relative)}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        save_png(draw_detections(image, kept, model.class_names, score_threshold), png)
        pngs.append(str(png))
    json_path = write_json(out_dir / "detections.json", results, indent=1)
    return {"images": len(pngs), "detections": len(results), "json": str(json_path), "pngs": pngs,
            "skipped": skipped}
