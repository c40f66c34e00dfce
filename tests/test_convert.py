"""Official checkpoints (safe loading, key conversion, timm pretrained path) and our safetensors weights."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import timm
import torch

import open_fastervit
from open_fastervit import CheckpointError, load_official, official_to_ours
from open_fastervit.cli.convert import main as convert_main

# a small official-layout model covering HAT, layer scale and propagation (faster_vit_3 code path)
SMALL = dict(dim=32, in_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)


class NotAllowed:
    """A pickled object outside the allow-list."""


@pytest.fixture()
def official_small(oracle):
    model = timm.create_model("faster_vit_3_224", resolution=224, **SMALL).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "gamma" in name:
                p.normal_(0, 0.3)
    return model


def _write_official(path: Path, model: torch.nn.Module, **extra) -> Path:
    sd = model.state_dict()
    ema = {k: v.clone() + (0.5 if v.is_floating_point() else 0) for k, v in sd.items()}
    opt = torch.optim.AdamW(model.parameters())
    ckpt = {
        "epoch": 309,
        "arch": "faster_vit_3_224",
        "state_dict": sd,
        "state_dict_ema": ema,
        "optimizer": opt.state_dict(),
        "args": argparse.Namespace(model="faster_vit_3_224", lr=5e-3),
        **extra,
    }
    torch.save(ckpt, path)
    return path


def test_key_mapping_covers_official_listing() -> None:
    """Every key of the official listings (docs/official-keys) maps to one of our keys, caches dropped."""
    keys_dir = Path(__file__).resolve().parents[2] / "shared" / "docs" / "official-keys"
    if not keys_dir.is_dir():  # CI lays shared/ beside the clone; a developer checkout may have it at ../shared
        keys_dir = Path(open_fastervit.__file__).resolve().parents[2] / "shared" / "docs" / "official-keys"
    files = sorted(keys_dir.glob("keys_*.tsv"))
    assert files, f"no key listings found in {keys_dir}"
    for listing in files:
        arch = listing.stem.removeprefix("keys_")
        shapes = {}
        for line in listing.read_text().splitlines():
            key, shape, *_ = line.split("\t")
            shapes[key] = torch.Size(eval(shape))  # "(64, 3, 3, 3)"
        fake = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        ours = official_to_ours(fake)
        with torch.device("meta"):
            model = open_fastervit.create_model(arch)
        expected = {k: v.shape for k, v in model.state_dict().items()}
        assert {k: v.shape for k, v in ours.items()} == expected, arch


def test_load_official_file_both_ways(official_small, tmp_path: Path) -> None:
    path = _write_official(tmp_path / "fastervit_small.pth.tar", official_small)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = official_small(x)
    ours = load_official("fastervit_3", path, **SMALL).eval()
    via_timm = timm.create_model(
        "fastervit_3", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL
    ).eval()
    # timm's file loader takes state_dict_ema when present (timm convention); load_official takes state_dict
    # (the authors' loader) unless use_ema=True, or custom_load=True routes timm through load_official's reader
    ema = load_official("fastervit_3", path, use_ema=True, **SMALL).eval()
    raw_via_timm = timm.create_model(
        "fastervit_3", pretrained=True, pretrained_cfg_overlay=dict(file=str(path), custom_load=True), **SMALL
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(raw_via_timm(x), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(via_timm(x), ema(x))
    assert not torch.equal(ema.stem.conv1.weight, ours.stem.conv1.weight)


def test_stale_cache_buffers_are_ignored(official_small, tmp_path: Path) -> None:
    sd = official_small.state_dict()
    for k in sd:
        if k.endswith(("relative_bias", "relative_coords_table")):
            sd[k] = torch.full_like(sd[k], 123.0)
    converted = official_to_ours(sd)
    assert not any(k.endswith(("relative_bias", "relative_coords_table", "relative_position_index")) for k in converted)
    ours = open_fastervit.create_model("fastervit_3", **SMALL).eval()
    ours.load_state_dict(converted)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official_small(x), rtol=1e-5, atol=1e-5)


def test_foreign_pickle_is_refused(official_small, tmp_path: Path) -> None:
    path = _write_official(tmp_path / "evil.pth.tar", official_small, extra=NotAllowed())
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_official("fastervit_3", path, **SMALL)
    with pytest.raises(CheckpointError, match="refusing to load"):  # timm's file route reads through ours
        timm.create_model("fastervit_3", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **SMALL)


def test_corrupt_and_missing_files(tmp_path: Path) -> None:
    bad = tmp_path / "broken.pth.tar"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        load_official("fastervit_0", bad, **SMALL)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"hello, not a checkpoint")
    with pytest.raises(CheckpointError, match="no zip or pickle header"):
        load_official("fastervit_0", junk, **SMALL)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_official("fastervit_0", tmp_path / "nope.pth.tar", **SMALL)
    bad_st = tmp_path / "broken.safetensors"
    bad_st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        open_fastervit.load_weights(open_fastervit.create_model("fastervit_0", **SMALL), bad_st)


def test_checkpoint_for_another_architecture_names_the_problem(official_small, tmp_path: Path) -> None:
    path = _write_official(tmp_path / "small.pth.tar", official_small)
    expected = (
        r"architecture arguments differ.*shapes disagree: stem.conv2.weight: \(32, 16, 3, 3\) in checkpoint, "
        r"\(48, 16, 3, 3\) in model.*missing from the checkpoint: stages.2.blocks.2"
    )
    with pytest.raises(CheckpointError, match=expected):
        load_official("fastervit_3", path, **{**SMALL, "dim": 48, "depths": (1, 1, 3, 1)})
    with pytest.raises(CheckpointError, match="unexpected in the checkpoint: .*ls_attn.gamma"):
        load_official("fastervit_0", path, **SMALL)  # no layer scale in model 0: unexpected gamma keys
    with pytest.raises(CheckpointError, match="belong to no official FasterViT"):
        official_to_ours({"levels.0.blocks.0.conv1.weight": torch.zeros(1), "backbone.fc.weight": torch.zeros(1)})


def test_new_class_count_reinitialises_head(official_small, tmp_path: Path, caplog) -> None:
    path = _write_official(tmp_path / "small.pth.tar", official_small)
    model = load_official("fastervit_3", path, **{**SMALL, "num_classes": 7})
    assert model.head.fc.out_features == 7
    assert "re-initialised" in caplog.text
    torch.testing.assert_close(model.stem.conv1.weight, official_small.patch_embed.conv_down[0].weight)


def test_safetensors_roundtrip(tmp_path: Path) -> None:
    model = open_fastervit.create_model("fastervit_3", **SMALL).eval()
    out = open_fastervit.save_weights(model, tmp_path / "w.safetensors")
    clone = open_fastervit.load_weights(open_fastervit.create_model("fastervit_3", **SMALL).eval(), out)
    for (k, a), b in zip(model.state_dict().items(), clone.state_dict().values()):
        assert torch.equal(a, b), k
    with pytest.raises(CheckpointError, match="does not fit"):
        open_fastervit.load_weights(open_fastervit.create_model("fastervit_0", **SMALL), out)
    timm_model = timm.create_model("fastervit_3", pretrained=True, pretrained_cfg_overlay=dict(file=str(out)), **SMALL)
    torch.testing.assert_close(timm_model.stem.conv1.weight, model.stem.conv1.weight)


def test_convert_cli_full_size_model_0(oracle, tmp_path: Path, capsys) -> None:
    official = timm.create_model("faster_vit_0_224").eval()
    src = _write_official(tmp_path / "fastervit_0_224_1k.pth.tar", official)
    dst = tmp_path / "fastervit_0.safetensors"
    assert convert_main([str(src), str(dst), "--model", "fastervit_0"]) == 0
    assert "31,404,840 parameters" in capsys.readouterr().out
    ours = open_fastervit.load_weights(open_fastervit.create_model("fastervit_0").eval(), dst)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), official(x), rtol=1e-5, atol=1e-5)
    assert convert_main([str(src), str(tmp_path / "x.safetensors"), "--model", "fastervit_1"]) == 2
    assert "does not fit fastervit_1" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists()


def test_select_weights_picks_ema_or_raw_as_asked() -> None:
    from open_fastervit.serialization import select_weights

    raw, ema = {"w": torch.zeros(1)}, {"w": torch.ones(1)}
    both = {"state_dict": raw, "state_dict_ema": ema, "epoch": 3}
    assert select_weights(both, "prefer")[1] == "ema" and select_weights(both, "prefer")[0]["w"] == 1
    assert select_weights(both, "avoid")[1] == "raw" and select_weights(both, "avoid")[0]["w"] == 0
    assert select_weights({"model_ema": ema}, "avoid")[1] == "ema"  # nothing else to take
    state, kind = select_weights({"module.w": torch.ones(1)}, "prefer")  # a bare DDP state dict
    assert kind == "plain" and list(state) == ["w"]
    with pytest.raises(CheckpointError, match="no state_dict_ema"):
        select_weights({"state_dict": raw}, "require")
    with pytest.raises(CheckpointError, match="holds no weights"):
        select_weights({"epoch": 3}, "avoid")
    with pytest.raises(ValueError, match="ema must be"):
        select_weights(both, "sometimes")
