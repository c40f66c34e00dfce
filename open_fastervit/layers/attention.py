"""Multi-head self-attention with a continuous relative position bias (window and carrier-token attention)."""

from __future__ import annotations

import torch.nn.functional as F
from timm.layers import use_fused_attn
from torch import Tensor, nn

from .fused import FusedLinear
from .pos_embed import ContinuousRelPosBias

__all__ = ["Attention"]


class Attention(nn.Module):
    """Multi-head self-attention with an additive bias (paper Eq. 4-6: window attention and carrier attention).

    ``x: (B, N, C) -> (B, N, C)``, or windows ``(B, nW, N, C) -> (B, nW, N, C)``. ``bias`` is ``(1, heads, N, N)``
    shared by all sequences, or with ``per_window=True`` ``(nW, heads, N, N)``, where window ``i`` of every image
    takes bias ``i`` (padding masks folded in). The fused path calls ``F.scaled_dot_product_attention``; the
    explicit path is kept for export (``TIMM_FUSED_ATTN=0``) and CPU training, where SDPA cannot differentiate a
    float mask efficiently.
    The bias MLP of the sequences this layer attends over is ``rel_pos``.

    Raises:
        ValueError: ``dim`` not divisible by ``num_heads``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.fused_attn = use_fused_attn()
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.rel_pos = ContinuousRelPosBias(num_heads)

    def forward(self, x: Tensor, bias: Tensor, residual: Tensor | None = None, per_window: bool = False) -> Tensor:
        """``x``: ``(B, N, C)`` sequences, or ``(B, nW, N, C)`` windows; ``bias``: ``(1, heads, N, N)``, or with
        ``per_window`` ``(nW, heads, N, N)``. ``residual`` (inference form only, after :meth:`fuse_projections`) is
        added by the output projection."""
        n, c = x.shape[-2:]
        qkv = self.qkv(x).view(*x.shape[:-2], n, 3, self.num_heads, self.head_dim)
        if x.dim() == 4:  # windows: fold (B, nW) into one batch dim for the fused kernels
            b, nw = x.shape[:2]
            qkv = qkv.reshape(b * nw, n, 3, self.num_heads, self.head_dim)
            if per_window:
                bias = bias.unsqueeze(0).expand(b, -1, -1, -1, -1).reshape(b * nw, self.num_heads, n, n)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B_, heads, N, d)
        bias = bias.to(q.dtype)
        if self.fused_attn and not (bias.requires_grad and q.device.type == "cpu"):
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias
            y = attn.softmax(dim=-1) @ v
        y = y.transpose(1, 2).reshape(x.shape)
        return self.proj(y) if residual is None else self.proj(y, residual=residual)

    def fuse_projections(self, scale: Tensor | None) -> None:
        """Inference form: fused linears; ``scale`` (the block's LayerScale gamma) folded into the projection."""
        self.qkv = FusedLinear(self.qkv)
        self.proj = FusedLinear(self.proj, scale=scale)
