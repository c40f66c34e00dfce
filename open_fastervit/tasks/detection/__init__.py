"""Object detection and instance segmentation with a FasterViT backbone (torchvision detectors + FPN).

* ``build_detector(kind, backbone, num_classes)``: Mask R-CNN, Faster R-CNN, RetinaNet or FCOS on FasterViT + FPN
  (see ``models`` for how this differs from the paper's Cascade Mask R-CNN: the APs are not comparable);
* ``CocoDetection`` / ``InstanceMaskFolder``: datasets returning ``(image, target)``, with ``train_transforms``,
  ``eval_transforms`` and ``collate_detection``;
* ``to_coco_results`` / ``coco_evaluate``: COCO AP with pycocotools;
* ``draw_detections`` / ``save_png``: pictures of the outputs.

Names are imported lazily (torchvision's detection models and pycocotools load on first use).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .train import (  # the task itself (registered with the engine); light: its heavy parts load on use
    DetectionConfig,
    DetectionTask,
    evaluate_detector,
    load_detector,
    predict_detector,
    train_detector,
)

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first access
    from .data import (
        CocoDetection,
        InstanceMaskFolder,
        NoMasksError,
        RandomCropFraction,
        collate_detection,
        eval_transforms,
        instance_folder_to_coco,
        instances_from_label_image,
        train_transforms,
    )
    from .metrics import CocoMetrics, coco_evaluate, to_coco_results
    from .models import (
        DETECTOR_KINDS,
        FasterViTFPN,
        build_detector,
        detector_backbone,
        detector_from_config,
        detector_param_groups,
    )
    from .visualize import draw_detections, save_png

_EXPORTS = {
    "DetectionConfig": "train",
    "DetectionTask": "train",
    "evaluate_detector": "train",
    "load_detector": "train",
    "predict_detector": "train",
    "train_detector": "train",
    "DETECTOR_KINDS": "models",
    "FasterViTFPN": "models",
    "build_detector": "models",
    "detector_backbone": "models",
    "detector_from_config": "models",
    "detector_param_groups": "models",
    "CocoDetection": "data",
    "InstanceMaskFolder": "data",
    "NoMasksError": "data",
    "RandomCropFraction": "data",
    "collate_detection": "data",
    "eval_transforms": "data",
    "instance_folder_to_coco": "data",
    "instances_from_label_image": "data",
    "train_transforms": "data",
    "CocoMetrics": "metrics",
    "coco_evaluate": "metrics",
    "to_coco_results": "metrics",
    "draw_detections": "visualize",
    "save_png": "visualize",
}

__all__ = [
    "DetectionConfig",
    "DetectionTask",
    "evaluate_detector",
    "load_detector",
    "predict_detector",
    "train_detector",
    "DETECTOR_KINDS",
    "CocoDetection",
    "CocoMetrics",
    "FasterViTFPN",
    "InstanceMaskFolder",
    "NoMasksError",
    "RandomCropFraction",
    "build_detector",
    "coco_evaluate",
    "collate_detection",
    "detector_backbone",
    "detector_from_config",
    "detector_param_groups",
    "draw_detections",
    "eval_transforms",
    "instance_folder_to_coco",
    "instances_from_label_image",
    "save_png",
    "to_coco_results",
    "train_transforms",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
