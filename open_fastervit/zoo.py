"""The published FasterViT zoo: configurations, timm pretrained cfgs and registration.

Importing this module registers ``fastervit_0`` ... ``fastervit_6`` and ``fastervit_4_21k_{224,384,512,768}``
with timm, so ``timm.create_model('fastervit_0')`` works once ``open_fastervit`` is imported.
"""

from __future__ import annotations

import difflib
import logging
import operator
from typing import Any

import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model, resolve_pretrained_cfg
from torch import Tensor, nn

from .convert import checkpoint_filter_fn
from .model import MIN_INPUT_SIZE, FasterViT
from .serialization import (
    CheckpointError,
    checkpoint_classes,
    checkpoint_in_chans,
    fit_state,
    locate_weights,
    read_weights,
)

__all__ = ["MODEL_NAMES", "OFFICIAL_NAMES", "PUBLISHED", "close_names", "create_model", "list_models", "resolve_name"]

_logger = logging.getLogger(__name__)

_BASE = dict(ct_size=2, mlp_ratio=4.0, hat=(False, False, True, False))
_HEADS_S = (2, 4, 8, 16)
_HEADS_L = (4, 8, 16, 32)
_LARGE = dict(layer_scale=1e-5, do_propagation=True)

MODEL_ARGS: dict[str, dict] = {
    "fastervit_0": dict(dim=64, in_dim=64, depths=(2, 3, 6, 5), num_heads=_HEADS_S, drop_path_rate=0.2),
    "fastervit_1": dict(dim=80, in_dim=32, depths=(1, 3, 8, 5), num_heads=_HEADS_S, drop_path_rate=0.2),
    "fastervit_2": dict(dim=96, in_dim=64, depths=(3, 3, 8, 5), num_heads=_HEADS_S, drop_path_rate=0.2),
    "fastervit_3": dict(dim=128, in_dim=64, depths=(3, 3, 12, 5), num_heads=_HEADS_S, drop_path_rate=0.3, **_LARGE),
    "fastervit_4": dict(dim=196, in_dim=64, depths=(3, 3, 12, 5), num_heads=_HEADS_L, drop_path_rate=0.3, **_LARGE),
    "fastervit_5": dict(dim=320, in_dim=64, depths=(3, 3, 12, 5), num_heads=_HEADS_L, drop_path_rate=0.3, **_LARGE),
    "fastervit_6": dict(dim=320, in_dim=64, depths=(3, 3, 16, 8), num_heads=_HEADS_L, drop_path_rate=0.5, **_LARGE),
}
for _size, _ws in ((224, (7, 7, 14, 7)), (384, (7, 7, 24, 12)), (512, (7, 7, 32, 16)), (768, (7, 7, 48, 24))):
    MODEL_ARGS[f"fastervit_4_21k_{_size}"] = dict(
        dim=196, in_dim=64, depths=(3, 3, 12, 5), num_heads=_HEADS_L, window_size=_ws, drop_path_rate=0.42,
        hat=(False, False, False, False), **_LARGE,
    )  # fmt: skip

MODEL_NAMES: tuple[str, ...] = tuple(MODEL_ARGS)
OFFICIAL_NAMES: dict[str, str] = {
    **{f"faster_vit_{i}_224": f"fastervit_{i}" for i in range(7)},
    **{f"faster_vit_4_21k_{s}": f"fastervit_4_21k_{s}" for s in (224, 384, 512, 768)},
}
# published ImageNet-1K top-1 / top-5 and A100 throughput (img/s, batch 128) from the authors' README
PUBLISHED: dict[str, dict[str, float]] = {
    "fastervit_0": dict(top1=82.1, top5=95.9, throughput=5802),
    "fastervit_1": dict(top1=83.2, top5=96.5, throughput=4188),
    "fastervit_2": dict(top1=84.2, top5=96.8, throughput=3161),
    "fastervit_3": dict(top1=84.9, top5=97.2, throughput=1780),
    "fastervit_4": dict(top1=85.4, top5=97.3, throughput=849),
    "fastervit_5": dict(top1=85.6, top5=97.4, throughput=449),
    "fastervit_6": dict(top1=85.8, top5=97.4, throughput=352),
    "fastervit_4_21k_224": dict(top1=86.6, top5=97.8),
    "fastervit_4_21k_384": dict(top1=87.6, top5=98.3),
    "fastervit_4_21k_512": dict(top1=87.8, top5=98.4),
    "fastervit_4_21k_768": dict(top1=87.9, top5=98.5),
}


