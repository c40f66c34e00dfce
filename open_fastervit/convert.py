"""Official FasterViT checkpoints: safe loading and conversion to this implementation's layout.

The authors' files (``fastervit_0_224_1k.pth.tar`` ...) are timm training checkpoints: a dict holding
``state_dict`` (sometimes ``state_dict_ema``, ``optimizer``, ``args`` as an ``argparse.Namespace``, ``epoch``).
They are read with ``torch.load(weights_only=True)`` allowing only ``argparse.Namespace`` besides tensors, so a
file carrying any other pickled object is refused.

Key mapping (SPEC.md section 7): ``patch_embed.conv_down.{0,1,3,4}`` -> ``stem.{conv1,norm1,conv2,norm2}``;
``levels.i.downsample`` moves to the start of the next stage, ``stages.{i+1}.downsample``;
``levels.i.global_tokenizer.pos_embed`` -> ``stages.i.carrier_init.pos_conv`` (its duplicate under
``to_global_feature.pos`` is checked and dropped); the ``hat_*`` carrier-token modules become ``ct_*``;
``gamma1..4`` become LayerScale modules; the cached ``relative_bias`` / ``relative_coords_table`` /
``relative_position_index`` buffers are dropped (they are recomputed, and may be stale in files).
"""

from __future__ import annotations

import argparse
import logging
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from timm.models import clean_state_dict
from torch import Tensor, nn

__all__ = [
    "CheckpointError",
    "load_checkpoint_file",
    "official_to_ours",
    "load_official_state_dict",
    "load_official_checkpoint",
    "checkpoint_filter_fn",
]

_logger = logging.getLogger(__name__)

_CACHE_BUFFERS = ("relative_bias", "relative_coords_table", "relative_position_index")
_STEM = {"0": "conv1", "1": "norm1", "3": "conv2", "4": "norm2"}
# first component of a transformer-block key: official name -> ours
_BLOCK_PARTS = {
    "hat_pos_embed": "ct_pos_embed",
    "hat_norm1": "ct_norm1",
    "hat_attn": "ct_attn",
    "hat_norm2": "ct_norm2",
    "hat_mlp": "ct_mlp",
    "gamma1": "ct_ls_attn.gamma",
    "gamma2": "ct_ls_mlp.gamma",
    "gamma3": "ls_attn.gamma",
    "gamma4": "ls_mlp.gamma",
}
_INNER = {"cpb_mlp": "mlp", "pos_emb_funct": "rel_pos"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be read safely or does not fit the model."""


def load_checkpoint_file(path: str | Path) -> dict:
    """Read a ``.pth``/``.pth.tar``/``.safetensors`` file safely and return its top-level dict.

    Raises :class:`CheckpointError` for missing, corrupt or unsafe files.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file (corrupt or truncated?): {e}") from e
    with open(path, "rb") as f:
        magic = f.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # zip (torch.save) or legacy pickle
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (no zip or pickle header)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} carries pickled objects other than tensors and argparse.Namespace; refusing to load it "
            f"(weights_only=True). Detail: {str(e).splitlines()[0]}"
        ) from e
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): {e}") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a checkpoint dict or state dict")
    return dict(obj)


#: Keys of a checkpoint dict holding weights: timm's CheckpointSaver layout (``state_dict`` / ``state_dict_ema``), which
#: our trainer's checkpoints and the official files share, and the ``model`` / ``model_ema`` variant timm also reads.
EMA_KEYS = ("state_dict_ema", "model_ema")
RAW_KEYS = ("state_dict", "model")


