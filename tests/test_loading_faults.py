"""Loading faults: other timm architectures keep their head, non-finite weights are refused, resuming with another
model or before the first checkpoint says what to do, temporary files of killed writes do not pile up."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
from pathlib import Path

import pytest
import timm
import torch
from conftest import TINY
from safetensors.torch import save_file

import open_fastervit
from open_fastervit import CheckpointError, load_model, save_weights
from open_fastervit.cli.train import main as train_main
from open_fastervit.inference import Predictor
from open_fastervit.paths import data_path
from open_fastervit.serialization import atomic_write, remove_stale_temporaries
from open_fastervit.tasks.classification import TrainConfig
from open_fastervit.train.checkpoint import NoCheckpointYet, load_checkpoint

ARCH = {k: v for k, v in TINY.items() if k not in ("num_classes", "drop_path_rate")}
#: A run of a few seconds: 2 optimizer steps of 8 images at 32 px.
RUN = ["--model", "fastervit_0", "--model-kwargs", json.dumps(ARCH), "--data", str(data_path("tiny-imagenet-10")),
       "--img-size", "32", "--train-images", "16", "--val-images", "8", "--batch-size", "8", "--epochs", "1",
       "--warmup-epochs", "0", "--workers", "0", "--threads", "1", "--no-progress", "--no-tensorboard"]


# ---- 3: the classifier of any timm architecture ---------------------------------------------------------------------


@pytest.mark.parametrize("arch, kwargs, classes, classifier", [
    ("resnet18", {}, 3, "fc"),
    ("convnext_atto", {}, 3, "head.fc"),
    ("vit_tiny_patch16_224", {"img_size": 32, "depth": 2}, 3, "head"),
    ("fastervit_0", ARCH, 7, "head.fc"),
])
def test_other_architectures_load_as_they_are(tmp_path, arch, kwargs, classes, classifier):
    torch.manual_seed(0)
    model = timm.create_model(arch, num_classes=classes, **kwargs).eval()
    path = save_weights(model, tmp_path / "m.safetensors")
    loaded = load_model(path)
    assert loaded.num_classes == classes and loaded.weights_info["reinitialized"] == []
    assert open_fastervit.loading.classifier_name(arch) == classifier
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(x), model(x), atol=1e-5)
    predictor = Predictor(path, img_size=32)
    assert predictor.num_classes == classes and len(predictor.class_names) == classes


def test_file_of_another_architecture_is_refused_briefly(tmp_path):
    path = save_weights(timm.create_model("resnet18", num_classes=3), tmp_path / "r18.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_model(path, architecture="convnext_atto")
    text = str(info.value)
    assert "holds a resnet18 (its metadata says so), not a convnext_atto" in text
    assert "missing from the checkpoint" in text and "(+" in text  # a few keys named, the rest counted
    assert len(text) < 1500 and text.count("\n") == 0


# ---- 5: non-finite weights ---------------------------------------------------------------------------------------


def _nan_head(state: dict[str, torch.Tensor], key: str = "head.fc.weight", count: int = 12,
              value: float = float("nan")) -> dict[str, torch.Tensor]:
    state = {k: v.clone() for k, v in state.items()}
    state[key].view(-1)[:count] = value
    return state


def test_nan_or_inf_in_safetensors_is_refused(tmp_path):
    model = timm.create_model("fastervit_0", num_classes=3, **ARCH)
    save_file(_nan_head(model.state_dict()), str(tmp_path / "nan.safetensors"), metadata={"architecture": "fastervit_0",
              "model_kwargs": json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in ARCH.items()})})
    with pytest.raises(CheckpointError, match=r"nan.safetensors holds non-finite weights \(NaN/inf\), so it cannot "
                                              r"be used: head.fc.weight: 12 NaN"):
        load_model(tmp_path / "nan.safetensors")
    save_file(_nan_head(model.state_dict(), "stem.conv1.weight", 2, float("inf")), str(tmp_path / "inf.safetensors"))
    with pytest.raises(CheckpointError, match=r"stem.conv1.weight: 2 inf"):
        open_fastervit.load_weights(model, tmp_path / "inf.safetensors")


def test_nan_only_in_the_ema_copy(tmp_path):
    model = timm.create_model("fastervit_0", num_classes=3, **ARCH)
    good = model.state_dict()
    torch.save({"state_dict": good, "state_dict_ema": _nan_head(good, count=5),
                "config": {"model": "fastervit_0", "model_kwargs": ARCH}}, tmp_path / "last.pt")
    with pytest.raises(CheckpointError, match=r"last.pt \(ema weights\) holds non-finite weights .*head.fc.weight: "
                                              r"5 NaN"):
        load_model(tmp_path / "last.pt")  # the EMA weights are preferred
    raw = load_model(tmp_path / "last.pt", use_ema=False)  # the raw copy is finite: it loads
    assert raw.weights_info["weights"] == "raw"


def test_nan_in_an_official_file_and_a_hugging_face_folder(tmp_path, oracle):
    official = timm.create_model("faster_vit_0_224", resolution=224, dim=32, in_dim=16, depths=(1, 1, 2, 1),
                                 num_heads=(1, 2, 4, 8))
    torch.save({"state_dict": _nan_head(official.state_dict(), "head.weight", 3),
                "args": argparse.Namespace(model="faster_vit_0_224")}, tmp_path / "o.pth.tar")
    with pytest.raises(CheckpointError, match=r"o.pth.tar \(raw weights\) holds non-finite weights .*head.weight: "
                                              r"3 NaN"):
        load_model(tmp_path / "o.pth.tar")
    folder = tmp_path / "hf"
    folder.mkdir()
    r18 = timm.create_model("resnet18", num_classes=3)
    save_file(_nan_head(r18.state_dict(), "fc.weight", 4), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet18", "num_classes": 3}))
    with pytest.raises(CheckpointError, match=r"hf holds non-finite weights .*fc.weight: 4 NaN"):
        load_model(folder)


# ---- 6 and 10: resuming -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A finished run, trained with the progress bar asked for and stderr going to a file (not a terminal)."""
    out = tmp_path_factory.mktemp("run")
    log = io.StringIO()
    with contextlib.redirect_stderr(log):
        assert train_main([a for a in RUN if a != "--no-progress"] + ["--progress", "--output", str(out)]) == 0
    (out / "stderr.txt").write_text(log.getvalue())
    return out


