"""Hierarchical Attention as a plug-in for timm's Swin Transformer (FasterViT, arXiv:2306.06189, Sec. 3.3).

The paper presents HAT as a drop-in for window attention. :func:`add_hat` puts it into a built
``timm.models.swin_transformer.SwinTransformer`` (Swin, arXiv:2103.14030), in place:

* each chosen stage gains a :class:`~open_fastervit.layers.CarrierTokenInit` (``carrier_init``) that pools
  ``ct x ct`` carrier tokens per window from the stage input (after Swin's patch merging);
* each block of the stage gains a :class:`CarrierAttention` (``carrier_attn``): global attention among all
  carrier tokens of an image (own LayerNorms, continuous position embedding and bias, MLP);
* then the carriers of a window join that window's attention as prefix tokens, through Swin's *own* ``norm1``,
  ``qkv``, ``proj``, ``norm2`` and ``mlp``: pairs that involve a carrier get bias 0, window-token pairs keep
  Swin's relative position bias table and its shift mask; afterwards tokens and carriers split again.

Every Swin weight keeps its state-dict key and shape, so a Swin checkpoint loads unchanged; only the
``carrier_init`` / ``carrier_attn`` keys are new (:func:`load_swin_state_dict` returns exactly those).

Carriers and shifted windows (the rule): carrier tokens belong to the windows of the *regular* (unshifted) grid of
the stage, ``ceil(H/ws) x ceil(W/ws)`` windows, window-major, and keep that identity through the stage. Swin
shifts the map by ``s = ws // 2`` before partitioning in odd blocks; the shifted partition has the same window
grid, and shifted window ``(i, j)`` takes the carriers of regular window ``(i, j)``, the regular window it
overlaps most (``ws - s >= s`` rows and columns of it). Carriers attend to every token of the window they join;
Swin's shift mask only separates window tokens that came from different sides of the cyclic wrap, so carrier
pairs need no mask. Carriers already exchange information globally in every block, so this pairing only decides
which local tokens a carrier reads from and writes to. The carriers of a stage are dropped at its end (no
propagation onto the map; the next stage pools new ones).

With ``stages=()`` or ``carrier_size=0`` nothing is changed: the model *is* timm's Swin.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import (
    SwinTransformer,
    SwinTransformerBlock,
    SwinTransformerStage,
    window_partition,
    window_reverse,
)
from timm.models.swin_transformer import checkpoint_filter_fn as swin_checkpoint_filter_fn
from torch import Tensor, nn

from ..layers import Attention, CarrierTokenInit, TokenPosEmbed, WindowGrid

__all__ = [
    "CarrierAttention",
    "HatSwinBlock",
    "HatSwinStage",
    "HatSwinTransformer",
    "add_hat",
    "carrier_keys",
    "load_swin_state_dict",
]

_logger = logging.getLogger(__name__)

CARRIER_MODULES = ("carrier_init", "carrier_attn")  # attribute names of the added modules (state-dict key parts)


@dataclass(frozen=True)
class CarrierGrid:
    """Regular window grid of an ``h x w`` Swin stage map with ``(wh, ww)`` windows and ``ct x ct`` carriers each.

    Swin's windows are square except where the map is smaller than the window along one axis, so the two axes are
    handled separately: the pooling of each axis comes from a one-axis :class:`WindowGrid`. Provides what
    :class:`CarrierTokenInit` reads from a grid (``nh``, ``nw``, ``num_windows``, ``carrier_pool_matrices``).
    """

    h: int
    w: int
    window: tuple[int, int]
    carrier_size: int

    @property
    def nh(self) -> int:
        return (self.h + self.window[0] - 1) // self.window[0]

    @property
    def nw(self) -> int:
        return (self.w + self.window[1] - 1) // self.window[1]

    @property
    def num_windows(self) -> int:
        return self.nh * self.nw

    @property
    def carrier_grid(self) -> tuple[int, int]:
        return self.nh * self.carrier_size, self.nw * self.carrier_size

    def carrier_pool_matrices(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """``(P_h (nh*ct, h), P_w (nw*ct, w))``, the average pooling of :meth:`WindowGrid.carrier_pool_matrices`."""
        pool_h = WindowGrid(self.h, self.h, self.window[0], self.carrier_size).carrier_pool_matrices(device, dtype)[0]
        pool_w = WindowGrid(self.w, self.w, self.window[1], self.carrier_size).carrier_pool_matrices(device, dtype)[1]
        return pool_h, pool_w

    def carriers_to_raster(self, t: Tensor) -> Tensor:
        """Window-major carriers ``(B, nW*ct*ct, C)`` -> raster order over the ``(nh*ct, nw*ct)`` carrier grid."""
        return self._layout().carriers_to_raster(t)

    def raster_to_carriers(self, t: Tensor) -> Tensor:
        """Raster carriers -> window-major; inverse of :meth:`carriers_to_raster`."""
        return self._layout().raster_to_carriers(t)

    def _layout(self) -> WindowGrid:
        """A grid with the same ``(nh, nw, ct)`` (one token per window): the carrier layouts depend on nothing else."""
        return WindowGrid(self.nh, self.nw, 1, self.carrier_size)


class CarrierAttention(nn.Module):
    """Global attention among the carrier tokens of an image (paper Sec. 3.3), the first step of a HAT block.

    ``t: (B, nW*ct*ct, C)`` window-major -> same. In raster order over the carrier grid:
    ``t = t + pos``, ``t = t + MHSA(LN(t))`` (continuous relative position bias), ``t = t + MLP(LN(t))``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True) -> None:
        super().__init__()
        self.pos_embed = TokenPosEmbed(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, t: Tensor, grid: CarrierGrid, drop_path: nn.Module) -> Tensor:
        gh, gw = grid.carrier_grid
        t = grid.carriers_to_raster(t) + self.pos_embed(gh, gw)
        t = t + drop_path(self.attn(self.norm1(t), self.attn.rel_pos(gh, gw)))
        t = t + drop_path(self.mlp(self.norm2(t)))
        return grid.raster_to_carriers(t)


