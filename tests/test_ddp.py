"""DistributedDataParallel on CPU: 2 ranks (torchrun, gloo) stay in sync and match a 1-rank run.

BatchNorm normalises each process's micro-batch, so the fair 1-rank reference with the same global
batch accumulates 2 micro-batches per step: the data sampler hands it exactly the micro-batches the two
ranks see, and averaging the two gradients is what DDP does. Augmentation, mixup, drop path and random
erasing are off so both runs consume identical inputs; the remaining difference is float summation order.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import timm
import torch
from conftest import TINY
from safetensors.torch import load_file

from open_fastervit.paths import data_path
from open_fastervit.tasks.classification import TrainConfig
from open_fastervit.train import train

REPO = Path(__file__).resolve().parent.parent
ARCH = {k: v for k, v in TINY.items() if k not in ("num_classes", "drop_path_rate")}
SETTINGS = dict(
    model="fastervit_0", data=str(data_path("tiny-imagenet-10")), img_size=32, train_images=64, val_images=40,
    batch_size=8, epochs=2, warmup_epochs=1, lr=2e-3, drop_path=0.0, augment=False, aa=None, reprob=0.0, mixup=0.0,
    cutmix=0.0, smoothing=0.1, model_ema=True, ema_decay=0.9, workers=0, tensorboard=False, progress=False,
    seed=3, checkpoint_steps=2,
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(output: Path, ranks: int) -> dict:
    argv = [f"--model-kwargs={json.dumps(ARCH)}", f"--output={output}"]
    for key, value in SETTINGS.items():
        flag = "--" + key.replace("_", "-")
        argv.append(flag if value is True else f"--no-{flag[2:]}" if value is False else f"{flag}={value}")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", "-m", "open_fastervit.cli", "train", *argv]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((output / "results.json").read_text())


def test_two_cpu_ranks_match_one_rank_with_the_same_global_batch(tmp_path):
    two = _torchrun(tmp_path / "ddp", ranks=2)
    assert two["world_size"] == 2 and two["global_batch"] == 16 and two["global_step"] == 8
    assert two["rank_divergence"] == 0.0  # parameters bit-identical on both ranks

    one = train(TrainConfig(**SETTINGS, model_kwargs=ARCH, accum_steps=2, threads=1,  # 1 thread like each rank
                            output=str(tmp_path / "single")))
    assert one["global_batch"] == 16 and one["global_step"] == 8

    ddp, single = load_file(tmp_path / "ddp" / "last.safetensors"), load_file(tmp_path / "single" / "last.safetensors")
    torch.manual_seed(SETTINGS["seed"])  # the trainer's initial weights
    initial = timm.create_model("fastervit_0", **ARCH, num_classes=10).state_dict()
    params = [k for k in single if "running_" not in k and "num_batches" not in k]  # BN buffers: per-rank momentum
    trained = max(float((single[k] - initial[k]).abs().max()) for k in params)
    worst = max(float((ddp[k] - single[k]).abs().max()) for k in params)
    assert trained > 1e-3 and worst < 1e-5, f"2-rank vs 1-rank weights differ by {worst} (training moved {trained})"
    # evaluation ran on each rank's shard and was reduced: rank 0's saved weights (BN statistics averaged over
    # the ranks) score exactly the reported top-1 on all 40 images
    from open_fastervit.data import LoaderOptions, build_eval_loader, open_dataset
    from open_fastervit.tasks.classification.task import classification_transforms as _transforms
    from open_fastervit.train.loader import subset_indices as _subset
    from open_fastervit.validate import evaluate

    model = timm.create_model("fastervit_0", **ARCH, num_classes=10)
    model.load_state_dict(ddp)
    val = open_dataset(SETTINGS["data"], "val", is_training=False)
    loader = build_eval_loader(val, _transforms(TrainConfig(**SETTINGS), model)[1], 8, LoaderOptions(workers=0),
                               indices=_subset(len(val), SETTINGS["val_images"], SETTINGS["seed"]))
    metrics = evaluate(model, loader)
    assert metrics["count"] == two["final"]["count"] == 40
    assert metrics["top1"] == two["final"]["top1"] and abs(metrics["loss"] - two["final"]["loss"]) < 1e-5
