"""Semantic segmentation models: a FasterViT backbone under segmentation_models_pytorch's UPerNet or FPN decoder.

The paper (Sec. 5.3) evaluates FasterViT on ADE20K with UPerNet. ``build_segmenter`` composes our
``FasterViTBackbone`` (so frozen stages, ``norm_eval``, checkpoint loading, activation checkpointing and layer-wise
lr decay all work) with smp's ``UPerNetDecoder`` / ``FPNDecoder`` and ``SegmentationHead`` classes. smp's own model
classes are not used: they build their encoder from a name, and they refuse inputs whose sides are not multiples of
32. The ``Segmenter`` built here:

* takes images in [0, 1], ``(B, C, H, W)``, and normalises them with the backbone's ``pretrained_cfg`` mean / std;
* feeds smp's decoders the feature list they expect (``[input, <stride-2 placeholder>, s4, s8, s16, s32]``);
* pads the normalised image at the bottom / right to the decoder's ``size_divisor`` (32 for FPN, whose top-down path
  upsamples by exactly 2; none for UPerNet, which resizes to each lateral's size), upsamples the stride-4 logits by 4
  (bilinear, ``align_corners=False``) and crops them back, so it returns ``(B, num_classes, H, W)`` logits for any
  ``H, W >= 32``;
* optionally (``aux_head=True``) carries the auxiliary FCN head of the usual UPerNet ADE20K training recipe on the
  stride-16 (third stage) features: a 3x3 conv to 256 channels, BatchNorm, ReLU, Dropout2d(0.1), a 1x1 classifier.
  It is a training aid only: ``forward(images)`` never runs it, ``forward(images, return_aux=True)`` also returns its
  logits (upsampled to the input size) for the loss ``main + aux_weight * aux``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...backbone import FasterViTBackbone, create_backbone
from ...model import MIN_INPUT_SIZE

__all__ = [
    "SEGMENTER_KINDS",
    "Segmenter",
    "build_segmenter",
    "fcn_aux_head",
    "segmenter_backbone",
    "segmenter_from_config",
    "segmenter_param_groups",
]

#: Decoder kinds ``build_segmenter`` knows.
SEGMENTER_KINDS = ("upernet", "fpn")
#: Stride of the decoders' output map (both decode at the backbone's first stage, stride 4).
DECODER_STRIDE = 4
#: Default decoder width per kind: 512 for UPerNet (the usual UPerNet head width on ADE20K), 256 for FPN (smp's).
DEFAULT_DECODER_CHANNELS = {"upernet": 512, "fpn": 256}
#: Decoder options per kind (passed as ``**decoder_kwargs``) with their defaults.
DECODER_OPTIONS: dict[str, dict[str, Any]] = {
    # use_norm: smp's norm between conv and ReLU; dropout: Dropout2d before the 1x1 classifier (0.1 is the usual
    # UPerNet head setting).
    "upernet": {"use_norm": "batchnorm", "dropout": 0.1},
    # segmentation_channels: width of the per-level blocks (a multiple of 32: they use GroupNorm(32, .));
    # dropout: smp's Dropout2d after the merge; merge_policy: "add" or "cat"; interpolation_mode: top-down upsampling.
    "fpn": {"segmentation_channels": 128, "dropout": 0.2, "merge_policy": "add", "interpolation_mode": "nearest"},
}
#: Backbone options that would break the decoders (they need all four stages, in order).
FIXED_OUT_INDICES = (0, 1, 2, 3)
#: The auxiliary FCN head: backbone output it reads (the third stage, stride 16), its width and its dropout.
AUX_STAGE = 2
AUX_CHANNELS = 256
AUX_DROPOUT = 0.1


def fcn_aux_head(in_channels: int, num_classes: int, channels: int = AUX_CHANNELS,
                 dropout: float = AUX_DROPOUT) -> nn.Sequential:
    """The auxiliary FCN head: ``Conv2d 3x3 (in_channels -> channels, no bias)``, ``BatchNorm2d``, ``ReLU``,
    ``Dropout2d(dropout)``, ``Conv2d 1x1 (channels -> num_classes)``; maps ``(B, in_channels, h, w)`` to
    ``(B, num_classes, h, w)`` logits at the feature resolution.

    Raises:
        ValueError: a channel or class count < 1, or a dropout outside [0, 1).
    """
    if min(int(in_channels), int(channels), int(num_classes)) < 1:
        raise ValueError(f"aux head sizes must be >= 1, got in_channels={in_channels}, channels={channels}, "
                         f"num_classes={num_classes}")
    if not 0.0 <= float(dropout) < 1.0:
        raise ValueError(f"aux head dropout must be in [0, 1), got {dropout}")
    return nn.Sequential(
        nn.Conv2d(int(in_channels), int(channels), kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(int(channels)),
        nn.ReLU(inplace=True),
        nn.Dropout2d(float(dropout)) if dropout > 0 else nn.Identity(),
        nn.Conv2d(int(channels), int(num_classes), kernel_size=1),
    )


class Segmenter(nn.Module):
    """Backbone + decoder + 1x1 classifier; ``forward`` maps images in [0, 1] to per-pixel logits.

    Built by ``build_segmenter`` (which also sets ``build_config``). Sub-modules: ``backbone`` (a
    ``FasterViTBackbone`` with ``out_indices=(0, 1, 2, 3)``), ``decoder`` (smp decoder returning a stride-4 map of
    ``decoder_out_channels`` channels), ``dropout`` and ``segmentation_head`` (smp ``SegmentationHead``, a 1x1 conv
    without upsampling), and ``aux_head`` (the auxiliary FCN head on the stride-16 features, or None). ``mean`` /
    ``std`` are non-persistent buffers: the state dict holds only learned tensors and BatchNorm statistics.

    Args:
        size_divisor: the backbone input is padded (bottom / right, zeros after normalisation) to a multiple of this.
        mean, std: per-channel normalisation of the [0, 1] input (length ``backbone.in_chans``).
        aux_head: a training-only head on backbone output ``AUX_STAGE`` (e.g. ``fcn_aux_head``); run only when
            ``forward(..., return_aux=True)`` asks for it.
    """

    def __init__(self, backbone: FasterViTBackbone, decoder: nn.Module, segmentation_head: nn.Module, *, kind: str,
                 num_classes: int, size_divisor: int, mean: tuple[float, ...], std: tuple[float, ...],
                 dropout: float = 0.0, aux_head: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.decoder = decoder
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.segmentation_head = segmentation_head
        self.aux_head = aux_head
        self.kind = kind
        self.num_classes = num_classes
        self.size_divisor = size_divisor
        self.build_config: dict[str, Any] = {}
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in every backbone stage (the decoder is small and left as it is)."""
        self.backbone.set_grad_checkpointing(enable)

    def fuse(self) -> Segmenter:
        """Inference form of the backbone in place (``FasterViTBackbone.fuse``); returns ``self`` in eval mode."""
        self.backbone.fuse()
        return self.eval()

    @overload
    def forward(self, images: Tensor, return_aux: Literal[False] = ...) -> Tensor: ...

    @overload
    def forward(self, images: Tensor, return_aux: Literal[True]) -> tuple[Tensor, Tensor | None]: ...

    def forward(self, images: Tensor, return_aux: bool = False) -> Tensor | tuple[Tensor, Tensor | None]:
        """Per-pixel class logits (and, when asked, the auxiliary head's).

        Args:
            images: ``(B, C, H, W)`` floats in [0, 1] (not checked), ``C = backbone.in_chans``, ``H, W >= 32``.
            return_aux: also run the auxiliary head (training: the trainer asks for it when its loss weight is > 0;
                a model without one gives None). The main logits are the same either way.

        Returns:
            ``(B, num_classes, H, W)`` logits (before softmax), at the input resolution; with ``return_aux`` the pair
            ``(logits, aux_logits)``, ``aux_logits`` also ``(B, num_classes, H, W)`` (bilinearly upsampled from
            stride 16) or None.

        Raises:
            ValueError: not a 4-D tensor, a wrong channel count, or a side under 32 px.
        """
        if images.ndim != 4:
            raise ValueError(f"Segmenter expects a (B, C, H, W) batch, got shape {tuple(images.shape)}")
        height, width = images.shape[-2:]
        if height < MIN_INPUT_SIZE or width < MIN_INPUT_SIZE:
            raise ValueError(f"Segmenter needs images of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels, "
                             f"got {height}x{width}")
        if images.shape[1] != self.mean.shape[1]:
            raise ValueError(f"Segmenter expects {self.mean.shape[1]} input channels, got {images.shape[1]}")
        x = (images - self.mean.to(images.dtype)) / self.std.to(images.dtype)
        pad_h = -height % self.size_divisor
        pad_w = -width % self.size_divisor
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        maps = self.backbone(x)
        # smp decoders index features as [stride 1, stride 2, stride 4, ..., stride 32]; FasterViT has no stride-2
        # output, so (as smp's own timm encoder does for transformer-style models) a zero-channel placeholder
        # stands in for it.
        placeholder = x.new_empty(x.shape[0], 0, math.ceil(x.shape[-2] / 2), math.ceil(x.shape[-1] / 2))
        decoded = self.decoder([x, placeholder, *maps])
        logits = self.segmentation_head(self.dropout(decoded))
        size = (logits.shape[-2] * DECODER_STRIDE, logits.shape[-1] * DECODER_STRIDE)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[..., :height, :width]
        if not return_aux:
            return logits
        if self.aux_head is None:
            return logits, None
        aux = self.aux_head(maps[AUX_STAGE])
        stride = int(self.backbone.strides[AUX_STAGE])
        size = (max(aux.shape[-2] * stride, height), max(aux.shape[-1] * stride, width))
        aux = F.interpolate(aux, size=size, mode="bilinear", align_corners=False)
        return logits, aux[..., :height, :width]


