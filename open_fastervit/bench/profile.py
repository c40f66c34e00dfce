"""``fastervit bench --profile``: where the time of one backbone call goes.

:func:`profile_forward` runs ``torch.profiler`` on one call of one model, form and size and writes the top operators
by self CPU time with their shares, plus the shares by category (matmul, convolution, attention, ...).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from open_fastervit.bench.backbones import (
    FORMS,
    Builder,
    DenseConfig,
    Size,
    dense_inputs,
    make_dense_infer_step,
    make_dense_train_step,
    size_label,
)
from open_fastervit.bench.candidates import check_model_names, import_plugins
from open_fastervit.bench.timing import BenchError, device_sync, resolve_device

__all__ = ["OP_CATEGORIES", "op_category", "profile_forward", "profile_markdown"]

#: Operator categories of the profile (first match wins; names are torch's ``aten::``/``mkldnn::`` keys).
OP_CATEGORIES: tuple[tuple[str, str], ...] = (
    ("autograd engine (backward nodes)", r"^autograd::|Backward\d*$"),
    ("attention", r"scaled_dot_product|flash_attention|efficient_attention|_softmax|softmax"),
    ("convolution", r"conv|cudnn_convolution|mkldnn_convolution|_convolution_pointwise"),
    ("matmul (addmm/mm/bmm/linear)", r"addmm|\bmm\b|::mm$|bmm|matmul|linear|_linear_pointwise|baddbmm|gemm"),
    ("normalization", r"layer_norm|batch_norm|group_norm|native_norm"),
    ("activation (gelu/relu/silu)", r"gelu|relu|silu|hardswish|sigmoid|tanh"),
    ("copies and layout", r"copy|contiguous|clone|cat$|::cat|_to_copy|::to$|roll|pad|index|stack|empty|fill|zero|"
                          r"permute|transpose|reshape|view|expand|as_strided|unfold|split|chunk|slice|select"),
    ("elementwise", r"::add|::mul|::sub|::div|::neg|::exp|::sqrt|::rsqrt|::pow|::where|::masked_fill|::sum|::mean"),
)




def op_category(name: str) -> str:
    """The category of an operator name (``aten::addmm`` -> matmul), ``other`` when none matches."""
    for category, pattern in OP_CATEGORIES:
        if re.search(pattern, name):
            return category
    return "other"


def profile_forward(config: DenseConfig, model: str, form: str, size: Size, out_dir: str | Path, *,
                    batch: int | None = None, top: int = 25) -> dict[str, Any]:
    """``torch.profiler`` on one call (after two warm-up calls) of ``model`` in ``form`` (plain, fused, train).

    Writes ``profile_<model>_<form>_<HxW>.json`` / ``.md`` into ``out_dir``: the ``top`` operators by self CPU
    time with their share of the total self CPU time, and the shares by category. Returns the JSON dict, with the
    written ``paths``.

    Raises:
        BenchError: an unknown form or model, or a configuration that cannot run.
    """
    if form not in (*FORMS, "train"):
        raise BenchError(f"--profile-form must be plain, fused or train, got {form!r}")
    config = dataclasses.replace(config, models=[model], forms=["fused"] if form == "fused" else ["plain"])
    config.validate()
    import_plugins(config.imports)
    check_model_names([model])
    device = resolve_device(config.device)
    kind = "train" if form == "train" else "infer"
    batch = batch or (config.train_batch if kind == "train" else config.batch) or 1
    threads_before = torch.get_num_threads()
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.backends.cudnn.benchmark = device.type == "cuda"
        cand = Builder(config, device).get(model, size, kind)
        cand.model.train(kind == "train")
        x = dense_inputs(batch, size, device, config.channels_last)
        precision = config.precisions[0]
        params = [p for p in cand.model.parameters() if p.requires_grad]
        ran = form if form in cand.run else "plain"  # peers have no fused form: as built
        step = (make_dense_train_step(cand.run["train"], params, x, precision) if kind == "train"
                else make_dense_infer_step(cand.run[ran], x, precision))
        sync = device_sync(device)
        for _ in range(2):
            step()
        sync()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        started = time.perf_counter()
        with profile(activities=activities) as prof:
            step()
            sync()
        wall = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads_before)
    result = _profile_table(prof.key_averages(), top)
    result.update(model=model, form=form if kind == "train" else ran, size=size_label(size), batch=batch,
                  precision=config.precisions[0],
                  device=str(device), threads=config.threads or torch.get_num_threads(),
                  channels_last=config.channels_last, wall_ms=1e3 * wall, command=config.command)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"profile_{model}_{form}_{size_label(size)}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{stem}.md").write_text(profile_markdown(result))
    result["paths"] = [str(out / f"{stem}.json"), str(out / f"{stem}.md")]
    return result


def _profile_table(events: Any, top: int) -> dict[str, Any]:
    """Operators by self CPU time (and self device time on CUDA) with % shares, plus shares by category."""
    ops = []
    for evt in events:
        device_us = getattr(evt, "self_device_time_total", 0) or getattr(evt, "self_cuda_time_total", 0) or 0
        ops.append({"name": evt.key, "calls": int(evt.count), "self_cpu_ms": evt.self_cpu_time_total / 1e3,
                    "cpu_total_ms": evt.cpu_time_total / 1e3, "self_device_ms": device_us / 1e3,
                    "category": op_category(evt.key)})
    total = sum(o["self_cpu_ms"] for o in ops) or 1.0
    total_dev = sum(o["self_device_ms"] for o in ops)
    for o in ops:
        o["pct_self_cpu"] = 100.0 * o["self_cpu_ms"] / total
        o["pct_self_device"] = 100.0 * o["self_device_ms"] / total_dev if total_dev else None
    ops.sort(key=lambda o: -o["self_cpu_ms"])
    categories: dict[str, dict[str, float]] = {}
    for o in ops:
        entry = categories.setdefault(o["category"], {"self_cpu_ms": 0.0, "pct_self_cpu": 0.0, "ops": 0})
        entry["self_cpu_ms"] += o["self_cpu_ms"]
        entry["pct_self_cpu"] += o["pct_self_cpu"]
        entry["ops"] += 1
        if total_dev:
            entry["pct_self_device"] = entry.get("pct_self_device", 0.0) + o["pct_self_device"]
    ordered = dict(sorted(categories.items(), key=lambda kv: -kv[1]["self_cpu_ms"]))
    return {"total_self_cpu_ms": total, "total_self_device_ms": total_dev, "top": ops[:top], "categories": ordered,
            "op_count": len(ops)}


def profile_markdown(result: dict[str, Any]) -> str:
    """The profile as Markdown: shares by category, then the top operators."""
    dev = bool(result["total_self_device_ms"])
    lines = [
        f"# Profile: {result['model']} ({result['form']}), {result['size']}, batch {result['batch']}, "
        f"{result['precision']}, {result['device']}",
        "",
        f"- one call after two warm-up calls; {result['threads']} threads; channels_last {result['channels_last']}; "
        f"wall {result['wall_ms']:.1f} ms under the profiler; total self CPU time {result['total_self_cpu_ms']:.1f} ms"
        + (f"; total self device time {result['total_self_device_ms']:.1f} ms" if dev else ""),
        f"- command: `{result.get('command') or '(Python API)'}`",
        "",
        "## Where the time goes (self CPU time by category)",
        "",
        "| category | self CPU ms | share |" + (" device share |" if dev else ""),
        "|---|---:|---:|" + ("---:|" if dev else ""),
    ]
    for name, c in result["categories"].items():
        lines.append(f"| {name} | {c['self_cpu_ms']:.1f} | {c['pct_self_cpu']:.1f}% |"
                     + (f" {c.get('pct_self_device', 0.0):.1f}% |" if dev else ""))
    lines += ["", f"## Top {len(result['top'])} operators by self CPU time", "",
              "| operator | category | calls | self CPU ms | share | CPU total ms |",
              "|---|---|---:|---:|---:|---:|"]
    lines += [f"| `{o['name']}` | {o['category']} | {o['calls']} | {o['self_cpu_ms']:.2f} | {o['pct_self_cpu']:.1f}% "
              f"| {o['cpu_total_ms']:.2f} |" for o in result["top"]]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------------------------------
