"""Window geometry of one attention stage: padding, window grid, carrier grid, masks and layouts.

Hierarchical Attention (paper Sec. 3.2) cuts a ``H x W`` map into ``ws x ws`` windows and gives each window a
``ct x ct`` grid of carrier tokens. :class:`WindowGrid` computes that geometry once per stage and forward pass;
every layer takes it from there instead of re-deriving it.

All arithmetic is integer arithmetic on the map size (``ceil`` as ``(h + ws - 1) // ws``) and all masks and pooling
matrices are built from ``arange`` comparisons, so the sizes stay symbolic under ``torch.compile(dynamic=True)``,
``torch.export`` and ONNX export. One rule keeps symbolic shape reasoning out of divisibility proofs it cannot make
(``(ws + ws*q) % (1 + q)``): a size is never split by a symbolic factor with ``view``; windows and carrier cells are
cut with ``unfold`` (their counts come out as floor divisions), and only sizes built as products of the window
counts are split again. Under tracing, padding and cropping run unconditionally (a pad of 0, a gather of every
row), so no branch depends on whether a size divides. Layouts::

    window tokens:  (B, nW, ws*ws, C)  windows row-major over the (nh, nw) window grid, tokens row-major inside
    carrier tokens: (B, nh*nw*ct*ct, C) "window-major": window row, window col, then the ct x ct cell
    carrier raster: (B, nh*ct * nw*ct, C) row-major over the (nh*ct, nw*ct) carrier grid
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["WindowGrid", "tracing"]


def tracing() -> bool:
    """True under torch.compile / torch.export / jit tracing: layers then take their branch-free, symbolic path."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting()


