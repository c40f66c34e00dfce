"""Does Hierarchical Attention help a host network? A small-scale, CPU-sized check of the paper's plug-in claim.

One command reproduces every number (``results.json`` + ``results.md`` under ``--out``)::

    python experiments/hat_plugin.py --out runs/hat_plugin          # ~25 min on one quiet CPU core
    python experiments/hat_plugin.py --out runs/hat_smoke --quick   # ~20 s smoke run (used by a test)
    python experiments/hat_plugin.py --out runs/hat_plugin --parts long_range,speed,cost   # redo some parts

Parts, all with timm's Swin Transformer as the host and :func:`open_fastervit.plugins.add_hat`:

* ``imagenet10``: a scaled-down Swin vs the same Swin + HAT on tiny-imagenet-10 (64 px), same budget, 3 seeds
  (top-1, parameters); and the carrier size ct = 1, 2, 3 at seed 0 (``carrier_ablation``).
* ``long_range``: synthetic 64 px images, two patterns in opposite corners, label = "same pattern". A one-stage
  Swin (a regular and a shifted block, 4x4-token windows on a 16x16 token map) cannot connect the corners, and
  with mean pooling and a linear head it cannot beat chance; HAT's carriers can.
* ``speed``: inference img/s (batch 32) of every model above, measured together, round-robin.
* ``cost``: one block at C=128, stride 16, for 224..1024 px inputs: window attention (ws 7), HAT (ws 7, ct 2)
  and global attention; time per forward and attention multiply-adds.

Everything runs with one intra-op thread (the machines this was sized for have two shared cores) and fixed
seeds. These are small-scale numbers; the paper's ImageNet-1K deltas are not reproduced here.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from timm.models.swin_transformer import SwinTransformer
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from torch import Tensor, nn

from open_fastervit.layers import HierarchicalAttention
from open_fastervit.plugins import add_hat

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)

# the host of parts 1 and 3: Swin-style, scaled down for 64 px and one CPU core (16x16 tokens after patch 4)
HOST = dict(img_size=64, patch_size=4, embed_dim=32, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=4,
            drop_path_rate=0.1)
HAT_STAGES = (0, 1)  # stage 0: 16x16 tokens = 4x4 windows; stage 1: 8x8 = 2x2 windows; later stages: one window
# the host of part 2: one stage, a regular and a shifted block
LONG_RANGE_HOST = dict(img_size=64, patch_size=4, embed_dim=32, depths=(2,), num_heads=(2,), window_size=4,
                       drop_path_rate=0.0)
LONG_RANGE_DATA = (2000, 1000)  # train, test images
LONG_RANGE_EPOCHS = 12
LONG_RANGE_RECIPE = dict(lr=1e-3, batch=32, cosine=False, label_smoothing=0.0)


def data_root() -> Path:
    """``$FASTERVIT_DATA`` or ``../shared/data`` beside the checkout."""
    env = os.environ.get("FASTERVIT_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def load_image_folder(root: Path, limit: int | None = None) -> tuple[Tensor, Tensor]:
    """An ImageFolder of 64x64 images -> ``(uint8 (N, 3, 64, 64), int64 (N,))``; ``limit`` images per class.

    Raises:
        FileNotFoundError: ``root`` has no class folders.
    """
    classes = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not classes:
        raise FileNotFoundError(f"no ImageFolder class directories under {root}")
    images, labels = [], []
    for idx, name in enumerate(classes):
        files = sorted((root / name).iterdir())[:limit]
        for f in files:
            img = Image.open(f).convert("RGB").resize((64, 64), Image.BILINEAR)
            images.append(torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(64, 64, 3))
            labels.append(idx)
    return torch.stack(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def normalize(x: Tensor) -> Tensor:
    """uint8 ``(B, 3, H, W)`` -> ImageNet-normalised float."""
    return (x.float() / 255 - MEAN) / STD


def augment(x: Tensor, gen: torch.Generator, pad: int = 4) -> Tensor:
    """Random crop (reflect pad ``pad``) and horizontal flip of a float batch ``(B, 3, H, W)``, per sample."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    offs = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen)
    flips = torch.rand(b, generator=gen) < 0.5
    out = torch.stack([padded[i, :, offs[i, 0]: offs[i, 0] + h, offs[i, 1]: offs[i, 1] + w] for i in range(b)])
    return torch.where(flips.view(b, 1, 1, 1), out.flip(-1), out)


