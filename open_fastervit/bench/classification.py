"""``fastervit bench``: throughput, latency, training-step speed, memory and compute efficiency of classifiers.

The benchmark compares a list of candidates (:mod:`open_fastervit.bench.candidates`) - our models by name
(``fastervit_0``), timm peers by name (``convnext_tiny``), and, when the user imports it with ``--import
fastervit``, the official implementation (``faster_vit_0_224``) - on the same inputs, on CPU or CUDA, timed as
:mod:`open_fastervit.bench.timing` describes: candidates interleaved, medians of per-call times, ratios as medians
of per-round ratios.

When an official name and our model of the same architecture are both in the run, ours is given the
official model's weights (``open_fastervit.convert.official_to_ours``), so both compute the same
function; the largest output difference is recorded.

Python API: :class:`BenchConfig`, :func:`run_benchmark` (returns a JSON-ready dict) and
:func:`open_fastervit.bench.report.write_reports` (JSON, CSV, Markdown, PNG).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import itertools
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.utils.model import reparameterize_model
from torch import nn

from open_fastervit import PUBLISHED, create_model, official_to_ours
from open_fastervit.bench.candidates import (
    check_model_names,
    import_plugins,
    official_to_ours_name,
    pairs_of,
    source_of,
)
from open_fastervit.bench.environment import environment, load_average
from open_fastervit.bench.memory import count_gmacs, measure_gemm, peak_memory_mb
from open_fastervit.bench.timing import (
    BenchError,
    Progress,
    Step,
    Timer,
    auto_iters,
    autocast,
    device_sync,
    measure_interleaved,
    per_round_ratio,
    resolve_device,
    run_settings,
    timing_fields,
)
from open_fastervit.deploy.quantize import load_quantized
from open_fastervit.runtime import PRECISIONS
from open_fastervit.train import fused_optimizer_kwargs

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_SCALING_SIZES",
    "PEER_TOP1",
    "SCHEMA",
    "BenchConfig",
    "Group",
    "Prepared",
    "add_ratios",
    "base_row",
    "build_at_size",
    "candidate_info",
    "create_candidate",
    "fuse_model",
    "make_infer_step",
    "make_inputs",
    "make_optimizer",
    "make_train_step",
    "member_steps",
    "parse_model_kwargs",
    "parse_top1",
    "plan_groups",
    "prepare",
    "probe_forward",
    "run_benchmark",
    "run_group",
    "share_official_weights",
]

SCHEMA = "open_fastervit.bench/1"
DEFAULT_MODELS = ("fastervit_0", "swin_tiny_patch4_window7_224", "convnext_tiny")
DEFAULT_SCALING_SIZES = (224, 448, 672, 896, 1024)

#: Published ImageNet-1K top-1 (%) of timm peers for the throughput-vs-accuracy figure (FasterViT's own
# numbers come from open_fastervit.PUBLISHED). Swin: the ImageNet-1K model zoo of microsoft/Swin-Transformer
# (released checkpoints; the paper's Table 1 prints 81.3 / 83.0 / 83.5). ConvNeXt: Liu et al. 2022,
# Table 1 (ImageNet-1K, 224 px). DeiT: Touvron et al. 2021, Table 1.
PEER_TOP1: dict[str, float] = {
    "swin_tiny_patch4_window7_224": 81.2, "swin_small_patch4_window7_224": 83.2,
    "swin_base_patch4_window7_224": 83.5,
    "convnext_tiny": 82.1, "convnext_small": 83.1, "convnext_base": 83.8,
    "deit_tiny_patch16_224": 72.2, "deit_small_patch16_224": 79.8, "deit_base_patch16_224": 81.8,
}


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


@dataclass
class BenchConfig:
    """Everything one benchmark run measures.

    ``model_kwargs`` maps a candidate name (or ``"*"`` for all) to extra ``create_model`` arguments.
    ``train_batch`` 0 skips the training step; an empty ``scaling_sizes`` skips the input-size sweep.
    ``iters`` 0 picks, per candidate, enough calls for ``min_block_s`` seconds per timed turn.
    Each of ``baselines`` is ``NAME`` (same precision as each row) or ``NAME:PRECISION`` (one fixed
    precision); every row gets a throughput ratio against each (default: the first model).
    """

    models: list[str] = field(default_factory=lambda: list(DEFAULT_MODELS))
    batch_sizes: list[int] = field(default_factory=lambda: [1, 16])
    img_sizes: list[int] = field(default_factory=lambda: [224])
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    train_batch: int = 8
    scaling_sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SCALING_SIZES))
    scaling_batch: int = 1
    device: str = "auto"
    channels_last: bool = False
    compile_mode: str | None = None
    fuse: bool = False
    threads: int | None = None
    warmup: int = 3
    rounds: int = 7
    iters: int = 0
    min_block_s: float = 0.2
    baselines: list[str] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    num_classes: int = 1000
    top1: dict[str, float] = field(default_factory=dict)
    macs: bool = True
    memory: bool = True
    gemm_size: int | None = None
    seed: int = 0
    command: str = ""

    def validate(self) -> None:
        """Raise :class:`BenchError` on arguments that cannot describe a run."""
        if not self.models:
            raise BenchError("no models given; pass --models NAME[,NAME...]")
        if len(set(self.models)) != len(self.models):
            raise BenchError(f"models are listed more than once: {self.models}")
        for label, values in (("batch size", self.batch_sizes), ("image size", self.img_sizes),
                              ("scaling size", self.scaling_sizes)):
            if any(v <= 0 for v in values):
                raise BenchError(f"every {label} must be positive, got {values}")
        if not self.batch_sizes and self.train_batch <= 0 and not self.scaling_sizes:
            raise BenchError("nothing to measure: no batch sizes, no training step and no scaling sizes")
        if not self.img_sizes:
            raise BenchError("no image sizes given")
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown or not self.precisions:
            raise BenchError(f"precisions must be among {sorted(PRECISIONS)}, got {self.precisions}")
        if self.rounds < 1 or self.warmup < 0 or self.iters < 0 or self.scaling_batch < 1:
            raise BenchError("need rounds >= 1, warmup >= 0, iters >= 0 and scaling batch >= 1")
        if self.threads is not None and self.threads < 1:
            raise BenchError(f"threads must be >= 1, got {self.threads}")
        self.baseline_members()

    def baseline_members(self) -> list[tuple[str, str | None]]:
        """The baselines as (model, fixed precision or None); default: the first model."""
        members = []
        for text in self.baselines or [self.models[0]]:
            name, _, precision = text.partition(":")
            if name not in self.models:
                raise BenchError(f"baseline {name!r} is not among the models {self.models}")
            if precision and precision not in self.precisions:
                raise BenchError(f"baseline precision {precision!r} is not among {self.precisions}")
            members.append((name, precision or None))
        return members

    def kwargs_for(self, name: str) -> dict[str, Any]:
        """The ``create_model`` overrides of one candidate (``"*"`` first, then its own)."""
        merged = {**self.model_kwargs.get("*", {}), **self.model_kwargs.get(name, {})}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()}


@dataclass(frozen=True)
class Group:
    """One workload: every candidate runs it at each of ``precisions``, interleaved."""

    kind: str  # "infer" or "train"
    batch: int
    size: int
    precisions: tuple[str, ...]


def plan_groups(config: BenchConfig) -> list[Group]:
    """Workloads of the run, ordered by input size; the scaling sweep reuses matching groups."""
    wanted: dict[tuple[str, int, int], list[str]] = {}
    for size in config.img_sizes:
        for batch in config.batch_sizes:
            wanted[("infer", batch, size)] = list(config.precisions)
        if config.train_batch > 0:
            wanted[("train", config.train_batch, size)] = list(config.precisions)
    for size in config.scaling_sizes:
        wanted.setdefault(("infer", config.scaling_batch, size), [config.precisions[0]])
    groups = [Group(kind, batch, size, tuple(p)) for (kind, batch, size), p in wanted.items()]
    return sorted(groups, key=lambda g: (g.size, g.kind != "infer", g.batch))


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def create_candidate(name: str, size: int, config: BenchConfig, device: torch.device) -> nn.Module:
    """Build one candidate on ``device``, in eval mode, able to run ``size`` px inputs; raise if it cannot.

    The official model is fixed at build time (``resolution=size``); timm models with a fixed input size
    are rebuilt with ``img_size=size`` when the default build rejects the size. An ``.onnx`` name is an int8 file
    of ``fastervit quantize``, run by onnxruntime on CPU with torch's thread count (inference only: a run that
    times training steps stops with a message).
    """
    if source_of(name) == "int8":
        if config.train_batch > 0:
            raise BenchError(f"{name} is an int8 inference model: pass --train-batch 0 to time it")
        if device.type != "cpu":
            raise BenchError(f"{name} runs in onnxruntime on CPU: pass --device cpu to time it")
        return load_quantized(name)
    kwargs = {"num_classes": config.num_classes, **config.kwargs_for(name)}
    torch.manual_seed(config.seed)
    if source_of(name) == "official":
        return timm.create_model(name, resolution=size, **kwargs).to(device).eval()
    if source_of(name) == "open_fastervit":
        return create_model(name, **kwargs).to(device).eval()
    model = timm.create_model(name, **kwargs).to(device).eval()
    try:
        probe_forward(model, size)
        return model
    except Exception:
        torch.manual_seed(config.seed)
        return timm.create_model(name, img_size=size, **kwargs).to(device).eval()


def probe_forward(model: nn.Module, size: int) -> torch.Tensor:
    """One batch-1 forward on a fixed input (eval, no grad, model's device): checks the size works."""
    param = next(itertools.chain(model.parameters(), model.buffers()), None)  # inference forms hold buffers only
    device = param.device if param is not None else torch.device("cpu")
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1234)).to(device)
    with torch.no_grad():
        return model(x).float()


