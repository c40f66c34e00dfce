"""Semantic segmentation metrics from an accumulated confusion matrix (mIoU, pixel accuracy, mean accuracy).

The confusion matrix is built with one ``torch.bincount`` over ``target * K + prediction`` per update: exact int64
counts, on whatever device the predictions are, with no per-call input validation pass beyond what is needed
(torchmetrics' ``multiclass_confusion_matrix`` computes the same bincount after its own checks and formatting, and
its stateful metric syncs itself over ``torch.distributed``; here the caller owns the sync: ``confusion`` is a plain
tensor to all-reduce, or call ``sync()``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

__all__ = ["SegmentationMetric"]


class SegmentationMetric:
    """Confusion-matrix accumulator for semantic segmentation.

    ``confusion[t, p]`` counts the pixels of true class ``t`` predicted as ``p`` (int64 ``(K, K)``; sum it over
    DDP ranks with ``torch.distributed.all_reduce`` or ``sync()`` before ``compute()``). Pixels whose target is
    ``ignore_index`` are not counted.

    Metrics (``compute()``), with ``TP_c`` the diagonal, ``T_c`` the row sums (pixels of class c) and ``P_c`` the
    column sums (pixels predicted c):

    * ``per_class_iou[c] = TP_c / (T_c + P_c - TP_c)``; a class absent from both target and prediction has
      ``T_c + P_c = 0`` and gets NaN, excluded from the mean. A class predicted but never present gets 0 and counts.
    * ``mIoU``: mean of the non-NaN per-class IoUs (NaN when there are none).
    * ``pixel_accuracy = sum(TP) / sum(T)`` (NaN when no pixel was counted).
    * ``per_class_accuracy[c] = TP_c / T_c`` (NaN when class c never occurs in the target);
      ``mean_accuracy`` is their mean over the non-NaN entries.

    Args:
        num_classes: K.
        ignore_index: target value left out of every count.
        device: where ``confusion`` starts (it moves to the predictions' device on the first update).

    Raises:
        ValueError: ``num_classes < 1``.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        """Zero the confusion matrix (keeps its device)."""
        self.confusion.zero_()

    @torch.no_grad()
    def update(self, logits_or_pred: Tensor, target: Tensor) -> None:
        """Add a batch.

        Args:
            logits_or_pred: float logits / scores ``(B, K, H, W)`` (arg-maxed over dim 1), or integer class
                predictions ``(B, H, W)``; also unbatched ``(K, H, W)`` / ``(H, W)``.
            target: integer labels ``(B, H, W)`` (or ``(H, W)``) at the same resolution; values in ``0..K-1`` or
                ``ignore_index``.

        Raises:
            ValueError: mismatched shapes, a float target, a logits channel count other than K, or predicted /
                target labels outside ``0..K-1`` (other than an ignored target).
        """
        k = self.num_classes
        if target.is_floating_point():
            raise ValueError(f"target must hold integer labels, got {target.dtype}")
        if logits_or_pred.is_floating_point():
            if logits_or_pred.ndim != target.ndim + 1 or logits_or_pred.shape[-3] != k:
                raise ValueError(f"logits {tuple(logits_or_pred.shape)} do not match target {tuple(target.shape)} "
                                 f"and {k} classes (expected (B, K, H, W) with (B, H, W))")
            pred = logits_or_pred.argmax(dim=-3)
        else:
            pred = logits_or_pred
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape; "
                             "resize the logits to the label size first")
        pred = pred.reshape(-1).long()
        target = target.to(pred.device).reshape(-1).long()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if target.numel():
            low = torch.minimum(pred.min(), target.min())
            high = torch.maximum(pred.max(), target.max())
            if bool(low < 0) or bool(high >= k):
                raise ValueError(f"labels {int(low)}..{int(high)} outside 0..{k - 1} (ignore_index "
                                 f"{self.ignore_index}); check num_classes / ignore_index")
        counts = torch.bincount(target * k + pred, minlength=k * k).view(k, k)
        if self.confusion.device != counts.device:
            self.confusion = self.confusion.to(counts.device)
        self.confusion += counts

    def sync(self, group: Any = None) -> None:
        """Sum ``confusion`` over the ranks of ``group`` (no-op outside ``torch.distributed``); call on every rank."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(self.confusion, group=group)

    def compute(self) -> dict[str, Any]:
        """``{"mIoU", "pixel_accuracy", "mean_accuracy": float, "per_class_iou", "per_class_accuracy": list[float]}``
        (fractions in [0, 1]; NaN as described in the class docstring)."""
        cm = self.confusion.double().cpu()
        tp = cm.diag()
        in_target = cm.sum(dim=1)
        in_pred = cm.sum(dim=0)
        union = in_target + in_pred - tp
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
        acc = torch.where(in_target > 0, tp / in_target.clamp(min=1), nan)
        total = float(in_target.sum())
        return {
            "mIoU": _nanmean(iou),
            "pixel_accuracy": float(tp.sum()) / total if total > 0 else math.nan,
            "mean_accuracy": _nanmean(acc),
            "per_class_iou": [float(v) for v in iou],
            "per_class_accuracy": [float(v) for v in acc],
        }


def _nanmean(values: Tensor) -> float:
    valid = values[~values.isnan()]
    return float(valid.mean()) if valid.numel() else math.nan