def _cfg(file: str, size: int = 224, **kwargs) -> dict:
    return {
        "hf_hub_id": "nvidia/FasterViT",
        "hf_hub_filename": file,
        "url": f"https://huggingface.co/nvidia/FasterViT/resolve/main/{file}",
        "num_classes": 1000,
        "input_size": (3, size, size),
        "min_input_size": (3, MIN_INPUT_SIZE, MIN_INPUT_SIZE),
        "fixed_input_size": False,
        "pool_size": (size // 32, size // 32),
        "crop_pct": 1.0,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
        "license": "nvidia-source-code-license-nc",
        "paper_ids": "arXiv:2306.06189",
        "paper_name": "FasterViT: Fast Vision Transformers with Hierarchical Attention",
        "origin_url": "https://github.com/NVlabs/FasterViT",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "fastervit_0.in1k": _cfg("fastervit_0_224_1k.pth.tar", crop_pct=0.875),
        **{f"fastervit_{i}.in1k": _cfg(f"fastervit_{i}_224_1k.pth.tar") for i in range(1, 7)},
        "fastervit_4_21k_224.in21k_ft_in1k": _cfg(
            "fastervit_4_21k_224_w14.pth.tar", crop_pct=0.95, crop_mode="squash"
        ),
        "fastervit_4_21k_384.in21k_ft_in1k": _cfg(
            "fastervit_4_21k_384_w24.pth.tar", 384, crop_pct=1.0, crop_mode="squash"
        ),
        "fastervit_4_21k_512.in21k_ft_in1k": _cfg(
            "fastervit_4_21k_512_w32.pth.tar", 512, crop_pct=1.0, crop_mode="squash"
        ),
        "fastervit_4_21k_768.in21k_ft_in1k": _cfg(
            "fastervit_4_21k_768_w48.pth.tar", 768, crop_pct=0.93, crop_mode="squash"
        ),
    }
)


