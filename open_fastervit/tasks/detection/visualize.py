"""Drawing detector outputs on images (torchvision's ``draw_bounding_boxes`` / ``draw_segmentation_masks``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.io import write_png
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

__all__ = ["draw_detections", "save_png", "to_uint8"]

#: Distinct colours cycled over class labels.
PALETTE = ("#e6194b", "#3cb44b", "#ffe119", "#4363d8", "#f58231", "#911eb4", "#46f0f0", "#f032e6", "#bcf60c",
           "#fabebe", "#008080", "#e6beff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075", "#808080")


def to_uint8(image: Tensor) -> Tensor:
    """``(C, H, W)`` float in [0, 1] (clamped) or uint8 -> uint8 ``(C, H, W)`` on the CPU.

    Raises:
        ValueError: not a 3-D tensor, or another dtype.
    """
    if image.dim() != 3:
        raise ValueError(f"expected an image (C, H, W), got shape {tuple(image.shape)}")
    image = image.detach().cpu()
    if image.dtype == torch.uint8:
        return image
    if not image.is_floating_point():
        raise ValueError(f"expected a float image in [0, 1] or uint8, got {image.dtype}")
    return (image.float().clamp(0, 1) * 255).round().to(torch.uint8)


def _label_text(label: int, score: float, class_names: Sequence[str] | None) -> str:
    if class_names is not None and 1 <= label <= len(class_names):
        name = class_names[label - 1]
    else:
        name = str(label)
    return f"{name} {score:.2f}"


def draw_detections(image: Tensor, output: Mapping[str, Any], class_names: Sequence[str] | None = None,
                    score_threshold: float = 0.5, *, mask_threshold: float = 0.5, alpha: float = 0.45,
                    width: int = 2) -> Tensor:
    """Draw one image's detections: masks (if any) filled, boxes outlined and labelled ``"name score"``.

    Args:
        image: ``(3, H, W)`` float in [0, 1] or uint8 (a 1-channel image is repeated to RGB).
        output: a detector output, ``boxes`` (N, 4) xyxy pixels, ``labels`` (N,) in ``1..K``, ``scores`` (N,),
            optionally ``masks`` (N, 1, H, W) or (N, H, W) probabilities or binary masks.
        class_names: names of labels ``1..K`` in order (``dataset.class_names``); otherwise the label numbers.
        score_threshold: detections scoring below are not drawn.
        mask_threshold: masks are binarised at this probability.
        alpha: mask opacity; width: box line width in pixels.

    Returns:
        uint8 ``(3, H, W)`` tensor on the CPU.
    """
    canvas = to_uint8(image)
    if canvas.shape[0] == 1:
        canvas = canvas.repeat(3, 1, 1)
    scores = output["scores"].detach().cpu().reshape(-1)
    keep = scores >= score_threshold
    boxes = output["boxes"].detach().cpu().float().reshape(-1, 4)[keep]
    labels = output["labels"].detach().cpu().reshape(-1)[keep]
    scores = scores[keep]
    if boxes.numel() == 0:
        return canvas
    colors = [PALETTE[int(label) % len(PALETTE)] for label in labels]
    if "masks" in output and output["masks"] is not None:
        masks = output["masks"].detach().cpu()
        masks = masks.reshape(masks.shape[0], *masks.shape[-2:])[keep]
        masks = masks > mask_threshold if masks.is_floating_point() else masks.bool()
        canvas = draw_segmentation_masks(canvas, masks, alpha=alpha, colors=colors)
    texts = [_label_text(int(label), float(score), class_names) for label, score in zip(labels, scores)]
    return draw_bounding_boxes(canvas, boxes, labels=texts, colors=colors, width=width)


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write a ``(C, H, W)`` image (uint8, or float in [0, 1]) as PNG; parent folders are created.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(to_uint8(image), str(path))
    return path
