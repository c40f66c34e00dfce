"""COCO evaluation of detector outputs with pycocotools' ``COCOeval`` (boxes and instance masks).

``to_coco_results`` turns torchvision detector outputs into COCO's results format; ``coco_evaluate`` scores them
against a ground-truth ``COCO`` (e.g. ``CocoDetection.coco``). The numbers are COCO's: AP averaged over IoU
thresholds 0.50:0.05:0.95 with 101-point interpolated precision, over all categories having ground truth, at
most 100 detections per image.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

__all__ = ["METRIC_NAMES", "CocoMetrics", "coco_evaluate", "to_coco_results"]

logger = logging.getLogger(__name__)

#: Our names of ``COCOeval.stats`` entries (index in ``stats``): AP@[.5:.95], AP@.5, AP@.75, AP by object size
#: (small < 32^2 px^2 < medium < 96^2 px^2 < large), and AR with at most 100 detections per image.
METRIC_NAMES = {"mAP": 0, "mAP50": 1, "mAP75": 2, "mAP_small": 3, "mAP_medium": 4, "mAP_large": 5, "AR100": 8}
IOU_TYPES = ("bbox", "segm")


class CocoMetrics(dict):
    """``{iou_type: {metric: value}}`` as returned by ``coco_evaluate``, with ``summary``: ``{iou_type: text}``
    holding COCOeval's printed table."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.summary: dict[str, str] = {}


def _as_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float32 if value.is_floating_point() else value.dtype).numpy()
    return np.asarray(value)


def to_coco_results(outputs: Sequence[Mapping[str, Any]], image_ids: Iterable[int],
                    label_to_category: Mapping[int, int], masks: bool = False, *,
                    mask_threshold: float = 0.5) -> list[dict[str, Any]]:
    """Detector outputs -> COCO results (``[{"image_id", "category_id", "bbox", "score"[, "segmentation"]}]``).

    Args:
        outputs: one dict per image with ``boxes`` (N, 4) xyxy pixels, ``scores`` (N,), ``labels`` (N,) and, for
            ``masks=True``, ``masks`` (N, 1, H, W) or (N, H, W) probabilities (binarised at ``mask_threshold``).
        image_ids: the COCO image id of each output, in order.
        label_to_category: ``{label: COCO category id}`` (``dataset.label_to_category``). Label 0 (the background
            index, which RetinaNet/FCOS could in principle emit) is skipped.
        masks: also encode the masks as compressed RLE (``counts`` as str, JSON-ready).

    Returns:
        The list of results; ``bbox`` is ``[x, y, width, height]`` in pixels.

    Raises:
        ValueError: ``outputs`` and ``image_ids`` differ in length, an output lacks ``masks`` with ``masks=True``, or
            a label is not in ``label_to_category``.
    """
    image_ids = list(image_ids)
    if len(outputs) != len(image_ids):
        raise ValueError(f"{len(outputs)} outputs but {len(image_ids)} image ids")
    results: list[dict[str, Any]] = []
    for output, image_id in zip(outputs, image_ids):
        boxes = _as_numpy(output["boxes"]).reshape(-1, 4).astype(np.float64)
        scores = _as_numpy(output["scores"]).reshape(-1).astype(np.float64)
        labels = _as_numpy(output["labels"]).reshape(-1).astype(np.int64)
        rles: list[dict[str, Any]] = []
        if masks:
            if "masks" not in output:
                raise ValueError("masks=True but a detector output has no 'masks' (is it a Mask R-CNN?)")
            probs = _as_numpy(output["masks"])
            probs = probs.reshape(len(boxes), *probs.shape[-2:])
            binary = np.asfortranarray((probs > mask_threshold).astype(np.uint8).transpose(1, 2, 0))
            rles = mask_utils.encode(binary) if len(boxes) else []
        for k in range(len(boxes)):
            label = int(labels[k])
            if label == 0:
                continue
            if label not in label_to_category:
                raise ValueError(f"label {label} has no COCO category (known labels: {sorted(label_to_category)})")
            x1, y1, x2, y2 = (float(v) for v in boxes[k])
            result = {"image_id": int(image_id), "category_id": int(label_to_category[label]),
                      "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(scores[k])}
            if masks:
                rle = rles[k]
                result["segmentation"] = {"size": [int(v) for v in rle["size"]],
                                          "counts": rle["counts"].decode("ascii")}
            results.append(result)
    return results


def _zero_metrics() -> dict[str, float]:
    return dict.fromkeys(METRIC_NAMES, 0.0)


def _load_gt(coco_gt: COCO | str | Path) -> COCO:
    if isinstance(coco_gt, COCO):
        return coco_gt
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(coco_gt))


