"""Reports of a ``fastervit bench`` run: JSON, CSV, a Markdown summary and two PNG figures.

The figures are the paper's Figure 1 (published ImageNet top-1 against measured throughput) and the
cost of one image against the input side (how each model scales from 224 px up to 1024 px).
Everything here reads the dict returned by :func:`open_fastervit.bench.run_benchmark`.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

__all__ = ["CSV_COLUMNS", "markdown_report", "plot_accuracy_vs_throughput", "plot_time_vs_size",
           "write_reports"]

CSV_COLUMNS = [
    "model", "source", "kind", "batch", "img_size", "precision", "status", "img_per_s", "latency_ms",
    "q1_ms", "q3_ms", "min_ms", "max_ms", "spread_pct", "rounds", "iters", "ratio_vs_baseline",
    "ratio_min", "ratio_max", "baseline", "gmacs_per_img", "gmacs_per_s", "pct_of_fp32_gemm", "pct_of_precision_gemm",
    "peak_mem_mb",
]
PRECISION_ORDER = {"fp32": 0, "bf16": 1, "fp16": 2}
KIND_TITLES = {"infer": "Inference", "train": "Training step (forward + backward + AdamW)"}


def write_reports(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``bench.json``, ``bench.csv``, ``bench.md`` and the PNG figures into ``out_dir``.

    A figure without data (no published top-1, fewer than two sizes) is skipped and the reason is
    recorded under ``result["plots"]``. Returns the written paths by kind; raises ``OSError`` when the
    folder cannot be written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    result["plots"] = {}
    for key, name, plot in (("accuracy_png", "accuracy_vs_throughput.png", plot_accuracy_vs_throughput),
                            ("scaling_png", "time_vs_size.png", plot_time_vs_size)):
        skipped = plot(result, out / name)
        result["plots"][name] = skipped or "written"
        if skipped is None:
            paths[key] = out / name
    paths["json"] = out / "bench.json"
    paths["json"].write_text(json.dumps(result, indent=2, default=str) + "\n")
    paths["csv"] = write_csv(result, out / "bench.csv")
    paths["markdown"] = out / "bench.md"
    paths["markdown"].write_text(markdown_report(result))
    return paths


def write_csv(result: dict[str, Any], path: Path) -> Path:
    """One line per result row, fixed columns (raw samples stay in the JSON)."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in _sorted_rows(result, None):
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_COLUMNS})
    return path


def _csv_value(value: Any) -> Any:
    return f"{value:.6g}" if isinstance(value, float) else ("" if value is None else value)


def _sorted_rows(result: dict[str, Any], kind: str | None) -> list[dict[str, Any]]:
    order = {name: i for i, name in enumerate(result["config"]["models"])}
    rows = [r for r in result["rows"] if kind is None or r["kind"] == kind]
    return sorted(rows, key=lambda r: (r["kind"] != "infer", r["img_size"], r["batch"],
                                       PRECISION_ORDER.get(r["precision"], 9), order.get(r["model"], 99)))


# --------------------------------------------------------------------------------------------------
# Markdown
# --------------------------------------------------------------------------------------------------


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _sig(value: float | None) -> str:
    """Three significant digits, without exponents for values of 100 and more."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _ratio(ratio: dict[str, Any]) -> str:
    if ratio["median"] is None:
        return "-"
    return f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"


def _header(result: dict[str, Any]) -> list[str]:
    env, cfg = result["env"], result["config"]
    hardware = env.get("gpu") or env["cpu"]
    gemm = ", ".join(f"{p} {_num(g.get('gmacs_per_s'), 0)} GMAC/s" for p, g in result["gemm"].items())
    n = next(iter(result["gemm"].values()))["n"]
    return [
        "# Benchmark",
        "",
        f"- device: {env['device']} ({hardware}), {env['threads']} threads; torch {env['torch']}, "
        f"timm {env['timm']}, open_fastervit {env['open_fastervit']}; {env['date_utc']}",
        f"- method: {cfg['warmup']} warm-up + {cfg['rounds']} timed rounds, candidates interleaved; "
        "medians; spread = interquartile range / median; ratio = median of per-round throughput ratios "
        "(min-max) against the baseline; GMAC by torch's FlopCounterMode (training step: 3x forward); "
        "peak MiB: memory allocated during one step beyond what existed before it (CUDA: "
        "max_memory_allocated; CPU: live tensors tracked op by op, not for compiled models)",
        f"- ratios (throughput / baseline throughput) against: {', '.join(_baseline_labels(cfg))}",
        f"- options: channels_last {cfg['channels_last']}, compile {cfg['compile_mode'] or 'off'}, "
        f"fuse {cfg['fuse']}",
        f"- matrix-multiply reference ({n}x{n} GEMM): {gemm}",
        f"- machine load (1-min load average, {env['cpu_count']} cores): {_num(env.get('load_average_1m'), 2)} "
        f"at start, {_num(env.get('load_average_1m_end'), 2)} at end",
        f"- command: `{cfg['command'] or '(Python API)'}`",
    ]


def _baseline_labels(cfg: dict[str, Any]) -> list[str]:
    """``NAME:PRECISION`` as given, or ``NAME`` for a baseline at each row's own precision."""
    return list(cfg["baselines"] or cfg["models"][:1])