def share_official_weights(ours: nn.Module, official: nn.Module) -> None:
    """Load the official model's weights into ours (strict), through the checkpoint converter."""
    state = official_to_ours(official.state_dict())
    try:
        ours.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise BenchError(f"cannot give our model the official weights (same kwargs on both?): {exc}") from exc


def fuse_model(model: nn.Module) -> nn.Module:
    """An inference copy with ``fuse()`` (ours) or timm's ``reparameterize_model`` applied."""
    fused = copy.deepcopy(model)
    if hasattr(fused, "fuse"):
        return fused.fuse() or fused
    return reparameterize_model(fused, inplace=True)


@dataclass
class Prepared:
    """A candidate ready at one input size: eager model plus the callables that are timed."""

    name: str
    model: nn.Module
    infer_model: nn.Module | Callable[..., Any]
    train_model: nn.Module | Callable[..., Any]
    compiled: bool


def prepare(model: nn.Module, name: str, config: BenchConfig) -> Prepared:
    """Set the memory format, then fuse and compile as configured."""
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    infer_model: Any = fuse_model(model) if config.fuse else model
    train_model: Any = model
    if config.compile_mode:
        mode = None if config.compile_mode == "default" else config.compile_mode
        infer_model = torch.compile(infer_model, mode=mode)
        train_model = torch.compile(model, mode=mode)
    return Prepared(name, model, infer_model, train_model, bool(config.compile_mode))


