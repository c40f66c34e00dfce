"""FasterViT: Fast Vision Transformers with Hierarchical Attention.

Hatamizadeh et al., ICLR 2024, arXiv:2306.06189. Written from ``docs/SPEC.md`` of this project.

The network follows the paper's Figure 3::

    Stem (stride 4) -> ConvStage 0 -> ConvStage 1 -> HatStage 2 -> HatStage 3 -> BatchNorm -> pool -> Linear

Every stage after the first starts with its ``Downsample`` (LayerNorm + strided 3x3 conv), so stage ``i``
outputs stride ``4 * 2**i``. Transformer stages cut the map into ``ws x ws`` windows; when a stage holds more
than one window, Hierarchical Attention (HAT) adds ``ct x ct`` carrier tokens per window that attend to each
other globally and then join their window's local attention.

Unlike the authors' release, one model instance runs at any input size (>= 32 px): stage maps that do not divide
by the window are padded, padded positions are masked out of attention and out of carrier pooling, and the
output is cropped back. All position terms (token position MLPs, attention biases, pooling geometry, padding
masks) are pure functions of the configuration and the grid size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import ClassifierHead, DropPath, LayerNorm2d, LayerScale, Mlp, trunc_normal_, use_fused_attn
from timm.models import checkpoint_seq, register_notrace_function
from torch import Tensor, nn

from .fused import FusedConv2d, FusedLinear, FusedMlp

__all__ = ["FasterViT", "MIN_INPUT_SIZE"]

MIN_INPUT_SIZE = 32
POS_MLP_HIDDEN = 512  # hidden width of every position-encoding MLP (paper: continuous position bias)


# --------------------------------------------------------------------------------------------------------------
# Position terms: pure functions of the grid size (no learned state, no buffers).
# --------------------------------------------------------------------------------------------------------------


@register_notrace_function
def grid_coordinates(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Normalised (row, col) of every cell of an ``h x w`` grid, row-major: ``(h*w, 2)``.

    Each axis maps index ``i`` to ``(i - s//2) / (s//2)`` (integer halves), e.g. 7 -> -1 ... 1, 4 -> -1 ... 0.5.
    """
    ys = (torch.arange(h, device=device, dtype=dtype) - h // 2) / max(h // 2, 1)
    xs = (torch.arange(w, device=device, dtype=dtype) - w // 2) / max(w // 2, 1)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(h * w, 2)


@register_notrace_function
def log_relative_offsets(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """SwinV2 log-spaced relative offsets of an ``h x w`` window: ``((2h-1)*(2w-1), 2)``.

    Offsets in ``[-(s-1), s-1]`` are divided by ``s-1``, scaled by 8 and mapped by ``sign(x) log2(|x|+1) / 3``.
    """
    dy = torch.arange(-(h - 1), h, device=device, dtype=torch.float32) / max(h - 1, 1)
    dx = torch.arange(-(w - 1), w, device=device, dtype=torch.float32) / max(w - 1, 1)
    table = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1) * 8
    table = torch.sign(table) * torch.log2(table.abs() + 1.0) / 3.0
    return table.reshape(-1, 2).to(dtype)


@register_notrace_function
def relative_position_index(h: int, w: int, device: torch.device) -> Tensor:
    """Swin index of the offset between every pair of tokens of an ``h x w`` window: ``(h*w, h*w)``."""
    coords = torch.stack(
        torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :]
    return (rel[0] + h - 1) * (2 * w - 1) + (rel[1] + w - 1)


@register_notrace_function
def window_key_mask(
    h: int, w: int, window_size: int, num_prefix: int, device: torch.device, dtype: torch.dtype
) -> Tensor | None:
    """Additive attention mask hiding padded positions, per window: ``(nW, 1, 1, num_prefix + ws*ws)``.

    The map ``h x w`` is padded to the next multiple of ``window_size``; padded keys get ``-inf``, real ones and
    the ``num_prefix`` carrier tokens in front get 0. Every window keeps at least one real key. ``None`` when no
    padding is needed.
    """
    nh, nw = -(-h // window_size), -(-w // window_size)
    if nh * window_size == h and nw * window_size == w:
        return None
    rows = torch.arange(nh * window_size, device=device) < h
    cols = torch.arange(nw * window_size, device=device) < w
    valid = (rows[:, None] & cols[None, :]).view(nh, window_size, nw, window_size)
    valid = valid.permute(0, 2, 1, 3).reshape(nh * nw, window_size * window_size)
    valid = torch.cat([valid.new_ones(nh * nw, num_prefix), valid], dim=1)
    mask = torch.zeros(valid.shape, device=device, dtype=dtype).masked_fill(~valid, float("-inf"))
    return mask[:, None, None, :]


# --------------------------------------------------------------------------------------------------------------
# Window and carrier-token layouts.
#   window tokens:  (B*nW, ws*ws, C), windows row-major over the window grid, tokens row-major inside a window
#   carrier tokens: (B, nh*nw*ct*ct, C) "window-major": window row, window col, then the ct x ct cell
# --------------------------------------------------------------------------------------------------------------


def window_partition(x: Tensor, window_size: int) -> Tensor:
    """(B, C, H, W) with H, W multiples of ``window_size`` -> window tokens (B*nW, ws*ws, C)."""
    _, c, h, w = x.shape
    x = x.view(-1, c, h // window_size, window_size, w // window_size, window_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, window_size * window_size, c)


def window_reverse(z: Tensor, window_size: int, h: int, w: int) -> Tensor:
    """Window tokens (B*nW, ws*ws, C) -> (B, C, H, W); the inverse of :func:`window_partition`."""
    c = z.shape[-1]
    z = z.view(-1, h // window_size, w // window_size, window_size, window_size, c)
    return z.permute(0, 5, 1, 3, 2, 4).reshape(-1, c, h, w)


def carriers_to_raster(t: Tensor, nh: int, nw: int, ct: int) -> Tensor:
    """Window-major carrier tokens (B, nh*nw*ct*ct, C) -> raster order over the (nh*ct, nw*ct) grid."""
    c = t.shape[-1]
    return t.view(-1, nh, nw, ct, ct, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, nh * nw * ct * ct, c)


def raster_to_carriers(t: Tensor, nh: int, nw: int, ct: int) -> Tensor:
    """Raster carrier tokens over the (nh*ct, nw*ct) grid -> window-major; inverse of :func:`carriers_to_raster`."""
    c = t.shape[-1]
    return t.view(-1, nh, ct, nw, ct, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, nh * nw * ct * ct, c)


# --------------------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------------------


class PositionTerm(nn.Module):
    """Base of the position terms: constant per (grid, dtype, device) in inference, so cached there.

    The cache is used only when nothing can need its gradient or trace: eval mode, grad disabled, not tracing or
    compiling. Keys include the parameters' version counters (in-place updates such as EMA invalidate them),
    device, dtype and autocast state; ``train()``, ``.to()`` and ``load_state_dict`` clear it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[tuple, Tensor] = {}

    def cached(self, key: tuple, compute: Callable[[], Tensor]) -> Tensor:
        if (
            self.training
            or torch.is_grad_enabled()
            or torch.jit.is_tracing()
            or torch.jit.is_scripting()
            or torch.compiler.is_compiling()
        ):
            return compute()
        weight = self.mlp[0].weight
        device = weight.device.type
        amp = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
        key = (*key, weight.device, weight.dtype, amp, *(p._version for p in self.parameters()))
        value = self._cache.get(key)
        if value is None:
            if len(self._cache) >= 64:  # many sizes in one process: keep memory bounded
                self._cache.clear()
            value = self._cache[key] = compute()
        return value

    def train(self, mode: bool = True) -> PositionTerm:
        self._cache.clear()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half() ...
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)


class TokenPosEmbed(PositionTerm):
    """Continuous token position encoding: an MLP over normalised grid coordinates (paper Sec. 3.2).

    Used for the window tokens (a ``ws x ws`` grid) and for the carrier tokens (the carrier grid).
    """

    def __init__(self, dim: int, hidden: int = POS_MLP_HIDDEN) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, dim, bias=False))

    def forward(self, h: int, w: int) -> Tensor:
        """Embedding of an ``h x w`` grid, row-major: ``(1, h*w, C)``."""
        return self.cached((h, w), lambda: self.compute(h, w))

    def compute(self, h: int, w: int) -> Tensor:
        weight = self.mlp[0].weight
        return self.mlp(grid_coordinates(h, w, weight.device, weight.dtype)).unsqueeze(0)


class ContinuousRelPosBias(PositionTerm):
    """SwinV2-style continuous relative position bias: MLP over log-spaced offsets, ``16 * sigmoid``.

    For a window attention over a padded map it also folds in the key mask of the padded positions.
    """

    def __init__(self, num_heads: int, hidden: int = POS_MLP_HIDDEN) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, num_heads, bias=False))

    def forward(self, h: int, w: int, num_prefix: int = 0, map_size: tuple[int, int] | None = None) -> Tensor:
        """Bias of an ``h x w`` window: ``(1, heads, P + h*w, P + h*w)``; pairs with a prefix token get 0.

        With ``map_size`` (the unpadded map cut into such windows) and padding needed, the result is per window,
        ``(nW, heads, N, N)``, with ``-inf`` on padded keys (see :func:`window_key_mask`).
        """
        return self.cached((h, w, num_prefix, map_size), lambda: self.compute(h, w, num_prefix, map_size))

    def compute(self, h: int, w: int, num_prefix: int = 0, map_size: tuple[int, int] | None = None) -> Tensor:
        weight = self.mlp[0].weight
        values = self.mlp(log_relative_offsets(h, w, weight.device, weight.dtype))  # ((2h-1)(2w-1), heads)
        bias = values[relative_position_index(h, w, weight.device)]  # (hw, hw, heads)
        bias = 16 * torch.sigmoid(bias.permute(2, 0, 1))
        if num_prefix:
            bias = F.pad(bias, (num_prefix, 0, num_prefix, 0))
        bias = bias.unsqueeze(0)  # 4-D: the layout fused SDPA kernels take
        if map_size is not None:
            if h != w:
                raise ValueError("padding masks are defined for square windows")
            mask = window_key_mask(map_size[0], map_size[1], h, num_prefix, weight.device, bias.dtype)
            if mask is not None:
                bias = bias + mask  # (nW, heads, N, N)
        return bias


class Attention(nn.Module):
    """Multi-head self-attention with an additive bias (window attention and carrier-token attention).

    ``x: (B_, N, C)``; ``bias`` is ``(1, heads, N, N)`` shared by all sequences, or ``(nW, heads, N, N)`` per
    window (B_ = B * nW, padding mask folded in). The fused path calls ``F.scaled_dot_product_attention``
    (a fused kernel on CPU and GPU for a 4-D float mask; on GPU also when training the bias); the explicit
    path is kept for export (``TIMM_FUSED_ATTN=0``) and CPU training.
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

    def forward(self, x: Tensor, bias: Tensor, residual: Tensor | None = None) -> Tensor:
        """``residual`` (inference form only, after ``fuse_projections``) is added by the output projection."""
        b_, n, c = x.shape
        qkv = self.qkv(x).view(b_, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B_, heads, N, d)
        if bias.shape[0] > 1:  # per-window bias: batch b*nW + w takes window w's bias
            n_windows = bias.shape[0]
            bias = bias.unsqueeze(0).expand(b_ // n_windows, -1, -1, -1, -1).reshape(b_, self.num_heads, n, n)
        bias = bias.to(q.dtype)
        # CPU SDPA kernels cannot differentiate a float mask and fall back to a slower math path: there (training
        # the position MLPs) the explicit form is faster; everywhere else the fused kernel is.
        if self.fused_attn and not (bias.requires_grad and q.device.type == "cpu"):
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias
            x = attn.softmax(dim=-1) @ v
        x = x.transpose(1, 2).reshape(b_, n, c)
        return self.proj(x) if residual is None else self.proj(x, residual=residual)

    def fuse_projections(self, scale: Tensor | None) -> None:
        """Inference form: fused linears; ``scale`` (the block's LayerScale gamma) folded into the projection."""
        self.qkv = FusedLinear(self.qkv)
        self.proj = FusedLinear(self.proj, scale=scale)


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> None:
    """Fold an inference BatchNorm into the conv before it (in place): ``bn(conv(x)) == conv'(x)``."""
    if not isinstance(bn, nn.BatchNorm2d):
        return  # already fused
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    new_bias = (bias - bn.running_mean) * scale + bn.bias
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


class TwoConvBN(nn.Module):
    """Mixin for layers built as ``conv1 -> norm1 -> act1 -> conv2 -> norm2 (-> act2)`` with foldable BatchNorms."""

    fused = False
    fused_acts = ("none", "none")  # the activations after norm1 and norm2, taken over by the fused convs

    def fuse(self) -> nn.Module:
        """Inference form (timm ``reparameterize_model`` calls this): BatchNorms folded into the convs, the
        activations fused into them (``fused.FusedConv2d``)."""
        if self.fused:
            return self
        fuse_conv_bn(self.conv1, self.norm1)
        fuse_conv_bn(self.conv2, self.norm2)
        self.norm1, self.norm2 = nn.Identity(), nn.Identity()
        self.conv1 = FusedConv2d(self.conv1, self.fused_acts[0])
        self.conv2 = FusedConv2d(self.conv2, self.fused_acts[1])
        self.act1 = nn.Identity()
        if hasattr(self, "act2"):
            self.act2 = nn.Identity()
        self.fused = True
        return self


class Stem(TwoConvBN):
    """Stem: two strided 3x3 conv + BatchNorm + ReLU layers, stride 4 (paper Sec. 3.1)."""

    fused_acts = ("relu", "relu")

    def __init__(self, in_chans: int, stem_dim: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, stem_dim, 3, stride=2, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(stem_dim, eps=1e-4)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(stem_dim, dim, 3, stride=2, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-4)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.norm1(self.conv1(x)))
        return self.act2(self.norm2(self.conv2(x)))


class Downsample(nn.Module):
    """Between stages: LayerNorm over channels, then a strided 3x3 conv doubling the width."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(in_dim, eps=1e-6)
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.norm(x))

    def fuse(self) -> Downsample:
        """Inference form: the conv pre-packed (``fused.FusedConv2d``)."""
        if not isinstance(self.conv, FusedConv2d):
            self.conv = FusedConv2d(self.conv)
        return self


class ConvBlock(TwoConvBN):
    """Residual conv block of the high-resolution stages: ``x + DropPath(BN(Conv(GELU(BN(Conv(x))))))``."""

    fused_acts = ("gelu", "none")

    def __init__(self, dim: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(dim, eps=1e-5)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-5)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:  # inference form: BN folded, GELU and the residual add done inside the convs
            return self.conv2(self.conv1(x), residual=x)
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.drop_path(y).add_(x)  # in place on the fresh branch output (nothing saved it)


class ConvStage(nn.Module):
    """Stages 0 and 1: (Downsample) + residual conv blocks. ``(B, C_in, H, W) -> (B, C, H', W')``."""

    def __init__(self, in_dim: int, dim: int, depth: int, drop_path: Sequence[float], downsample: bool) -> None:
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        self.blocks = nn.Sequential(*[ConvBlock(dim, drop_path[i]) for i in range(depth)])
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)


class CarrierTokenInit(nn.Module):
    """Carrier-token initializer (paper Sec. 3.2): depthwise conv position encoding, then average pooling.

    The pool covers only the real (unpadded) map and yields ``ct`` cells per window and axis; the result is
    returned window-major: ``(B, nh*nw*ct*ct, C)``.
    """

    def __init__(self, dim: int, ct_size: int) -> None:
        super().__init__()
        self.ct_size = ct_size
        self.pos_conv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)

    def forward(self, x: Tensor, nh: int, nw: int) -> Tensor:
        x = self.pos_conv(x)
        ct = self.ct_size
        out_h, out_w = ct * nh, ct * nw
        h, w = x.shape[-2:]
        if h < out_h or w < out_w:  # tiny maps: repeat cells so every pooled cell covers at least one position
            x = F.interpolate(x, size=(max(h, out_h), max(w, out_w)), mode="nearest")
            h, w = x.shape[-2:]
        sh, sw = h // out_h, w // out_w
        x = F.avg_pool2d(x, kernel_size=(h - (out_h - 1) * sh, w - (out_w - 1) * sw), stride=(sh, sw))
        c = x.shape[1]
        x = x.view(-1, c, nh, ct, nw, ct).permute(0, 2, 4, 3, 5, 1)
        return x.reshape(-1, nh * nw * ct * ct, c)


class HatBlock(nn.Module):
    """Transformer block with Hierarchical Attention (paper Sec. 3.2, Fig. 3).

    With carrier tokens ``t`` (one ``ct x ct`` set per window) the block first lets all carrier tokens of an
    image attend to each other (global, cheap), then concatenates each window's carriers in front of its tokens
    for local window attention, and finally splits them again. Without carriers it is plain window attention.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        ct_size: int,
        hat: bool,
        propagate: bool,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        layer_scale: float | None = None,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.ct_size = ct_size
        self.propagate = propagate
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
        self.hat = hat
        self.fused = False
        if hat:  # global attention among carrier tokens
            self.ct_pos_embed = TokenPosEmbed(dim)
            self.ct_norm1 = nn.LayerNorm(dim)
            self.ct_attn = Attention(dim, num_heads, qkv_bias)
            self.ct_ls_attn = scale()
            self.ct_norm2 = nn.LayerNorm(dim)
            self.ct_mlp = Mlp(dim, hidden)
            self.ct_ls_mlp = scale()

    def _per_image_drop(self, y: Tensor, n_windows: int) -> Tensor:
        """DropPath over images rather than windows: ``(B*nW, N, C)`` viewed as ``(B, nW*N, C)``."""
        if isinstance(self.drop_path, nn.Identity) or not self.training:
            return y
        return self.drop_path(y.reshape(-1, n_windows * y.shape[1], y.shape[2])).view_as(y)

    def carrier_attention(self, t: Tensor, nh: int, nw: int) -> Tensor:
        """Global attention among the carrier tokens of each image; ``t`` window-major ``(B, N_ct, C)``."""
        ct = self.ct_size
        gh, gw = nh * ct, nw * ct
        t = carriers_to_raster(t, nh, nw, ct) + self.ct_pos_embed(gh, gw)
        bias = self.ct_attn.rel_pos(gh, gw)
        if self.fused:  # inference form: layer scales folded, residual adds done by the output linears
            t = self.ct_attn(self.ct_norm1(t), bias, residual=t)
            t = self.ct_mlp(self.ct_norm2(t), residual=t)
        else:
            t = t + self.drop_path(self.ct_ls_attn(self.ct_attn(self.ct_norm1(t), bias)))
            t = t + self.drop_path(self.ct_ls_mlp(self.ct_mlp(self.ct_norm2(t))))
        return raster_to_carriers(t, nh, nw, ct)

    def fuse(self) -> HatBlock:
        """Inference form (timm ``reparameterize_model`` calls this): LayerScale gammas folded into the output
        linears, GELU and residual adds fused into them (``fused.FusedLinear``). Drop path is inactive."""
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

    def forward(self, z: Tensor, t: Tensor | None, h: int, w: int) -> tuple[Tensor, Tensor | None]:
        """``z``: window tokens (B*nW, ws*ws, C) of an ``h x w`` map padded to whole windows;
        ``t``: carrier tokens (B, N_ct, C) window-major, or None for plain window attention.
        """
        ws = self.window_size
        nh, nw = -(-h // ws), -(-w // ws)
        n_windows = nh * nw
        z = z + self.pos_embed(ws, ws)
        num_ct = 0
        if t is not None:
            num_ct = self.ct_size * self.ct_size
            t = self.carrier_attention(t, nh, nw)
            u = torch.cat([t.reshape(-1, num_ct, z.shape[-1]), z], dim=1)  # carriers FIRST
        else:
            u = z
        bias = self.attn.rel_pos(ws, ws, num_prefix=num_ct, map_size=(h, w))
        if self.fused:
            u = self.attn(self.norm1(u), bias, residual=u)
            u = self.mlp(self.norm2(u), residual=u)
        else:
            u = u + self._per_image_drop(self.ls_attn(self.attn(self.norm1(u), bias)), n_windows)
            u = u + self._per_image_drop(self.ls_mlp(self.mlp(self.norm2(u))), n_windows)
        if t is None:
            return u, None
        t_win, z = u.split([num_ct, ws * ws], dim=1)
        t = t_win.reshape(t.shape)
        if self.propagate:  # nearest-upsample each window's carriers onto its tokens, scaled by the carrier g1
            idx = torch.arange(ws, device=z.device) * self.ct_size // ws
            up = t_win.reshape(-1, self.ct_size, self.ct_size, z.shape[-1])[:, idx][:, :, idx]
            z = z + self.ct_ls_attn(up.reshape(z.shape))
        return z, t


class HatStage(nn.Module):
    """Stages 2 and 3: Downsample, carrier-token initializer, HAT blocks over windows.

    ``(B, C_in, H, W) -> (B, C, H/2, W/2)``. The map is padded to whole windows and cropped back; HAT (carrier
    tokens) runs when the stage is flagged for it and holds more than one window, else plain window attention.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        window_size: int,
        ct_size: int,
        hat: bool,
        do_propagation: bool,
        drop_path: Sequence[float],
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        layer_scale: float | None = None,
        downsample: bool = True,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        self.carrier_init = CarrierTokenInit(dim, ct_size) if hat else None
        self.blocks = nn.ModuleList(
            [
                HatBlock(
                    dim,
                    num_heads,
                    window_size,
                    ct_size,
                    hat=hat,
                    propagate=hat and do_propagation and i == depth - 1,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    drop_path=drop_path[i],
                    layer_scale=layer_scale,
                )
                for i in range(depth)
            ]
        )
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        h, w = x.shape[-2:]
        ws = self.window_size
        nh, nw = -(-h // ws), -(-w // ws)
        use_hat = self.carrier_init is not None and nh * nw > 1
        t = self.carrier_init(x, nh, nw) if use_hat else None  # pooled from the real map only
        padded = nh * ws != h or nw * ws != w
        if padded:
            x = F.pad(x, (0, nw * ws - w, 0, nh * ws - h))
        z = window_partition(x, ws)
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                z, t = torch.utils.checkpoint.checkpoint(blk, z, t, h, w, use_reentrant=False)
            else:
                z, t = blk(z, t, h, w)
        x = window_reverse(z, ws, nh * ws, nw * ws)
        return x[:, :, :h, :w].contiguous() if padded else x


# --------------------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------------------


def _four(name: str, value: Sequence | int | bool) -> tuple:
    values = tuple(value) if isinstance(value, Sequence) else (value,) * 4
    if len(values) != 4:
        raise ValueError(f"{name} needs one value per stage (4), got {value!r}")
    return values


class FasterViT(nn.Module):
    """FasterViT (arXiv:2306.06189): conv stages at high resolution, HAT transformer stages at low resolution.

    Args:
        depths: blocks per stage.
        num_heads: attention heads per stage (used by the transformer stages 2 and 3).
        window_size: window side per stage (used by stages 2 and 3).
        ct_size: carrier tokens per window and axis.
        dim: width of stage 0; stage ``i`` has ``dim * 2**i`` channels.
        in_dim: width of the first stem conv.
        mlp_ratio: hidden width of the transformer MLPs.
        drop_path_rate: stochastic depth, linearly increasing over all blocks.
        layer_scale: initial value of the transformer layer scales (None: no layer scale).
        hat: per stage, whether Hierarchical Attention (carrier tokens) is used.
        do_propagation: add the carrier tokens back onto the map after the last block of a HAT stage.
        in_chans, num_classes, global_pool, drop_rate: as in timm.
    """

    def __init__(
        self,
        depths: Sequence[int] = (2, 3, 6, 5),
        num_heads: Sequence[int] = (2, 4, 8, 16),
        window_size: Sequence[int] | int = (7, 7, 7, 7),
        ct_size: int = 2,
        dim: int = 64,
        in_dim: int = 64,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.2,
        layer_scale: float | None = None,
        hat: Sequence[bool] | bool = (False, False, True, False),
        do_propagation: bool = False,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        depths, num_heads = _four("depths", depths), _four("num_heads", num_heads)
        window_size, hat = _four("window_size", window_size), _four("hat", hat)
        if min(window_size) < 1 or ct_size < 1:
            raise ValueError(f"window_size and ct_size must be >= 1, got {window_size} and {ct_size}")
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.grad_checkpointing = False
        dims = [dim * 2**i for i in range(4)]
        self.num_features = self.head_hidden_size = dims[-1]
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linspace, device-free
        dpr = [dpr[sum(depths[:i]) : sum(depths[: i + 1])] for i in range(4)]

        self.stem = Stem(in_chans, in_dim, dim)
        stages: list[nn.Module] = []
        for i in range(4):
            if i < 2:
                stages.append(ConvStage(dims[max(i - 1, 0)], dims[i], depths[i], dpr[i], downsample=i > 0))
            else:
                stages.append(
                    HatStage(
                        dims[i - 1],
                        dims[i],
                        depths[i],
                        num_heads[i],
                        window_size[i],
                        ct_size,
                        hat=bool(hat[i]),
                        do_propagation=do_propagation,
                        drop_path=dpr[i],
                        mlp_ratio=mlp_ratio,
                        qkv_bias=qkv_bias,
                        layer_scale=layer_scale,
                    )
                )
        self.stages = nn.Sequential(*stages)
        self.feature_info = [
            dict(num_chs=dims[i], reduction=4 * 2**i, module=f"stages.{i}") for i in range(4)
        ]
        self.norm = nn.BatchNorm2d(self.num_features)
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.LayerNorm, nn.BatchNorm2d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ---- timm contract -----------------------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Layer scales (also excluded as 1-D tensors by timm's optimizer factory)."""
        return {name for name, _ in self.named_parameters() if name.endswith(".gamma")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)"
            if coarse
            else [
                (r"^stages\.(\d+)\.(?:downsample|carrier_init)", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head.reset(num_classes, pool_type=global_pool)

    def fuse(self, pack: bool = True) -> FasterViT:
        """Inference form, in place (see ``open_fastervit.fused``): BatchNorms folded into the convs before them,
        LayerScales into the linears before them, activations and residual adds fused into the producing layer,
        and, on CPU with oneDNN, weights pre-packed for oneDNN kernels (fp32 and bf16) on first use (``pack=False``:
        no packed copies, which cost one copy of the weights per dtype used).

        Outputs are unchanged up to fp32 rounding. The fused model is for inference only (no BatchNorm or drop
        path to train); it runs on any device, and under autograd, tracing, export or compile it takes plain ops.
        """
        for m in list(self.modules()):
            if m is not self and isinstance(m, (TwoConvBN, Downsample, HatBlock)):
                m.fuse()
        for m in self.modules():
            if isinstance(m, (FusedConv2d, FusedLinear)):
                m.use_packed = pack
                if not pack:
                    m._packed.clear()
        return self

    @torch.jit.ignore
    def load_pretrained(self, path: str, use_ema: bool = False) -> None:
        """timm ``custom_load`` hook: load an official ``.pth.tar`` or our ``.safetensors`` (safe, checked)."""
        from .convert import load_official_checkpoint

        load_official_checkpoint(self, path, use_ema=use_ema)

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error for input the model cannot take (runs on shapes/dtype only)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"FasterViT expects a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"FasterViT expects a 4-D batch (B, {self.in_chans}, H, W), got {x.dim()}-D shape "
                f"{tuple(x.shape)}" + ("; add a batch dimension with x.unsqueeze(0)" if x.dim() == 3 else "")
            )
        if not x.is_floating_point():
            raise TypeError(
                f"FasterViT expects a floating-point image tensor, got {x.dtype}; "
                "convert and normalise it first (e.g. x.float() / 255 then mean/std)"
            )
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"FasterViT built for {self.in_chans} input channels got {x.shape[1]} "
                f"(input shape {tuple(x.shape)}); pass in_chans={x.shape[1]} when creating the model"
            )
        if x.shape[2] < MIN_INPUT_SIZE or x.shape[3] < MIN_INPUT_SIZE:
            raise ValueError(
                f"FasterViT needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels, "
                f"got {x.shape[2]}x{x.shape[3]}"
            )

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Stage outputs (strides 4, 8, 16, 32) and, unless ``intermediates_only``, the final normed map.

        ``indices``: last n stages if int, all if None, else the listed stage indices. ``norm`` applies the
        final BatchNorm to the last stage's intermediate.
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        self.check_input(x)
        take = _take_indices(len(self.stages), indices)
        last = max(take)
        x = self.stem(x)
        stages = self.stages[: last + 1] if stop_early else self.stages
        intermediates = []
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                intermediates.append(self.norm(x) if norm and i == len(self.stages) - 1 else x)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages (and head/norm) not needed for the given intermediates; returns their indices."""
        take = _take_indices(len(self.stages), indices)
        last = max(take)
        self.stages = self.stages[: last + 1]
        if last < 3:
            self.num_features = self.head_hidden_size = self.feature_info[last]["num_chs"]
            prune_norm = True
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head or last < 3:
            self.head = ClassifierHead(self.num_features, 0, pool_type="")
            self.num_classes, self.global_pool = 0, ""
        return take

    def forward_features(self, x: Tensor) -> Tensor:
        """(B, C_in, H, W) -> normalised final map (B, 8*dim, ceil(H/32), ceil(W/32)), unpooled."""
        self.check_input(x)
        return self.norm(self.stages(self.stem(x)))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return self.head(x, pre_logits=pre_logits) if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _take_indices(num_stages: int, indices: int | Sequence[int] | None) -> list[int]:
    """Stage indices to return: all (None), the last ``n`` (int), or the listed ones (negatives allowed)."""
    if indices is None:
        return list(range(num_stages))
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices={indices} must be between 1 and {num_stages}")
        return list(range(num_stages - indices, num_stages))
    take = [i + num_stages if i < 0 else i for i in indices]
    if not take or any(not 0 <= i < num_stages for i in take):
        raise ValueError(f"indices {list(indices)} out of range for {num_stages} stages")
    return take
