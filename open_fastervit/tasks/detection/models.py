"""Object detectors and instance segmenters on a FasterViT backbone, built from torchvision's detection models.

``build_detector(kind, backbone, num_classes)`` puts a ``FasterViTBackbone`` under a feature pyramid
(``torchvision.ops.FeaturePyramidNetwork``) and hands it to one of torchvision's detectors:

* ``mask_rcnn`` / ``faster_rcnn``: the four stage maps (strides 4, 8, 16, 32) plus a stride-2 subsampling of the
  last one (``LastLevelMaxPool``), i.e. P2-P6, as torchvision's ResNet-FPN R-CNNs; RoIAlign on P2-P5.
* ``retinanet`` / ``fcos``: the maps of strides 8, 16, 32 plus two stride-2 convolutions on P5
  (``LastLevelP6P7``), i.e. P3-P7, as torchvision's RetinaNet (v2) and FCOS.

The detectors take a list of ``(3, H, W)`` float images **in [0, 1]** of any sizes; their transform
(``GeneralizedRCNNTransform``) normalises with the backbone's ImageNet mean/std, resizes so the short side is
``min_size`` (the long side at most ``max_size``) and pads the batch to a multiple of 32. A tuple ``min_size``
gives multi-scale training: one entry is drawn per training batch, and evaluation uses the last entry.
In training the detector returns a dict of losses; in eval mode one dict per image with ``boxes`` (N, 4) in
``xyxy`` pixels of the input image, ``labels`` (N,) int64 and ``scores`` (N,), plus ``masks`` (N, 1, H, W)
probabilities for Mask R-CNN.

Class indices follow torchvision's convention: object classes are labels ``1..num_classes`` and index 0 is the
background. ``num_classes`` here counts object classes only; every head gets ``num_classes + 1`` outputs (for
RetinaNet and FCOS, whose sigmoid classifiers have no background class, index 0 is simply never a target).

Difference from the paper (FasterViT, arXiv 2306.06189, Table 3): the COCO results there come from **Cascade
Mask R-CNN** (three cascaded box heads trained at IoU 0.5 / 0.6 / 0.7, GIoU box loss, 3x schedule with
multi-scale training, in mmdetection). torchvision has no cascade RoI head, so our ``mask_rcnn`` is the plain
single-stage RoI head of Mask R-CNN (one box head at IoU 0.5, smooth-L1 box loss, torchvision's sampling and
post-processing defaults). Its APs are therefore not comparable with the paper's numbers; they are
comparable with other backbones trained through this same code.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from ...backbone import FasterViTBackbone, create_backbone

__all__ = [
    "DETECTOR_KINDS",
    "FasterViTFPN",
    "build_detector",
    "detector_backbone",
    "detector_from_config",
    "detector_param_groups",
]

#: The detector kinds ``build_detector`` knows (hyphens are accepted too: ``mask-rcnn``).
DETECTOR_KINDS = ("mask_rcnn", "faster_rcnn", "retinanet", "fcos")
#: Backbone strides fed to the FPN, per kind (R-CNNs: C2-C5; one-stage detectors: C3-C5).
_FPN_STRIDES = {"mask_rcnn": (4, 8, 16, 32), "faster_rcnn": (4, 8, 16, 32), "retinanet": (8, 16, 32),
                "fcos": (8, 16, 32)}
#: Default anchor base sizes (pixels of the resized image) per pyramid level, five levels for every kind.
_DEFAULT_ANCHOR_SIZES = {"mask_rcnn": (32, 64, 128, 256, 512), "faster_rcnn": (32, 64, 128, 256, 512),
                         "retinanet": (32, 64, 128, 256, 512), "fcos": (8, 16, 32, 64, 128)}
#: Anchor aspect ratios (height / width) of the anchor-based kinds.
ASPECT_RATIOS = (0.5, 1.0, 2.0)
#: FCOS needs anchor sizes equal to the level strides (its target assignment derives scale ranges from them).
_FCOS_STRIDES = (8, 16, 32, 64, 128)


class FasterViTFPN(nn.Module):
    """A FasterViT backbone under a feature pyramid: what torchvision's detectors expect as ``backbone``.

    Args:
        body: the FasterViT trunk; it must return maps at every stride of ``strides``.
        strides: backbone strides fed to the FPN, increasing (``(4, 8, 16, 32)`` or ``(8, 16, 32)``).
        out_channels: channels of every pyramid level.
        extra: ``"maxpool"`` (one more level by stride-2 subsampling, named ``"pool"``) or ``"p6p7"`` (two
            stride-2 convolutions on the last FPN output, named ``"p6"``, ``"p7"``).

    Attributes:
        out_channels: channels of every level (torchvision reads this attribute).
        level_names: the names of the returned levels, finest first (``"0"``, ``"1"``, ... then the extras).
        level_strides: their strides relative to the (padded) input.

    Raises:
        ValueError: ``body`` lacks one of ``strides``, or ``extra`` is unknown.
    """

    def __init__(self, body: FasterViTBackbone, strides: Sequence[int], out_channels: int = 256,
                 extra: str = "maxpool") -> None:
        super().__init__()
        missing = [s for s in strides if s not in body.strides]
        if missing:
            raise ValueError(
                f"the backbone returns maps at strides {list(body.strides)} but this detector needs {list(strides)}; "
                f"build it with out_indices covering strides {missing} (stride 4 -> 0, 8 -> 1, 16 -> 2, 32 -> 3)"
            )
        self.body = body
        self._positions = [list(body.strides).index(s) for s in strides]
        in_channels = [body.out_channels[i] for i in self._positions]
        if extra == "maxpool":
            extra_block, extra_names = LastLevelMaxPool(), ["pool"]
        elif extra == "p6p7":
            extra_block, extra_names = LastLevelP6P7(out_channels, out_channels), ["p6", "p7"]
        else:
            raise ValueError(f"extra must be 'maxpool' or 'p6p7', got {extra!r}")
        self.fpn = FeaturePyramidNetwork(in_channels_list=in_channels, out_channels=out_channels,
                                         extra_blocks=extra_block)
        self.out_channels = out_channels
        self.level_names = [str(i) for i in range(len(strides))] + extra_names
        last = int(strides[-1])
        self.level_strides = [int(s) for s in strides] + [last * 2 ** (k + 1) for k in range(len(extra_names))]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """``(B, C_in, H, W)`` -> ordered ``{name: (B, out_channels, H / stride, W / stride)}`` (ceil), finest
        level first (see ``level_names`` / ``level_strides``)."""
        maps = self.body(x)
        selected = OrderedDict((str(k), maps[i]) for k, i in enumerate(self._positions))
        return self.fpn(selected)


def _canonical_kind(kind: str) -> str:
    canonical = str(kind).strip().lower().replace("-", "_")
    if canonical not in DETECTOR_KINDS:
        raise ValueError(f"unknown detector kind {kind!r}; valid kinds: {', '.join(DETECTOR_KINDS)} "
                         "(hyphens accepted, e.g. 'mask-rcnn')")
    return canonical


def _check_min_size(min_size: int | Sequence[int]) -> tuple[int, ...]:
    sizes = (min_size,) if isinstance(min_size, (int, float)) else tuple(min_size)
    if not sizes or any(int(s) != s or int(s) < 32 for s in sizes):
        raise ValueError(f"min_size must be an integer >= 32 or a non-empty sequence of them, got {min_size!r}")
    return tuple(int(s) for s in sizes)


def _normalisation(backbone: FasterViTBackbone) -> tuple[list[float], list[float]]:
    """The backbone's ImageNet mean/std (ImageNet defaults when its config has none), one entry per channel."""
    cfg = backbone.pretrained_cfg or {}
    mean = list(cfg.get("mean", (0.485, 0.456, 0.406)))
    std = list(cfg.get("std", (0.229, 0.224, 0.225)))
    channels = int(backbone.in_chans)
    if len(mean) != channels:  # e.g. a 1- or 4-channel backbone adapted from RGB weights
        mean = [sum(mean) / len(mean)] * channels
        std = [sum(std) / len(std)] * channels
    return [float(v) for v in mean], [float(v) for v in std]


