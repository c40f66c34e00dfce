"""The ``fastervit`` command: dispatcher, one file per command, shared options (weights, --amp)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from open_fastervit import cli
from open_fastervit.cli import bench as bench_cli
from open_fastervit.cli import predict as predict_cli
from open_fastervit.cli import train as train_cli
from open_fastervit.cli import validate as validate_cli
from open_fastervit.paths import data_path

TINY = json.dumps(dict(dim=32, in_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], drop_path_rate=0.0))


@pytest.fixture()
def image(tmp_path: Path) -> Path:
    path = tmp_path / "cat.png"
    Image.new("RGB", (80, 64), (200, 120, 40)).save(path)
    return path


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_every_listed_command_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as done:
        cli.main([command, "--help"])
    assert done.value.code == 0
    assert f"fastervit {command}" in capsys.readouterr().out


def test_dispatcher_lists_only_existing_commands(capsys) -> None:
    import importlib

    for name in cli.COMMANDS:  # every listed command has its module (export was listed before without one)
        assert callable(importlib.import_module(f"open_fastervit.cli.{name}").main)
    assert cli.main(["nosuchcommand"]) == 2
    assert "unknown command 'nosuchcommand'" in capsys.readouterr().err
    assert cli.main([]) == 0 and "commands:" in capsys.readouterr().out


def test_predict_without_weights_offline_stops_with_how_to_pass_a_file(image: Path, tmp_path: Path) -> None:
    """Issue 12 item 11. Before: `fastervit predict IMG --model fastervit_0` printed ImageNet labels from random
    weights and said nothing. Now: the published weights, or (offline, nothing cached) a clear error."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "open_fastervit.cli", "predict", str(image), "--model", "fastervit_0"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""
    assert "the published weights of fastervit_0" in done.stderr and "HF_HUB_OFFLINE is set" in done.stderr
    assert "--checkpoint FILE" in done.stderr and str(tmp_path / "hf" / "hub") in done.stderr


def test_random_weights_only_by_name(image: Path, capsys) -> None:
    assert predict_cli.main([str(image), "--model", "fastervit_0", "--model-kwargs", TINY, "--img-size", "64",
                             "--random-weights", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "random weights" in out.err and "cat.png:" in out.out
    root = str(data_path("tiny-imagenet-10"))
    assert validate_cli.main([root, "--model", "fastervit_0", "--model-kwargs", TINY, "--img-size", "64",
                              "--random-weights", "-b", "500", "--device", "cpu"]) == 0
    out = capsys.readouterr()
    assert "(random weights)" in out.out and "random weights (--random-weights)" in out.err
    with pytest.raises(SystemExit):  # a file and random weights at once: refused
        predict_cli.main([str(image), "--checkpoint", "w.safetensors", "--random-weights"])


def test_one_precision_vocabulary(capsys) -> None:
    assert validate_cli.build_parser().parse_args(["data", "--amp", "bf16"]).amp == "bf16"
    assert validate_cli.build_parser().parse_args(["data", "--amp", "bfloat16"]).amp == "bf16"
    assert "--amp bfloat16 is deprecated; use --amp bf16" in capsys.readouterr().err
    assert train_cli.config_from_args(["--amp", "float16"]).amp == "fp16"
    assert "deprecated" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_cli.config_from_args(["--amp", "fp64"])
    argv = ["--models", "fastervit_0", "--amp", "none,bf16", "--baseline", "fastervit_0:none"]
    cfg = bench_cli.config_from_args(bench_cli.build_parser().parse_args(argv), argv)
    assert cfg.precisions == ["fp32", "bf16"] and cfg.baselines == ["fastervit_0:fp32"]
    argv = ["--models", "fastervit_0", "--precisions", "fp32,bf16"]  # the old option and words still work
    cfg = bench_cli.config_from_args(bench_cli.build_parser().parse_args(argv), argv)
    assert cfg.precisions == ["fp32", "bf16"] and "--precisions is deprecated" in capsys.readouterr().err


def test_unknown_name_suggests_its_lookalike_first_without_a_random_weights_note(image: Path, capsys) -> None:
    """Review item 4: 'fastervit_O' suggested fastervit_6, 5, 4, 3 (difflib ties) after a note that the unknown
    model has random weights; expected: fastervit_0 first, and no note."""
    from open_fastervit.zoo import MODEL_NAMES, close_names

    assert close_names("fastervit_O", list(MODEL_NAMES))[0] == "fastervit_0"
    assert close_names("fastervit_l", list(MODEL_NAMES))[0] == "fastervit_1"
    assert predict_cli.main([str(image), "--model", "fastervit_O", "--random-weights"]) == 1
    err = capsys.readouterr().err
    assert "did you mean fastervit_0," in err and "random weights" not in err


@pytest.mark.parametrize("offline", [False, True])
def test_predict_without_weights_fails_fast_when_the_hub_cannot_be_reached(
    image: Path, tmp_path: Path, monkeypatch, capsys, offline: bool
) -> None:
    """Review item 5: offline, `fastervit predict img` took ~39 s with 6 'Retrying in Ns' lines; expected: under
    15 s, one short message (what failed, --checkpoint FILE, the cache path, --random-weights), whether
    HF_HUB_OFFLINE is set or the hub just cannot be reached (here: an endpoint that refuses connections)."""
    import time

    import huggingface_hub.constants as hub

    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", offline)
    if offline:
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.monotonic()
    assert predict_cli.main([str(image)]) == 1
    assert time.monotonic() - start < 15
    err = capsys.readouterr().err
    assert ("HF_HUB_OFFLINE is set" if offline else "http://127.0.0.1:9 cannot be reached") in err
    assert "--checkpoint FILE" in err and str(tmp_path / "hub") in err and "--random-weights" in err
    assert "Retrying" not in err and len(err.strip().splitlines()) == 1 and len(err) < 500
