"""Stochastic depth that skips the work of the samples it drops.

Stochastic depth (Huang et al., 2016, "Deep Networks with Stochastic Depth"; timm's ``DropPath``), used by FasterViT
with rates ``linspace(0, drop_path_rate)`` over its blocks (SPEC section 4), computes a residual branch for every
sample and then multiplies the dropped ones by zero: ``x + branch(x) * mask / keep_prob``. For a branch whose
samples do not interact (LayerNorm, attention within an image, MLP: every HAT branch), the same result comes from
running the branch on the kept samples only and adding it back at their rows. On average that skips the fraction
``drop_prob`` of the branch's forward *and* backward, e.g. 13% of FasterViT-0's HAT-stage work, 22% of
FasterViT-6's.

Branches with BatchNorm in training mode (the conv stages) mix the samples through the batch statistics; they
keep timm's ``DropPath``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .windows import tracing

__all__ = ["keep_mask", "residual_drop_path"]


def keep_mask(batch: int, keep_prob: float) -> Tensor:
    """Which of ``batch`` samples a stochastic-depth branch keeps: a ``(batch,)`` CPU float tensor of 0/1.

    Drawn from torch's default CPU generator (the draw timm's ``DropPath`` makes for a CPU tensor), so that the
    kept indices are known on the host without a device synchronization, and activation checkpointing, which
    restores the CPU RNG state, recomputes the same mask.
    """
    return torch.empty(batch).bernoulli_(keep_prob)


def residual_drop_path(
    x: Tensor, branch: Callable[[Tensor], Tensor], drop_prob: float, training: bool, mask: Tensor | None = None
) -> Tensor:
    """``x + DropPath(branch(x))`` with ``branch`` run on the kept samples only (exact for per-sample branches).

    Args:
        x: ``(B, ...)``, the residual stream; samples along dim 0.
        branch: maps ``(b, ...) -> (b, ...)`` for any ``b <= B`` and must treat samples independently (no
            BatchNorm in training mode); it is called once, on ``x`` or on a subset of its rows.
        drop_prob: probability of dropping the branch for a sample (0 <= drop_prob < 1).
        training: stochastic depth acts only in training; otherwise ``x + branch(x)``.
        mask: ``(B,)`` 0/1 keep mask (default: :func:`keep_mask`); given for tests and reproductions.

    Returns:
        ``(B, ...)``: ``x + branch(x) * mask / (1 - drop_prob)`` per sample, equal up to float rounding to timm's
        ``x + DropPath(drop_prob)(branch(x))`` under the same mask. When no sample is kept the branch still runs
        (times zero), so every parameter gets a gradient, as distributed data parallel requires. Under
        torch.compile / export / tracing the mask is applied by multiplication (no data-dependent shapes).

    Raises:
        ValueError: ``drop_prob`` outside ``[0, 1)`` or a ``mask`` of the wrong length.
    """
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
    if not training or drop_prob == 0.0:
        return x + branch(x)
    keep_prob = 1.0 - drop_prob
    batch = x.shape[0]
    if mask is None:
        mask = keep_mask(batch, keep_prob)
    if mask.shape != (batch,):
        raise ValueError(f"mask must have shape ({batch},), got {tuple(mask.shape)}")
    if tracing():
        scale = (mask / keep_prob).to(device=x.device, dtype=x.dtype).view(batch, *([1] * (x.dim() - 1)))
        return x + branch(x) * scale
    kept = mask.cpu().nonzero().flatten()
    if kept.numel() == batch:
        return x + branch(x) * (1.0 / keep_prob)
    if kept.numel() == 0:
        return x + branch(x) * 0.0
    kept = kept.to(x.device, non_blocking=True)
    y = branch(x.index_select(0, kept))
    dtype = torch.result_type(x, y)  # as ``x + y`` would promote (an fp32 stream with a bf16 autocast branch)
    return x.to(dtype).index_add(0, kept, y.to(dtype), alpha=1.0 / keep_prob)