def _anchor_generator(kind: str, sizes: Sequence[float]) -> AnchorGenerator:
    """One anchor set per pyramid level: R-CNNs 3 aspect ratios, RetinaNet 3 octave scales x 3 ratios, FCOS one
    square anchor (its points) per location."""
    if kind == "retinanet":
        per_level = tuple(tuple(float(s) * 2 ** (k / 3) for k in range(3)) for s in sizes)
        return AnchorGenerator(per_level, (ASPECT_RATIOS,) * len(per_level))
    if kind == "fcos":
        return AnchorGenerator(tuple((float(s),) for s in sizes), ((1.0,),) * len(sizes))
    return AnchorGenerator(tuple((float(s),) for s in sizes), (ASPECT_RATIOS,) * len(sizes))


def _rcnn_heads(kind: str, in_channels: int, classes: int, box_width: int | None,
                mask_width: int | None) -> dict[str, nn.Module]:
    """torchvision's R-CNN box (and mask) heads and predictors at the given widths; empty when both are None
    (torchvision then builds its defaults: box MLP 1024, mask convs 256)."""
    if box_width is None and mask_width is None:
        return {}
    box_width = 1024 if box_width is None else int(box_width)
    resolution = 7  # output size of torchvision's box RoIAlign
    heads: dict[str, nn.Module] = {"box_head": TwoMLPHead(in_channels * resolution**2, box_width),
                                   "box_predictor": FastRCNNPredictor(box_width, classes)}
    if kind == "mask_rcnn":
        mask_width = 256 if mask_width is None else int(mask_width)
        heads["mask_head"] = MaskRCNNHeads(in_channels, (mask_width,) * 4, 1)
        heads["mask_predictor"] = MaskRCNNPredictor(mask_width, mask_width, classes)
    return heads