def build_at_size(
    config: BenchConfig, size: int, device: torch.device, info: dict[str, dict[str, Any]]
) -> tuple[dict[str, Prepared], dict[str, str]]:
    """All candidates at one size (officials first, so ours can take their weights).

    Returns (prepared candidates, "n/a (reason)" for those that cannot run at this size).
    Records parameter counts and official/ours output differences in ``info``.
    """
    pairs = pairs_of(config.models)
    built: dict[str, nn.Module] = {}
    unavailable: dict[str, str] = {}
    order = sorted(config.models, key=lambda n: source_of(n) != "official")
    for name in order:
        try:
            model = create_candidate(name, size, config, device)
            if name in pairs and pairs[name] in built:
                share_official_weights(model, built[pairs[name]])
            probe_forward(model, size)
        except BenchError:
            raise
        except Exception as exc:
            unavailable[name] = f"n/a ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
            continue
        built[name] = model
        info[name].setdefault("params", sum(p.numel() for p in model.parameters()))
    for ours, official in pairs.items():
        if ours in built and official in built:
            diff = (probe_forward(built[ours], size) - probe_forward(built[official], size)).abs().max()
            info[ours].setdefault("same_weights_as", official)
            info[ours].setdefault("max_abs_diff_vs_official", {})[str(size)] = float(diff)
    prepared = {name: prepare(model, name, config) for name, model in built.items()}
    if config.fuse:
        for name, cand in prepared.items():
            if isinstance(cand.infer_model, nn.Module) and not cand.compiled:
                diff = (probe_forward(cand.infer_model, size) - probe_forward(cand.model, size)).abs().max()
                info[name].setdefault("inference_form_max_abs_diff", {})[str(size)] = float(diff)
    return prepared, unavailable


