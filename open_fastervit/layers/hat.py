"""Hierarchical Attention (HAT), the paper's contribution (arXiv:2306.06189, Sec. 3.3 "Hierarchical Attention").

A map is cut into ``ws x ws`` local windows (the paper's ``x̂_l``). Each window gets ``ct x ct`` carrier tokens
(``x̂_ct``), pooled from the map. In every block the carrier tokens of an image first attend to each other globally
(cheap: few tokens), then each window attends over ``[its carrier tokens, its window tokens]``, so information
crosses windows through the carriers. Optionally the carriers are propagated back onto the map at the end.

:class:`HierarchicalAttention` is the plug-in module: ``(B, C, H, W) -> (B, C, H, W)`` for any ``H, W >= 1``.
FasterViT's transformer stages are a downsampler followed by one of these (``model.HatStage``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.utils.checkpoint
from timm.layers import DropPath, LayerScale, Mlp
from torch import Tensor, nn

from .attention import Attention
from .drop_path import residual_drop_path
from .fused import FusedMlp
from .pos_embed import TokenPosEmbed
from .windows import WindowGrid, tracing

__all__ = ["CarrierTokenInit", "HatBlock", "HierarchicalAttention"]


class CarrierTokenInit(nn.Module):
    """Carrier-token initializer (paper: ``x̂_c = Conv3x3(x)``, ``x̂_ct = AvgPool(x̂_c)``): a depthwise 3x3 conv as
    position encoding, then average pooling to ``ct x ct`` cells per window.

    ``x: (B, C, H, W)`` real (unpadded) map -> carrier tokens ``(B, nh*nw*ct*ct, C)`` window-major. The pooling
    cells tile the real map only (:meth:`WindowGrid.carrier_pool_matrices`), so padding never leaks in.
    """

    def __init__(self, dim: int, carrier_size: int) -> None:
        super().__init__()
        self.carrier_size = carrier_size
        self.pos_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, grid: WindowGrid) -> Tensor:
        x = self.pos_conv(x)
        pool_h, pool_w = grid.carrier_pool_matrices(x.device, x.dtype)
        x = torch.matmul(torch.matmul(pool_h, x), pool_w.t())  # (B, C, nh*ct, nw*ct)
        b, c, ct = x.shape[0], x.shape[1], self.carrier_size
        x = x.unfold(2, ct, ct).unfold(3, ct, ct)  # (B, C, nh, nw, ct, ct)
        return x.permute(0, 2, 3, 4, 5, 1).reshape(b, grid.num_windows * ct * ct, c)


class HatBlock(nn.Module):
    """One transformer block with Hierarchical Attention (paper Sec. 3.3, Fig. 4; SPEC section 4 steps 1-10).

    With carrier tokens ``t`` (``x̂_ct``, one ``ct x ct`` set per window):

    1. ``x̂_ct = x̂_ct + γ1 · MHSA(LN(x̂_ct))``, ``x̂_ct = x̂_ct + γ2 · MLP(LN(x̂_ct))``: global attention among all
       carrier tokens of an image (raster order over the carrier grid, own position MLPs);
    2. ``x̂_w = Concat(x̂_ct of the window, x̂_l)``, carriers first; ``x̂_w = x̂_w + γ3 · MHSA(LN(x̂_w))``,
       ``x̂_w = x̂_w + γ4 · MLP(LN(x̂_w))``: local attention over each window and its carriers;
    3. split ``x̂_w`` back into ``x̂_ct`` and ``x̂_l``; with ``propagate``, nearest-upsample each window's carriers
       to ``ws x ws`` and add ``γ1 ·`` that to the window tokens.

    Without carriers (``carrier_size=0`` or ``t=None``) it is a plain window-attention block (step 2 alone).
    Window tokens get a continuous position embedding first (``pos_embed``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        carrier_size: int = 0,
        propagate: bool = False,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.carrier_size = carrier_size
        self.propagate = propagate and carrier_size > 0
        self.hat = carrier_size > 0
        self.fused = False
        hidden = int(dim * mlp_ratio)

        def scale() -> nn.Module:
            return LayerScale(dim, layer_scale) if layer_scale is not None else nn.Identity()

        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        # local window attention over [carriers of the window, window tokens]
        self.pos_embed = TokenPosEmbed(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.ls_attn = scale()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden)
        self.ls_mlp = scale()
        if self.hat:  # global attention among carrier tokens
            self.ct_pos_embed = TokenPosEmbed(dim)
            self.ct_norm1 = nn.LayerNorm(dim)
            self.ct_attn = Attention(dim, num_heads, qkv_bias)
            self.ct_ls_attn = scale()
            self.ct_norm2 = nn.LayerNorm(dim)
            self.ct_mlp = Mlp(dim, hidden)
            self.ct_ls_mlp = scale()

    def _residual(self, x: Tensor, branch: Callable[[Tensor], Tensor]) -> Tensor:
        """``x + DropPath(branch(x))``, the branch run on the kept images only (every branch here is per image)."""
        drop_prob = self.drop_path.drop_prob if isinstance(self.drop_path, DropPath) else 0.0
        return residual_drop_path(x, branch, drop_prob, self.training)

    def carrier_attention(self, t: Tensor, grid: WindowGrid) -> Tensor:
        """Global attention among the carrier tokens of each image: window-major ``(B, N_ct, C)`` in and out."""
        gh, gw = grid.carrier_grid
        t = grid.carriers_to_raster(t) + self.ct_pos_embed(gh, gw)
        bias = self.ct_attn.rel_pos(gh, gw)
        if self.fused:  # inference form: layer scales folded, residual adds done by the output linears
            t = self.ct_attn(self.ct_norm1(t), bias, residual=t)
            t = self.ct_mlp(self.ct_norm2(t), residual=t)
        else:
            t = self._residual(t, lambda v: self.ct_ls_attn(self.ct_attn(self.ct_norm1(v), bias)))
            t = self._residual(t, lambda v: self.ct_ls_mlp(self.ct_mlp(self.ct_norm2(v))))
        return grid.raster_to_carriers(t)

    def forward(self, z: Tensor, t: Tensor | None, grid: WindowGrid) -> tuple[Tensor, Tensor | None]:
        """``z``: window tokens ``(B, nW, ws*ws, C)`` of the map padded to whole windows; ``t``: carrier tokens
        ``(B, nW*ct*ct, C)`` window-major, or None. Returns both, same shapes. Drop path is per image."""
        ws = self.window_size
        z = z + self.pos_embed(ws, ws)
        num_ct = 0
        if t is not None:
            num_ct = self.carrier_size * self.carrier_size
            t = self.carrier_attention(t, grid)
            u = torch.cat([t.view(t.shape[0], grid.num_windows, num_ct, t.shape[-1]), z], dim=2)  # carriers FIRST
        else:
            u = z
        per_window = tracing() or grid.needs_padding()  # padded keys masked per window
        bias = self.attn.rel_pos(ws, ws, num_prefix=num_ct, grid=grid if per_window else None)
        if self.fused:
            u = self.attn(self.norm1(u), bias, residual=u, per_window=per_window)
            u = self.mlp(self.norm2(u), residual=u)
        else:
            u = self._residual(u, lambda v: self.ls_attn(self.attn(self.norm1(v), bias, per_window=per_window)))
            u = self._residual(u, lambda v: self.ls_mlp(self.mlp(self.norm2(v))))
        if t is None:
            return u, None
        t_win, z = u.split([num_ct, ws * ws], dim=2)
        t = t_win.reshape(t.shape)
        if self.propagate:  # nearest-upsample each window's carriers onto its tokens, scaled by the carrier γ1
            ct = self.carrier_size
            idx = torch.arange(ws, device=z.device) * ct // ws
            up = t_win.reshape(*t_win.shape[:2], ct, ct, t_win.shape[-1])[:, :, idx][:, :, :, idx]
            z = z + self.ct_ls_attn(up.reshape(z.shape))
        return z, t

    def fuse(self) -> HatBlock:
        """Inference form (timm ``reparameterize_model`` calls this): LayerScale gammas folded into the output
        linears, GELU and residual adds fused into them (``FusedLinear``). Drop path is inactive."""
        if self.fused:
            return self

        def gamma(ls: nn.Module) -> Tensor | None:
            return ls.gamma if isinstance(ls, LayerScale) else None

        self.attn.fuse_projections(gamma(self.ls_attn))
        self.mlp = FusedMlp(self.mlp.fc1, self.mlp.fc2, gamma(self.ls_mlp))
        if self.hat:  # ct_ls_attn stays: carrier propagation uses its gamma
            self.ct_attn.fuse_projections(gamma(self.ct_ls_attn))
            self.ct_mlp = FusedMlp(self.ct_mlp.fc1, self.ct_mlp.fc2, gamma(self.ct_ls_mlp))
        self.fused = True
        return self


class HierarchicalAttention(nn.Module):
    """Hierarchical Attention as a module: ``(B, C, H, W) -> (B, C, H, W)`` for any ``H, W >= 1``.

    Steps (shapes for ``nW = ceil(H/ws) * ceil(W/ws)`` windows, ``ct`` = ``carrier_size``):

    1. carrier tokens from the real map (:class:`CarrierTokenInit`): ``(B, nW*ct*ct, C)``;
    2. pad bottom/right to whole windows and cut into windows (the paper's ``x̂_l = Split(x)``):
       ``(B, nW, ws*ws, C)``; padded keys are masked out of attention;
    3. ``depth`` :class:`HatBlock` s (carrier attention, concatenation, window attention, split; carrier
       propagation after the last block when ``propagate``);
    4. merge the windows and crop the padding: ``(B, C, H, W)``.

    Carrier tokens are used when ``carrier_size > 0`` and the map holds more than one window (with one window,
    window attention is already global). ``carrier_size=0`` gives plain (non-shifted) window attention with
    continuous position bias and no carrier weights at all.

    Args:
        dim: channels ``C``.
        num_heads: attention heads (``dim`` must divide by it).
        window_size: window side ``ws``.
        carrier_size: carrier tokens per window and axis ``ct`` (FasterViT: 2; 0: none).
        depth: number of HAT blocks.
        mlp_ratio: MLP hidden width / ``dim``.
        drop_path: stochastic depth rate, one float or one per block.
        layer_scale: initial LayerScale value (None: no layer scale).
        qkv_bias: bias of the qkv projections.
        propagate: add the carrier tokens back onto the map after the last block (FasterViT-3..6).

    Raises:
        ValueError: bad sizes (``window_size < 1``, ``carrier_size < 0``, ``depth < 1``, a ``drop_path`` list of
            the wrong length, ``dim`` not divisible by ``num_heads``), or an input that is not ``(B, dim, H, W)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int = 7,
        carrier_size: int = 2,
        depth: int = 1,
        mlp_ratio: float = 4.0,
        drop_path: float | Sequence[float] = 0.0,
        layer_scale: float | None = None,
        qkv_bias: bool = True,
        propagate: bool = False,
    ) -> None:
        super().__init__()
        if window_size < 1 or carrier_size < 0 or depth < 1:
            raise ValueError(
                f"need window_size >= 1, carrier_size >= 0, depth >= 1; got {window_size}, {carrier_size}, {depth}"
            )
        rates = [float(drop_path)] * depth if isinstance(drop_path, (int, float)) else [float(r) for r in drop_path]
        if len(rates) != depth:
            raise ValueError(f"drop_path has {len(rates)} rates for depth {depth}")
        self.dim = dim
        self.window_size = window_size
        self.carrier_size = carrier_size
        self.carrier_init = CarrierTokenInit(dim, carrier_size) if carrier_size > 0 else None
        self.blocks = nn.ModuleList(
            [
                HatBlock(
                    dim,
                    num_heads,
                    window_size,
                    carrier_size,
                    propagate=propagate and i == depth - 1,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=rates[i],
                    layer_scale=layer_scale,
                )
                for i in range(depth)
            ]
        )
        self.grad_checkpointing = False

    def grid(self, h: int, w: int) -> WindowGrid:
        """The window geometry of an ``h x w`` map."""
        return WindowGrid(h, w, self.window_size, self.carrier_size)

    def uses_carriers(self, h: int, w: int) -> bool:
        """Whether carrier tokens run for an ``h x w`` map (carrier weights get no gradient otherwise)."""
        return self.carrier_init is not None and self.grid(h, w).num_windows > 1

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.dim:
            raise ValueError(f"HierarchicalAttention({self.dim}) expects (B, {self.dim}, H, W), got {tuple(x.shape)}")
        grid = self.grid(x.shape[-2], x.shape[-1])
        t = self.carrier_init(x, grid) if self.uses_carriers(x.shape[-2], x.shape[-1]) else None
        z = grid.partition(x)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                z, t = torch.utils.checkpoint.checkpoint(blk, z, t, grid, use_reentrant=False)
            else:
                z, t = blk(z, t, grid)
        return grid.reverse(z)