def select_weights(checkpoint: Mapping, ema: str = "avoid") -> tuple[dict[str, Tensor], str]:
    """The weights inside a checkpoint dict, and which they are: ``"ema"``, ``"raw"`` or ``"plain"`` (a state dict).

    ``ema``: ``"require"`` the EMA weights (error without them), ``"prefer"`` them when present, or ``"avoid"``
    them unless the checkpoint holds nothing else. Keys lose DDP / torch.compile prefixes (timm
    ``clean_state_dict``).
    """
    if ema not in ("require", "prefer", "avoid"):
        raise ValueError(f"ema must be 'require', 'prefer' or 'avoid', got {ema!r}")
    ema_key = next((k for k in EMA_KEYS if isinstance(checkpoint.get(k), Mapping) and checkpoint[k]), None)
    raw_key = next((k for k in RAW_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
    if ema == "require" and ema_key is None:
        raise CheckpointError("use_ema=True but the checkpoint has no state_dict_ema/model_ema")
    if ema_key and (ema != "avoid" or raw_key is None):
        chosen, kind = ema_key, "ema"
    else:
        chosen, kind = (raw_key, "raw") if raw_key else (None, "plain")
    source = checkpoint[chosen] if chosen else checkpoint
    state = clean_state_dict({k: v for k, v in source.items() if isinstance(v, Tensor)})
    if not state:
        raise CheckpointError(f"the checkpoint holds no weights (keys: {sorted(map(str, checkpoint))[:8]})")
    return state, kind


def extract_state_dict(checkpoint: Mapping, use_ema: bool = False) -> dict[str, Tensor]:
    """The weights inside a checkpoint dict: ``state_dict`` (or ``state_dict_ema`` with ``use_ema``), or itself."""
    return select_weights(checkpoint, "require" if use_ema else "avoid")[0]


def is_official_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("levels.", "patch_embed.")) for k in state_dict)


def _rename(key: str) -> str | None:
    """Our name for one official key; None for keys to drop; raises KeyError for unknown keys."""
    if key.rsplit(".", 1)[-1] in _CACHE_BUFFERS:
        return None
    if m := re.fullmatch(r"patch_embed\.conv_down\.(\d)\.(.+)", key):
        if m[1] in _STEM:
            return f"stem.{_STEM[m[1]]}.{m[2]}"
    elif m := re.fullmatch(r"levels\.(\d)\.downsample\.norm\.(.+)", key):
        return f"stages.{int(m[1]) + 1}.downsample.norm.{m[2]}"
    elif m := re.fullmatch(r"levels\.(\d)\.downsample\.reduction\.0\.(.+)", key):
        return f"stages.{int(m[1]) + 1}.downsample.conv.{m[2]}"
    elif m := re.fullmatch(r"levels\.(\d)\.global_tokenizer\.pos_embed\.(.+)", key):
        return f"stages.{m[1]}.carrier_init.pos_conv.{m[2]}"
    elif re.fullmatch(r"levels\.\d\.global_tokenizer\.to_global_feature\.pos\..+", key):
        return None  # the same conv registered a second time
    elif m := re.fullmatch(r"levels\.(\d)\.blocks\.(\d+)\.([^.]+)(\..+)?", key):
        part = _BLOCK_PARTS.get(m[3], m[3])
        rest = ".".join(_INNER.get(p, p) for p in (m[4] or "").split("."))
        return f"stages.{m[1]}.blocks.{m[2]}.{part}{rest}"
    elif m := re.fullmatch(r"(norm\..+)", key):
        return m[1]
    elif m := re.fullmatch(r"head\.(weight|bias)", key):
        return f"head.fc.{m[1]}"
    raise KeyError(key)