# --------------------------------------------------------------------------------------------------
# Work: inference and training steps
# --------------------------------------------------------------------------------------------------


def make_infer_step(model: Callable[..., Any], x: torch.Tensor, precision: str) -> Step:
    """One forward pass without gradients under the chosen autocast."""

    def step() -> Any:
        with torch.no_grad(), autocast(x.device, precision):
            return model(x)

    return step


def make_train_step(
    model: Callable[..., Any], optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
    precision: str,
) -> Step:
    """One training step: forward, cross-entropy, backward, optimizer step (grad scaling for fp16)."""
    scaler = torch.amp.GradScaler(x.device.type, enabled=precision == "fp16")

    def step() -> None:
        with autocast(x.device, precision):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    return step


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW through timm (no weight decay on norms and biases), built as ``fastervit train`` builds it (torch's
    fused kernel where it exists), the same for every candidate."""
    return create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05, **fused_optimizer_kwargs(model, "adamw"))


def make_inputs(group: Group, num_classes: int, device: torch.device, channels_last: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random images and labels for one workload, shared by all candidates."""
    gen = torch.Generator().manual_seed(group.batch * 10007 + group.size)
    x = torch.randn(group.batch, 3, group.size, group.size, generator=gen).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (group.batch,), generator=gen).to(device)
    return x, y


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def member_steps(group: Group, prepared: dict[str, Prepared], x: torch.Tensor, y: torch.Tensor
                 ) -> dict[tuple[str, str], Step]:
    """The step to time for every (candidate, precision) of a workload; models set to its mode.

    Training steps of one model share one optimizer across precisions.
    """
    steps: dict[tuple[str, str], Step] = {}
    for name, cand in prepared.items():
        cand.model.train(group.kind == "train")
        optimizer = make_optimizer(cand.model) if group.kind == "train" else None
        for precision in group.precisions:
            steps[name, precision] = (
                make_infer_step(cand.infer_model, x, precision) if optimizer is None
                else make_train_step(cand.train_model, optimizer, x, y, precision))
    return steps


