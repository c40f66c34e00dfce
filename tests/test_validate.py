"""Evaluation: exact metrics, label maps, preprocessing, checkpoint forms (ours, training, official), CLI."""

from __future__ import annotations

import argparse
import json

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import create_transform, resolve_data_config

import open_fastervit
from open_fastervit.cli.validate import main
from open_fastervit.labels import open_eval_dataset
from open_fastervit.paths import data_path
from open_fastervit.validate import evaluate, load_model, read_checkpoint, validate

#: A ~2.5M-parameter FasterViT with HAT active at 64 px (stage 2: 4x4 map, 2x2 windows).
TINY = dict(dim=32, in_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=(7, 7, 2, 2),
            drop_path_rate=0.0)


def tiny(num_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("fastervit_0", num_classes=num_classes, **TINY).eval()


class Replay(torch.nn.Module):
    """Returns preset logits batch after batch (ignores the images): a model with known answers."""

    def __init__(self, logits: list[torch.Tensor]):
        super().__init__()
        self.logits = logits
        self.calls = 0
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.logits[self.calls]
        self.calls += 1
        return out + 0 * self.weight


def _batches(targets: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.zeros(len(t), 3, 4, 4), torch.tensor(t)) for t in targets]


def test_evaluate_counts_exactly():
    # 7 classes; target ranks: batch 1 -> 1st, 2nd, 6th; batch 2 -> 1st, 5th, 7th  => top1 2/6, top5 4/6
    ranks = [[0, 1, 5], [0, 4, 6]]
    targets = [[3, 0, 6], [2, 5, 1]]
    logits = []
    for batch_ranks, batch_targets in zip(ranks, targets):
        rows = []
        for rank, target in zip(batch_ranks, batch_targets):
            others = [c for c in range(7) if c != target]
            order = others[:rank] + [target] + others[rank:]  # classes by decreasing score
            row = torch.empty(7)
            row[order] = torch.linspace(3.0, -3.0, 7)
            rows.append(row)
        logits.append(torch.stack(rows))
    result = evaluate(Replay(logits), _batches(targets))
    assert result["count"] == 6
    assert result["top1"] == pytest.approx(100 * 2 / 6)
    assert result["top5"] == pytest.approx(100 * 4 / 6)
    expected = F.cross_entropy(torch.cat(logits), torch.tensor(sum(targets, [])))
    assert result["loss"] == pytest.approx(expected.item(), rel=1e-6)


def test_evaluate_label_map_and_small_class_count():
    # dataset targets 0..2 are model outputs 4..6 (an ImageNet-indexed subset, in miniature)
    logits = [torch.eye(7)[[4, 5, 0]] * 10]
    with_map = evaluate(Replay(logits), _batches([[0, 1, 2]]), label_map={0: 4, 1: 5, 2: 6})
    assert with_map["top1"] == pytest.approx(200 / 3)
    as_list = evaluate(Replay(logits), _batches([[0, 1, 2]]), label_map=[4, 5, 6])
    assert as_list == with_map
    three = evaluate(Replay([torch.randn(4, 3)]), _batches([[0, 1, 2, 0]]))
    assert three["top5"] == 100.0  # top-min(5, 3) with three classes


def test_evaluate_errors_and_mode_restored():
    model = Replay([torch.zeros(2, 3)] * 3).train()
    with pytest.raises(ValueError, match="no entry for dataset target 2"):
        evaluate(model, _batches([[0, 2]]), label_map={0: 1, 1: 2})
    assert model.training
    with pytest.raises(ValueError, match="outside the model's 3 outputs"):
        evaluate(model, _batches([[0, 5]]))
    with pytest.raises(ValueError, match="empty loader"):
        evaluate(model, [])


def _manual(model, root, split="val", label_map=None, **cfg_args):
    """Metrics computed image by image with timm's eval transform, independently of the loader."""
    dataset = open_eval_dataset(root, split=split)
    transform = create_transform(**resolve_data_config(args=cfg_args, model=model))
    images, targets = [], []
    for i in range(len(dataset)):
        path = dataset.reader.samples[i][0]
        images.append(transform(Image.open(path).convert("RGB")))
        target = dataset.reader.samples[i][1]
        targets.append(label_map[target] if label_map else target)
    with torch.no_grad():
        logits = model(torch.stack(images))
    targets = torch.tensor(targets)
    return {
        "top1": (logits.argmax(-1) == targets).float().mean().item() * 100,
        "loss": F.cross_entropy(logits, targets).item(),
    }


