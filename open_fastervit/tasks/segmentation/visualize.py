"""Pictures of segmentations for reports: class-colour overlays, image | target | prediction strips, PNG output."""

from __future__ import annotations

import colorsys
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torchvision.io import write_png
from torchvision.utils import draw_segmentation_masks

__all__ = ["overlay_mask", "palette", "save_png", "side_by_side"]


def palette(num_classes: int) -> list[tuple[int, int, int]]:
    """``num_classes`` distinct RGB colours, the same for every call (hues spread by the golden ratio, with
    alternating brightness so that neighbouring class indices differ clearly)."""
    colours = []
    for i in range(num_classes):
        hue = (i * 0.6180339887) % 1.0
        value = 0.95 if i % 2 == 0 else 0.7
        r, g, b = colorsys.hsv_to_rgb(hue, 0.75, value)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return colours


def _to_uint8(image: Tensor) -> Tensor:
    """``(3, H, W)`` / ``(1, H, W)`` / ``(H, W)`` image, uint8 or float in [0, 1] -> uint8 ``(3, H, W)`` on the CPU."""
    image = image.detach().cpu()
    if image.ndim == 2:
        image = image.unsqueeze(0)
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise ValueError(f"expected an image (3, H, W), (1, H, W) or (H, W), got {tuple(image.shape)}")
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    if image.dtype != torch.uint8:
        image = (image.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return image.contiguous()


def _labels(mask: Tensor) -> Tensor:
    """Labels ``(H, W)`` from labels ``(H, W)`` / ``(1, H, W)`` or scores ``(K, H, W)`` (arg-maxed)."""
    mask = mask.detach().cpu()
    if mask.is_floating_point():
        if mask.ndim != 3:
            raise ValueError(f"float masks must be (K, H, W) scores, got {tuple(mask.shape)}")
        return mask.argmax(dim=0)
    if mask.ndim == 3 and mask.shape[0] == 1:
        mask = mask[0]
    if mask.ndim != 2:
        raise ValueError(f"expected labels (H, W), got {tuple(mask.shape)}")
    return mask.long()


def overlay_mask(image: Tensor, mask: Tensor, num_classes: int, alpha: float = 0.5, *, ignore_index: int = 255,
                 skip_classes: Sequence[int] = (), colors: Sequence[tuple[int, int, int]] | None = None) -> Tensor:
    """The image with each class's pixels tinted in its colour (``torchvision.utils.draw_segmentation_masks``).

    Args:
        image: ``(3, H, W)`` (or grey ``(1, H, W)`` / ``(H, W)``), uint8 or float in [0, 1].
        mask: labels ``(H, W)`` or scores / logits ``(K, H, W)`` (arg-maxed). ``ignore_index`` pixels, labels
            outside ``0..num_classes-1`` and ``skip_classes`` (e.g. a background class) are left untinted.
        alpha: opacity of the colours.
        colors: one RGB tuple per class (default ``palette(num_classes)``).

    Returns:
        uint8 ``(3, H, W)`` on the CPU.

    Raises:
        ValueError: unsupported shapes, or image and mask of different sizes.
    """
    rgb = _to_uint8(image)
    labels = _labels(mask)
    if tuple(labels.shape) != tuple(rgb.shape[-2:]):
        raise ValueError(f"mask {tuple(labels.shape)} and image {tuple(rgb.shape[-2:])} differ in size")
    colours = list(colors) if colors is not None else palette(num_classes)
    skip = set(int(c) for c in skip_classes)
    shown = [c for c in range(num_classes) if c not in skip and c != ignore_index]
    if not shown:
        return rgb
    masks = torch.stack([labels == c for c in shown])
    return draw_segmentation_masks(rgb, masks, alpha=alpha, colors=[colours[c] for c in shown])


def side_by_side(image: Tensor, target: Tensor, prediction: Tensor, num_classes: int | None = None,
                 alpha: float = 0.5, *, ignore_index: int = 255, gap: int = 4) -> Tensor:
    """``[image | target overlay | prediction overlay]`` in one uint8 ``(3, H, 3 W + 2 gap)`` picture (white gaps).

    Args:
        image: ``(3, H, W)``, uint8 or float in [0, 1].
        target: labels ``(H, W)``.
        prediction: labels ``(H, W)`` or logits ``(K, H, W)``.
        num_classes: K (default: the logits' K, else the largest label of target and prediction + 1, ignoring
            ``ignore_index``).

    Raises:
        ValueError: as ``overlay_mask``.
    """
    pred = _labels(prediction)
    tgt = _labels(target)
    if num_classes is None:
        if prediction.is_floating_point():
            num_classes = int(prediction.shape[0])
        else:
            both = torch.cat([tgt[tgt != ignore_index], pred[pred != ignore_index]])
            num_classes = int(both.max()) + 1 if both.numel() else 1
    rgb = _to_uint8(image)
    panels = [rgb, overlay_mask(rgb, tgt, num_classes, alpha, ignore_index=ignore_index),
              overlay_mask(rgb, pred, num_classes, alpha, ignore_index=ignore_index)]
    spacer = torch.full((3, rgb.shape[1], gap), 255, dtype=torch.uint8)
    pieces: list[Tensor] = []
    for i, panel in enumerate(panels):
        if i and gap > 0:
            pieces.append(spacer)
        pieces.append(panel)
    return torch.cat(pieces, dim=2)


def save_png(picture: Tensor, path: str | os.PathLike) -> Path:
    """Write a uint8 ``(3, H, W)`` / ``(1, H, W)`` / ``(H, W)`` picture (float in [0, 1] is converted) as a PNG,
    creating parent folders. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture = picture.detach().cpu()
    if picture.ndim == 2:
        picture = picture.unsqueeze(0)
    if picture.dtype != torch.uint8:
        picture = (picture.float().clamp(0, 1) * 255).round().to(torch.uint8)
    write_png(picture.contiguous(), str(path))
    return path
