"""``fastervit bench --dense``: backbones (all four stage maps) at detection and segmentation input sizes.

The candidates, their forms and the work timed are described in :mod:`open_fastervit.bench.backbones`. Timing
reuses :func:`open_fastervit.bench.timing.measure_interleaved`: all members of one workload run in turn after
warm-up, medians of per-call times; ratios are medians of per-round ratios (against a baseline, default Swin-T, and,
for FasterViT, fused against plain).

Before timing, every candidate runs once at each size (fp32, batch of the workload; MACs counted with
``FlopCounterMode`` on that pass), and the fused FasterViT maps are compared with the plain ones: the largest
``max|fused - plain| / max|plain|`` over the four maps must stay within ``check_tol`` (1e-5); TF32 is off during
the check on CUDA. The result is in the JSON (``checks``) and the Markdown.

Python API: :class:`DenseConfig`, :func:`run_dense` (JSON-ready dict), :func:`write_dense_reports`,
:func:`profile_forward` (:mod:`open_fastervit.bench.profile`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from open_fastervit.bench.backbones import (
    DEFAULT_DENSE_MODELS,
    DEFAULT_DENSE_SIZES,
    DEFAULT_TRAIN_SIZES,
    Builder,
    Candidate,
    DenseConfig,
    DenseGroup,
    dense_inputs,
    exact_fp32,
    make_dense_infer_step,
    make_dense_train_step,
    map_rel_errors,
    output_maps,
    parse_sizes,
    plan_dense_groups,
    size_label,
)
from open_fastervit.bench.candidates import check_model_names, import_plugins, source_of
from open_fastervit.bench.environment import environment, load_average
from open_fastervit.bench.memory import peak_memory_mb
from open_fastervit.bench.profile import op_category, profile_forward
from open_fastervit.bench.report import dense_markdown, write_dense_reports
from open_fastervit.bench.timing import (
    BenchError,
    Progress,
    Step,
    Timer,
    auto_iters,
    device_sync,
    measure_interleaved,
    per_round_ratio,
    resolve_device,
    run_settings,
    timing_fields,
)

__all__ = [
    "DEFAULT_DENSE_MODELS",
    "DEFAULT_DENSE_SIZES",
    "DEFAULT_TRAIN_SIZES",
    "SCHEMA",
    "DenseConfig",
    "add_dense_ratios",
    "base_dense_row",
    "dense_markdown",
    "group_steps",
    "map_rel_errors",
    "op_category",
    "parse_sizes",
    "probe",
    "profile_forward",
    "run_dense",
    "run_dense_group",
    "write_dense_reports",
]

SCHEMA = "open_fastervit.bench_dense/1"


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def probe(cand: Candidate, x: torch.Tensor, config: DenseConfig, info: dict[str, Any], group: DenseGroup,
          checks: list[dict[str, Any]]) -> float | None:
    """First pass of a candidate at a size (fp32, eval): map shapes, GMAC per image, fused-vs-plain check.

    Doubles as the first warm-up call. Returns GMAC per image of the forward (None when not counted).
    Raises when the model cannot run at this size.
    """
    label = size_label(group.size)
    counter = FlopCounterMode(display=False) if config.macs else contextlib.nullcontext()
    was_training = cand.model.training
    cand.model.eval()
    try:
        with exact_fp32(), torch.inference_mode():
            with counter:
                plain = output_maps(cand.model(x))
            fused = output_maps(cand.fused(x)) if cand.fused is not None and group.kind == "infer" else None
    finally:
        cand.model.train(was_training)
    info.setdefault("maps", {})[label] = [list(m.shape[1:]) for m in plain]
    if fused is not None and config.check:
        errors = map_rel_errors(plain, fused)
        worst = max(errors)
        checks.append({"model": cand.name, "size": label, "batch": x.shape[0], "max_rel_err": worst,
                       "per_map": errors, "tol": config.check_tol, "ok": worst <= config.check_tol})
    if not config.macs:
        return None
    return counter.get_total_flops() / 2 / 1e9 / x.shape[0]  # type: ignore[union-attr]


def group_steps(group: DenseGroup, cands: dict[str, Candidate], x: torch.Tensor, config: DenseConfig
                ) -> dict[tuple[str, str, str], Step]:
    """The step of every (model, form, precision) of a workload; models put in its mode."""
    steps: dict[tuple[str, str, str], Step] = {}
    for name, cand in cands.items():
        cand.model.train(group.kind == "train")
        params = [p for p in cand.model.parameters() if p.requires_grad]
        for form, fn in cand.run.items():
            for precision in config.precisions:
                steps[name, form, precision] = (
                    make_dense_infer_step(fn, x, precision) if group.kind == "infer"
                    else make_dense_train_step(fn, params, x, precision))
    return steps


def base_dense_row(name: str, form: str, group: DenseGroup, precision: str) -> dict[str, Any]:
    """The identifying fields of a result row."""
    h, w = group.size
    return {"model": name, "source": source_of(name), "form": form, "kind": group.kind, "batch": group.batch,
            "size": size_label(group.size), "height": h, "width": w, "megapixels": h * w / 1e6,
            "precision": precision, "status": "ok"}


def run_dense_group(group: DenseGroup, builder: Builder, config: DenseConfig, device: torch.device, timer: Timer,
                    progress: Progress, info: dict[str, dict[str, Any]], checks: list[dict[str, Any]]
                    ) -> list[dict[str, Any]]:
    """Build, probe, warm up and time every member of one workload, interleaved; one result row each."""
    sync = device_sync(device)
    x = dense_inputs(group.batch, group.size, device, config.channels_last)
    cands: dict[str, Candidate] = {}
    gmacs: dict[str, float | None] = {}
    unavailable: dict[str, str] = {}
    for name in config.models:
        try:
            cand = builder.get(name, group.size, group.kind)
            gmacs[name] = probe(cand, x, config, info[name], group, checks)
            info[name].setdefault("params", sum(p.numel() for p in cand.model.parameters()))
            cands[name] = cand
        except BenchError:
            raise
        except Exception as exc:  # a model that cannot run at this size is reported, the others go on
            unavailable[name] = f"n/a ({_error_text(exc)})"
    steps = group_steps(group, cands, x, config)
    progress.start_group(f"{group.kind} b{group.batch} {size_label(group.size)}",
                         (config.warmup + config.rounds + int(config.memory)) * len(steps))
    mem: dict[tuple[str, str, str], float | None] = {}
    errors: dict[tuple[str, str, str], str] = {}
    if config.memory:  # the memory pass is the first warm-up call of every member
        for key, step in steps.items():
            try:
                mem[key] = peak_memory_mb(step, device, cands[key[0]].compiled)
            except Exception as exc:
                errors[key] = _error_text(exc)
            progress.tick()
    live = {k: s for k, s in steps.items() if k not in errors}
    warmup = max(config.warmup, 1) if config.compile_mode else config.warmup  # compiling is not timed
    warm, late = measure_interleaved(live, warmup=warmup, rounds=0, timer=timer, sync=sync,
                                     tick=progress.tick)
    errors.update(late)
    iters = {k: config.iters or auto_iters(live[k], config.min_block_s, sync, timer) for k in warm}
    samples, late = measure_interleaved({k: live[k] for k in iters}, warmup=0, rounds=config.rounds, iters=iters,
                                        timer=timer, sync=sync, tick=progress.tick)
    errors.update(late)
    rows = []
    for key in steps:
        name, form, precision = key
        row = base_dense_row(name, form, group, precision)
        if key in samples:
            g = gmacs.get(name)
            work = None if g is None else (g if group.kind == "infer" else 3 * g)
            row.update(timing_fields(samples[key], group.batch, iters[key], work, mem.get(key)))
        else:
            row["status"] = f"error ({errors.get(key, 'unknown')})"
        rows.append(row)
    for name, reason in unavailable.items():
        forms = config.forms_for(name) if group.kind == "infer" else ["train"]
        rows += [{**base_dense_row(name, f, group, p), "status": reason} for f in forms for p in config.precisions]
    return rows


def add_dense_ratios(rows: list[dict[str, Any]], baseline: str) -> None:
    """In place: ``vs_baseline`` (throughput / the baseline's, same workload and precision, baseline as built)
    and, for fused rows, ``fused_vs_plain`` (fused throughput / plain throughput of the same model)."""
    index = {(r["model"], r["form"], r["kind"], r["batch"], r["size"], r["precision"]): r for r in rows}
    for row in rows:
        base_form = "plain" if row["kind"] == "infer" else "train"
        key = (row["kind"], row["batch"], row["size"], row["precision"])
        ratio = per_round_ratio(index.get((baseline, base_form, *key)), row)
        row["vs_baseline"] = {"baseline": baseline, **ratio}
        row["ratio_vs_baseline"] = ratio["median"]
        if row["form"] == "fused":
            row["fused_vs_plain"] = per_round_ratio(index.get((row["model"], "plain", *key)), row)


def run_dense(config: DenseConfig, *, timer: Timer = time.perf_counter, progress: bool = True) -> dict[str, Any]:
    """Run the dense benchmark; returns a self-describing, JSON-ready dict (``rows``, ``checks``, ``env``).

    torch's thread count and ``cudnn.benchmark`` are restored afterwards.
    """
    config.validate()
    import_plugins(config.imports)
    check_model_names(config.models)
    device = resolve_device(config.device)
    with run_settings(config.threads, device):
        return _run_dense(config, device, timer, progress)


def _run_dense(config: DenseConfig, device: torch.device, timer: Timer, progress: bool) -> dict[str, Any]:
    env = environment(device)
    started = time.perf_counter()
    info: dict[str, dict[str, Any]] = {
        name: {"source": source_of(name), "model_kwargs": config.kwargs_for(name), "forms": config.forms_for(name)}
        for name in config.models}
    groups = plan_dense_groups(config)
    members = sum(len(config.forms_for(n)) if g.kind == "infer" else 1 for g in groups for n in config.models)
    bar = Progress((config.warmup + config.rounds + int(config.memory)) * members * len(config.precisions),
                    progress)
    builder = Builder(config, device)
    rows: list[dict[str, Any]] = []
    checks: list[dict[str, Any]] = []
    try:
        for group in groups:
            rows.extend(run_dense_group(group, builder, config, device, timer, bar, info, checks))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        bar.close()
        del builder
    for name, entry in info.items():
        with contextlib.suppress(Exception):
            entry["output_fmt"] = _output_fmt(name)
    add_dense_ratios(rows, config.baseline_name())
    env["load_average_1m_end"] = load_average()
    env["wall_s"] = time.perf_counter() - started
    cfg = dataclasses.asdict(config)
    cfg["sizes"] = [size_label(s) for s in config.sizes]
    cfg["train_sizes"] = [size_label(s) for s in config.train_sizes]
    cfg["baseline"] = config.baseline_name()
    return {"schema": SCHEMA, "env": env, "config": cfg, "candidates": info, "checks": checks,
            "checks_ok": all(c["ok"] for c in checks), "rows": rows}


def _output_fmt(name: str) -> str:
    """Layout of the returned maps: FasterViT and ConvNeXt NCHW; timm's Swin NHWC (as timm returns them)."""
    if source_of(name) == "open_fastervit":
        return "NCHW"
    return "NHWC" if name.startswith("swin") else "NCHW"