def make_swin(config: dict[str, Any], num_classes: int, hat_stages: Sequence[int], carrier_size: int,
              seed: int) -> SwinTransformer:
    """A timm Swin of ``config`` (weights drawn from ``seed``), then HAT in ``hat_stages`` (carriers drawn after,
    so host and host+HAT of one seed share every Swin weight)."""
    torch.manual_seed(seed)
    model = SwinTransformer(num_classes=num_classes, **config)
    return add_hat(model, hat_stages, carrier_size)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def train_eval(model: nn.Module, train: tuple[Tensor, Tensor], val: tuple[Tensor, Tensor], epochs: int, seed: int,
               lr: float = 1e-3, batch: int = 64, aug: bool = True, cosine: bool = True,
               label_smoothing: float = 0.1, prepare: Callable[[Tensor], Tensor] = normalize) -> dict[str, Any]:
    """AdamW (timm, wd 0.05); with ``cosine`` a cosine schedule with one warm-up epoch, else constant ``lr``.
    Returns top-1 on ``val``, the mean training loss of each epoch and the wall time."""
    gen = torch.Generator().manual_seed(seed)
    opt = create_optimizer_v2(model, "adamw", lr=lr, weight_decay=0.05)
    steps = math.ceil(len(train[1]) / batch)
    sched = None
    if cosine:
        sched = CosineLRScheduler(opt, t_initial=epochs * steps, lr_min=lr * 0.01,
                                  warmup_t=min(steps, epochs * steps // 4), warmup_lr_init=lr * 0.01)
    losses: list[float] = []
    start = time.perf_counter()
    step = 0
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train[1]), generator=gen)
        total = 0.0
        for i in range(steps):
            idx = order[i * batch: (i + 1) * batch]
            x = prepare(train[0][idx])
            if aug:
                x = augment(x, gen)
            loss = F.cross_entropy(model(x), train[1][idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if sched is not None:
                sched.step_update(step)
            total += loss.item()
        losses.append(total / steps)
    seconds = time.perf_counter() - start
    return {"top1": evaluate(model, val, prepare), "epoch_loss": losses, "train_seconds": round(seconds, 1)}


@torch.no_grad()
def evaluate(model: nn.Module, data: tuple[Tensor, Tensor], prepare: Callable[[Tensor], Tensor] = normalize,
             batch: int = 100) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    correct = 0
    for i in range(0, len(data[1]), batch):
        correct += (model(prepare(data[0][i: i + batch])).argmax(-1) == data[1][i: i + batch]).sum().item()
    return 100.0 * correct / len(data[1])


@torch.no_grad()
def throughputs(models: dict[str, nn.Module], size: int = 64, batch: int = 32, rounds: int = 7) -> dict[str, float]:
    """Inference images/s at ``batch`` (eval mode, no autograd) of several models, measured round-robin: each
    round runs every model once and each model keeps its fastest round, so load from other processes on a shared
    machine hurts all models alike and as little as possible."""
    x = torch.randn(batch, 3, size, size)
    best: dict[str, float] = {}
    for model in models.values():
        model.eval()(x)  # warm-up
    for _ in range(rounds):
        for name, model in models.items():
            t = time.perf_counter()
            model(x)
            best[name] = min(best.get(name, math.inf), time.perf_counter() - t)
    return {name: round(batch / t, 1) for name, t in best.items()}


# ---- part 2: the long-range task ---------------------------------------------------------------------------------


def corner_pairs(n: int, seed: int, num_patterns: int = 2, size: int = 64, pattern: int = 16,
                 jitter: int = 0, patterns_seed: int = 1234) -> tuple[Tensor, Tensor]:
    """Synthetic long-range task: ``(float (n, 3, size, size), int64 (n,))``, label 1 iff the two patterns match.

    A fixed bank of ``num_patterns`` random ``pattern x pattern`` RGB sign textures (+-1, seed ``patterns_seed``);
    each image is Gaussian noise (std 0.5) with one pattern at the top-left corner and one at the bottom-right
    (offsets ``0..jitter`` px from the corner); half the images carry the same pattern twice. With the defaults
    each pattern fills exactly one 4x4-token window of the 16x16 token map (patch 4), the two farthest windows.
    """
    bank = torch.randn(num_patterns, 3, pattern, pattern, generator=torch.Generator().manual_seed(patterns_seed)).sign()
    gen = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(n, 3, size, size, generator=gen)
    labels = (torch.rand(n, generator=gen) < 0.5).long()
    a = torch.randint(0, num_patterns, (n,), generator=gen)
    other = (a + torch.randint(1, num_patterns, (n,), generator=gen)) % num_patterns
    b = torch.where(labels.bool(), a, other)
    offs = torch.randint(0, jitter + 1, (n, 4), generator=gen)
    for i in range(n):
        r, c = offs[i, 0], offs[i, 1]
        x[i, :, r: r + pattern, c: c + pattern] = bank[a[i]]
        r, c = size - pattern - offs[i, 2], size - pattern - offs[i, 3]
        x[i, :, r: r + pattern, c: c + pattern] = bank[b[i]]
    return x, labels


# ---- part 4: cost against input size ------------------------------------------------------------------------------


def attention_macs(h: int, w: int, dim: int, window: int | None, carrier_size: int = 0) -> int:
    """Multiply-adds of ``QK^T`` and ``AV`` for one layer on an ``h x w`` map (``window=None``: global).

    Window: ``nW * 2 * (ws^2 + ct^2)^2 * C`` over padded windows, plus HAT's carrier attention
    ``2 * (nW * ct^2)^2 * C``; global: ``2 * (h*w)^2 * C``.
    """
    if window is None:
        return 2 * (h * w) ** 2 * dim
    nw = math.ceil(h / window) * math.ceil(w / window)
    macs = nw * 2 * (window * window + carrier_size**2) ** 2 * dim
    if carrier_size and nw > 1:
        macs += 2 * (nw * carrier_size**2) ** 2 * dim
    return macs


@torch.no_grad()
def time_forward(module: nn.Module, x: Tensor, repeats: int) -> float:
    """Fastest of ``repeats`` runs of ``module(x)`` after one warm-up, in milliseconds (robust to a shared CPU)."""
    module(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        module(x)
        times.append(time.perf_counter() - t)
    return 1000 * min(times)


def cost_table(sizes: Sequence[int], dim: int = 128, heads: int = 4, window: int = 7, carrier_size: int = 2,
               repeats: int = 3) -> list[dict[str, Any]]:
    """One block (attention + MLP) at ``dim`` channels on the stride-16 map of each input size: window attention,
    HAT and global attention, all :class:`HierarchicalAttention` (global = one window covering the map)."""
    torch.manual_seed(0)
    window_block = HierarchicalAttention(dim, heads, window_size=window, carrier_size=0).eval()
    hat_block = HierarchicalAttention(dim, heads, window_size=window, carrier_size=carrier_size).eval()
    rows = []
    for size in sizes:
        s = size // 16
        x = torch.randn(1, dim, s, s)
        global_block = HierarchicalAttention(dim, heads, window_size=s, carrier_size=0).eval()
        global_block.load_state_dict(window_block.state_dict())
        row: dict[str, Any] = {"input": size, "map": s, "tokens": s * s}
        for name, block, win, ct in (("window", window_block, window, 0), ("hat", hat_block, window, carrier_size),
                                     ("global", global_block, None, 0)):
            row[f"{name}_ms"] = round(time_forward(block, x, repeats), 2)
            row[f"{name}_attn_gmacs"] = round(attention_macs(s, s, dim, win, ct) / 1e9, 4)
        rows.append(row)
    return rows


# ---- the run -------------------------------------------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, float]:
    return {"mean": round(statistics.mean(values), 2),
            "std": round(statistics.stdev(values), 2) if len(values) > 1 else 0.0,
            "min": round(min(values), 2), "max": round(max(values), 2)}


PARTS = ("imagenet10", "long_range", "speed", "cost")  # imagenet10 includes the carrier ablation


def _jsonable(config: dict[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def run(out: Path, quick: bool = False, parts: Sequence[str] = PARTS,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """The experiment; writes ``results.json`` and ``results.md`` under ``out`` and returns the results.

    ``parts`` (default: all) selects what to (re)compute; a subset updates those entries of an existing
    ``out/results.json`` (to redo one part without the others).

    Raises:
        ValueError: an unknown part, or a subset of parts without an existing ``results.json`` to update.
    """
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    if set(parts) != set(PARTS):
        if not (out / "results.json").is_file():
            raise ValueError(f"--parts {list(parts)} updates {out / 'results.json'}, which does not exist")
        results = json.loads((out / "results.json").read_text())
    seeds = (0,) if quick else (0, 1, 2)
    epochs = 1 if quick else 4
    rounds = 2 if quick else 7
    results["setup"] = {"host": _jsonable(HOST), "hat_stages": list(HAT_STAGES), "epochs": epochs,
                        "seeds": list(seeds), "threads": 1, "quick": quick, "torch": torch.__version__}

    seconds = results.setdefault("seconds", {})
    clock = time.perf_counter()

    def lap(part: str) -> None:
        nonlocal clock
        seconds[part] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    if "imagenet10" in parts:
        results.update(imagenet10_parts(quick, seeds, epochs, log))
        lap("imagenet10")
    if "long_range" in parts:
        results["long_range"] = long_range_part(quick, log)
        lap("long_range")
    if "speed" in parts:  # every model above, measured together (fresh weights: speed does not depend on them)
        results["speed"] = {
            "imagenet10": throughputs({f"ct{ct}": make_swin(HOST, 10, HAT_STAGES if ct else (), ct, 0)
                                       for ct in (0, 1, 2, 3)}, rounds=rounds),
            "long_range": throughputs({"swin": make_swin(LONG_RANGE_HOST, 2, (), 0, 0),
                                       "swin+hat": make_swin(LONG_RANGE_HOST, 2, (0,), 2, 0)}, rounds=rounds),
            "protocol": f"img/s, batch 32, 64 px, eval, round-robin, fastest of {rounds} rounds",
        }
        log(f"[speed] {results['speed']}")
        lap("speed")
    if "cost" in parts:
        sizes = (224, 384) if quick else (224, 384, 512, 768, 1024)
        results["cost"] = cost_table(sizes, repeats=1 if quick else 10)
        for row in results["cost"]:
            log(f"[cost] {row}")
        lap("cost")

    seconds["total"] = round(sum(v for k, v in seconds.items() if k in PARTS), 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    log(f"wrote {out / 'results.json'} and {out / 'results.md'} ({time.perf_counter() - started:.0f} s)")
    return results


def imagenet10_parts(quick: bool, seeds: Sequence[int], epochs: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Parts 1 and 3: host vs host + HAT (ct 2) over ``seeds``, and ct 1 / 3 at the first seed."""
    root = data_root() / "tiny-imagenet-10"
    train = load_image_folder(root / "train", 20 if quick else None)
    val = load_image_folder(root / "val", 10 if quick else None)
    log(f"tiny-imagenet-10: {len(train[1])} train, {len(val[1])} val")
    part: dict[str, Any] = {"data": {"train_images": len(train[1]), "val_images": len(val[1])}}
    for name, stages, ct in (("swin", (), 0), ("swin+hat", HAT_STAGES, 2)):
        runs = []
        for seed in seeds:
            model = make_swin(HOST, 10, stages, ct, seed)
            r = train_eval(model, train, val, epochs, seed)
            runs.append(r)
            log(f"[imagenet10] {name} seed {seed}: top-1 {r['top1']:.1f} loss {r['epoch_loss']} {r['train_seconds']}s")
        part[name] = {"params": count_params(model), "top1": [r["top1"] for r in runs],
                      "top1_summary": summary([r["top1"] for r in runs]), "runs": runs}
    ablation = [{"carrier_size": 0, "top1": part["swin"]["top1"][0], "params": part["swin"]["params"]}]
    for ct in (1, 2, 3):  # ct 2 is the seed-0 run above
        if ct == 2:
            top1, params = part["swin+hat"]["top1"][0], part["swin+hat"]["params"]
        else:
            model = make_swin(HOST, 10, HAT_STAGES, ct, seeds[0])
            top1, params = train_eval(model, train, val, epochs, seeds[0])["top1"], count_params(model)
        ablation.append({"carrier_size": ct, "top1": top1, "params": params})
        log(f"[ablation] ct {ct}: top-1 {top1:.1f}")
    return {"imagenet10": part, "carrier_ablation": ablation}


def long_range_part(quick: bool, log: Callable[[str], None]) -> dict[str, Any]:
    """Part 2: one-stage Swin vs the same + HAT on :func:`corner_pairs`."""
    n_train, n_test = (256, 128) if quick else LONG_RANGE_DATA
    train, test = corner_pairs(n_train, seed=1), corner_pairs(n_test, seed=2)
    epochs = 1 if quick else LONG_RANGE_EPOCHS
    part: dict[str, Any] = {"setup": {"host": _jsonable(LONG_RANGE_HOST), "hat_stages": [0], "carrier_size": 2,
                                      "train": n_train, "test": n_test, "epochs": epochs, "patterns": 2,
                                      "chance": 50.0, **LONG_RANGE_RECIPE}}
    for name, stages, ct in (("swin", (), 0), ("swin+hat", (0,), 2)):
        model = make_swin(LONG_RANGE_HOST, 2, stages, ct, 0)
        r = train_eval(model, train, test, epochs, 0, aug=False, prepare=lambda x: x, **LONG_RANGE_RECIPE)
        part[name] = {**r, "params": count_params(model)}
        log(f"[long-range] {name}: test acc {r['top1']:.1f}  loss {[round(v, 4) for v in r['epoch_loss']]}")
    return part


def markdown(r: dict[str, Any]) -> str:
    """The results as markdown tables (parts not yet computed are left out)."""
    s, speed = r["setup"], r.get("speed", {})
    lines = ["# HAT as a plug-in: small-scale check", "",
             "1 CPU thread, fixed seeds. Small-scale numbers: the paper's ImageNet-1K deltas are not reproduced here."]
    if "imagenet10" in r:
        d, ips = r["imagenet10"]["data"], speed.get("imagenet10", {})
        lines += ["", "## tiny-imagenet-10 (64 px), same budget", "",
                  f"Host: timm SwinTransformer {s['host']}; HAT (ct 2) in stages {s['hat_stages']}; {s['epochs']} "
                  f"epochs, seeds {s['seeds']}, {d['train_images']} train / {d['val_images']} val images.", "",
                  "| model | params | top-1 per seed | top-1 mean ± std | img/s (batch 32) |",
                  "|---|---:|---|---:|---:|"]
        for name, key in (("swin", "ct0"), ("swin+hat", "ct2")):
            p, t = r["imagenet10"][name], r["imagenet10"][name]["top1_summary"]
            lines.append(f"| {name} | {p['params'] / 1e6:.2f} M | {', '.join(f'{v:.1f}' for v in p['top1'])} | "
                         f"{t['mean']:.1f} ± {t['std']:.1f} | {ips.get(key, float('nan')):.0f} |")
        lines += ["", "## Carrier size (seed 0; ct 0 = host)", "", "| ct | params | top-1 | img/s |",
                  "|---:|---:|---:|---:|"]
        for a in r["carrier_ablation"]:
            speed_ct = ips.get("ct{}".format(a["carrier_size"]), float("nan"))
            lines.append(f"| {a['carrier_size']} | {a['params'] / 1e6:.2f} M | {a['top1']:.1f} | {speed_ct:.0f} |")
    if "long_range" in r:
        lr, ips = r["long_range"], speed.get("long_range", {})
        lines += ["", "## Long-range task (two corner patterns, match or not; chance 50 %)", "",
                  f"One-stage Swin {lr['setup']['host']}, HAT (ct 2) in stage 0; {lr['setup']['train']} train / "
                  f"{lr['setup']['test']} test images, {lr['setup']['epochs']} epochs.", "",
                  "| model | params | test acc | final train loss | img/s |", "|---|---:|---:|---:|---:|"]
        for name in ("swin", "swin+hat"):
            p = lr[name]
            lines.append(f"| {name} | {p['params'] / 1e6:.3f} M | {p['top1']:.1f} | {p['epoch_loss'][-1]:.3f} | "
                         f"{ips.get(name, float('nan')):.0f} |")
    if "cost" in r:
        lines += ["", "## Cost of one block (C=128, stride 16, batch 1): ms per forward / attention GMACs", "",
                  "| input | map | window (ws 7) | HAT (ws 7, ct 2) | global |", "|---:|---:|---:|---:|---:|"]
        for c in r["cost"]:
            cells = [f"{c[f'{k}_ms']:.1f} / {c[f'{k}_attn_gmacs']:.3f}" for k in ("window", "hat", "global")]
            lines.append(f"| {c['input']} | {c['map']}x{c['map']} | " + " | ".join(cells) + " |")
    if speed:
        lines += ["", f"Speed: {speed['protocol']}."]
    lines += ["", f"Compute time (s): {r.get('seconds', {})}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/hat_plugin"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="about one minute smoke run (tiny subsets)")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated subset of {','.join(PARTS)} to (re)compute into an existing "
                        "results.json (default: all)")
    args = parser.parse_args(argv)
    parts = [p for p in args.parts.split(",") if p]
    try:
        run(args.out, quick=args.quick, parts=parts, log=lambda m: print(m, flush=True))
    except ValueError as err:
        parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