def test_validate_labels_csv_matches_manual_pipeline():
    """A flat labels.csv folder with ImageNet-1K indices (non-square photos, short side 256), scored by a
    1000-class model, centre crop and squash: the loader pipeline gives the same loss as per-image timm
    transforms, and the two crop modes differ."""
    model = tiny(num_classes=1000)
    root = data_path("imagenet-sample-100-s256")
    losses = {}
    for crop in ("center", "squash"):
        got = validate(model, root, crop_mode=crop, img_size=96, batch_size=50, workers=0, device="cpu")
        want = _manual(model, root, crop_mode=crop, img_size=96)
        assert got["count"] == 100 and got["crop_mode"] == crop and got["input_size"] == [3, 96, 96]
        assert got["crop_pct"] == 0.875 and got["interpolation"] == "bicubic"  # fastervit_0's cfg
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
        assert got["top1"] == pytest.approx(want["top1"])
        losses[crop] = got["loss"]
    assert losses["center"] != pytest.approx(losses["squash"], rel=1e-6)


def test_validate_image_folder_with_in1k_label_map():
    model = tiny(num_classes=1000)
    root = data_path("tiny-imagenet-10")
    got = validate(model, root, label_map="in1k", img_size=64, batch_size=250, workers=2, device="cpu")
    want = _manual(model, root, label_map=[1, 105, 145, 323, 387, 779, 849, 954, 963, 970], img_size=64)
    assert got["count"] == 500
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
    csv_map = validate(model, root, label_map=root / "classes.csv", img_size=64, batch_size=250, device="cpu")
    assert csv_map["loss"] == pytest.approx(got["loss"], rel=1e-6)


def _training_checkpoint(tmp_path):
    raw, ema = tiny(seed=1), tiny(seed=2)
    path = tmp_path / "last.pt"
    torch.save({"version": 1, "state_dict": raw.state_dict(), "state_dict_ema": ema.state_dict(), "epoch": 3}, path)
    return path, raw, ema


def test_checkpoint_forms_load_the_right_weights(tmp_path):
    path, raw, ema = _training_checkpoint(tmp_path)
    x = torch.randn(2, 3, 64, 64)
    model, info = load_model("fastervit_0", path, model_kwargs=TINY)
    assert info["weights"] == "ema" and info["num_classes"] == 10
    torch.testing.assert_close(model(x), ema(x))
    model, info = load_model("fastervit_0", path, model_kwargs=TINY, use_ema=False)
    assert info["weights"] == "raw"
    torch.testing.assert_close(model(x), raw(x))
    safe = tmp_path / "w.safetensors"
    open_fastervit.save_weights(raw, safe, metadata={"class_names": ["a"] * 10, "model_kwargs": TINY})
    model, info = load_model("fastervit_0", safe)  # architecture kwargs come from the metadata
    assert info["class_names"] == ["a"] * 10
    torch.testing.assert_close(model(x), raw(x))


def test_checkpoint_errors(tmp_path):
    path, _, _ = _training_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="does not fit"):
        load_model("fastervit_0", path, model_kwargs={**TINY, "dim": 48})
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="bad.pth.tar"):
        read_checkpoint(bad)
    with pytest.raises(ValueError, match="unknown (FasterViT )?model"):
        load_model("fastervit_99")


def test_official_checkpoint_matches_official_model(tmp_path):
    """An official-format .pth.tar (random weights, built by the official package as an oracle) is
    converted on load, and validate() reproduces the official model's loss on real images."""
    from fastervit.models.faster_vit import FasterViT as Official

    torch.manual_seed(0)
    official = Official(dim=32, in_dim=32, depths=[1, 1, 2, 1], window_size=[7, 7, 2, 2], ct_size=2,
                        mlp_ratio=4, num_heads=[1, 2, 4, 8], resolution=64, drop_path_rate=0.0,
                        num_classes=10, hat=[False, False, True, False]).eval()
    path = tmp_path / "official.pth.tar"
    torch.save({"state_dict": official.state_dict(), "args": argparse.Namespace(model="tiny")}, path)
    root = data_path("tiny-imagenet-10")
    got = validate("fastervit_0", root, checkpoint=path, model_kwargs=TINY, img_size=64, crop_pct=1.0,
                   batch_size=250, device="cpu")
    want = _manual(official, root, img_size=64, crop_pct=1.0, interpolation="bicubic")
    assert got["weights"] == "official raw"
    assert got["loss"] == pytest.approx(want["loss"], rel=1e-4)
    assert got["top1"] == pytest.approx(want["top1"])


def test_cli(tmp_path, capsys):
    path, _, _ = _training_checkpoint(tmp_path)
    out = tmp_path / "result.json"
    argv = [str(data_path("tiny-imagenet-10")), "--model", "fastervit_0", "--checkpoint", str(path),
            "--model-kwargs", json.dumps(TINY), "--img-size", "64", "--json", str(out), "--raw", "-b", "500"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["weights"] == "raw" and result["count"] == 500
    assert f"top-1 {result['top1']:.2f}%" in printed
    assert main([str(tmp_path / "missing"), "--model", "fastervit_0"]) == 1
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), "--model-kwargs", "{bad json"])
