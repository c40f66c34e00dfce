"""``fastervit demo``: train a small FasterViT from scratch, evaluate it, classify photos, benchmark it.

Everything goes through the public API of the package, in the order a user would run it:

1. ``open_fastervit.train.train`` trains a 2.5M-parameter FasterViT at 64 px on tiny-imagenet-10
   (10 classes, 5000 train / 500 val photos) with AdamW and light augmentation, for as many epochs as fit
   a training budget (6 minutes by default; the speed of this machine is measured first);
2. the best weights are saved as a self-describing safetensors file (architecture overrides, input size,
   class names in its metadata), so ``fastervit validate`` / ``fastervit predict`` need no extra flags;
3. ``open_fastervit.validate.validate`` scores that file on the held-out val split;
4. ``open_fastervit.predict.predict`` classifies one held-out photo per class -> ``predictions.png``;
5. ``open_fastervit.bench.run_benchmark`` times it against small timm CNNs at the same input size;
6. ``REPORT.md`` gathers numbers, figures and the commands to reproduce each step.

``--quick`` shrinks every step (a few hundred images, one epoch, a short benchmark) to check that each
artifact is produced; its accuracy means nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from open_fastervit import load_model, save_weights
from open_fastervit.bench import BenchConfig, run_benchmark, write_reports
from open_fastervit.demos import CLASSIFICATION_MINUTES
from open_fastervit.labels import class_names_of, open_eval_dataset
from open_fastervit.paths import data_path
from open_fastervit.predict import Prediction, load_image, predict
from open_fastervit.tasks.classification import TrainConfig
from open_fastervit.train import train
from open_fastervit.validate import validate

__all__ = ["DEMO_MODEL", "DEMO_MODEL_KWARGS", "DemoConfig", "Plan", "plan_training", "run_demo"]

DEMO_MODEL = "fastervit_0"
#: The demo architecture: FasterViT-0's layout (2 conv stages, HAT in stage 2) at half its width and a
#: quarter of its depth. At 64 px stage 2 sees a 4x4 map in 2x2 windows, so hierarchical attention is active.
DEMO_MODEL_KWARGS: dict[str, Any] = dict(
    dim=32, in_dim=32, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=(7, 7, 2, 2),
)
DEMO_DATA = "tiny-imagenet-10"
#: Small timm CNNs that run at 64 px (3.4M and 11.2M parameters with 10 classes), for the benchmark.
PEERS = ("resnet18", "convnext_atto")


@dataclass
class DemoConfig:
    """What the demo runs. ``quick`` overrides the budget fields with a tiny one (see :func:`budget`)."""

    data: str | None = None  # default: open_fastervit.paths.data_path('tiny-imagenet-10')
    output: str = "demo_output"
    quick: bool = False
    img_size: int = 64
    minutes: float = CLASSIFICATION_MINUTES  # training budget: the epochs are chosen to fit it (plan_training)
    epochs: int | None = None  # fixed number of epochs instead of the budget (quick: 1)
    max_epochs: int = 40
    batch_size: int = 64
    lr: float = 2e-3
    drop_path: float = 0.05
    warmup_epochs: int | None = None  # default: a sixth of the epochs, at most 2
    train_images: int = 0  # 0: all
    val_images: int = 0
    workers: int = 2
    seed: int = 0
    bench: bool = True
    peers: tuple[str, ...] = PEERS
    progress: bool = True
    model_kwargs: dict[str, Any] = field(default_factory=lambda: dict(DEMO_MODEL_KWARGS))


def budget(cfg: DemoConfig) -> DemoConfig:
    """``quick``: 320 training images, one epoch unless given, 100 val images; else unchanged."""
    if not cfg.quick:
        return cfg
    return dataclasses.replace(cfg, epochs=cfg.epochs or 1, batch_size=32, train_images=320, val_images=100)


def train_seconds_per_image(cfg: DemoConfig, num_classes: int, steps: int = 4) -> float:
    """Time of one training image (forward, backward, AdamW step) on this machine, from a few steps on
    random data with the demo's model, batch and input size."""
    torch.manual_seed(cfg.seed)
    model = timm.create_model(DEMO_MODEL, num_classes=num_classes, **cfg.model_kwargs).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size)
    y = torch.randint(num_classes, (cfg.batch_size,))

    def step() -> None:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()  # warm-up: allocator, kernels
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / (steps * cfg.batch_size)