def _prefix_window_attention(attn: nn.Module, x: Tensor, prefix: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Swin's window attention (``attn``: a timm ``WindowAttention``) over ``[prefix, window tokens]``.

    ``x: (B*nW, N, C)`` window tokens, ``prefix: (B*nW, P, C)`` carriers of each window, ``mask``: Swin's shift
    mask ``(nW, N, N)`` or None. The bias is Swin's relative position bias (and shift mask) on window-token pairs
    and 0 on every pair that involves a prefix token. Returns ``(x (B*nW, N, C), prefix (B*nW, P, C))``.
    """
    b_, n, c = x.shape
    p = prefix.shape[1]
    u = torch.cat([prefix, x], dim=1)
    heads = attn.num_heads
    q, k, v = attn.qkv(u).reshape(b_, p + n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    bias = F.pad(attn._get_rel_pos_bias(), (p, 0, p, 0))  # (1, heads, P+N, P+N), zeros around the window block
    if mask is not None:
        num_win = mask.shape[0]
        mask = F.pad(mask, (p, 0, p, 0)).to(bias.dtype)  # (nW, P+N, P+N)
        bias = (bias.unsqueeze(1) + mask.unsqueeze(1).unsqueeze(0)).expand(b_ // num_win, -1, -1, -1, -1)
        bias = bias.reshape(b_, heads, p + n, p + n)
    if attn.fused_attn:
        drop = attn.attn_drop.p if attn.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=drop)
    else:
        y = attn.attn_drop(attn.softmax((q * attn.scale) @ k.transpose(-2, -1) + bias)) @ v
    y = attn.proj_drop(attn.proj(y.transpose(1, 2).reshape(b_, p + n, -1)))
    return y[:, p:], y[:, :p]


class HatSwinBlock(SwinTransformerBlock):
    """A Swin block with carrier tokens (the class :func:`add_hat` gives a block; Swin weights untouched).

    ``forward(x, t)``: ``x (B, H, W, C)`` map, ``t (B, nW*ct*ct, C)`` window-major carriers of the regular grid
    (or None: then it is exactly Swin's block). Returns ``(x, t)`` with the same shapes.
    """

    carrier_attn: CarrierAttention

    def _hat_attn(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Swin's ``_attn`` (roll, pad, partition, attention, merge, crop, roll back) with carriers as prefix.
        ``x (B, H, W, C)`` normalised map, ``t (B, nW*P, C)`` normalised carriers -> attention outputs, same shapes."""
        b, h, w, c = x.shape
        wh, ww = self.window_size
        has_shift = any(self.shift_size)
        if has_shift:
            x = torch.roll(x, shifts=(-self.shift_size[0], -self.shift_size[1]), dims=(1, 2))
        x = F.pad(x, (0, 0, 0, (ww - w % ww) % ww, 0, (wh - h % wh) % wh))
        hp, wp = x.shape[1:3]
        windows = window_partition(x, self.window_size).view(-1, self.window_area, c)  # (B*nW, N, C)
        mask = self.get_attn_mask(x) if self.dynamic_mask else self.attn_mask
        windows, t = _prefix_window_attention(self.attn, windows, t.reshape(windows.shape[0], -1, c), mask)
        x = window_reverse(windows.view(-1, wh, ww, c), self.window_size, hp, wp)[:, :h, :w, :]
        if has_shift:
            x = torch.roll(x, shifts=self.shift_size, dims=(1, 2))
        return x, t.reshape(b, -1, c)

    def forward(self, x: Tensor, t: Tensor | None = None, grid: CarrierGrid | None = None) -> Any:  # type: ignore[override]
        if t is None or grid is None:
            return super().forward(x), None
        b, h, w, c = x.shape
        t = self.carrier_attn(t, grid, self.drop_path1)
        xa, ta = self._hat_attn(self.norm1(x), self.norm1(t))
        u = torch.cat([t, x.reshape(b, -1, c)], dim=1)  # carriers first, one drop-path draw per image for both
        u = u + self.drop_path1(torch.cat([ta, xa.reshape(b, -1, c)], dim=1))
        u = u + self.drop_path2(self.mlp(self.norm2(u)))
        num_ct = t.shape[1]
        return u[:, num_ct:].reshape(b, h, w, c), u[:, :num_ct]


class HatSwinStage(SwinTransformerStage):
    """A Swin stage with Hierarchical Attention: patch merging, carrier pooling, then the blocks carry ``(x, t)``.

    ``x: (B, H, W, C_in) -> (B, H', W', C)`` as Swin's stage. Carriers run when the stage map holds more than one
    window (with one window, window attention is already global).
    """

    carrier_init: CarrierTokenInit
    carrier_size: int

    def carrier_grid(self, h: int, w: int) -> CarrierGrid:
        """The regular window grid of an ``h x w`` stage map (window size of the stage's blocks)."""
        return CarrierGrid(h, w, tuple(self.blocks[0].window_size), self.carrier_size)

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        grid = self.carrier_grid(x.shape[1], x.shape[2])
        t = self.carrier_init(x.permute(0, 3, 1, 2), grid) if grid.num_windows > 1 else None
        if t is None:
            grid = None
        for blk in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x, t = torch.utils.checkpoint.checkpoint(blk, x, t, grid, use_reentrant=False)
            else:
                x, t = blk(x, t, grid)
        return x


def _init_new(module: nn.Module) -> None:
    """Swin's initialisation for the added weights: truncated normal (std .02) linears with zero bias."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def add_hat(model: SwinTransformer, stages: Sequence[int] = (2,), carrier_size: int = 2) -> SwinTransformer:
    """Put Hierarchical Attention into the given stages of a timm Swin Transformer, in place.

    Adds carrier weights (``layers.{i}.carrier_init.*``, ``layers.{i}.blocks.{j}.carrier_attn.*``) and switches
    those stages and blocks to :class:`HatSwinStage` / :class:`HatSwinBlock`; all Swin weights keep their keys,
    shapes and values. ``stages=()`` or ``carrier_size=0`` leave the model untouched (exactly timm's Swin).

    Args:
        model: a ``timm.models.swin_transformer.SwinTransformer`` (any size, ``img_size``, ``dynamic_img_size``).
        stages: stage indices (0-based) that get carriers.
        carrier_size: carrier tokens per window and axis ``ct``.

    Returns:
        ``model`` itself.

    Raises:
        TypeError: ``model`` is not a timm SwinTransformer.
        ValueError: a stage index out of range or repeated, ``carrier_size < 0``, or a stage that already has HAT.
    """
    if not isinstance(model, SwinTransformer):
        raise TypeError(f"add_hat expects a timm SwinTransformer, got {type(model).__name__}")
    stages = tuple(int(s) for s in stages)
    if carrier_size < 0:
        raise ValueError(f"carrier_size must be >= 0, got {carrier_size}")
    num_stages = len(model.layers)
    bad = [s for s in stages if not 0 <= s < num_stages]
    if bad:
        raise ValueError(f"stage index {bad} out of range: this Swin has stages 0..{num_stages - 1}")
    if len(set(stages)) != len(stages):
        raise ValueError(f"repeated stage index in {stages}")
    if carrier_size == 0:
        return model
    for s in stages:
        stage = model.layers[s]
        if isinstance(stage, HatSwinStage):
            raise ValueError(f"stage {s} already has Hierarchical Attention")
        dim = stage.blocks[0].dim
        device = stage.blocks[0].norm1.weight.device
        stage.carrier_init = CarrierTokenInit(dim, carrier_size).to(device)
        stage.carrier_size = carrier_size
        stage.__class__ = HatSwinStage
        for blk in stage.blocks:
            blk.carrier_attn = CarrierAttention(dim, blk.attn.num_heads, blk.mlp_ratio, blk.attn.qkv.bias is not None)
            _init_new(blk.carrier_attn)
            blk.carrier_attn.to(device)
            blk.__class__ = HatSwinBlock
    return model


def carrier_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the weights :func:`add_hat` added (the carrier weights), in state-dict order."""
    return [k for k in model.state_dict() if any(f".{name}." in f".{k}" for name in CARRIER_MODULES)]


def load_swin_state_dict(model: SwinTransformer, state_dict: Mapping[str, Tensor]) -> list[str]:
    """Load a timm Swin state dict (or an original Swin checkpoint, via timm's filter) into a HAT-Swin.

    Returns the missing keys, which are exactly :func:`carrier_keys` (left at their fresh initialisation) and
    logs them.

    Raises:
        RuntimeError: the state dict lacks a Swin weight, has keys the model does not know, or a shape differs.
    """
    state = swin_checkpoint_filter_fn(dict(state_dict), model)
    result = model.load_state_dict(state, strict=False)
    new = set(carrier_keys(model))
    missing = [k for k in result.missing_keys if k not in new]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"not a checkpoint of this Swin: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {result.unexpected_keys[:5]} ({len(result.unexpected_keys)})"
        )
    _logger.info("Swin weights loaded; %d carrier weights newly initialised: %s", len(result.missing_keys),
                 ", ".join(result.missing_keys))
    return list(result.missing_keys)


class HatSwinTransformer(SwinTransformer):
    """timm's Swin Transformer built with Hierarchical Attention in ``hat_stages`` (see :func:`add_hat`).

    Takes every :class:`SwinTransformer` argument plus ``hat_stages`` and ``carrier_size``.
    """

    def __init__(self, *args: Any, hat_stages: Sequence[int] = (2,), carrier_size: int = 2, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        add_hat(self, hat_stages, carrier_size)
        self.hat_stages = tuple(hat_stages) if carrier_size > 0 else ()
        self.carrier_size = carrier_size


def checkpoint_filter_fn(state_dict: dict, model: nn.Module) -> dict[str, Tensor]:
    """Pretrained filter: timm's Swin filter, then the model's own (fresh) carrier weights, so they stay new and
    the strict load succeeds. Logs the carrier keys as newly initialised."""
    out = swin_checkpoint_filter_fn(state_dict, model)
    own = model.state_dict()
    new = [k for k in carrier_keys(model) if k not in out]
    out.update({k: own[k] for k in new})
    if new:
        _logger.info("Swin checkpoint: %d carrier weights newly initialised", len(new))
    return out


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> HatSwinTransformer:
    out_indices = kwargs.pop("out_indices", tuple(range(len(kwargs.get("depths", (1, 1, 3, 1))))))
    return build_model_with_cfg(
        HatSwinTransformer,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices),
        **kwargs,
    )


def _cfg(swin_tag: str, **kwargs: Any) -> dict[str, Any]:
    """Pretrained cfg: timm's Swin weights on the Hugging Face hub (carriers stay new)."""
    return {
        "hf_hub_id": f"timm/{swin_tag}",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
        "first_conv": "patch_embed.proj",
        "classifier": "head.fc",
        "license": "mit",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "hat_swin_tiny_patch4_window7_224.ms_in1k": _cfg("swin_tiny_patch4_window7_224.ms_in1k"),
        "hat_swin_small_patch4_window7_224.ms_in1k": _cfg("swin_small_patch4_window7_224.ms_in1k"),
        "hat_swin_base_patch4_window7_224.ms_in1k": _cfg("swin_base_patch4_window7_224.ms_in1k"),
    }
)


@register_model
def hat_swin_tiny_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> HatSwinTransformer:
    """Swin-T with HAT in stage 2 (14x14 map, 2x2 windows at 224 px), carriers 2x2 per window."""
    args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    return _create("hat_swin_tiny_patch4_window7_224", pretrained, **dict(args, **kwargs))


@register_model
def hat_swin_small_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> HatSwinTransformer:
    """Swin-S with HAT in stage 2, carriers 2x2 per window."""
    args = dict(patch_size=4, window_size=7, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
    return _create("hat_swin_small_patch4_window7_224", pretrained, **dict(args, **kwargs))


@register_model
def hat_swin_base_patch4_window7_224(pretrained: bool = False, **kwargs: Any) -> HatSwinTransformer:
    """Swin-B with HAT in stage 2, carriers 2x2 per window."""
    args = dict(patch_size=4, window_size=7, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
    return _create("hat_swin_base_patch4_window7_224", pretrained, **dict(args, **kwargs))
