"""The demo: `fastervit demo --quick` produces every artifact, and they agree with each other."""

from __future__ import annotations

import json
import re

import torch
from PIL import Image

from open_fastervit.cli.demo import main
from open_fastervit.demos.classification import DEMO_MODEL_KWARGS, DemoConfig, Plan, budget, plan_training, run_demo
from open_fastervit.validate import load_model


def test_quick_demo_writes_every_artifact(tmp_path):
    out = tmp_path / "demo"
    summary = run_demo(DemoConfig(output=str(out), quick=True, progress=False))

    report = (out / "REPORT.md").read_text()
    for link in re.findall(r"\]\(([^)]+)\)", report):  # every figure / file the report links to exists
        assert (out / link).is_file(), link
    for name in ("predictions.png", "train/curves.png"):
        with Image.open(out / name) as png:
            assert png.format == "PNG" and png.width > 600
    assert (out / "bench" / "bench.json").is_file()

    val = summary["validate"]
    assert val["count"] == 500 and val["weights"] == "plain"
    assert f"top-1 {val['top1']:.1f}%" in report
    assert len(summary["predictions"]) == 10  # one held-out photo per class
    assert all(len(p["labels"]) == 3 for p in summary["predictions"])
    assert "| FasterViT (demo model) | 2.5M |" in report and "| resnet18 | 11.2M |" in report

    # the saved weights describe themselves: no architecture flags needed to load them
    model, info = load_model(None, out / "fastervit_demo.safetensors")
    assert info["class_names"][0] == "goldfish" and info["img_size"] == 64
    assert model.num_classes == 10 and model.stem.conv1.out_channels == DEMO_MODEL_KWARGS["in_dim"]
    assert json.loads((out / "demo.json").read_text())["report"] == str(out / "REPORT.md")


def test_epoch_planning_and_bad_data(tmp_path, capsys):
    assert budget(DemoConfig(quick=True)).epochs == 1
    assert budget(DemoConfig(quick=True, epochs=3)).epochs == 3
    threads = torch.get_num_threads()
    assert plan_training(DemoConfig(epochs=5), 5000, 10) == Plan(5, threads, None)
    tight = plan_training(DemoConfig(minutes=1e-6, batch_size=4, img_size=32), 5000, 10)
    assert tight.epochs == 1 and tight.epoch_seconds > 0 and tight.threads in (1, threads)
    assert torch.get_num_threads() == threads
    assert main(["--data", str(tmp_path / "nowhere"), "--output", str(tmp_path / "o"), "--quick"]) == 1
    assert "does not exist" in capsys.readouterr().err
