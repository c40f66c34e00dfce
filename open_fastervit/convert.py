"""Official FasterViT checkpoints: the key map from the authors' layout to this implementation's, nothing else.

The authors' files (``fastervit_0_224_1k.pth.tar`` ...) are timm training checkpoints: a dict holding
``state_dict`` (sometimes ``state_dict_ema``, ``optimizer``, ``args`` as an ``argparse.Namespace``, ``epoch``).
Reading them safely is ``open_fastervit.serialization``'s job, loading them ``open_fastervit.load_model``'s.

Key mapping (SPEC.md section 7): ``patch_embed.conv_down.{0,1,3,4}`` -> ``stem.{conv1,norm1,conv2,norm2}``;
``levels.i.downsample`` moves to the start of the next stage, ``stages.{i+1}.downsample``;
``levels.i.global_tokenizer.pos_embed`` -> ``stages.i.carrier_init.pos_conv`` (its duplicate under
``to_global_feature.pos`` is checked and dropped); the ``hat_*`` carrier-token modules become ``ct_*``;
``gamma1..4`` become LayerScale modules; the cached ``relative_bias`` / ``relative_coords_table`` /
``relative_position_index`` buffers are dropped (they are recomputed, and may be stale in files).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .serialization import CheckpointError, key_listing, select_weights

__all__ = ["CheckpointError", "checkpoint_filter_fn", "is_official_state_dict", "official_to_ours"]

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


def is_official_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    """True for a state dict in the authors' key layout (``patch_embed.*``, ``levels.*``)."""
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
        raise CheckpointError(f"keys that belong to no official FasterViT: {key_listing(unknown)}")
    for key, value in state_dict.items():
        if m := re.fullmatch(r"levels\.(\d)\.global_tokenizer\.to_global_feature\.pos\.(.+)", key):
            twin = out.get(f"stages.{m[1]}.carrier_init.pos_conv.{m[2]}")
            same = twin is not None and twin.shape == value.shape and (value.is_meta or torch.equal(twin, value))
            if not same:
                raise CheckpointError(f"{key} differs from its twin global_tokenizer.pos_embed.{m[2]}")
    return out


def checkpoint_filter_fn(state_dict: Mapping, model: nn.Module) -> dict[str, Tensor]:
    """timm ``pretrained_filter_fn``: official checkpoint dict or state dict -> our state dict."""
    state = select_weights(state_dict, "avoid")[0]
    return official_to_ours(state) if is_official_state_dict(state) else state
