"""Nothing lost: a run SIGKILLed right after a mid-epoch step checkpoint resumes to the same weights."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from open_fastervit.checkpoint import load_checkpoint
from open_fastervit.paths import data_path
from open_fastervit.train import TrainConfig, train

REPO = Path(__file__).resolve().parent.parent
ARCH = {k: v for k, v in TINY.items() if k not in ("num_classes", "drop_path_rate")}

# every source of randomness the recipe has: RandAugment, random erasing, mixup/cutmix, drop path, MESA
SETTINGS = dict(
    model="fastervit_0", model_kwargs=ARCH, data=str(data_path("tiny-imagenet-10")), img_size=32,
    train_images=96, val_images=16, batch_size=8, epochs=2, warmup_epochs=1, lr=2e-3, drop_path=0.1,
    aa="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, mesa=0.5, mesa_start=0.5, ema_decay=0.9,
    checkpoint_steps=3, workers=0, threads=1, deterministic=True, tensorboard=False, progress=False, seed=7,
)


def _argv(settings: dict) -> list[str]:
    argv = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        else:
            argv += [flag, str(value)]
    return argv


def _kill_after_first_checkpoint(output: Path) -> int:
    """Start training in a subprocess, SIGKILL it as soon as last.pt exists; returns the exit code."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "open_fastervit.cli", "train", *_argv({**SETTINGS, "output": str(output)})]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (output / "last.pt").exists():
        if process.poll() is not None:
            raise AssertionError(f"training exited before a checkpoint: {process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("no step checkpoint within 240 s")
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return process.returncode


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    reference = train(TrainConfig(**SETTINGS, output=str(tmp_path / "reference")))

    killed = tmp_path / "killed"
    assert _kill_after_first_checkpoint(killed) == -signal.SIGKILL
    state = load_checkpoint(killed / "last.pt")
    steps_per_epoch = 96 // 8
    assert 0 < state["progress"]["global_step"] < 2 * steps_per_epoch
    assert state["progress"]["step_in_epoch"] > 0, "the kill should land mid-epoch"
    assert not (killed / "results.json").exists()

    resumed = train(TrainConfig(**SETTINGS, output=str(killed), resume=str(killed / "last.pt")))
    assert resumed["resumed_from"] and resumed["global_step"] == reference["global_step"] == 2 * steps_per_epoch
    for name in ("last.safetensors", "last_ema.safetensors", "best.safetensors"):
        expected, got = load_file(tmp_path / "reference" / name), load_file(killed / name)
        assert expected.keys() == got.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=f"{name}:{key}")
    assert resumed["final"]["train_loss"] == pytest.approx(reference["final"]["train_loss"], abs=1e-6)
    assert resumed["final_top1"] == reference["final_top1"]

    final = load_checkpoint(killed)  # the folder form finds last.pt; the optimizer state matches too
    expected_final = load_checkpoint(tmp_path / "reference" / "last.pt")
    exp_avg = [s["exp_avg"] for s in expected_final["optimizer"]["state"].values()]
    got_avg = [s["exp_avg"] for s in final["optimizer"]["state"].values()]
    for a, b in zip(exp_avg, got_avg):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """A write that dies half-way leaves the previous checkpoint intact and no temporary file behind."""
    from open_fastervit.checkpoint import capture_rng, save_checkpoint

    path = tmp_path / "last.pt"
    save_checkpoint(path, {"state_dict": {"w": torch.ones(3)}, "rng": [capture_rng()]})
    real_save = torch.save

    def dying_save(obj, target):
        real_save({"partial": torch.zeros(1000)}, target)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"state_dict": {"w": torch.zeros(3)}})
    state = load_checkpoint(path)  # weights_only=True load of the previous, complete file
    assert torch.equal(state["state_dict"]["w"], torch.ones(3)) and len(state["rng"][0]["python"][1]) == 625
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
