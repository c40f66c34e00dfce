"""Nothing lost: a run SIGKILLed (or Ctrl-C'd) right after a mid-epoch step checkpoint resumes to the same weights,
with or without loader workers."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, settings_argv
from safetensors.torch import load_file
from torch.utils.data import Dataset

from open_fastervit.cli.train import main as train_main
from open_fastervit.data import LoaderOptions, build_train_loader
from open_fastervit.paths import data_path
from open_fastervit.tasks.classification import TrainConfig
from open_fastervit.train import train
from open_fastervit.train.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
ARCH = {k: v for k, v in TINY.items() if k not in ("num_classes", "drop_path_rate")}

# every source of randomness the recipe has: RandAugment, random erasing, mixup/cutmix, drop path, MESA
SETTINGS = dict(
    model="fastervit_0", model_kwargs=ARCH, data=str(data_path("tiny-imagenet-10")), img_size=32,
    train_images=96, val_images=16, batch_size=8, epochs=2, warmup_epochs=1, lr=2e-3, drop_path=0.1,
    aa="rand-m9-mstd0.5-inc1", reprob=0.25, mixup=0.8, cutmix=1.0, mesa=0.5, mesa_start=0.5, ema_decay=0.9,
    checkpoint_steps=3, workers=0, threads=1, deterministic=True, tensorboard=False, progress=False, seed=7,
)


def _kill_after_first_checkpoint(output: Path, settings: dict = SETTINGS, sig: int = signal.SIGKILL) -> tuple[int, str]:
    """Start training in a subprocess (its own process group, like a shell job), send ``sig`` as soon as last.pt
    exists: SIGKILL to the trainer, SIGINT to the whole group as Ctrl-C in a terminal does (loader workers
    included). Returns the exit code and stderr."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "open_fastervit.cli", "train", *settings_argv({**settings, "output": str(output)})]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               start_new_session=True)
    deadline = time.monotonic() + 240
    while not (output / "last.pt").exists():
        if process.poll() is not None:
            raise AssertionError(f"training exited before a checkpoint: {process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("no step checkpoint within 240 s")
        time.sleep(0.005)
    if sig == signal.SIGINT:
        os.killpg(process.pid, signal.SIGINT)
    else:
        process.send_signal(sig)
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr.decode()


def test_sigkill_mid_epoch_then_resume_matches_uninterrupted_run(tmp_path):
    reference = train(TrainConfig(**SETTINGS, output=str(tmp_path / "reference")))

    killed = tmp_path / "killed"
    assert _kill_after_first_checkpoint(killed)[0] == -signal.SIGKILL
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


def _assert_same_weights(expected_run: Path, got_run: Path) -> None:
    for name in ("last.safetensors", "last_ema.safetensors", "best.safetensors"):
        expected, got = load_file(expected_run / name), load_file(got_run / name)
        assert expected.keys() == got.keys()
        differ = [key for key in expected if not torch.equal(expected[key], got[key])]
        assert not differ, f"{name}: {len(differ)} of {len(expected)} tensors differ, e.g. {differ[:3]}"


#: The user's case: 64 px, a few hundred images, 2 epochs, step checkpoints, loader workers; every random
#: augmentation of the recipe (RandAugment, random erasing, flips/crops in the workers; mixup/cutmix, drop path and
#: MESA in the main process).
WORKER_SETTINGS = {**SETTINGS, "img_size": 64, "train_images": 192, "val_images": 32, "batch_size": 16,
                   "checkpoint_steps": 5, "workers": 2}


def test_ctrl_c_with_loader_workers_then_resume_is_exact_and_worker_count_free(tmp_path, capsys):
    """Before: with loader workers a run stopped mid-epoch and resumed ended with other weights (141 of 148 tensors,
    top-1 34.0 vs 36.0), since each worker's RNG stream restarted at the resume point. Expected: Ctrl-C right after
    the first mid-epoch step checkpoint exits 130 with the one-line resume hint, `fastervit train --resume RUN`
    (no other flag) continues it, and the final weights equal bit for bit those of the uninterrupted run with 2
    workers and those of a run without workers (the augmentation of a sample depends on (seed, epoch, position))."""
    steps_per_epoch = 192 // 16
    reference = train(TrainConfig(**WORKER_SETTINGS, output=str(tmp_path / "reference")))
    no_workers = train(TrainConfig(**{**WORKER_SETTINGS, "workers": 0}, output=str(tmp_path / "no_workers")))
    _assert_same_weights(tmp_path / "reference", tmp_path / "no_workers")
    assert no_workers["final_top1"] == reference["final_top1"]

    run = tmp_path / "interrupted"
    code, stderr = _kill_after_first_checkpoint(run, WORKER_SETTINGS, signal.SIGINT)
    assert code == 130, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    hint = stderr.strip().splitlines()[-1]
    assert hint.startswith("fastervit train: interrupted at epoch 1, step "), hint
    assert hint.endswith(f"; last checkpoint: {run / 'last.pt'}; continue with: fastervit train --resume {run}")
    state = load_checkpoint(run / "last.pt")
    assert 0 < state["progress"]["step_in_epoch"] < steps_per_epoch and state["progress"]["epoch"] == 0
    assert not (run / "results.json").exists()

    capsys.readouterr()
    assert train_main(["--resume", str(run)]) == 0  # every other setting comes from the run's config.json
    assert f"resuming {run} with its saved settings" in capsys.readouterr().err
    resumed = json.loads((run / "results.json").read_text())
    assert resumed["resumed_from"] == str(run) and resumed["global_step"] == 2 * steps_per_epoch
    _assert_same_weights(tmp_path / "reference", run)
    assert resumed["final_top1"] == reference["final_top1"]


class _RandomSamples(Dataset):
    """Each item draws from Python's random, numpy and torch, as timm's transforms do."""

    def __len__(self) -> int:
        return 40

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        draws = [random.random(), float(np.random.rand()), float(torch.rand(()))]
        return torch.tensor([float(index), *draws], dtype=torch.float64), index


def _epoch_batches(workers: int, epoch: int, start: int = 0) -> list[torch.Tensor]:
    loader = build_train_loader(_RandomSamples(), None, 4, LoaderOptions(workers=workers), seed=3)
    return [images for images, _ in loader.epoch(epoch, start)]


def test_sample_randomness_depends_only_on_seed_epoch_and_position():
    """Expected: the random draws of every sample are the same with 0 or 2 workers and when an epoch starts
    mid-way (resume), differ between epochs, and loading with no workers leaves the main process's RNG (mixup,
    drop path) untouched."""
    python_state, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    inline = _epoch_batches(0, epoch=1)
    assert random.getstate() == python_state and torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), numpy_state))
    with_workers = _epoch_batches(2, epoch=1)
    assert len(inline) == len(with_workers) == 10
    for a, b in zip(inline, with_workers):
        assert torch.equal(a, b)
    for a, b in zip(inline[4:], _epoch_batches(2, epoch=1, start=4)):
        assert torch.equal(a, b)
    other_epoch = torch.cat(_epoch_batches(0, epoch=2))
    first = torch.cat(inline)
    for index in range(40):  # the same image in another epoch gets other random draws
        a, b = first[first[:, 0] == index][0, 1:], other_epoch[other_epoch[:, 0] == index][0, 1:]
        assert not torch.equal(a, b)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    """A write that dies half-way leaves the previous checkpoint intact and no temporary file behind."""
    from open_fastervit.train.checkpoint import capture_rng, save_checkpoint

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