def _pretrained_filter(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """timm ``pretrained_filter_fn``: official keys converted, stem adapted, head fitted, every key checked."""
    state, report = fit_state(model, checkpoint_filter_fn(state_dict, model), head="resize")
    model.weights_info = report  # read back by open_fastervit.load_model
    return state


def _weights_overlay(variant: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The ``pretrained_cfg_overlay`` that makes timm load the weights we read: the source the cfg names (a file,
    a local model folder, the Hugging Face hub, a URL) is read by our safe reader and handed to timm as
    ``state_dict``, with ``num_classes`` / ``input_size`` stating what the weights hold (timm then keeps or drops
    the head and adapts the stem exactly as for its own models)."""
    overlay = dict(kwargs.get("pretrained_cfg_overlay") or {})
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), overlay).to_dict()
    state = cfg.get("state_dict")
    if state is None:
        path = locate_weights(cfg, cache_dir=kwargs.get("cache_dir"))
        # timm's convention prefers the EMA weights of a checkpoint file; custom_load=True reads it as the
        # authors' loader does (their state_dict)
        state, info = read_weights(path, "avoid" if cfg.get("custom_load") else "prefer")
        overlay["file"] = info["file"]
    try:
        state = checkpoint_filter_fn(state, None)
    except CheckpointError as e:
        raise CheckpointError(f"{overlay.get('file', 'state_dict')}: {e}") from None
    classes, in_chans = checkpoint_classes(state), checkpoint_in_chans(state)
    if classes is not None:  # timm keeps the head when num_classes agrees with these, else a fresh head
        overlay["num_classes"] = kwargs.get("num_classes", classes)
    if in_chans is not None:
        overlay["input_size"] = (kwargs.get("in_chans", in_chans), *cfg["input_size"][1:])
    overlay.update(state_dict=state, source="", custom_load=False)
    return overlay


def _create(variant: str, pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """Build ``variant``; with ``pretrained``, load the weights its (overlaid) pretrained cfg names.

    Raises:
        CheckpointError: the weights cannot be had, read safely, or do not fit (message names file and keys).
    """
    img_size = _img_size(kwargs.pop("img_size", None))
    if pretrained:
        kwargs["pretrained_cfg_overlay"] = _weights_overlay(variant, kwargs)
    args = {**_BASE, **MODEL_ARGS[variant], **kwargs}
    try:
        model = build_model_with_cfg(
            FasterViT,
            variant,
            pretrained,
            pretrained_filter_fn=_pretrained_filter,
            feature_cfg=dict(out_indices=(0, 1, 2, 3), feature_cls="getter"),
            **args,
        )
    except CheckpointError as e:
        where = (kwargs.get("pretrained_cfg_overlay") or {}).get("file")
        raise CheckpointError(f"{where}: {e}" if where and where not in str(e) else str(e)) from None
    model.pretrained_cfg.pop("state_dict", None)  # the weights are in the model; the cfg keeps where they came from
    if img_size is not None:  # the model runs at any size: img_size only sets the size its data config asks for
        model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (model.in_chans, *img_size)}
        model.default_cfg = model.pretrained_cfg
    return model


def _img_size(value: Any) -> tuple[int, int] | None:
    """timm's ``img_size`` (an int or ``(H, W)``) as ``(H, W)``; None when not given.

    Raises:
        ValueError: not one or two integers >= 32 (FasterViT's smallest input).
    """
    if value is None:
        return None
    message = f"img_size must be an integer >= 32 or (height, width) of such integers, got {value!r}"
    items = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2 or any(isinstance(v, bool) for v in items):
        raise ValueError(message)
    try:
        size = (operator.index(items[0]), operator.index(items[1]))  # ints and numpy integers; not floats
    except TypeError:
        raise ValueError(message) from None
    if min(size) < MIN_INPUT_SIZE:
        raise ValueError(message)
    return size


def _register(name: str) -> None:
    def entry(pretrained: bool = False, **kwargs) -> FasterViT:
        return _create(name, pretrained, **kwargs)

    entry.__name__ = name
    entry.__qualname__ = name
    entry.__doc__ = f"FasterViT {name.removeprefix('fastervit_')} (arXiv:2306.06189), config {MODEL_ARGS[name]}."
    entry.__module__ = __name__
    globals()[name] = register_model(entry)


for _name in MODEL_NAMES:
    _register(_name)


#: Characters typed for one another (letter O / digit 0, letter l or I / digit 1): compared as equal when ranking
#: near-miss names.
_LOOKALIKES = str.maketrans({"o": "0", "l": "1", "i": "1"})


def _lookalike(text: str) -> str:
    return text.lower().replace("-", "_").translate(_LOOKALIKES)


def close_names(name: str, candidates: list[str], n: int = 4, cutoff: float = 0.5) -> list[str]:
    """Up to ``n`` of ``candidates`` close to ``name``, best first.

    Ranked by the ``difflib`` similarity of the names with case, ``-``/``_`` and look-alike characters (O/0, l/1,
    I/1) folded together, so ``fastervit_O`` gives ``fastervit_0`` first; ties keep the candidates' order, and a
    candidate equal to ``name`` up to those foldings comes before any other.
    """
    folded = _lookalike(name)
    scored = []
    for order, candidate in enumerate(candidates):
        other = _lookalike(candidate)
        ratio = 2.0 if other == folded else difflib.SequenceMatcher(None, folded, other).ratio()
        if ratio >= cutoff:
            scored.append((-ratio, order, candidate))
    return [candidate for _, _, candidate in sorted(scored)[:n]]


def resolve_name(name: str) -> str:
    """Our timm name for ``name`` (ours, with or without a pretrained tag, or an official ``faster_vit_*`` alias).

    Raises:
        ValueError: not a FasterViT name; the message suggests close names.
    """
    base = name.split(".", 1)[0]
    if base in MODEL_ARGS:
        return name
    if base in OFFICIAL_NAMES:
        return OFFICIAL_NAMES[base]
    close = close_names(base, list(MODEL_NAMES) + list(OFFICIAL_NAMES))
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown FasterViT model {name!r}{hint} (known: {', '.join(MODEL_NAMES)})")


def create_model(name: str, pretrained: bool = False, **kwargs: Any) -> FasterViT:
    """``timm.create_model`` for FasterViT names (official ``faster_vit_*`` names accepted), clear errors."""
    return timm.create_model(resolve_name(name), pretrained=pretrained, **kwargs)


def list_models() -> list[dict]:
    """Name, parameter count (1000 classes), native resolution and published accuracy of every model."""
    rows = []
    for name in MODEL_NAMES:
        with torch.device("meta"):
            model = create_model(name)
        rows.append(
            dict(
                name=name,
                params=sum(p.numel() for p in model.parameters()),
                input_size=model.pretrained_cfg["input_size"][-1],
                **PUBLISHED[name],
            )
        )
    return rows
