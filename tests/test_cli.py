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
    assert "export" not in cli.COMMANDS  # listed before without a module behind it
    assert cli.main(["export"]) == 2
    assert "unknown command 'export'" in capsys.readouterr().err
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