def build_detector(
    kind: str,
    backbone: FasterViTBackbone | str = "fastervit_0",
    num_classes: int = 80,
    *,
    min_size: int | Sequence[int] = 800,
    max_size: int = 1333,
    backbone_kwargs: dict[str, Any] | None = None,
    fpn_channels: int = 256,
    anchor_sizes: Sequence[float] | None = None,
    box_head_channels: int | None = None,
    mask_head_channels: int | None = None,
    **detector_kwargs: Any,
) -> nn.Module:
    """A torchvision detector (``MaskRCNN``, ``FasterRCNN``, ``RetinaNet`` or ``FCOS``) on a FasterViT + FPN.

    Args:
        kind: ``"mask_rcnn"``, ``"faster_rcnn"``, ``"retinanet"`` or ``"fcos"`` (hyphens accepted).
        backbone: a ``FasterViTBackbone``, or an architecture name for ``create_backbone`` (random weights unless
            ``backbone_kwargs`` says ``pretrained=True`` or gives a ``checkpoint``).
        num_classes: object classes **without** the background; labels are ``1..num_classes`` and the heads get
            ``num_classes + 1`` outputs (index 0 = background, torchvision's convention). Default 80 (COCO).
        min_size: short side of the resized input, in pixels; a tuple draws one per training batch (multi-scale
            training) and evaluates at the last one.
        max_size: cap on the long side of the resized input, in pixels.
        backbone_kwargs: keyword arguments of ``create_backbone`` when ``backbone`` is a name (``pretrained``,
            ``checkpoint``, ``frozen_stages``, ``norm_eval``, ``drop_path_rate``, ``model_kwargs``, ...). The
            one-stage kinds default to ``out_indices=(1, 2, 3)``.
        fpn_channels: channels of every pyramid level.
        anchor_sizes: anchor base size per pyramid level (five levels for every kind), in pixels of the resized
            image; default 32..512 (R-CNNs, RetinaNet). FCOS's must be its level strides 8..128 (only those).
        box_head_channels: R-CNNs only: width of the two-layer MLP box head (default torchvision's 1024).
        mask_head_channels: Mask R-CNN only: channels of the four-conv mask head and its upsampling (default
            torchvision's 256). Small values make small test models.
        **detector_kwargs: passed to the torchvision class (e.g. ``box_score_thresh``, ``box_detections_per_img``,
            ``score_thresh``, ``detections_per_img``, ``image_mean``/``image_std`` to override the backbone's).

    Returns:
        The detector in train mode. ``detector.backbone`` is a ``FasterViTFPN`` whose ``.body`` is the FasterViT
        (see ``detector_backbone``); ``detector.build_config`` holds the arguments (``detector_from_config``
        rebuilds the same architecture, to load a saved state dict into).

    Raises:
        ValueError: unknown ``kind``; ``num_classes`` < 1; bad ``min_size``/``max_size``; ``backbone_kwargs`` with a
            backbone instance; a backbone lacking the strides the kind needs; wrong number of ``anchor_sizes``;
            head widths for a kind without that head.
        TypeError: ``backbone`` is neither a name nor a ``FasterViTBackbone``.
    """
    kind = _canonical_kind(kind)
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes counts object classes (background excluded) and must be >= 1, got "
                         f"{num_classes!r}")
    num_classes = int(num_classes)
    sizes = _check_min_size(min_size)
    if int(max_size) < max(sizes):
        raise ValueError(f"max_size {max_size} is smaller than min_size {max(sizes)}")
    strides = _FPN_STRIDES[kind]
    if box_head_channels is not None and kind not in ("mask_rcnn", "faster_rcnn"):
        raise ValueError(f"box_head_channels applies to the R-CNNs, not {kind}")
    if mask_head_channels is not None and kind != "mask_rcnn":
        raise ValueError(f"mask_head_channels applies to mask_rcnn, not {kind}")

    if isinstance(backbone, str):
        bb_kwargs = dict(backbone_kwargs or {})
        if kind in ("retinanet", "fcos"):
            bb_kwargs.setdefault("out_indices", (1, 2, 3))
        body = create_backbone(backbone, **bb_kwargs)
        backbone_name, from_instance = backbone, False
    elif isinstance(backbone, FasterViTBackbone):
        if backbone_kwargs:
            raise ValueError("backbone_kwargs only apply when backbone is a name; configure the instance instead")
        body = backbone
        backbone_name = str(backbone.pretrained_cfg.get("architecture", "fastervit_0"))
        bb_kwargs = dict(out_indices=tuple(backbone.out_indices), frozen_stages=backbone.frozen_stages,
                         norm_eval=backbone.norm_eval, in_chans=backbone.in_chans)
        from_instance = True
    else:
        raise TypeError(f"backbone must be a FasterViTBackbone or an architecture name, got {type(backbone).__name__}")

    extra = "maxpool" if kind in ("mask_rcnn", "faster_rcnn") else "p6p7"
    fpn = FasterViTFPN(body, strides, out_channels=int(fpn_channels), extra=extra)
    levels = len(fpn.level_names)
    if anchor_sizes is None:
        anchors = _DEFAULT_ANCHOR_SIZES[kind]
    else:
        anchors = tuple(float(s) for s in anchor_sizes)
        if len(anchors) != levels:
            raise ValueError(f"anchor_sizes needs one size per pyramid level ({levels}), got {len(anchors)}")
        if kind == "fcos" and tuple(anchors) != tuple(float(s) for s in _FCOS_STRIDES):
            raise ValueError(f"FCOS anchor sizes must equal its level strides {_FCOS_STRIDES}, got {anchors}")

    mean, std = _normalisation(body)
    kwargs = dict(detector_kwargs)
    kwargs.setdefault("image_mean", mean)
    kwargs.setdefault("image_std", std)
    heads = _rcnn_heads(kind, fpn.out_channels, num_classes + 1, box_head_channels, mask_head_channels)
    common = dict(num_classes=None if heads else num_classes + 1, min_size=sizes if len(sizes) > 1 else sizes[0],
                  max_size=int(max_size), **heads, **kwargs)
    generator = _anchor_generator(kind, anchors)
    if kind == "mask_rcnn":
        detector: nn.Module = MaskRCNN(fpn, rpn_anchor_generator=generator, **common)
    elif kind == "faster_rcnn":
        detector = FasterRCNN(fpn, rpn_anchor_generator=generator, **common)
    elif kind == "retinanet":
        detector = RetinaNet(fpn, anchor_generator=generator, **common)
    else:
        detector = FCOS(fpn, anchor_generator=generator, **common)

    detector.build_config = {
        "kind": kind,
        "backbone": backbone_name,
        "backbone_kwargs": _plain(bb_kwargs),
        "backbone_from_instance": from_instance,
        "num_classes": num_classes,
        "min_size": list(sizes) if len(sizes) > 1 else sizes[0],
        "max_size": int(max_size),
        "fpn_channels": int(fpn_channels),
        "anchor_sizes": None if anchor_sizes is None else list(anchors),
        "box_head_channels": box_head_channels,
        "mask_head_channels": mask_head_channels,
        "detector_kwargs": _plain(detector_kwargs),
    }
    return detector.train()