def epoch_overhead(threads: int) -> float:
    """Real epoch time / timed steps on random data (data loading, the per-epoch evaluation, checkpoints).

    Measured with the demo's settings on 2 cores and 2 loader workers: 1.3 when a core is left for the
    loader, 2.1 when the compute threads take every core and compete with it.
    """
    return 1.3 if threads < (os.cpu_count() or 1) else 2.1


@dataclass
class Plan:
    """How the demo trains: epochs, torch threads, and the estimated epoch time (None: epochs were given)."""

    epochs: int
    threads: int
    epoch_seconds: float | None = None


def plan_training(cfg: DemoConfig, train_images: int, num_classes: int) -> Plan:
    """``cfg.epochs`` if set, else as many epochs (1..max_epochs) as fit ``cfg.minutes`` on this machine.

    Small models are dominated by many small operations, for which one thread can beat several (always so
    on a busy machine, where threads wait for each other, and the data loader needs a core too): both 1
    and all threads are timed and the faster is used.
    """
    threads = torch.get_num_threads()
    if cfg.epochs:
        return Plan(cfg.epochs, threads)
    seconds = {}
    try:
        for n in sorted({1, threads}):
            torch.set_num_threads(n)
            seconds[n] = train_seconds_per_image(cfg, num_classes)
    finally:
        torch.set_num_threads(threads)
    epoch_seconds = {n: epoch_overhead(n) * train_images * t for n, t in seconds.items()}
    best = min(epoch_seconds, key=epoch_seconds.get)
    epochs = max(1, min(cfg.max_epochs, int(60 * cfg.minutes / epoch_seconds[best])))
    return Plan(epochs, best, epoch_seconds[best])


def _log(cfg: DemoConfig, message: str) -> None:
    if cfg.progress:
        print(f"[demo] {message}", file=sys.stderr, flush=True)


# ---- 1-2. training -------------------------------------------------------------------------------------------