def test_progress_bar_is_off_when_stderr_is_not_a_terminal(finished_run):
    """Epoch lines in a log file, no tqdm redraws."""
    text = (finished_run / "stderr.txt").read_text()
    assert "\r" not in text and "step/s" not in text and "it/s" not in text
    assert "epoch 1/1: train loss" in text and "on 8 val images" in text


def test_resume_with_another_model_exits_2_naming_the_settings(finished_run, tmp_path, capsys):
    stale = finished_run / ".last.pt.999999999.abcdef.tmp"  # left by a write killed in an earlier start
    stale.write_bytes(b"x" * 1000)
    other = json.dumps({**ARCH, "dim": 24})
    assert train_main(["--resume", str(finished_run), "--model-kwargs", other, "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "was trained with another model than the one configured now: model_kwargs" in err
    error = [line for line in err.splitlines() if line.startswith("fastervit train: error:")]
    assert len(error) == 1 and "'dim': 16" in error[0] and "'dim': 24" in error[0] and "Traceback" not in err
    assert not stale.exists() and f"removed {stale.name}, left by an interrupted write of last.pt" in err


def test_resume_with_an_edited_config_json_is_refused(finished_run, tmp_path, capsys):
    run = tmp_path / "copy"
    run.mkdir()
    for name in ("last.pt", "config.json"):
        (run / name).write_bytes((finished_run / name).read_bytes())
    settings = json.loads((run / "config.json").read_text())
    settings["model_kwargs"] = {**settings["model_kwargs"], "depths": [1, 1, 1, 1]}
    (run / "config.json").write_text(json.dumps(settings))
    assert train_main(["--resume", str(run), "--epochs", "2"]) == 2
    assert "model_kwargs" in capsys.readouterr().err


def test_resume_before_the_first_checkpoint_says_how_to_start(finished_run, tmp_path, capsys):
    run = tmp_path / "early"
    run.mkdir()
    (run / "config.json").write_bytes((finished_run / "config.json").read_bytes())  # written at start, then killed
    with pytest.raises(NoCheckpointYet, match="has no checkpoint yet"):
        load_checkpoint(run)
    assert train_main(["--resume", str(run)]) == 1
    err = capsys.readouterr().err
    assert f"{run} has no checkpoint yet" in err and "run the same command without --resume" in err
    assert f"remove the folder {run} first" in err


def test_nan_before_any_checkpoint_names_none(tmp_path, capsys):
    argv = RUN + ["--lr", "1e30", "--clip-grad", "none", "--log-interval", "1", "--train-images", "64",
                  "--output", str(tmp_path)]
    assert train_main(argv) == 1
    err = capsys.readouterr().err
    assert "NaN/inf" in err and "No checkpoint was written before it" in err and "last.pt" not in err
    assert not (tmp_path / "last.pt").exists()


def test_stale_temporary_files_are_removed(tmp_path):
    target = tmp_path / "w.safetensors"
    dead = tmp_path / ".w.safetensors.999999999.x1.tmp"
    old_style = tmp_path / ".w.safetensors.k2j3h4.tmp"
    live = tmp_path / f".w.safetensors.{os.getppid()}.y2.tmp"  # a running process's write in progress
    other = tmp_path / ".v.safetensors.999999999.z3.tmp"  # another file's
    for path in (dead, old_style, live, other):
        path.write_bytes(b"partial")
    assert sorted(p.name for p in remove_stale_temporaries(target)) == sorted([dead.name, old_style.name])
    assert live.exists() and other.exists()
    live.unlink()
    save_weights(torch.nn.Linear(2, 2), target)  # the writer cleans up before writing, as training starts do
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, other.name])
    seen = []
    atomic_write(tmp_path / "a.bin", lambda tmp: seen.append(Path(tmp).name) or Path(tmp).write_bytes(b"1"))
    assert seen[0].startswith(f".a.bin.{os.getpid()}.") and seen[0].endswith(".tmp")


def test_train_config_check_names_options():
    cfg = TrainConfig(data="x", img_size=0, workers=-1, batch_size=0)
    with pytest.raises(ValueError) as info:
        cfg.check()
    text = str(info.value)
    assert "--batch-size must be >= 1, got 0" in text and "--img-size must be >= 1, got 0" in text
    assert "--workers must be >= 0, got -1" in text
    assert dataclasses.replace(cfg, img_size=None, workers=0, batch_size=8).check() is None