def coco_evaluate(coco_gt: COCO | str | Path, results: Sequence[Mapping[str, Any]],
                  iou_types: Sequence[str] = ("bbox",), *,
                  image_ids: Iterable[int] | None = None) -> CocoMetrics:
    """COCO AP/AR of ``results`` against ``coco_gt`` with pycocotools' ``COCOeval``.

    Args:
        coco_gt: the ground truth (a ``COCO``, e.g. ``CocoDetection.coco``, or the path of a COCO json).
        results: COCO results (``to_coco_results``); an empty list scores 0 everywhere.
        iou_types: ``"bbox"`` and/or ``"segm"`` (needs ``segmentation`` in both ground truth and results).
        image_ids: evaluate only these images (e.g. ``dataset.image_ids`` when some listed images were skipped);
            default all images of ``coco_gt``. Images without any result count as missed detections.

    Returns:
        ``{iou_type: {"mAP", "mAP50", "mAP75", "mAP_small", "mAP_medium", "mAP_large", "AR100"}}`` as fractions in
        [0, 1]; COCO reports -1 for a size range without ground truth. ``.summary[iou_type]`` holds COCOeval's
        table (also logged at INFO level). Ground-truth annotations without ``area`` get their box area (in place).

    Raises:
        ValueError: an unknown IoU type; results for images not in ``coco_gt``; ``segm`` without segmentations.
    """
    gt = _load_gt(coco_gt)
    unknown = [t for t in iou_types if t not in IOU_TYPES]
    if unknown or not iou_types:
        raise ValueError(f"iou_types must be among {IOU_TYPES}, got {tuple(iou_types)}")
    known_images = set(gt.getImgIds())
    stray = {int(r["image_id"]) for r in results} - known_images
    if stray:
        raise ValueError(f"results for {len(stray)} image id(s) absent from the ground truth, e.g. {sorted(stray)[:5]}")
    selected = sorted(known_images if image_ids is None else {int(i) for i in image_ids})
    for ann in gt.anns.values():  # COCOeval needs areas (size ranges); fill missing ones with the box area
        if "area" not in ann and len(ann.get("bbox", ())) == 4:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    metrics = CocoMetrics()
    for iou_type in iou_types:
        if iou_type == "segm":
            if any("segmentation" not in r for r in results):
                raise ValueError("segm evaluation needs 'segmentation' in every result (to_coco_results(masks=True))")
            lacking = [a["id"] for a in gt.loadAnns(gt.getAnnIds(imgIds=selected)) if "segmentation" not in a]
            if lacking:
                raise ValueError(f"segm evaluation needs ground-truth segmentations; {len(lacking)} annotation(s) "
                                 "have none (boxes-only data: evaluate 'bbox')")
        if not results:
            metrics[iou_type] = _zero_metrics()
            metrics.summary[iou_type] = "no detections: every metric is 0"
            continue
        # one result kind per evaluation: loadRes derives area (and box) from the masks only without 'bbox'
        drop = "segmentation" if iou_type == "bbox" else "bbox"
        dets = [{k: copy.deepcopy(v) for k, v in r.items() if k != drop} for r in results]
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            coco_dt = gt.loadRes(dets)
            evaluator = COCOeval(gt, coco_dt, iouType=iou_type)
            evaluator.params.imgIds = selected
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        stats = evaluator.stats
        metrics[iou_type] = {name: float(stats[i]) for name, i in METRIC_NAMES.items()}
        summary = "\n".join(line for line in buffer.getvalue().splitlines() if line.startswith(" Average"))
        metrics.summary[iou_type] = summary
        logger.info("COCO %s evaluation:\n%s", iou_type, summary)
    return metrics
