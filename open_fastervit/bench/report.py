"""Reports of the benchmarks: JSON, CSV and a Markdown summary, with the figures of :mod:`open_fastervit.bench.plots`.

:func:`write_reports` writes a ``fastervit bench`` result (the dict returned by
:func:`open_fastervit.bench.classification.run_benchmark`); :func:`write_dense_reports` a ``fastervit bench --dense``
result (:func:`open_fastervit.bench.dense.run_dense`).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from open_fastervit.bench.plots import (
    dense_series,
    find_dense_row,
    find_row,
    plot_accuracy_vs_throughput,
    plot_dense_time_vs_size,
    plot_time_vs_size,
)

__all__ = ["CSV_COLUMNS", "dense_markdown", "markdown_report", "plot_accuracy_vs_throughput", "plot_time_vs_size",
           "write_csv", "write_dense_reports", "write_reports"]

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
            row = find_row(result, model, "infer", batch, size, precision)
            if row is None:
                cells.append("-")
            elif row["status"] != "ok":
                cells.append(row["status"].split(" (")[0])
            else:
                cells.append(_num(row["latency_ms"] / batch, 1))
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return lines


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
# Dense benchmark
# --------------------------------------------------------------------------------------------------


def _ratio_text(ratio: dict[str, Any] | None) -> str:
    if not ratio or ratio.get("median") is None:
        return "-"
    return f"{ratio['median']:.2f}x ({ratio['min']:.2f}-{ratio['max']:.2f})"


def _sorted_dense_rows(result: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    order = {name: i for i, name in enumerate(result["config"]["models"])}
    prec = {"fp32": 0, "bf16": 1, "fp16": 2}
    sizes = {s: i for i, s in enumerate(result["config"]["sizes"] + result["config"]["train_sizes"])}
    rows = [r for r in result["rows"] if r["kind"] == kind]
    return sorted(rows, key=lambda r: (sizes.get(r["size"], 99), prec.get(r["precision"], 9),
                                       order.get(r["model"], 99), r["form"] != "plain"))


def dense_markdown(result: dict[str, Any]) -> str:
    """A self-contained Markdown summary: environment, method, check, tables, size table, failures."""
    env, cfg = result["env"], result["config"]
    hardware = env.get("gpu") or env["cpu"]
    base = cfg["baseline"]
    lines = [
        "# Dense-prediction benchmark (backbones, maps at strides 4-32)",
        "",
        f"- device: {env['device']} ({hardware}), {env['threads']} threads; torch {env['torch']}, timm {env['timm']}; "
        f"{env['date_utc']}; wall {_num(env.get('wall_s'), 0)} s",
        f"- method: one fp32 check/probe pass, {cfg['warmup']} warm-up + {cfg['rounds']} timed rounds, members "
        "interleaved; medians; spread = interquartile range / median; ratios = median (min-max) of per-round "
        f"throughput ratios; `vs {base}` against the baseline as built; `fused / plain` = FasterViT inference form "
        "(`fuse()`) against the plain eval path (no fusion, eval mode, `torch.inference_mode()`)",
        "- work: inference = forward returning the four maps; training = forward in train mode + backward of the sum "
        "of the maps' means (no optimizer step); peers: timm `features_only=True` (Swin built for each size)",
        f"- options: channels_last {cfg['channels_last']}, compile {cfg['compile_mode'] or 'off'}, "
        f"precisions {', '.join(cfg['precisions'])}",
        f"- machine load (1-min load average, {env['cpu_count']} cores): {_num(env.get('load_average_1m'), 2)} at "
        f"start, {_num(env.get('load_average_1m_end'), 2)} at end",
        f"- command: `{cfg['command'] or '(Python API)'}`",
    ]
    if result["checks"]:
        worst = ", ".join(f"{c['model']} {c['size']} {c['max_rel_err']:.1e}{'' if c['ok'] else ' FAILED'}"
                          for c in result["checks"])
        lines.append(f"- inference form check (fp32, max |fused - plain| / max |plain| over the maps, tolerance "
                     f"{cfg['check_tol']:g}): {'all ok' if result['checks_ok'] else 'FAILED'} ({worst})")
    for kind, title in (("infer", f"Inference, batch {cfg['batch']}"),
                        ("train", f"Training step (forward + backward), batch {cfg['train_batch']}")):
        rows = _sorted_dense_rows(result, kind)
        if not rows:
            continue
        lines += ["", f"## {title}", "",
                  f"| model | form | size | precision | ms | img/s | spread | vs {base} | fused / plain | GMAC/img "
                  "| peak MiB |",
                  "|---|---|---|---|---:|---:|---:|---|---|---:|---:|"]
        for r in rows:
            head = f"| {r['model']} | {r['form']} | {r['size']} | {r['precision']} "
            if r["status"] != "ok":
                lines.append(head + f"| {r['status']} |" + " |" * 6)
                continue
            lines.append(head + f"| {_num(r['latency_ms'])} | {_num(r['img_per_s'], 2)} | {_num(r['spread_pct'])}% "
                         f"| {_ratio_text(r.get('vs_baseline'))} | {_ratio_text(r.get('fused_vs_plain'))} "
                         f"| {_sig(r.get('gmacs_per_img'))} | {_sig(r.get('peak_mem_mb'))} |")
    lines += _size_table(result)
    bad = sorted({(r["model"], r["form"], r["size"], r["status"]) for r in result["rows"] if r["status"] != "ok"})
    if bad:
        lines += ["", "Not measured:", ""] + [f"- {m} ({f}) at {s}: {st}" for m, f, s, st in bad]
    return "\n".join(lines) + "\n"


def _size_table(result: dict[str, Any]) -> list[str]:
    cfg = result["config"]
    sizes = cfg["sizes"]
    if len(sizes) < 2:
        return []
    precision = cfg["precisions"][0]
    lines = ["", f"## Milliseconds per image against input size (inference, batch {cfg['batch']}, {precision})", "",
             "| model | form | " + " | ".join(sizes) + " |", "|---|---|" + "---:|" * len(sizes)]
    for model, form in dense_series(result):
        cells = []
        for size in sizes:
            row = find_dense_row(result, model, form, "infer", size, precision)
            cells.append("-" if row is None else row["status"].split(" (")[0] if row["status"] != "ok"
                         else _num(row["latency_ms"] / row["batch"]))
        lines.append(f"| {model} | {form} | " + " | ".join(cells) + " |")
    return lines


def write_dense_reports(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``dense.json``, ``dense.md`` and ``dense_time_vs_size.png`` into ``out_dir``; returns the paths.

    A figure without data is skipped with its reason under ``result["plots"]``. Raises ``OSError`` when the folder
    cannot be written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    png = out / "dense_time_vs_size.png"
    skipped = plot_dense_time_vs_size(result, png)
    result["plots"] = {png.name: skipped or "written"}
    if skipped is None:
        paths["png"] = png
    paths["json"] = out / "dense.json"
    paths["json"].write_text(json.dumps(result, indent=2, default=str) + "\n")
    paths["markdown"] = out / "dense.md"
    paths["markdown"].write_text(dense_markdown(result))
    return paths