def _json_ready(value: Any) -> Any:
    """Paths to strings and tuples to lists, recursively (so ``build_config`` can be saved as JSON / YAML)."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    return value


def _normalisation(backbone: FasterViTBackbone) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The backbone's ``pretrained_cfg`` mean / std (ImageNet's when absent), one value per input channel.

    When the channel count differs from the statistics' (``in_chans != 3``), every channel gets the average.
    """
    cfg = backbone.pretrained_cfg or {}
    mean = tuple(float(v) for v in cfg.get("mean", (0.485, 0.456, 0.406)))
    std = tuple(float(v) for v in cfg.get("std", (0.229, 0.224, 0.225)))
    channels = backbone.in_chans
    if len(mean) != channels:
        mean = (sum(mean) / len(mean),) * channels
    if len(std) != channels:
        std = (sum(std) / len(std),) * channels
    return mean, std


def _smp_parts() -> tuple[type, type, type, Any]:
    """smp's decoder / head classes and initialisers (imported lazily: smp is heavy)."""
    try:
        # here, not at the top: importing smp takes seconds, and only building a segmenter needs it
        from segmentation_models_pytorch.base import SegmentationHead, initialization
        from segmentation_models_pytorch.decoders.fpn.decoder import FPNDecoder
        from segmentation_models_pytorch.decoders.upernet.decoder import UPerNetDecoder
    except ImportError as err:  # pragma: no cover - depends on the installed smp
        raise ImportError("build_segmenter needs segmentation_models_pytorch >= 0.5 "
                          "(pip install segmentation-models-pytorch)") from err
    return UPerNetDecoder, FPNDecoder, SegmentationHead, initialization