@dataclass(frozen=True)
class WindowGrid:
    """Geometry of an ``h x w`` map (the real, unpadded size) cut into ``window_size`` windows.

    Attributes:
        h, w: real map size (may be symbolic ints under export).
        window_size: window side ``ws``.
        carrier_size: carrier tokens per window and axis ``ct`` (0: no carrier tokens).
        nh, nw: windows per axis, ``ceil(h / ws)``, ``ceil(w / ws)``.
    """

    h: int
    w: int
    window_size: int
    carrier_size: int = 0

    @property
    def nh(self) -> int:
        return (self.h + self.window_size - 1) // self.window_size

    @property
    def nw(self) -> int:
        return (self.w + self.window_size - 1) // self.window_size

    @property
    def num_windows(self) -> int:
        return self.nh * self.nw

    @property
    def padded_size(self) -> tuple[int, int]:
        """``(nh * ws, nw * ws)``: the map padded (bottom and right) to whole windows."""
        return self.nh * self.window_size, self.nw * self.window_size

    @property
    def carrier_grid(self) -> tuple[int, int]:
        """``(nh * ct, nw * ct)``: carrier tokens per axis over the whole map."""
        return self.nh * self.carrier_size, self.nw * self.carrier_size

    @property
    def num_carriers(self) -> int:
        """Carrier tokens per window, ``ct * ct``."""
        return self.carrier_size * self.carrier_size

    def needs_padding(self) -> bool:
        """Whether the map must be padded (a Python bool; eager mode only, see :func:`tracing`)."""
        return bool(self.nh * self.window_size != self.h or self.nw * self.window_size != self.w)

    # ---- layouts ---------------------------------------------------------------------------------------------

    def partition(self, x: Tensor) -> Tensor:
        """(B, C, H, W) real map -> padded window tokens (B, nW, ws*ws, C); padding is zeros."""
        ws, (hp, wp) = self.window_size, self.padded_size
        if tracing() or self.needs_padding():
            x = F.pad(x, (0, wp - self.w, 0, hp - self.h))
        b, c = x.shape[:2]
        x = x.unfold(2, ws, ws).unfold(3, ws, ws)  # (B, C, nh, nw, ws, ws); unfold keeps sizes symbolic-friendly
        return x.permute(0, 2, 3, 4, 5, 1).reshape(b, self.num_windows, ws * ws, c)

    def reverse(self, z: Tensor) -> Tensor:
        """Window tokens (B, nW, ws*ws, C) -> real map (B, C, H, W), padding cropped; inverse of :meth:`partition`."""
        ws, (hp, wp) = self.window_size, self.padded_size
        b, c = z.shape[0], z.shape[-1]
        x = z.view(b, self.nh, self.nw, ws, ws, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, hp, wp)
        if tracing():  # gather the real rows / columns: no guard on whether any padding exists
            rows = torch.arange(self.h, device=x.device)
            cols = torch.arange(self.w, device=x.device)
            return x.index_select(2, rows).index_select(3, cols)
        if self.needs_padding():
            return x[:, :, : self.h, : self.w].contiguous()
        return x

    def carriers_to_raster(self, t: Tensor) -> Tensor:
        """Window-major carrier tokens (B, nW*ct*ct, C) -> raster order over the carrier grid."""
        b, ct, c = t.shape[0], self.carrier_size, t.shape[-1]
        t6 = t.view(b, self.num_windows, ct, ct, c).view(b, self.nh, self.nw, ct, ct, c)  # windows first: see above
        return t6.permute(0, 1, 3, 2, 4, 5).reshape(t.shape)

    def raster_to_carriers(self, t: Tensor) -> Tensor:
        """Raster carrier tokens -> window-major; inverse of :meth:`carriers_to_raster`."""
        (gh, gw), ct, c = self.carrier_grid, self.carrier_size, t.shape[-1]
        cells = t.view(t.shape[0], gh, gw, c).unfold(1, ct, ct).unfold(2, ct, ct)  # (B, nh, nw, C, ct, ct)
        return cells.permute(0, 1, 2, 4, 5, 3).reshape(t.shape)

    # ---- masks and pooling -----------------------------------------------------------------------------------

    def key_mask(self, num_prefix: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """Additive attention mask of the padded positions, per window: ``(nW, 1, 1, num_prefix + ws*ws)``.

        Padded keys get ``-inf``; real keys and the ``num_prefix`` carrier tokens in front get 0. Every window keeps
        at least one real key (windows start inside the real map). All zeros when no padding is needed.
        """
        ws = self.window_size
        offsets = torch.arange(ws, device=device)[None, :]
        rows = torch.arange(self.nh, device=device)[:, None] * ws + offsets < self.h  # (nh, ws): real rows
        cols = torch.arange(self.nw, device=device)[:, None] * ws + offsets < self.w  # (nw, ws)
        valid = (rows[:, None, :, None] & cols[None, :, None, :]).reshape(self.num_windows, ws * ws)
        valid = torch.cat([valid.new_ones(self.num_windows, num_prefix), valid], dim=1)
        mask = torch.zeros(valid.shape, device=device, dtype=dtype).masked_fill(~valid, float("-inf"))
        return mask[:, None, None, :]

    def carrier_pool_matrices(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Average-pooling matrices ``(P_h, P_w)`` of the carrier initializer: ``pooled = P_h @ x @ P_w^T``.

        Axis of real length ``L`` pooled to ``n = ct * windows`` cells: stride ``s = L // n``, kernel
        ``L - (n - 1) * s`` (the cells tile the real map, none reaches into the padding). A map shorter than ``n``
        is first repeated (nearest) to ``n`` positions, so every cell covers at least one real position.
        Shapes: ``P_h (nh*ct, h)``, ``P_w (nw*ct, w)``.
        """
        gh, gw = self.carrier_grid
        return _pool_matrix(self.h, gh, device, dtype), _pool_matrix(self.w, gw, device, dtype)


def _pool_matrix(length: int, cells: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """``(cells, length)`` averaging matrix; branch-free in ``length`` (see ``carrier_pool_matrices``)."""
    i = torch.arange(cells, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    stride = length // cells
    kernel = length - (cells - 1) * stride
    start = i * stride
    window = ((j >= start) & (j < start + kernel)).to(dtype) / kernel
    nearest = (j == (i * length) // cells).to(dtype)  # map shorter than the grid: nearest repeat, kernel 1
    too_short = (torch.arange(cells, device=device) >= length).any()  # a tensor, not a Python branch
    return torch.where(too_short, nearest, window)
