"""Continuous position encodings of FasterViT (paper Sec. 3.2): token position MLPs and the attention bias MLP.

Both are MLPs over normalised coordinates, so they are pure functions of the grid size: one set of weights serves
any window, carrier grid or input size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from timm.models import register_notrace_function
from torch import Tensor, nn

from .windows import WindowGrid, tracing

__all__ = [
    "POS_MLP_HIDDEN",
    "ContinuousRelPosBias",
    "TokenPosEmbed",
    "grid_coordinates",
    "log_relative_offsets",
    "relative_position_index",
]

POS_MLP_HIDDEN = 512  # hidden width of every position-encoding MLP


@register_notrace_function
def grid_coordinates(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Normalised (row, col) of every cell of an ``h x w`` grid, row-major: ``(h*w, 2)``.

    Each axis maps index ``i`` to ``(i - s//2) / (s//2)`` (integer halves), e.g. 7 -> -1 ... 1, 4 -> -1 ... 0.5.
    """
    ys = (torch.arange(h, device=device, dtype=dtype) - h // 2) / torch.sym_max(h // 2, 1)
    xs = (torch.arange(w, device=device, dtype=dtype) - w // 2) / torch.sym_max(w // 2, 1)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(h * w, 2)


@register_notrace_function
def log_relative_offsets(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """SwinV2 log-spaced relative offsets of an ``h x w`` grid: ``((2h-1)*(2w-1), 2)``.

    Offsets in ``[-(s-1), s-1]`` are divided by ``s-1``, scaled by 8 and mapped by ``sign(x) log2(|x|+1) / 3``.
    """
    dy = torch.arange(-(h - 1), h, device=device, dtype=torch.float32) / torch.sym_max(h - 1, 1)
    dx = torch.arange(-(w - 1), w, device=device, dtype=torch.float32) / torch.sym_max(w - 1, 1)
    table = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1) * 8
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / 3.0
    return table.reshape(-1, 2).to(dtype)


@register_notrace_function
def relative_position_index(h: int, w: int, device: torch.device) -> Tensor:
    """Swin index of the offset between every pair of tokens of an ``h x w`` grid: ``(h*w, h*w)``."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)


class _GeometryCache(nn.Module):
    """A value computed from this module's weights and a geometry, cached in inference (eval mode, no autograd,
    not tracing) per geometry, device, dtype and autocast state, and used only while still valid (:func:`_stamp`).
    """

    max_cached = 64  # geometries kept at once (many input sizes in one process: memory stays bounded)

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[tuple, tuple[tuple, Tensor]] = {}

    def _cached(self, geometry: tuple, tensors: tuple[Tensor, ...], compute: Callable[[], Tensor]) -> Tensor:
        if self.training or torch.is_grad_enabled() or tracing():
            return compute()
        weight = tensors[0]
        device = weight.device.type
        amp = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        key = (*geometry, weight.device, weight.dtype, amp)
        hit = self._cache.get(key)
        if hit is not None and _still_valid(hit[0], tensors):
            return hit[1]
        if len(self._cache) >= self.max_cached:
            self._cache.clear()
        value = compute()
        self._cache[key] = (_stamp(tensors), value)
        return value

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half(): the cache holds old-device tensors
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self) -> dict:  # deepcopy / pickle: the cache is not state
        return {**self.__dict__, "_cache": {}}


class TokenPosEmbed(_GeometryCache):
    """Continuous token position encoding: an MLP over normalised grid coordinates (paper Sec. 3.2).

    Used for the window tokens (a ``ws x ws`` grid) and the carrier tokens (the carrier grid). In inference the
    embedding of a grid is cached and reused while the MLP's weights are unchanged (as :class:`ContinuousRelPosBias`
    does); in training it is recomputed every call.
    """

    def __init__(self, dim: int, hidden: int = POS_MLP_HIDDEN) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, dim, bias=False))

    def forward(self, h: int, w: int) -> Tensor:
        """Embedding of an ``h x w`` grid, row-major: ``(1, h*w, C)``."""
        tensors = (self.mlp[0].weight, self.mlp[0].bias, self.mlp[2].weight)
        return self._cached((h, w), tensors, lambda: self.compute(h, w))

    def compute(self, h: int, w: int) -> Tensor:
        weight = self.mlp[0].weight
        return self.mlp(grid_coordinates(h, w, weight.device, weight.dtype)).unsqueeze(0)


class ContinuousRelPosBias(_GeometryCache):
    """SwinV2-style continuous relative position bias: MLP over log-spaced offsets, ``16 * sigmoid``.

    For window attention over a padded map it also folds in the key mask of the padded positions.

    The bias is constant for given weights and geometry, so in inference (eval mode, no autograd, not tracing) it
    is cached per geometry, device, dtype and autocast state. In a trainable model a cached value is used only while
    the MLP's weights are *equal* to the ones it was computed from (compared element by element, a few thousand
    numbers), so no route of changing the weights (``.data`` edits, re-assigned or swapped parameters,
    ``load_state_dict``, EMA/averaging updates) can leave it stale. In the inference snapshot (weights held as
    buffers, out of reach of parameter updates) the check is identity and version counter, which is cheaper.
    """

    def __init__(self, num_heads: int, hidden: int = POS_MLP_HIDDEN) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, num_heads, bias=False))

    def forward(self, h: int, w: int, num_prefix: int = 0, grid: WindowGrid | None = None) -> Tensor:
        """Bias of an ``h x w`` window: ``(1, heads, P + h*w, P + h*w)``; pairs with a prefix token get 0.

        With ``grid`` (the map cut into such windows) the result is per window, ``(nW, heads, N, N)``, with ``-inf``
        on padded keys (:meth:`WindowGrid.key_mask`); pass it only when the map needs padding or when tracing.
        """
        tensors = (self.mlp[0].weight, self.mlp[0].bias, self.mlp[2].weight)
        return self._cached((h, w, num_prefix, grid), tensors, lambda: self.compute(h, w, num_prefix, grid))

    def compute(self, h: int, w: int, num_prefix: int = 0, grid: WindowGrid | None = None) -> Tensor:
        weight = self.mlp[0].weight
        values = self.mlp(log_relative_offsets(h, w, weight.device, weight.dtype))  # ((2h-1)(2w-1), heads)
        bias = values[relative_position_index(h, w, weight.device)]  # (hw, hw, heads)
        bias = 16 * torch.sigmoid(bias.permute(2, 0, 1))
        if num_prefix:
            bias = F.pad(bias, (num_prefix, 0, num_prefix, 0))
        bias = bias.unsqueeze(0)  # 4-D: the layout fused SDPA kernels take
        if grid is not None:
            bias = bias + grid.key_mask(num_prefix, weight.device, bias.dtype)  # (nW, heads, N, N)
        return bias


def _stamp(tensors: tuple[Tensor, ...]) -> tuple:
    """What a cached value was computed from. Parameters (a trainable model): a copy of their values, since
    ``.data`` edits and swaps bypass version counters. Buffers only (the inference snapshot, ``layers.fused.freeze``,
    whose parameters no update can reach): the tensors themselves (held) and their version counters, which every
    remaining route (``load_state_dict``, in-place ops on ``state_dict()`` tensors) bumps. Inference tensors (the
    snapshot built under ``torch.inference_mode``) have no version counter: their values are kept instead."""
    if any(isinstance(t, nn.Parameter) or t.is_inference() for t in tensors):
        return ("values", tuple(t.detach().clone() for t in tensors))
    return ("versions", tensors, tuple(t._version for t in tensors))


def _still_valid(stamp: tuple, tensors: tuple[Tensor, ...]) -> bool:
    if stamp[0] == "versions":
        return (all(a is b for a, b in zip(stamp[1], tensors))
                and stamp[2] == tuple(t._version for t in tensors))
    return all(
        a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
        for a, b in zip(stamp[1], tensors)
    )