def build_segmenter(
    kind: str,
    backbone: str = "fastervit_0",
    num_classes: int = 150,
    *,
    backbone_kwargs: Mapping[str, Any] | None = None,
    decoder_channels: int | None = None,
    aux_head: bool = False,
    aux_channels: int = AUX_CHANNELS,
    **decoder_kwargs: Any,
) -> Segmenter:
    """A FasterViT segmentation model with smp's UPerNet or FPN decoder.

    Args:
        kind: ``"upernet"`` (the paper's ADE20K setting) or ``"fpn"`` (smp's semantic FPN).
        backbone: a FasterViT architecture name (``fastervit_0`` .. ``fastervit_6``, ...).
        num_classes: output classes (150 for ADE20K).
        backbone_kwargs: ``create_backbone`` arguments: ``frozen_stages``, ``norm_eval``, ``checkpoint``,
            ``pretrained``, ``grad_checkpointing``, ``drop_path_rate``, ``model_kwargs``, ``in_chans``, ``use_ema``.
            ``out_indices`` must be left out (or be ``(0, 1, 2, 3)``): the decoders take all four stages.
        decoder_channels: decoder width (UPerNet: every lateral / PSP / fusion conv, default 512; FPN: the pyramid
            channels, default 256).
        aux_head: add the training-only auxiliary FCN head (``fcn_aux_head``) on the stride-16 backbone features,
            as the UPerNet ADE20K recipe trains with; inference never runs it.
        aux_channels: width of its 3x3 conv (256).
        decoder_kwargs: per kind (defaults in ``DECODER_OPTIONS``): UPerNet ``use_norm`` (smp's norm spec, default
            ``"batchnorm"``), ``dropout`` (before the classifier, 0.1); FPN ``segmentation_channels`` (128, a
            multiple of 32), ``dropout`` (0.2), ``merge_policy`` (``"add"`` / ``"cat"``), ``interpolation_mode``.

    Returns:
        A ``Segmenter`` in train mode whose ``build_config`` holds every argument (defaults resolved, paths as
        strings) so that ``segmenter_from_config(model.build_config)`` rebuilds the same architecture.

    Raises:
        ValueError: unknown ``kind`` (the message lists the valid ones), unknown decoder options, ``num_classes <
            1``, ``aux_channels < 1``, ``out_indices`` other than ``(0, 1, 2, 3)``, or anything ``create_backbone``
            refuses.
        CheckpointError: a missing or mismatching backbone checkpoint.
    """
    kind = str(kind).lower()
    if kind not in SEGMENTER_KINDS:
        raise ValueError(f"unknown segmenter kind {kind!r}; valid kinds: {', '.join(SEGMENTER_KINDS)}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    num_classes = int(num_classes)
    unknown = sorted(set(decoder_kwargs) - set(DECODER_OPTIONS[kind]))
    if unknown:
        raise ValueError(f"unknown {kind} decoder option(s) {unknown}; valid: {sorted(DECODER_OPTIONS[kind])}")
    options = {**DECODER_OPTIONS[kind], **decoder_kwargs}
    channels = int(decoder_channels if decoder_channels is not None else DEFAULT_DECODER_CHANNELS[kind])

    bb_kwargs = dict(backbone_kwargs or {})
    out_indices = tuple(bb_kwargs.pop("out_indices", FIXED_OUT_INDICES))
    if out_indices != FIXED_OUT_INDICES:
        raise ValueError(f"segmenters use all four backbone stages; out_indices must be {FIXED_OUT_INDICES}, "
                         f"got {out_indices}")
    trunk = create_backbone(backbone, out_indices=FIXED_OUT_INDICES, **bb_kwargs)

    upernet_decoder, fpn_decoder, segmentation_head, initialization = _smp_parts()
    # smp's channel list: [input, stride 2 (absent), stride 4, 8, 16, 32]
    encoder_channels = [trunk.in_chans, 0, *trunk.out_channels]
    if kind == "upernet":
        decoder = upernet_decoder(encoder_channels=encoder_channels, encoder_depth=5, decoder_channels=channels,
                                  use_norm=options["use_norm"])
        out_channels, size_divisor, head_dropout = channels, 1, float(options["dropout"])
    else:
        if int(options["segmentation_channels"]) % 32:
            raise ValueError(f"FPN segmentation_channels must be a multiple of 32 (GroupNorm(32, .)), "
                             f"got {options['segmentation_channels']}")
        decoder = fpn_decoder(encoder_channels=encoder_channels, encoder_depth=5, pyramid_channels=channels,
                              segmentation_channels=int(options["segmentation_channels"]),
                              dropout=float(options["dropout"]), merge_policy=options["merge_policy"],
                              interpolation_mode=options["interpolation_mode"])
        out_channels, size_divisor, head_dropout = decoder.out_channels, max(trunk.strides), 0.0
    head = segmentation_head(in_channels=out_channels, out_channels=num_classes, kernel_size=1, upsampling=1)
    initialization.initialize_decoder(decoder)
    initialization.initialize_head(head)
    aux: nn.Sequential | None = None
    if aux_head:
        aux = fcn_aux_head(trunk.out_channels[AUX_STAGE], num_classes, int(aux_channels))
        initialization.initialize_decoder(aux[:-1])
        initialization.initialize_head(aux[-1:])

    mean, std = _normalisation(trunk)
    model = Segmenter(trunk, decoder, head, kind=kind, num_classes=num_classes, size_divisor=size_divisor,
                      mean=mean, std=std, dropout=head_dropout, aux_head=aux)
    model.decoder_out_channels = out_channels
    model.build_config = _json_ready({
        "kind": kind, "backbone": backbone, "num_classes": num_classes, "backbone_kwargs": bb_kwargs,
        "decoder_channels": channels, **options,
        **({"aux_head": True, "aux_channels": int(aux_channels)} if aux_head else {}),
    })
    return model.train()


def segmenter_from_config(config: Mapping[str, Any], *, load_backbone_weights: bool = False) -> Segmenter:
    """Rebuild a segmenter from its ``build_config`` (e.g. read back from a saved run), to load a state dict into.

    Args:
        config: a ``Segmenter.build_config`` (``kind``, ``backbone``, ``num_classes``, ``backbone_kwargs``,
            ``decoder_channels``, the decoder options, and ``aux_head`` / ``aux_channels`` when it has that head).
        load_backbone_weights: keep ``checkpoint`` / ``pretrained`` from ``backbone_kwargs`` (False: the backbone is
            built with random weights, as the saved state dict replaces them anyway).

    Raises:
        ValueError: a config without ``kind``, or anything ``build_segmenter`` refuses.
    """
    config = copy.deepcopy(dict(config))
    if "kind" not in config:
        raise ValueError(f"not a segmenter build_config (no 'kind'): keys {sorted(config)}")
    bb_kwargs = dict(config.pop("backbone_kwargs", None) or {})
    if not load_backbone_weights:
        bb_kwargs.pop("checkpoint", None)
        bb_kwargs.pop("pretrained", None)
    return build_segmenter(config.pop("kind"), config.pop("backbone", "fastervit_0"),
                           config.pop("num_classes", 150), backbone_kwargs=bb_kwargs, **config)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP (``.module``) / ``torch.compile`` (``._orig_mod``) wrappers."""
    for attr in ("module", "_orig_mod"):
        inner = getattr(model, attr, None)
        if isinstance(inner, nn.Module):
            return _unwrap(inner)
    return model


def segmenter_backbone(model: nn.Module) -> FasterViTBackbone:
    """The ``FasterViTBackbone`` of a segmenter built by ``build_segmenter`` (also through DDP / compile wrappers).

    Raises:
        TypeError: ``model`` holds no ``FasterViTBackbone`` as ``backbone``.
    """
    trunk = getattr(_unwrap(model), "backbone", None)
    if not isinstance(trunk, FasterViTBackbone):
        raise TypeError(f"{type(model).__name__} has no FasterViTBackbone 'backbone' (not built by build_segmenter)")
    return trunk


def segmenter_param_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float | None = None, *,
                           decoder_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups for a segmenter: the backbone's, then the decoder's and the classifier's.

    Backbone groups come from ``FasterViTBackbone.param_groups`` (no decay on biases, norms and layer scales;
    with ``layer_decay`` the per-block lr scale ``layer_decay ** (depth - layer)``; frozen parameters left out),
    names prefixed ``backbone.``. The decoder and head make two groups: weights (``ndim > 1``) with
    ``weight_decay``, biases and norm parameters without; both at ``lr * decoder_lr_scale``.

    Returns:
        ``{"params", "weight_decay", "lr_scale", "lr", "param_names"}`` dicts for ``torch.optim`` (extra keys are
        kept by torch optimizers; schedulers may use ``lr_scale``).

    Raises:
        TypeError: ``model`` was not built by ``build_segmenter``.
    """
    trunk = segmenter_backbone(model)
    groups = trunk.param_groups(weight_decay=weight_decay, layer_decay=layer_decay, lr=lr, prefix="backbone.")
    decay: list[tuple[str, nn.Parameter]] = []
    no_decay: list[tuple[str, nn.Parameter]] = []
    backbone_ids = {id(p) for p in trunk.parameters()}
    for name, param in _unwrap(model).named_parameters():
        if id(param) in backbone_ids or not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 else decay).append((name, param))
    for members, wd in ((decay, weight_decay), (no_decay, 0.0)):
        if members:
            groups.append({"params": [p for _, p in members], "weight_decay": wd, "lr_scale": decoder_lr_scale,
                           "lr": lr * decoder_lr_scale, "param_names": [n for n, _ in members]})
    return groups