def official_to_ours(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Map an official FasterViT state dict to this implementation's keys (no model needed).

    Raises :class:`CheckpointError` for keys that belong to no FasterViT, and when the duplicated
    carrier-token conv disagrees with itself.
    """
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        try:
            new = _rename(key)
        except KeyError:
            unknown.append(key)
            continue
        if new is not None:
            out[new] = value
    if unknown:
        raise CheckpointError(f"keys that belong to no official FasterViT: {_listing(unknown)}")
    for key, value in state_dict.items():
        if m := re.fullmatch(r"levels\.(\d)\.global_tokenizer\.to_global_feature\.pos\.(.+)", key):
            twin = out.get(f"stages.{m[1]}.carrier_init.pos_conv.{m[2]}")
            same = twin is not None and twin.shape == value.shape and (value.is_meta or torch.equal(twin, value))
            if not same:
                raise CheckpointError(f"{key} differs from its twin global_tokenizer.pos_embed.{m[2]}")
    return out


def _listing(keys: list[str], limit: int = 8) -> str:
    more = f" ... (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_fit(model: nn.Module, state_dict: Mapping[str, Tensor], what: str = "checkpoint") -> None:
    """Raise :class:`CheckpointError` naming every missing/unexpected key and shape disagreement."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k}: {tuple(v.shape)} in {what}, {tuple(expected[k].shape)} in model"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    problems = []
    if shapes:
        problems.append(f"shapes disagree: {_listing(shapes, 6)}")
    if missing:
        problems.append(f"missing from the {what}: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected in the {what}: {_listing(unexpected)}")
    if problems:
        name = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise CheckpointError(
            f"the {what} does not fit {name} (is it for another architecture?): " + "; ".join(problems)
        )


def load_official_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, strict_head: bool = False
) -> dict[str, list[str]]:
    """Convert an official state dict and load it into ``model``.

    When the classifier shape differs (fine-tuning to a new class count) the head keeps its fresh
    initialisation and this is reported; ``strict_head=True`` makes it an error. Returns
    ``{"reinitialized": [...]}``.
    """
    ours = official_to_ours(state_dict) if is_official_state_dict(state_dict) else dict(state_dict)
    expected = model.state_dict()
    reinit: list[str] = []
    for key in ("head.fc.weight", "head.fc.bias"):
        if key in ours and (key not in expected or expected[key].shape != ours[key].shape) and not strict_head:
            reinit.append(key)
            del ours[key]
    for key in reinit:
        if key in expected:
            ours[key] = expected[key]
    check_fit(model, ours)
    model.load_state_dict(ours, strict=True)
    if reinit:
        _logger.warning(
            "classifier %s re-initialised: the checkpoint head does not fit num_classes=%s",
            ", ".join(reinit),
            getattr(model, "num_classes", "?"),
        )
    return {"reinitialized": reinit}


def load_official_checkpoint(
    model: nn.Module, path: str | Path, *, use_ema: bool = False, strict_head: bool = False
) -> dict[str, list[str]]:
    """Read an official ``.pth.tar`` (or our ``.safetensors``) safely and load it into ``model``."""
    state = extract_state_dict(load_checkpoint_file(path), use_ema=use_ema)
    try:
        return load_official_state_dict(model, state, strict_head=strict_head)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e


def checkpoint_filter_fn(state_dict: Mapping, model: nn.Module) -> dict[str, Tensor]:
    """timm ``pretrained_filter_fn``: official checkpoint dict or state dict -> our state dict."""
    state = extract_state_dict(state_dict)
    return official_to_ours(state) if is_official_state_dict(state) else state


# ---- `fastervit convert` --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastervit convert",
        description="Convert an official FasterViT .pth.tar checkpoint into open_fastervit safetensors weights.",
    )
    p.add_argument("checkpoint", help="official checkpoint, e.g. fastervit_0_224_1k.pth.tar")
    p.add_argument("output", help="output .safetensors path")
    p.add_argument("--model", required=True, help="architecture, e.g. fastervit_0 (see `fastervit models`)")
    p.add_argument("--ema", action="store_true", help="take state_dict_ema instead of state_dict")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .weights import save_weights
    from .zoo import create_model

    try:
        model = create_model(args.model)
        load_official_checkpoint(model, args.checkpoint, use_ema=args.ema, strict_head=True)
    except (CheckpointError, ValueError) as e:
        print(f"fastervit convert: {e}", file=sys.stderr)
        return 2
    save_weights(model, args.output, metadata={"architecture": args.model, "source": str(args.checkpoint)})
    print(f"wrote {args.output} ({sum(p.numel() for p in model.parameters()):,} parameters)")
    return 0
