"""Semantic segmentation with FasterViT backbones (paper Sec. 5.3: UPerNet on ADE20K).

* ``build_segmenter("upernet" | "fpn", "fastervit_0", num_classes)``: our ``FasterViTBackbone`` under
  segmentation_models_pytorch's UPerNet / FPN decoder; images in [0, 1] -> logits at the input size (any size >= 32).
* ``SegmentationFolder``: image / class-index mask folders (ADE20K layout included), problems reported and skipped;
  ``train_transforms`` / ``eval_transforms`` / ``collate_segmentation``.
* ``SegmentationMetric``: confusion matrix -> mIoU, pixel accuracy, mean accuracy.
* ``overlay_mask`` / ``side_by_side`` / ``save_png``: report pictures.

Names are imported on first use, so ``import open_fastervit.tasks.segmentation`` does not load
segmentation_models_pytorch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .train import (  # the task itself (registered with the engine); light: its heavy parts load on use
    SegmentationConfig,
    SegmentationTask,
    evaluate_segmenter,
    load_segmenter,
    predict_segmenter,
    train_segmenter,
)

__all__ = [
    "SegmentationConfig",
    "SegmentationTask",
    "evaluate_segmenter",
    "load_segmenter",
    "predict_segmenter",
    "train_segmenter",
    "SEGMENTER_KINDS",
    "DataProblem",
    "RandomRescale",
    "SegmentationFolder",
    "SegmentationMetric",
    "Segmenter",
    "build_segmenter",
    "collate_segmentation",
    "describe_folder",
    "eval_transforms",
    "overlay_mask",
    "palette",
    "read_mask",
    "save_png",
    "segmenter_backbone",
    "segmenter_from_config",
    "segmenter_param_groups",
    "side_by_side",
    "train_transforms",
]

_WHERE = {
    "SEGMENTER_KINDS": "models", "Segmenter": "models", "build_segmenter": "models", "segmenter_backbone": "models",
    "segmenter_from_config": "models", "segmenter_param_groups": "models",
    "DataProblem": "data", "RandomRescale": "data", "SegmentationFolder": "data", "collate_segmentation": "data",
    "describe_folder": "data", "eval_transforms": "data", "read_mask": "data", "train_transforms": "data",
    "SegmentationMetric": "metrics",
    "overlay_mask": "visualize", "palette": "visualize", "save_png": "visualize", "side_by_side": "visualize",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