def train_model(cfg: DemoConfig, data: Path, out: Path) -> dict[str, Any]:
    """Train from scratch with ``open_fastervit.train.train``; returns its result dict."""
    warmup = cfg.warmup_epochs if cfg.warmup_epochs is not None else min(2, cfg.epochs // 6)
    train_cfg = TrainConfig(
        model=DEMO_MODEL, model_kwargs=dict(cfg.model_kwargs), drop_path=cfg.drop_path, data=str(data),
        img_size=cfg.img_size, train_images=cfg.train_images, val_images=cfg.val_images,
        epochs=cfg.epochs, warmup_epochs=warmup, batch_size=cfg.batch_size, lr=cfg.lr,
        min_lr=cfg.lr / 100, opt="adamw", weight_decay=0.05,
        # light augmentation: 5000 photos and a few minutes of CPU are too little for the ImageNet recipe
        mixup=0.0, cutmix=0.0, aa=None, reprob=0.0, scale=[0.35, 1.0], color_jitter=0.2, smoothing=0.1,
        model_ema=False, output=str(out / "train"), workers=cfg.workers, seed=cfg.seed,
        progress=cfg.progress, tensorboard=False,
        overwrite=True,  # the demo owns OUTPUT/train: running the demo again trains afresh there
    )
    return train(train_cfg)


def save_demo_weights(cfg: DemoConfig, checkpoint: str, class_names: list[str], path: Path) -> Path:
    """Re-save the trained weights with the metadata ``validate``/``predict`` read (no flags needed)."""
    model = load_model(checkpoint, architecture=DEMO_MODEL, model_kwargs=cfg.model_kwargs)
    metadata = {
        "class_names": class_names,
        "model_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.model_kwargs.items()},
        "img_size": cfg.img_size,
    }
    return save_weights(model, path, metadata=metadata)


# ---- 4. predictions figure ------------------------------------------------------------------------------------


def held_out_images(data: Path, seed: int) -> list[tuple[Path, str]]:
    """One val photo per class (a seeded random pick), with its class name."""
    dataset = open_eval_dataset(data, split="val")
    names = class_names_of(dataset)
    by_class: dict[int, list[Path]] = {}
    for path, target in dataset.reader.samples:
        by_class.setdefault(int(target), []).append(Path(path))
    generator = torch.Generator().manual_seed(seed)
    return [
        (files[int(torch.randint(len(files), (1,), generator=generator))], names[target])
        for target, files in sorted(by_class.items())
    ]


def plot_predictions(preds: list[Prediction], truths: list[str], path: Path, columns: int = 5) -> Path:
    """A grid of photos, each titled with its true class and the top-3 guesses (green: correct)."""
    rows = (len(preds) + columns - 1) // columns
    height = 3.4 * rows + 0.5  # inches: 0.5 for the suptitle, per row a title, a photo and three guesses
    figure = Figure(figsize=(2.6 * columns, height))
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    figure.subplots_adjust(left=0.02, right=0.98, top=1 - 0.55 / height, bottom=0.85 / height, wspace=0.08,
                           hspace=0.5)
    for axis in axes[len(preds):]:
        axis.axis("off")
    for axis, pred, truth in zip(axes, preds, truths):
        axis.imshow(load_image(pred.image))
        axis.set_xticks([])
        axis.set_yticks([])
        axis.set_title(f"true: {truth}", fontsize=10, fontweight="bold")
        for i, (label, prob) in enumerate(zip(pred.labels, pred.probs)):
            color = "green" if label == truth else ("red" if i == 0 else "black")
            axis.text(0.5, -0.03 - 0.1 * i, f"{label} {100 * prob:.0f}%", transform=axis.transAxes,
                      ha="center", va="top", fontsize=9, color=color)
    figure.suptitle("held-out photos: top-3 predictions")
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


# ---- 5. benchmark ---------------------------------------------------------------------------------------------


def run_bench(cfg: DemoConfig, out: Path, num_classes: int, threads: int) -> dict[str, Any]:
    """Inference speed of the demo model vs timm peers at the demo input size (``open_fastervit.bench``),
    with the torch threads training used, every model in its inference form (``--fuse --channels-last``)."""
    bench_cfg = BenchConfig(
        models=[DEMO_MODEL, *cfg.peers], model_kwargs={DEMO_MODEL: dict(cfg.model_kwargs)},
        batch_sizes=[1, 32] if not cfg.quick else [8], img_sizes=[cfg.img_size], train_batch=0,
        scaling_sizes=[], num_classes=num_classes, threads=threads, warmup=2 if not cfg.quick else 1,
        rounds=5 if not cfg.quick else 2, min_block_s=0.2 if not cfg.quick else 0.05, memory=False,
        fuse=True, channels_last=True, command="fastervit demo",
    )
    previous_threads = torch.get_num_threads()
    try:
        result = run_benchmark(bench_cfg, progress=False)
    finally:
        torch.set_num_threads(previous_threads)
    write_reports(result, out / "bench")
    return result


# ---- 6. report ------------------------------------------------------------------------------------------------


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _param_count(name: str, kwargs: dict[str, Any], num_classes: int) -> int:
    with torch.device("meta"):  # shapes only, no memory
        return _params(timm.create_model(name, num_classes=num_classes, **kwargs))


def _bench_table(result: dict[str, Any], cfg: DemoConfig, num_classes: int) -> list[str]:
    """Inference rows of the benchmark; the demo model is labelled as such (it is not FasterViT-0)."""
    lines = [
        "| model | params | batch | img/s | latency (ms) | GMACs/img |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["rows"]:
        if row["kind"] != "infer" or row["img_size"] != cfg.img_size:
            continue
        kwargs = cfg.model_kwargs if row["model"] == DEMO_MODEL else {}
        label = "FasterViT (demo model)" if kwargs else row["model"]
        params = f"{_param_count(row['model'], kwargs, num_classes) / 1e6:.1f}M"
        if row["status"] != "ok":
            lines.append(f"| {label} | {params} | {row['batch']} | {row['status']} | | |")
            continue
        gmacs = f"{row['gmacs_per_img']:.3f}" if row.get("gmacs_per_img") is not None else "-"
        lines.append(f"| {label} | {params} | {row['batch']} | {row['img_per_s']:.0f} | {row['latency_ms']:.1f} "
                     f"| {gmacs} |")
    return lines


def _budget_note(facts: dict[str, Any]) -> str:
    minutes = facts.get("epochs_chosen_for_minutes")
    if not minutes:
        return ""
    return f" (as many as fit a {minutes:g}-minute budget here, with {facts['threads']} torch thread(s))"


def write_report(cfg: DemoConfig, out: Path, facts: dict[str, Any]) -> Path:
    """``REPORT.md``: what was trained, how well it does, what it predicts, how fast it runs."""
    trained, val, preds = facts["train"], facts["validate"], facts["predictions"]
    rel = lambda p: os.path.relpath(p, out)  # noqa: E731  (paths in the report are relative to it)
    weights = rel(facts["weights"])
    lines = [
        "# FasterViT demo: trained from scratch on tiny-imagenet-10",
        "",
        f"{'**Quick mode** (tiny budget: the accuracy is meaningless). ' if cfg.quick else ''}"
        f"Total time {facts['seconds'] / 60:.1f} min on {facts['machine']} ("
        + ", ".join(f"{name} {sec:.0f} s" for name, sec in facts["stage_seconds"].items()) + ").",
        "",
        "## Model and training",
        "",
        f"- model: `{DEMO_MODEL}` with `{json.dumps(facts['model_kwargs'])}`, "
        f"{facts['params']:,} parameters, input {cfg.img_size} px",
        f"- data: `{facts['data']}`, {val['count']} held-out val photos, 10 classes (chance 10%)",
        f"- schedule: {trained['epochs']} epochs{_budget_note(facts)}, batch {cfg.batch_size}, AdamW lr {cfg.lr:g} "
        "(cosine), weight decay 0.05, label smoothing 0.1, no EMA, light augmentation (random resized crops, "
        "flips, colour jitter)",
        f"- training time: {trained['seconds'] / 60:.1f} min; best val top-1 {trained['best_top1']:.1f}% "
        f"(epoch {trained.get('best_epoch')}), final {trained['final_top1']:.1f}%",
        "",
        f"![training curves]({rel(trained['curves_png'])})",
        "",
        "## Validation",
        "",
        f"`{weights}` on the val split: **top-1 {val['top1']:.1f}%**, top-5 {val['top5']:.1f}%, "
        f"loss {val['loss']:.3f} ({val['count']} images, input {val['input_size'][-1]} px, "
        f"crop_pct {val['crop_pct']}, {val['interpolation']}).",
        "",
        "## Predictions on held-out photos",
        "",
        f"![predictions]({rel(facts['predictions_png'])})",
        "",
        "| photo | true class | top-3 |",
        "|---|---|---|",
    ]
    for pred, truth in zip(preds, facts["truths"]):
        top = ", ".join(f"{label} ({100 * p:.0f}%)" for label, p in zip(pred.labels, pred.probs))
        lines.append(f"| {Path(pred.image).name} | {truth} | {top} |")
    if facts.get("bench"):
        lines += ["", f"## Inference speed (CPU, {facts['threads']} torch thread(s), {cfg.img_size} px, fp32, "
                  "each model in its inference form (fused, channels_last), against small timm CNNs)", ""]
        lines += _bench_table(facts["bench"], cfg, num_classes=len(facts["class_names"]))
        lines += ["", "Full benchmark output: [bench/bench.md](bench/bench.md)."]
    lines += [
        "",
        "## Reproduce",
        "",
        "```bash",
        f"fastervit demo --output {out}{' --quick' if cfg.quick else ''}",
        f"fastervit validate {facts['data']} --checkpoint {facts['weights']}",
        f"fastervit predict {preds[0].image} --checkpoint {facts['weights']}",
        "```",
        "",
    ]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines))
    return path