def _plain(value: Any) -> Any:
    """Tuples -> lists, paths -> str, recursively (a JSON-friendly copy of a config value)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "__fspath__"):
        return str(value)
    return copy.deepcopy(value)


def detector_from_config(config: dict[str, Any], *, load_backbone_weights: bool = False) -> nn.Module:
    """Rebuild a detector from its ``build_config`` (e.g. read back from a checkpoint), ready for
    ``load_state_dict``.

    Args:
        config: ``detector.build_config`` of the detector to rebuild.
        load_backbone_weights: also load the backbone weights the config names (``pretrained`` / ``checkpoint``);
            by default they are dropped (the state dict to be loaded carries all weights).

    Raises:
        ValueError: a config of a detector built on a backbone *instance*: its architecture overrides
            (``model_kwargs``) are unknown, so the rebuild could not be trusted; build it by name instead.
    """
    if config.get("backbone_from_instance"):
        raise ValueError(
            "this detector was built on a FasterViTBackbone instance; its architecture overrides are not recorded. "
            "Rebuild it with build_detector(kind, create_backbone(...), ...) as originally, or build by name"
        )
    bb_kwargs = copy.deepcopy(config.get("backbone_kwargs") or {})
    if not load_backbone_weights:
        bb_kwargs.pop("checkpoint", None)
        bb_kwargs.pop("pretrained", None)
    if "out_indices" in bb_kwargs:
        bb_kwargs["out_indices"] = tuple(bb_kwargs["out_indices"])
    min_size = config["min_size"]
    return build_detector(
        config["kind"], config["backbone"], config["num_classes"],
        min_size=tuple(min_size) if isinstance(min_size, list) else min_size, max_size=config["max_size"],
        backbone_kwargs=bb_kwargs, fpn_channels=config.get("fpn_channels", 256),
        anchor_sizes=config.get("anchor_sizes"), box_head_channels=config.get("box_head_channels"),
        mask_head_channels=config.get("mask_head_channels"), **copy.deepcopy(config.get("detector_kwargs") or {}),
    )


def detector_backbone(detector: nn.Module) -> FasterViTBackbone:
    """The ``FasterViTBackbone`` inside a detector of ``build_detector`` (``detector.backbone.body``).

    Raises:
        TypeError: the detector holds no FasterViT backbone.
    """
    body = getattr(getattr(detector, "backbone", None), "body", None)
    if not isinstance(body, FasterViTBackbone):
        raise TypeError(f"{type(detector).__name__} has no FasterViT backbone at .backbone.body")
    return body


def _module_prefix(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return f"{name}." if name else ""
    raise ValueError("module not found in the detector")


def detector_param_groups(detector: nn.Module, lr: float, weight_decay: float,
                          layer_decay: float | None = None) -> list[dict[str, Any]]:
    """Optimizer parameter groups for a detector of ``build_detector``.

    The backbone's groups come from ``FasterViTBackbone.param_groups`` (no decay on biases, norms and layer
    scales; with ``layer_decay`` the lr scale ``layer_decay ** (depth - layer)`` per block). The rest (FPN,
    RPN, heads) is split in two groups at ``lr`` with ``lr_scale`` 1: weights with ``weight_decay``, and 1-D
    parameters (biases, norm weights) without. Frozen parameters are left out.

    Returns:
        ``{"params", "lr", "lr_scale", "weight_decay", "param_names"}`` dicts (names as in
        ``detector.named_parameters()``), every trainable parameter in exactly one group.
    """
    body = detector_backbone(detector)
    prefix = _module_prefix(detector, body)
    groups = body.param_groups(weight_decay=weight_decay, layer_decay=layer_decay, lr=lr, prefix=prefix)
    in_body = {id(p) for p in body.parameters()}
    decay: tuple[list, list] = ([], [])
    no_decay: tuple[list, list] = ([], [])
    for name, p in detector.named_parameters():
        if id(p) in in_body or not p.requires_grad:
            continue
        params, names = no_decay if p.ndim <= 1 or name.endswith(".bias") else decay
        params.append(p)
        names.append(name)
    for (params, names), wd in ((decay, weight_decay), (no_decay, 0.0)):
        if params:
            groups.append({"params": params, "lr": lr, "lr_scale": 1.0, "weight_decay": wd, "param_names": names})
    return groups

