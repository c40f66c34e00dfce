"""FasterViT: Fast Vision Transformers with Hierarchical Attention.

Hatamizadeh et al., ICLR 2024, arXiv:2306.06189. Written from ``docs/SPEC.md`` of this project.

The network follows the paper's Figure 3::

    Stem (stride 4) -> ConvStage 0 -> ConvStage 1 -> HatStage 2 -> HatStage 3 -> BatchNorm -> pool -> Linear

Every stage after the first starts with its ``Downsample`` (LayerNorm + strided 3x3 conv), so stage ``i``
outputs stride ``4 * 2**i``. A transformer stage is a downsampler followed by Hierarchical Attention
(``layers.HierarchicalAttention``): ``ws x ws`` windows, and, when the stage is flagged for HAT and holds more than
one window, ``ct x ct`` carrier tokens per window that attend to each other globally and then join their window's
local attention. The layers live in ``open_fastervit.layers``; this module only assembles them.

Unlike the authors' release, one model instance runs at any input size (>= 32 px): stage maps that do not divide
by the window are padded, padded positions are masked out of attention and out of carrier pooling, and the
output is cropped back.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.layers import ClassifierHead, trunc_normal_
from timm.models import checkpoint_seq
from torch import Tensor, nn

from .layers import ConvBlock, Downsample, HatBlock, HierarchicalAttention, Stem
from .layers.conv import TwoConvBN
from .layers.fused import FusedConv2d, FusedLinear, freeze

__all__ = ["FasterViT", "MIN_INPUT_SIZE", "ConvStage", "HatStage", "fuse_in_place"]

MIN_INPUT_SIZE = 32


class ConvStage(nn.Module):
    """Stages 0 and 1 (paper Sec. 3.3): (Downsample) + residual conv blocks. ``(B, C_in, H, W) -> (B, C, H', W')``."""

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


class HatStage(HierarchicalAttention):
    """Stages 2 and 3 (paper Sec. 3.3): a Downsample, then Hierarchical Attention over windows.

    ``(B, C_in, H, W) -> (B, C, ceil(H/2), ceil(W/2))``. With ``hat=False`` (or a map of one window) the blocks run
    plain window attention.
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
        super().__init__(
            dim, num_heads, window_size, carrier_size=ct_size if hat else 0, depth=depth, mlp_ratio=mlp_ratio,
            drop_path=drop_path, layer_scale=layer_scale, qkv_bias=qkv_bias, propagate=do_propagation,
        )
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.downsample(x))


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
        """Inference form, in place (see ``open_fastervit.layers.fused``): BatchNorms folded into the convs before
        them, LayerScales into the linears before them, activations and residual adds fused into the producing layer,
        and, on CPU with oneDNN, weights pre-packed for oneDNN kernels (fp32 and bf16) on first use (``pack=False``:
        no packed copies, which cost one copy of the weights per dtype used).

        The result is a *snapshot* for inference: every parameter becomes a buffer (``parameters()`` is empty; the
        state dict has the fused layout: BatchNorms folded away, conv biases added), so optimizer, EMA and averaging
        updates cannot reach it. To change the weights, change
        a trainable model and fuse a copy of it again. Outputs equal the unfused model's up to fp32 rounding; it runs
        on any device, and under autograd (input gradients), tracing, export or compile it takes plain ops.
        """
        fuse_in_place(self, pack)
        return self

    def unused_parameters(self, input_size: tuple[int, int]) -> list[str]:
        """Names of the parameters that get no gradient at input size ``(H, W)``.

        A transformer stage runs carrier tokens only when its map holds more than one window, so at small inputs
        (FasterViT-0: below 113 px on both sides) its carrier-token weights (``carrier_init`` and the ``ct_*``
        modules of its blocks) are unused. Wrapping such a model in ``DistributedDataParallel`` then needs
        ``find_unused_parameters=True`` (or those parameters frozen), or DDP stops with its "parameters that were
        not used in producing loss" error. Computed from the geometry alone (no forward pass).
        """
        h, w = ((int(s) + 1) // 2 for s in input_size)  # stem conv 1 (3x3, stride 2, pad 1)
        h, w = (h + 1) // 2, (w + 1) // 2  # stem conv 2
        unused: list[str] = []
        for i, stage in enumerate(self.stages):
            if not isinstance(stage.downsample, nn.Identity):
                h, w = (h + 1) // 2, (w + 1) // 2
            if isinstance(stage, HierarchicalAttention) and not stage.uses_carriers(h, w):
                unused += [
                    f"stages.{i}.{name}"
                    for name, p in stage.named_parameters()
                    if p.requires_grad and (name.startswith("carrier_init.") or ".ct_" in name)
                ]
        return unused

    def check_input(self, x: Tensor) -> None:
        """Raise a clear error for input the model cannot take (runs on shapes/dtype only), and under
        ``torch.jit.trace``, which would fix sizes, dtype and device into the graph."""
        if torch.jit.is_tracing():
            raise RuntimeError(
                "torch.jit.trace is not supported: FasterViT's window geometry depends on the input size, and a trace "
                "would fix sizes, dtype and device into the graph. Use torch.export.export(model, (x,)) (dynamic "
                "shapes), ONNX via torch.onnx.export(model, (x,), dynamo=True), or `fastervit export`"
            )
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
        weight = self.stem.conv1.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(
                f"the input is {x.dtype} but the model's weights are {weight.dtype}; convert one to the other "
                f"(x.to({weight.dtype}) or model.to({x.dtype})), or run under torch.autocast"
            )
        if x.shape[1] != self.in_chans and x.shape[-1] == self.in_chans:
            raise ValueError(
                f"FasterViT expects (B, {self.in_chans}, H, W) but got {tuple(x.shape)}, which looks like a "
                f"channels-last (B, H, W, C) image tensor; convert it with x.permute(0, 3, 1, 2)"
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
        """Stage outputs (strides 4, 8, 16, 32) and, unless ``intermediates_only``, the final map.

        ``indices``: last n stages if int, all if None, else the listed stage indices (negatives allowed), returned
        in the order listed (the order of ``feature_info`` for ``features_only`` models); repeats are an error.
        ``norm`` applies the final BatchNorm to the last stage's intermediate. With ``stop_early`` the stages after
        the last index are skipped and the returned final map is the last stage run, normed only when that is the
        last stage (timm's convention: the final norm belongs to the final stage's width).
        """
        if output_fmt != "NCHW":
            raise ValueError(f"output_fmt must be 'NCHW', got {output_fmt!r}")
        self.check_input(x)
        take = _take_indices(len(self.stages), indices)
        last = max(take)
        x = self.stem(x)
        stages = self.stages[: last + 1] if stop_early else self.stages
        outputs: dict[int, Tensor] = {}
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                outputs[i] = self.norm(x) if norm and i == len(self.stages) - 1 else x
        intermediates = [outputs[i] for i in take]
        if intermediates_only:
            return intermediates
        return (self.norm(x) if len(stages) == len(self.stages) else x), intermediates

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


def fuse_in_place(module: nn.Module, pack: bool = True) -> None:
    """The inference form of every FasterViT layer inside ``module`` (see ``FasterViT.fuse``), in place; the
    module's parameters become buffers (a snapshot)."""
    for m in list(module.modules()):
        if m is not module and isinstance(m, (TwoConvBN, Downsample, HatBlock)):
            m.fuse()
    for m in module.modules():
        if isinstance(m, (FusedConv2d, FusedLinear)):
            m.use_packed = pack
            if not pack:
                m._packed.clear()
    freeze(module)


def _take_indices(num_stages: int, indices: int | Sequence[int] | None) -> list[int]:
    """Stage indices to return: all (None), the last ``n`` (int), or the listed ones in their order (negatives
    allowed). Raises ValueError for out-of-range or repeated indices."""
    if indices is None:
        return list(range(num_stages))
    if isinstance(indices, int):
        if not 0 < indices <= num_stages:
            raise ValueError(f"indices={indices} must be between 1 and {num_stages}")
        return list(range(num_stages - indices, num_stages))
    take = [i + num_stages if i < 0 else i for i in indices]
    if not take or any(not 0 <= i < num_stages for i in take):
        raise ValueError(f"indices {list(indices)} out of range for {num_stages} stages")
    if len(set(take)) != len(take):
        raise ValueError(f"indices {list(indices)} name a stage twice; list each stage once")
    return take
