"""Figures of the benchmarks (PNG): accuracy against throughput, and the cost of an image against its size.

The figures are the paper's Figure 1 (published ImageNet top-1 against measured throughput), the cost of one image
against the input side (how each model scales from 224 px up to 1024 px), and, for the dense benchmark, the cost of a
backbone call against the input size. Each reads the dict returned by
:func:`open_fastervit.bench.classification.run_benchmark` or :func:`open_fastervit.bench.dense.run_dense`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib import ticker

__all__ = ["dense_series", "find_dense_row", "find_row", "plot_accuracy_vs_throughput", "plot_dense_time_vs_size",
           "plot_time_vs_size", "pyplot"]


def find_row(result: dict[str, Any], model: str, kind: str, batch: int, size: int, precision: str
             ) -> dict[str, Any] | None:
    """The row of a classification result for one model, kind, batch, size and precision (None: not measured)."""
    for row in result["rows"]:
        if (row["model"], row["kind"], row["batch"], row["img_size"], row["precision"]) == (
                model, kind, batch, size, precision):
            return row
    return None


def dense_series(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(model, form) pairs of a dense result, in the order of the configuration."""
    return [(m, f) for m in result["config"]["models"] for f in result["candidates"][m]["forms"]]


def find_dense_row(result: dict[str, Any], model: str, form: str, kind: str, size: str, precision: str
                   ) -> dict[str, Any] | None:
    """The row of a dense result for one model, form, kind, size (``HxW``) and precision (None: not measured)."""
    for row in result["rows"]:
        if (row["model"], row["form"], row["kind"], row["size"], row["precision"]) == (model, form, kind, size,
                                                                                       precision):
            return row
    return None


def pyplot() -> Any:
    """``matplotlib.pyplot`` with the non-interactive Agg backend (figures are only written to files)."""
    matplotlib.use("Agg")
    # pyplot settles on a backend when it is first imported: imported here, after Agg is chosen
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy_vs_throughput(result: dict[str, Any], path: Path) -> str | None:
    """Published top-1 against measured throughput (the paper's Figure 1); None when written.

    Uses the inference rows at the largest batch and the first input size, one marker per precision.
    On CUDA the published A100 numbers are drawn as hollow markers for comparison.
    """
    cfg = result["config"]
    if not cfg["batch_sizes"]:
        return "skipped: no inference batch sizes"
    batch, size = max(cfg["batch_sizes"]), cfg["img_sizes"][0]
    info = result["candidates"]
    points = [(r["model"], r["precision"], r["img_per_s"], info[r["model"]]["published_top1"])
              for r in result["rows"]
              if r["kind"] == "infer" and r["batch"] == batch and r["img_size"] == size
              and r["status"] == "ok" and "published_top1" in info[r["model"]]]
    if not points:
        return "skipped: no measured candidate has a published top-1 (give --top1 NAME=ACC)"
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    for marker, precision in zip("osD^", cfg["precisions"]):
        chosen = [p for p in points if p[1] == precision]
        dots = ax.scatter([p[2] for p in chosen], [p[3] for p in chosen], marker=marker, label=precision,
                          zorder=3)
        family = sorted((p[3], p[2]) for p in chosen if info[p[0]]["source"] == "open_fastervit")
        if len(family) > 1:  # the FasterViT curve, as in the paper's figure
            ax.plot([f[1] for f in family], [f[0] for f in family], color=dots.get_facecolor()[0], alpha=0.6)
        for i, (model, _, x, y) in enumerate(sorted(chosen, key=lambda p: p[2])):
            # alternate above/below so that neighbours (ours and the official model) stay readable
            ax.annotate(model, (x, y), textcoords="offset points", xytext=(4, 5 if i % 2 == 0 else -12),
                        fontsize=8)
    if result["env"]["device"].startswith("cuda"):
        ref = [(i["published_a100_img_s"], i["published_top1"]) for i in info.values()
               if "published_a100_img_s" in i and "published_top1" in i]
        if ref:
            ax.scatter(*zip(*ref), facecolors="none", edgecolors="grey", label="paper (A100, batch 128)")
    ax.set_xlabel(f"measured throughput (img/s), batch {batch}, {size} px, {result['env']['device']}")
    ax.set_ylabel("published ImageNet-1K top-1 (%)")
    ax.margins(x=0.12, y=0.12)  # room for the labels
    ax.set_title("Accuracy against throughput")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def plot_time_vs_size(result: dict[str, Any], path: Path) -> str | None:
    """Milliseconds per image against the input side, log-log, one line per model; None when written."""
    cfg = result["config"]
    sizes = sorted(set(cfg["scaling_sizes"]))
    if len(sizes) < 2:
        return "skipped: fewer than two scaling sizes"
    batch, precision = cfg["scaling_batch"], cfg["precisions"][0]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    drawn = 0
    for model in cfg["models"]:
        rows = [find_row(result, model, "infer", batch, s, precision) for s in sizes]
        pts = [(r["img_size"], r["latency_ms"] / batch) for r in rows if r and r["status"] == "ok"]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=model)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return "skipped: no model ran at the scaling sizes"
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.xaxis.set_minor_locator(ticker.NullLocator())
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.set_xlabel("input side (px)")
    ax.set_ylabel("ms per image")
    ax.set_title(f"Cost against input size (batch {batch}, {precision}, {result['env']['device']})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def plot_dense_time_vs_size(result: dict[str, Any], path: Path) -> str | None:
    """Milliseconds per image at each inference size (sizes by pixel count), one line per model and form."""
    cfg = result["config"]
    sizes = sorted(cfg["sizes"], key=lambda s: (math.prod(int(v) for v in s.split("x")), s))
    if not sizes:
        return "skipped: no inference sizes"
    precision = cfg["precisions"][0]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    drawn = 0
    for model, form in dense_series(result):
        pts = []
        for i, size in enumerate(sizes):
            row = find_dense_row(result, model, form, "infer", size, precision)
            if row is not None and row["status"] == "ok":
                pts.append((i, row["latency_ms"] / row["batch"]))
        if pts:
            style = "--" if form == "fused" else "-"
            ax.plot(*zip(*pts), style, marker="o", label=f"{model} ({form})" if len(cfg["forms"]) > 1 else model)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return "skipped: no model ran at the inference sizes"
    ax.set_xticks(range(len(sizes)), [f"{s}\n{math.prod(int(v) for v in s.split('x')) / 1e6:.2f} MP" for s in sizes])
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(ticker.NullFormatter())
    ax.margins(x=0.08)
    ax.set_xlabel("input size (H x W)")
    ax.set_ylabel("ms per image")
    ax.set_title(f"Backbone cost against input size (batch {cfg['batch']}, {precision}, {result['env']['device']})")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