def _kind_table(result: dict[str, Any], kind: str) -> list[str]:
    rows = _sorted_rows(result, kind)
    if not rows:
        return []
    labels = _baseline_labels(result["config"])
    lines = [
        "", f"## {KIND_TITLES[kind]}", "",
        "| model | batch | px | precision | img/s | latency ms | spread | "
        + "".join(f"vs {label} | " for label in labels) + "GMAC/img | GMAC/s | % fp32 GEMM | peak MiB |",
        "|---|---:|---:|---|---:|---:|---:|" + "---|" * len(labels) + "---:|---:|---:|---:|",
    ]
    for r in rows:
        head = f"| {r['model']} | {r['batch']} | {r['img_size']} | {r['precision']} "
        if r["status"] != "ok":
            lines.append(head + f"| {r['status']} |" + " |" * (6 + len(labels)))
            continue
        lines.append(
            head + f"| {_num(r['img_per_s'])} | {_num(r['latency_ms'], 2)} | {_num(r['spread_pct'])}% | "
            + "".join(f"{_ratio(ratio)} | " for ratio in r["ratios"])
            + f"{_sig(r['gmacs_per_img'])} | {_sig(r['gmacs_per_s'])} "
            f"| {_num(r.get('pct_of_fp32_gemm'))} | {_num(r['peak_mem_mb'], 0)} |")
    return lines


def _scaling_table(result: dict[str, Any]) -> list[str]:
    cfg = result["config"]
    sizes = cfg["scaling_sizes"]
    if not sizes:
        return []
    batch, precision = cfg["scaling_batch"], cfg["precisions"][0]
    lines = ["", f"## Cost against input size (ms per image, batch {batch}, {precision})", "",
             "| model | " + " | ".join(f"{s} px" for s in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for model in cfg["models"]:
        cells = []
        for size in sizes:
            row = _find(result, model, "infer", batch, size, precision)
            if row is None:
                cells.append("-")
            elif row["status"] != "ok":
                cells.append(row["status"].split(" (")[0])
            else:
                cells.append(_num(row["latency_ms"] / batch, 1))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


def _find(result: dict[str, Any], model: str, kind: str, batch: int, size: int, precision: str
          ) -> dict[str, Any] | None:
    for row in result["rows"]:
        if (row["model"], row["kind"], row["batch"], row["img_size"], row["precision"]) == (
                model, kind, batch, size, precision):
            return row
    return None


FORM_TOLERANCE = 1e-3  # largest |difference| of logits between an inference form and its model still "the same"


def _candidate_notes(result: dict[str, Any]) -> list[str]:
    lines = []
    for name, info in result["candidates"].items():
        if "same_weights_as" in info:
            diffs = ", ".join(f"{s} px {d:.2e}" for s, d in info["max_abs_diff_vs_official"].items())
            lines.append(f"- {name} carries the weights of {info['same_weights_as']} "
                         f"(largest absolute output difference: {diffs})")
        form = info.get("inference_form_max_abs_diff")
        if form:
            worst = max(form.values())
            verdict = "same function" if worst <= FORM_TOLERANCE else "NOT the same function: its timings do not count"
            diffs = ", ".join(f"{s} px {d:.2e}" for s, d in form.items())
            lines.append(f"- {name}: inference form vs the model as built, largest absolute output difference {diffs} "
                         f"({verdict})")
    published = [(n, i) for n, i in result["candidates"].items()
                 if "published_top1" in i or "published_a100_img_s" in i]
    if published:
        lines += ["- published reference (not measured here): ImageNet-1K top-1; A100 batch-128 img/s "
                  "from the FasterViT README", "", "| model | top-1 | A100 img/s |", "|---|---:|---:|"]
        lines += [f"| {n} | {_num(i.get('published_top1'))} | {_num(i.get('published_a100_img_s'), 0)} |"
                  for n, i in published]
    return ["", "## Notes", "", *lines] if lines else []


def _failed_notes(result: dict[str, Any]) -> list[str]:
    bad = sorted({(r["model"], r["img_size"], r["status"]) for r in result["rows"] if r["status"] != "ok"})
    if not bad:
        return []
    return ["", "Not measured:", ""] + [f"- {m} at {s} px: {status}" for m, s, status in bad]


def markdown_report(result: dict[str, Any]) -> str:
    """A self-contained Markdown summary: environment, tables per kind, size sweep, notes."""
    lines = _header(result)
    for kind in ("infer", "train"):
        lines += _kind_table(result, kind)
    lines += _scaling_table(result)
    lines += _candidate_notes(result)
    lines += _failed_notes(result)
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
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
    plt = _pyplot()
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
    plt = _pyplot()
    from matplotlib import ticker

    fig, ax = plt.subplots(figsize=(7, 5))
    drawn = 0
    for model in cfg["models"]:
        rows = [_find(result, model, "infer", batch, s, precision) for s in sizes]
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