def run_group(
    group: Group, prepared: dict[str, Prepared], unavailable: dict[str, str], config: BenchConfig,
    device: torch.device, timer: Timer, progress: Progress, macs: dict[tuple[str, int, str], float | None],
) -> list[dict[str, Any]]:
    """Time every (candidate, precision) of one workload, interleaved; one result row each.

    Warm-up first, then the calls per turn are fixed (``config.iters`` or auto), then the timed rounds;
    peak memory takes one more, separate step per member.
    """
    sync = device_sync(device)
    x, y = make_inputs(group, config.num_classes, device, config.channels_last)
    steps = member_steps(group, prepared, x, y)
    members = len(config.models) * len(group.precisions)
    progress.start_group(f"{group.kind} b{group.batch} {group.size}px", (config.warmup + config.rounds) * members)
    warm, errors = measure_interleaved(steps, warmup=config.warmup, rounds=0, timer=timer, sync=sync,
                                       tick=progress.tick)
    iters = {k: config.iters or auto_iters(steps[k], config.min_block_s, sync, timer) for k in warm}
    samples, late_errors = measure_interleaved({k: steps[k] for k in iters}, warmup=0, rounds=config.rounds,
                                               iters=iters, timer=timer, sync=sync, tick=progress.tick)
    errors.update(late_errors)
    rows = []
    for (name, precision), step in steps.items():
        row = base_row(name, group, precision)
        if (name, precision) in samples:
            mem = _peak_memory(step, device, prepared[name].compiled) if config.memory else None
            gmacs = _cached_gmacs(macs, prepared[name], group, device, config)
            row.update(timing_fields(samples[name, precision], group.batch, iters[name, precision], gmacs, mem))
        else:
            row["status"] = f"error ({errors.get((name, precision), 'unknown')})"
        rows.append(row)
    for name, reason in unavailable.items():
        rows.extend({**base_row(name, group, p), "status": reason} for p in group.precisions)
    return rows


def _peak_memory(step: Step, device: torch.device, compiled: bool) -> float | None:
    try:
        return peak_memory_mb(step, device, compiled)
    except Exception:  # memory is reported when it can be measured; timings stand without it
        return None


def _cached_gmacs(macs: dict[tuple[str, int, str], float | None], cand: Prepared, group: Group,
                  device: torch.device, config: BenchConfig) -> float | None:
    key = (cand.name, group.size, group.kind)
    if config.macs and key not in macs:
        try:
            macs[key] = count_gmacs(cand.model, group.size, group.kind, device)
        except Exception:  # counting is a nicety; the timings stand without it
            macs[key] = None
    return macs.get(key)


def base_row(name: str, group: Group, precision: str) -> dict[str, Any]:
    """The identifying fields of a result row."""
    return {"model": name, "source": source_of(name), "kind": group.kind, "batch": group.batch,
            "img_size": group.size, "precision": precision, "status": "ok"}


def add_ratios(rows: list[dict[str, Any]], baselines: Sequence[tuple[str, str | None]],
               gemm: dict[str, Any]) -> None:
    """Throughput ratios against each baseline and the share of the GEMM rates, in place.

    A ratio is the median over rounds of (baseline time / row time) in the same round; its min and max
    show the spread. ``row["ratios"]`` holds one entry per baseline; the first is also flattened into
    ``ratio_vs_baseline``, ``ratio_min``, ``ratio_max`` and ``baseline`` (the CSV columns).
    """
    index = {(r["model"], r["kind"], r["batch"], r["img_size"], r["precision"]): r for r in rows}
    fp32_rate = gemm.get("fp32", {}).get("gmacs_per_s")
    for row in rows:
        own_rate = gemm.get(row["precision"], {}).get("gmacs_per_s")
        if row.get("gmacs_per_s") is not None and own_rate:
            row["pct_of_precision_gemm"] = 100.0 * row["gmacs_per_s"] / own_rate
        row["ratios"] = [_ratio_to(row, index, name, precision) for name, precision in baselines]
        first = row["ratios"][0]
        row.update(baseline=first["baseline"], ratio_vs_baseline=first["median"], ratio_min=first["min"],
                   ratio_max=first["max"])
        if row.get("gmacs_per_s") is not None and fp32_rate:
            row["pct_of_fp32_gemm"] = 100.0 * row["gmacs_per_s"] / fp32_rate