# ---- the whole demo -------------------------------------------------------------------------------------------


def _machine() -> str:
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}"


class _Stages:
    """Announces the demo's steps on stderr and records how long each took."""

    def __init__(self, cfg: DemoConfig, total: int):
        self.cfg, self.total, self.seconds = cfg, total, {}

    @contextlib.contextmanager
    def __call__(self, name: str, message: str):
        _log(self.cfg, f"{len(self.seconds) + 1}/{self.total} {message}")
        start = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - start


def run_demo(cfg: DemoConfig) -> dict[str, Any]:
    """Run the demo end to end; returns the facts written to ``REPORT.md`` (and ``demo.json``)."""
    cfg = budget(cfg)
    started = time.perf_counter()
    data = Path(cfg.data) if cfg.data else data_path(DEMO_DATA)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    stage = _Stages(cfg, total=5 if cfg.bench else 4)

    train_set = open_eval_dataset(data, split="train")
    names = class_names_of(train_set)
    with stage("plan", "measuring the training speed of this machine"):
        plan = plan_training(cfg, cfg.train_images or len(train_set), len(names))
    if plan.epoch_seconds is not None:
        _log(cfg, f"{plan.epochs} epochs fit {cfg.minutes:g} min here (about {plan.epoch_seconds:.0f} s per epoch "
                  f"with {plan.threads} thread(s))")
    cfg = dataclasses.replace(cfg, epochs=plan.epochs)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(plan.threads)
    try:
        with stage("train", f"training {DEMO_MODEL} {cfg.model_kwargs} on {data} for {cfg.epochs} epochs"):
            trained = train_model(cfg, data, out)
            weights = save_demo_weights(cfg, trained["best_checkpoint"], names, out / "fastervit_demo.safetensors")
        with stage("validate", f"validating {weights}"):
            val = validate(None, data, checkpoint=weights, workers=cfg.workers, device="cpu")
        with stage("predict", "classifying one held-out photo per class"):
            picks = held_out_images(data, cfg.seed)
            preds = predict([p for p, _ in picks], checkpoint=weights, topk=3, device="cpu")
            truths = [t for _, t in picks]
            figure = plot_predictions(preds, truths, out / "predictions.png")
    finally:
        torch.set_num_threads(previous_threads)
    bench = None
    if cfg.bench:
        with stage("bench", f"benchmarking against {', '.join(cfg.peers)}"):
            bench = run_bench(cfg, out, num_classes=len(names), threads=plan.threads)

    model = load_model(weights)
    facts = {
        "data": str(data), "class_names": names, "machine": _machine(), "model_kwargs": cfg.model_kwargs,
        "params": _params(model),
        "train": trained, "validate": val, "predictions": preds, "truths": truths,
        "predictions_png": str(figure), "weights": str(weights), "bench": bench,
        "stage_seconds": stage.seconds, "seconds": time.perf_counter() - started,
        "epochs_chosen_for_minutes": cfg.minutes if plan.epoch_seconds is not None else None,
        "threads": plan.threads,
    }
    report = write_report(cfg, out, facts)
    _log(cfg, f"done in {facts['seconds'] / 60:.1f} min: {report}")
    summary = {k: v for k, v in facts.items() if k not in ("bench", "predictions")}
    summary["predictions"] = [dataclasses.asdict(p) for p in preds]
    summary["report"] = str(report)
    (out / "demo.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary
