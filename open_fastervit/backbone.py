"""FasterViT as a multi-scale backbone for detection and segmentation (paper Sec. 5.2-5.3).

``create_backbone(name, ...)`` builds (and loads, through ``open_fastervit.load_model``) a FasterViT and keeps its
trunk: the stem and the stages up to the last requested output. The outputs are the stage maps before the next
downsample, at strides 4, 8, 16 and 32 (``(B, dim * 2**i, ceil(H / 2**(i + 2)), ceil(W / 2**(i + 2)))``), at any
input size of at least 32 px. The state-dict keys are the classification model's (``stem.*``, ``stages.*``), so a
backbone loads any FasterViT weights and a trained detector's backbone loads back into a classifier.

What detection and segmentation frameworks expect of a backbone is here: ``out_channels`` / ``strides`` /
``feature_info``, frozen stages (no gradient, always in eval mode), ``norm_eval`` (BatchNorms keep their running
statistics while the rest trains), activation checkpointing, layer-wise lr decay groups, and the inference form
(``fuse()``) for evaluation. (The authors' detection backbone lacks these: see issue 9.)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import Tensor, nn

from .loading import load_model
from .model import FasterViT, fuse_in_place

__all__ = ["FasterViTBackbone", "create_backbone"]

#: Number of FasterViT stages (outputs at strides 4, 8, 16, 32).
NUM_STAGES = 4


class FasterViTBackbone(nn.Module):
    """The trunk of a FasterViT returning the maps of ``out_indices``.

    Args:
        model: a FasterViT (its stem and stages are taken over; head and final norm are dropped).
        out_indices: stages whose outputs are returned, in this order (0..3 = strides 4, 8, 16, 32).
        frozen_stages: -1 freezes nothing, 0 the stem, ``k > 0`` the stem and stages ``0..k-1``: their parameters
            get ``requires_grad=False`` and the modules stay in eval mode (BatchNorm statistics and drop-path fixed).
        norm_eval: keep every BatchNorm in eval mode during training (statistics and affine transform frozen in
            behaviour; the affine parameters still train unless frozen), as usual with small detection batches.

    Raises:
        ValueError: out-of-range or repeated ``out_indices``; ``frozen_stages`` outside ``-1..4``.
    """

    def __init__(self, model: FasterViT, out_indices: Sequence[int] = (0, 1, 2, 3), frozen_stages: int = -1,
                 norm_eval: bool = False) -> None:
        super().__init__()
        if not isinstance(model, FasterViT):
            raise TypeError(f"FasterViTBackbone wraps a FasterViT, got {type(model).__name__}")
        indices = [int(i) + NUM_STAGES if int(i) < 0 else int(i) for i in out_indices]
        if not indices or any(not 0 <= i < NUM_STAGES for i in indices) or len(set(indices)) != len(indices):
            raise ValueError(f"out_indices {tuple(out_indices)} must list distinct stages among 0..3")
        if not -1 <= frozen_stages <= NUM_STAGES:
            raise ValueError(f"frozen_stages must be -1 (none) .. {NUM_STAGES} (all), got {frozen_stages}")
        self.out_indices = tuple(indices)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.in_chans = model.in_chans
        last = max(indices)
        self.stem = model.stem
        self.stages = nn.Sequential(*list(model.stages)[: last + 1])
        self.feature_info = [dict(model.feature_info[i]) for i in self.out_indices]
        self.out_channels = [info["num_chs"] for info in self.feature_info]
        self.strides = [info["reduction"] for info in self.feature_info]
        self.pretrained_cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        self.weights_info = dict(getattr(model, "weights_info", {}) or {})
        self.grad_checkpointing = False
        self._check_input = model.check_input  # bound to the donor, which only holds the input checks' settings
        self._freeze()

    # ---- training behaviour -------------------------------------------------------------------------------

    def _frozen_modules(self) -> list[nn.Module]:
        if self.frozen_stages < 0:
            return []
        return [self.stem, *list(self.stages)[: self.frozen_stages]]

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            module.eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def train(self, mode: bool = True) -> FasterViTBackbone:
        """As ``nn.Module.train``, but frozen stages, and with ``norm_eval`` every BatchNorm, stay in eval mode."""
        super().train(mode)
        if mode:
            for module in self._frozen_modules():
                module.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing per block in every stage (less memory, one more forward in backward)."""
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Layer scales (1-D tensors, also excluded by timm's optimizer factory)."""
        return {name for name, _ in self.named_parameters() if name.endswith(".gamma")}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's layer grouping (stem, then one group per block) for layer-wise lr decay."""
        return FasterViT.group_matcher(self, coarse)  # same key layout as the classifier

    def param_groups(self, weight_decay: float = 0.05, layer_decay: float | None = None,
                     lr: float | None = None, prefix: str = "") -> list[dict[str, Any]]:
        """Optimizer parameter groups: no weight decay on biases, norms and layer scales; with ``layer_decay``
        the lr scale ``layer_decay ** (depth - layer)`` per block (timm's ``param_groups_layer_decay``; the blocks
        nearest the output get 1). Frozen parameters are left out.

        Args:
            prefix: prepended to each group's names (e.g. ``"backbone.body."`` when the groups are merged with a
                detector's other parameters by name).
            lr: when given, each group also gets ``lr = lr * lr_scale``.

        Returns:
            A list of ``{"params", "weight_decay", "lr_scale"[, "lr"], "param_names"}`` dicts for torch optimizers.
        """

        no_decay = self.no_weight_decay()
        if layer_decay is not None:
            groups = param_groups_layer_decay(self, weight_decay=weight_decay, no_weight_decay_list=list(no_decay),
                                              layer_decay=layer_decay)
        else:
            groups = param_groups_weight_decay(self, weight_decay=weight_decay, no_weight_decay_list=list(no_decay))
        names = {id(p): name for name, p in self.named_parameters()}
        out = []
        for group in groups:
            params = [p for p in group["params"] if p.requires_grad]
            if not params:
                continue
            entry = {"params": params, "weight_decay": group["weight_decay"],
                     "lr_scale": group.get("lr_scale", 1.0), "param_names": [prefix + names[id(p)] for p in params]}
            if lr is not None:
                entry["lr"] = lr * entry["lr_scale"]
            out.append(entry)
        return out

    def fuse(self, pack: bool = True) -> FasterViTBackbone:
        """Inference form in place (``FasterViT.fuse``): folded norms, fused activations, packed weights; a
        snapshot whose parameters became buffers. Outputs equal the unfused backbone's to fp32 rounding."""
        fuse_in_place(self, pack)
        return self.eval()

    # ---- forward ------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> list[Tensor]:
        """``(B, C_in, H, W)`` -> one map per ``out_indices`` entry, ``(B, out_channels[k], H / strides[k], W /
        strides[k])`` (ceil). Raises ValueError for a wrong channel count or an image under 32 px."""
        self._check_input(x)
        x = self.stem(x)
        maps: dict[int, Tensor] = {}
        for i, stage in enumerate(self.stages):
            x = stage(x)
            maps[i] = x
        return [maps[i] for i in self.out_indices]


def create_backbone(
    name: str = "fastervit_0",
    out_indices: Sequence[int] = (0, 1, 2, 3),
    frozen_stages: int = -1,
    norm_eval: bool = False,
    checkpoint: str | Path | None = None,
    *,
    pretrained: bool = False,
    grad_checkpointing: bool = False,
    drop_path_rate: float | None = None,
    model_kwargs: dict[str, Any] | None = None,
    in_chans: int | None = None,
    use_ema: bool | None = None,
) -> FasterViTBackbone:
    """Build a FasterViT backbone and load its weights in one call.

    Args:
        name: a FasterViT architecture (``fastervit_0`` .. ``fastervit_6``, ``fastervit_4_21k_*``).
        out_indices, frozen_stages, norm_eval: see ``FasterViTBackbone``.
        checkpoint: weights for the trunk: our ``.safetensors``/``.pt`` files, a model folder, or the authors'
            ``.pth.tar`` (anything ``open_fastervit.load_model`` takes); the classifier is ignored.
        pretrained: without ``checkpoint``: the published ImageNet weights (True) or random weights (False).
        grad_checkpointing: activation checkpointing in every stage.
        drop_path_rate: stochastic depth (default: the architecture's).
        model_kwargs: architecture overrides (``dim``, ``depths``, ``window_size``, ...).
        in_chans: input channels (RGB weights adapted as timm does).

    Returns:
        A ``FasterViTBackbone`` in train mode (frozen parts in eval mode); ``weights_info`` says what was loaded.

    Raises:
        CheckpointError: a missing, corrupt or mismatching checkpoint; ValueError: unknown name or bad arguments.
    """

    kwargs = dict(model_kwargs or {})
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    source = checkpoint if checkpoint is not None else name
    arch = name if checkpoint is not None else None
    model = load_model(source, architecture=arch, head="resize" if checkpoint is not None else "keep",
                       use_ema=use_ema, model_kwargs=kwargs, in_chans=in_chans,
                       pretrained=pretrained if checkpoint is None else True)
    if not isinstance(model, FasterViT):
        raise ValueError(f"{source} is not a FasterViT ({type(model).__name__}); create_backbone builds FasterViT")
    backbone = FasterViTBackbone(model, out_indices=out_indices, frozen_stages=frozen_stages, norm_eval=norm_eval)
    if grad_checkpointing:
        backbone.set_grad_checkpointing(True)
    return backbone.train()