def _ratio_to(row: dict[str, Any], index: dict[tuple, dict[str, Any]], name: str, precision: str | None
              ) -> dict[str, Any]:
    key = (name, row["kind"], row["batch"], row["img_size"], precision or row["precision"])
    return {"baseline": f"{name}:{key[-1]}", **per_round_ratio(index.get(key), row)}


def candidate_info(config: BenchConfig) -> dict[str, dict[str, Any]]:
    """Per-candidate facts: source, overrides, published numbers (only for unmodified architectures)."""
    info = {}
    for name in config.models:
        kwargs = config.kwargs_for(name)
        published = {} if kwargs else PUBLISHED.get(official_to_ours_name(name) or name, {})
        top1 = config.top1.get(name, published.get("top1", None if kwargs else PEER_TOP1.get(name)))
        entry: dict[str, Any] = {"source": source_of(name), "model_kwargs": kwargs}
        if top1 is not None:
            entry["published_top1"] = top1
        if "throughput" in published:
            entry["published_a100_img_s"] = published["throughput"]
        info[name] = entry
    return info


def run_benchmark(config: BenchConfig, *, timer: Timer = time.perf_counter, progress: bool = True
                  ) -> dict[str, Any]:
    """Run the whole benchmark and return a self-describing, JSON-ready result.

    ``timer`` (seconds, monotonic) is injectable for tests; torch's thread count is restored afterwards.
    """
    config.validate()
    import_plugins(config.imports)
    check_model_names(config.models)
    device = resolve_device(config.device)
    with run_settings(config.threads, device):
        return _run(config, device, timer, progress)


def _run(config: BenchConfig, device: torch.device, timer: Timer, progress: bool) -> dict[str, Any]:
    env = environment(device)
    groups = plan_groups(config)
    sync = device_sync(device)
    gemm_n = config.gemm_size or (8192 if device.type == "cuda" else 2048)
    gemm = {p: measure_gemm(device, p, gemm_n, config.rounds, timer, sync)
            for p in dict.fromkeys(["fp32", *config.precisions])}
    info = candidate_info(config)
    turns = sum((config.warmup + config.rounds) * len(config.models) * len(g.precisions) for g in groups)
    bar = Progress(turns, progress)
    rows: list[dict[str, Any]] = []
    macs: dict[tuple[str, int, str], float | None] = {}
    try:
        for size in dict.fromkeys(g.size for g in groups):
            prepared, unavailable = build_at_size(config, size, device, info)
            for group in (g for g in groups if g.size == size):
                rows.extend(run_group(group, prepared, unavailable, config, device, timer, bar, macs))
            del prepared
            gc.collect()
    finally:
        bar.close()
    add_ratios(rows, config.baseline_members(), gemm)
    env["load_average_1m_end"] = load_average()
    return {"schema": SCHEMA, "env": env, "config": dataclasses.asdict(config),
            "gemm": gemm, "candidates": info, "rows": rows}


# --------------------------------------------------------------------------------------------------
# Parsing of option values (the command line itself is open_fastervit.cli.bench)
# --------------------------------------------------------------------------------------------------


def parse_model_kwargs(items: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``'{"dim": 32}'`` (all models) or ``'fastervit_0={"dim": 32}'`` (one model) -> per-name dicts."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        name, text = "*", item
        match = re.fullmatch(r"\s*([\w.\-]+)\s*=\s*(\{.*\})\s*", item, flags=re.S)
        if match:
            name, text = match.group(1), match.group(2)
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BenchError(f"--model-kwargs {item!r}: not a JSON object ({exc})") from exc
        if not isinstance(value, dict):
            raise BenchError(f"--model-kwargs {item!r}: expected a JSON object like '{{\"dim\": 32}}'")
        out.setdefault(name, {}).update(value)
    return out


def parse_top1(items: Sequence[str]) -> dict[str, float]:
    """``NAME=82.1`` pairs -> dict."""
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError as exc:
            raise BenchError(f"--top1 {item!r}: expected NAME=ACCURACY, e.g. convnext_tiny=82.1") from exc
    return out
