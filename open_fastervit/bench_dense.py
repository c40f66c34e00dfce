"""``fastervit bench --dense``: backbones (all four stage maps) at detection and segmentation input sizes.

What is compared: FasterViT backbones (:func:`open_fastervit.backbone.create_backbone`, maps at strides 4, 8, 16,
32) in two forms - the *plain eval path* (no fusion, eval mode, ``torch.inference_mode()``) and the *inference
form* (``backbone.fuse()``) - against timm peers built with ``features_only=True`` (``pretrained=False``). Peers
with a fixed input size (Swin) are built for each size with ``img_size=(H, W)``: timm 1.0.31 then keeps the
7x7 windows, pads every stage map to a multiple of the window inside the attention and pads odd maps before
patch merging, so any H, W divisible by the patch size (4) run without padding the input, and the shifted-window
masks are precomputed for that size (``dynamic_img_size=True`` would accept any size but rebuild the masks on
every call). ConvNeXt and FasterViT take any size (FasterViT pads and masks its windows itself; >= 32 px).

Work: a forward pass at ``batch`` (inference), and a forward + backward pass in train mode with the sum of the
means of all maps as the loss (``train_batch`` at ``train_sizes``; no optimizer step). Timing reuses
:func:`open_fastervit.bench.measure_interleaved`: all members of one workload run in turn after warm-up, medians
of per-call times; ratios are medians of per-round ratios (against a baseline, default Swin-T, and, for
FasterViT, fused against plain).

Before timing, every candidate runs once at each size (fp32, batch of the workload; MACs counted with
``FlopCounterMode`` on that pass), and the fused FasterViT maps are compared with the plain ones: the largest
``max|fused - plain| / max|plain|`` over the four maps must stay within ``check_tol`` (1e-5); TF32 is off during
the check on CUDA. The result is in the JSON (``checks``) and the Markdown.

:func:`profile_forward` runs ``torch.profiler`` on one call of one model, form and size and writes the top
operators by self CPU time with their shares, plus shares by category (matmul, convolution, attention, ...).

Python API: :class:`DenseConfig`, :func:`run_dense` (JSON-ready dict), :func:`write_dense_reports`,
:func:`profile_forward`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import gc
import json
import math
import os
import re
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from open_fastervit.bench import (
    PRECISIONS,
    BenchError,
    Step,
    Timer,
    _Progress,
    auto_iters,
    autocast,
    check_model_names,
    device_sync,
    environment,
    import_plugins,
    measure_interleaved,
    peak_memory_mb,
    resolve_device,
    source_of,
    timing_fields,
)

__all__ = [
    "DEFAULT_DENSE_MODELS",
    "DEFAULT_DENSE_SIZES",
    "DenseConfig",
    "parse_sizes",
    "profile_forward",
    "run_dense",
    "write_dense_reports",
]

SCHEMA = "open_fastervit.bench_dense/1"
DEFAULT_DENSE_MODELS = (
    "fastervit_0", "fastervit_1", "fastervit_2", "fastervit_3", "fastervit_4",
    "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "convnext_tiny", "convnext_small",
)
DEFAULT_DENSE_SIZES = ((800, 1216), (1024, 1024), (512, 2048))
DEFAULT_TRAIN_SIZES = ((512, 768),)
DEFAULT_BASELINE = "swin_tiny_patch4_window7_224"
CHECK_TOLERANCE = 1e-5
FORMS = ("plain", "fused")
OUT_REDUCTIONS = (4, 8, 16, 32)

Size = tuple[int, int]

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


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[Size]:
    """``"800x1216,1024"`` -> ``[(800, 1216), (1024, 1024)]`` (height x width; one number: square).

    Raises:
        BenchError: a size that is not ``H``, ``HxW`` with positive integers.
    """
    sizes = []
    for item in (v.strip().lower() for v in text.split(",")):
        if not item:
            continue
        match = re.fullmatch(r"(\d+)(?:x(\d+))?", item)
        if not match or int(match.group(1)) <= 0 or (match.group(2) and int(match.group(2)) <= 0):
            raise BenchError(f"size {item!r}: expected HxW with positive integers, e.g. 800x1216")
        h = int(match.group(1))
        sizes.append((h, int(match.group(2) or h)))
    return sizes


def size_label(size: Size) -> str:
    """``(800, 1216)`` -> ``"800x1216"``."""
    return f"{size[0]}x{size[1]}"


@dataclass
class DenseConfig:
    """Everything one dense benchmark run measures.

    ``forms`` are the FasterViT forms timed at inference (``plain``, ``fused``); peers always run as built.
    ``train_batch`` 0 or empty ``train_sizes`` skip the training step. ``iters`` 0 picks enough calls per turn for
    ``min_block_s`` seconds. ``model_kwargs`` maps a name (or ``"*"``) to architecture overrides (FasterViT:
    ``create_backbone(model_kwargs=...)``; timm: ``create_model`` arguments).
    """

    models: list[str] = field(default_factory=lambda: list(DEFAULT_DENSE_MODELS))
    sizes: list[Size] = field(default_factory=lambda: list(DEFAULT_DENSE_SIZES))
    batch: int = 1
    train_sizes: list[Size] = field(default_factory=lambda: list(DEFAULT_TRAIN_SIZES))
    train_batch: int = 2
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    forms: list[str] = field(default_factory=lambda: list(FORMS))
    baseline: str = ""
    device: str = "auto"
    channels_last: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    threads: int | None = None
    warmup: int = 1
    rounds: int = 5
    iters: int = 1
    min_block_s: float = 0.2
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    imports: list[str] = field(default_factory=list)
    check: bool = True
    check_tol: float = CHECK_TOLERANCE
    macs: bool = True
    memory: bool = True
    seed: int = 0
    command: str = ""

    def validate(self) -> None:
        """Raise :class:`BenchError` on arguments that cannot describe a run."""
        if not self.models:
            raise BenchError("no models given; pass --models NAME[,NAME...]")
        if len(set(self.models)) != len(self.models):
            raise BenchError(f"models are listed more than once: {self.models}")
        official = [m for m in self.models if source_of(m) == "official"]
        if official:
            raise BenchError(f"--dense measures backbones (ours and timm features_only); not supported: {official}")
        if not self.sizes and not (self.train_batch > 0 and self.train_sizes):
            raise BenchError("nothing to measure: no --dense-sizes and no training step")
        for h, w in [*self.sizes, *self.train_sizes]:
            if h < 32 or w < 32:
                raise BenchError(f"dense sizes must be at least 32x32 px, got {h}x{w}")
        if self.batch < 1 or self.train_batch < 0:
            raise BenchError("need --dense-batch >= 1 and --dense-train-batch >= 0")
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown or not self.precisions:
            raise BenchError(f"precisions must be among {sorted(PRECISIONS)}, got {self.precisions}")
        if not self.forms or any(f not in FORMS for f in self.forms):
            raise BenchError(f"forms must be among {FORMS}, got {self.forms}")
        if self.rounds < 1 or self.warmup < 0 or self.iters < 0:
            raise BenchError("need rounds >= 1, warmup >= 0 and iters >= 0")
        if self.threads is not None and self.threads < 1:
            raise BenchError(f"threads must be >= 1, got {self.threads}")
        if self.baseline and self.baseline not in self.models:
            raise BenchError(f"baseline {self.baseline!r} is not among the models {self.models}")

    def baseline_name(self) -> str:
        """The baseline: as given, else Swin-T when measured, else the first model."""
        if self.baseline:
            return self.baseline
        return DEFAULT_BASELINE if DEFAULT_BASELINE in self.models else self.models[0]

    def kwargs_for(self, name: str) -> dict[str, Any]:
        """The architecture overrides of one candidate (``"*"`` first, then its own)."""
        merged = {**self.model_kwargs.get("*", {}), **self.model_kwargs.get(name, {})}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()}

    def forms_for(self, name: str) -> list[str]:
        """Inference forms of one candidate: FasterViT as configured, peers ``plain`` only."""
        return list(self.forms) if source_of(name) == "open_fastervit" else ["plain"]


@dataclass(frozen=True)
class DenseGroup:
    """One workload: every (candidate, form, precision) runs it, interleaved."""

    kind: str  # "infer" or "train"
    batch: int
    size: Size


def plan_dense_groups(config: DenseConfig) -> list[DenseGroup]:
    """Inference at every size, then the training step at every training size."""
    groups = [DenseGroup("infer", config.batch, s) for s in dict.fromkeys(config.sizes)]
    if config.train_batch > 0:
        groups += [DenseGroup("train", config.train_batch, s) for s in dict.fromkeys(config.train_sizes)]
    return groups


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def build_dense_model(name: str, size: Size, config: DenseConfig, device: torch.device) -> tuple[nn.Module, bool]:
    """One backbone on ``device`` in eval mode returning the maps at strides 4, 8, 16, 32.

    Returns (model, whether it was built for ``size``: only then must it be rebuilt for another size).
    """
    kwargs = config.kwargs_for(name)
    torch.manual_seed(config.seed)
    if source_of(name) == "open_fastervit":
        from open_fastervit.backbone import create_backbone

        return create_backbone(name, out_indices=(0, 1, 2, 3), model_kwargs=kwargs).to(device).eval(), False
    import timm

    base = {"features_only": True, "pretrained": False, **kwargs}
    try:
        model, sized = timm.create_model(name, img_size=size, **base), True
    except TypeError as exc:  # no img_size argument: the model takes any size
        if "img_size" not in str(exc):
            raise
        torch.manual_seed(config.seed)
        model, sized = timm.create_model(name, **base), False
    reductions = [int(r) for r in model.feature_info.reduction()]
    if reductions != list(OUT_REDUCTIONS):
        every = [int(info["reduction"]) for info in model.feature_info.info]
        indices = tuple(max(i for i, r in enumerate(every) if r == want) for want in OUT_REDUCTIONS
                        if want in every)
        if len(indices) != len(OUT_REDUCTIONS):
            raise BenchError(f"{name}: no feature maps at strides {OUT_REDUCTIONS} (has {every})")
        torch.manual_seed(config.seed)
        extra = {"img_size": size} if sized else {}
        model = timm.create_model(name, out_indices=indices, **base, **extra)
    return model.to(device).eval(), sized


def fused_copy(model: nn.Module) -> nn.Module:
    """The inference form of a FasterViT backbone (a copy; ``fuse()`` works in place)."""
    return copy.deepcopy(model).fuse()


def _maps(out: Any) -> list[torch.Tensor]:
    """Model output as a list of tensors (a tensor, list/tuple or dict of tensors)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return list(out.values())
    return list(out)


def map_rel_errors(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> list[float]:
    """Per map: ``max|other - reference| / max|reference|`` (fp32; inf for a shape mismatch)."""
    errors = []
    for ref, out in zip(reference, other, strict=True):
        if ref.shape != out.shape:
            errors.append(math.inf)
            continue
        ref, out = ref.float(), out.float()
        scale = float(ref.abs().max()) or 1.0
        errors.append(float((out - ref).abs().max()) / scale)
    return errors


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for matmuls and convolutions (CUDA) while comparing fp32 outputs; restored afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@dataclass
class Candidate:
    """One backbone at one size: its eager model, the fused copy (FasterViT) and the callables timed."""

    name: str
    model: nn.Module
    fused: nn.Module | None
    run: dict[str, Callable[..., Any]]  # form ("plain", "fused", "train") -> callable
    compiled: bool


class Builder:
    """Builds candidates per size; size-independent models (FasterViT, ConvNeXt) and fused copies are kept."""

    def __init__(self, config: DenseConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.kept: dict[str, tuple[nn.Module, nn.Module | None]] = {}

    def get(self, name: str, size: Size, kind: str) -> Candidate:
        """The candidate ready at ``size`` (memory format, fused copy, compile as configured)."""
        cfg = self.config
        model, fused = self.kept.get(name, (None, None))
        sized = False
        if model is None:
            model, sized = build_dense_model(name, size, cfg, self.device)
            if cfg.channels_last:
                model = model.to(memory_format=torch.channels_last)
        if kind == "infer" and fused is None and "fused" in cfg.forms_for(name):
            fused = fused_copy(model)
        if not sized:  # size-independent: kept for the next sizes, with its fused copy
            self.kept[name] = (model, fused)
        run: dict[str, Callable[..., Any]] = {}
        if kind == "infer":
            forms = cfg.forms_for(name)
            if "plain" in forms:
                run["plain"] = model
            if fused is not None and "fused" in forms:
                run["fused"] = fused
        else:
            run["train"] = model
        if cfg.compile_mode:
            mode = None if cfg.compile_mode == "default" else cfg.compile_mode
            run = {form: torch.compile(m, mode=mode, backend=cfg.compile_backend) for form, m in run.items()}
        return Candidate(name, model, fused, run, bool(cfg.compile_mode))


def make_dense_infer_step(model: Callable[..., Any], x: torch.Tensor, precision: str) -> Step:
    """One forward pass under ``torch.inference_mode()`` and the chosen autocast."""

    def step() -> Any:
        with torch.inference_mode(), autocast(x.device, precision):
            return model(x)

    return step


def make_dense_train_step(model: Callable[..., Any], params: Sequence[nn.Parameter], x: torch.Tensor,
                          precision: str) -> Step:
    """Forward in train mode, loss = sum over maps of the map's mean, backward; gradients cleared each call.

    fp16 scales the loss by 1024 (as a GradScaler would at its start) so that no gradient underflows.
    """
    scale = 1024.0 if precision == "fp16" else 1.0

    def step() -> None:
        with autocast(x.device, precision):
            loss = sum(m.float().mean() for m in _maps(model(x)))
        (loss * scale).backward()
        for p in params:
            p.grad = None

    return step


def dense_inputs(batch: int, size: Size, device: torch.device, channels_last: bool) -> torch.Tensor:
    """Fixed random images of one workload, shared by all candidates."""
    gen = torch.Generator().manual_seed(batch * 10007 + size[0] * 31 + size[1])
    x = torch.randn(batch, 3, *size, generator=gen).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def _error_text(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]


def probe(cand: Candidate, x: torch.Tensor, config: DenseConfig, info: dict[str, Any], group: DenseGroup,
          checks: list[dict[str, Any]]) -> float | None:
    """First pass of a candidate at a size (fp32, eval): map shapes, GMAC per image, fused-vs-plain check.

    Doubles as the first warm-up call. Returns GMAC per image of the forward (None when not counted).
    Raises when the model cannot run at this size.
    """
    from torch.utils.flop_counter import FlopCounterMode

    label = size_label(group.size)
    counter = FlopCounterMode(display=False) if config.macs else contextlib.nullcontext()
    was_training = cand.model.training
    cand.model.eval()
    try:
        with exact_fp32(), torch.inference_mode():
            with counter:
                plain = _maps(cand.model(x))
            fused = _maps(cand.fused(x)) if cand.fused is not None and group.kind == "infer" else None
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
                    progress: _Progress, info: dict[str, dict[str, Any]], checks: list[dict[str, Any]]
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


def _per_round_ratio(base: dict[str, Any] | None, row: dict[str, Any]) -> dict[str, Any]:
    """Median (min, max) over rounds of base time / row time: the row's throughput relative to base."""
    out: dict[str, Any] = {"median": None, "min": None, "max": None}
    if row["status"] == "ok" and base is not None and base["status"] == "ok":
        per_round = [b / s for b, s in zip(base["samples_ms"], row["samples_ms"])]
        out.update(median=statistics.median(per_round), min=min(per_round), max=max(per_round))
    return out


def add_dense_ratios(rows: list[dict[str, Any]], baseline: str) -> None:
    """In place: ``vs_baseline`` (throughput / the baseline's, same workload and precision, baseline as built)
    and, for fused rows, ``fused_vs_plain`` (fused throughput / plain throughput of the same model)."""
    index = {(r["model"], r["form"], r["kind"], r["batch"], r["size"], r["precision"]): r for r in rows}
    for row in rows:
        base_form = "plain" if row["kind"] == "infer" else "train"
        key = (row["kind"], row["batch"], row["size"], row["precision"])
        ratio = _per_round_ratio(index.get((baseline, base_form, *key)), row)
        row["vs_baseline"] = {"baseline": baseline, **ratio}
        row["ratio_vs_baseline"] = ratio["median"]
        if row["form"] == "fused":
            row["fused_vs_plain"] = _per_round_ratio(index.get((row["model"], "plain", *key)), row)


def run_dense(config: DenseConfig, *, timer: Timer = time.perf_counter, progress: bool = True) -> dict[str, Any]:
    """Run the dense benchmark; returns a self-describing, JSON-ready dict (``rows``, ``checks``, ``env``).

    torch's thread count and ``cudnn.benchmark`` are restored afterwards.
    """
    config.validate()
    import_plugins(config.imports)
    check_model_names(config.models)
    device = resolve_device(config.device)
    threads_before, cudnn_before = torch.get_num_threads(), torch.backends.cudnn.benchmark
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        torch.backends.cudnn.benchmark = device.type == "cuda"  # fastest conv algorithms for fixed shapes
        return _run_dense(config, device, timer, progress)
    finally:
        torch.set_num_threads(threads_before)
        torch.backends.cudnn.benchmark = cudnn_before


def _run_dense(config: DenseConfig, device: torch.device, timer: Timer, progress: bool) -> dict[str, Any]:
    env = environment(device)
    started = time.perf_counter()
    info: dict[str, dict[str, Any]] = {
        name: {"source": source_of(name), "model_kwargs": config.kwargs_for(name), "forms": config.forms_for(name)}
        for name in config.models}
    groups = plan_dense_groups(config)
    members = sum(len(config.forms_for(n)) if g.kind == "infer" else 1 for g in groups for n in config.models)
    bar = _Progress((config.warmup + config.rounds + int(config.memory)) * members * len(config.precisions),
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
    env["load_average_1m_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
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


# --------------------------------------------------------------------------------------------------
# Profile
# --------------------------------------------------------------------------------------------------


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
    time with their share of the total self CPU time, and the shares by category. Returns the JSON dict.
    """
    from torch.profiler import ProfilerActivity, profile

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


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _sig(value: float | None) -> str:
    """Three significant digits, without exponents for values of 100 and more."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


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
    for model, form in _series(result):
        cells = []
        for size in sizes:
            row = _find_dense(result, model, form, "infer", size, precision)
            cells.append("-" if row is None else row["status"].split(" (")[0] if row["status"] != "ok"
                         else _num(row["latency_ms"] / row["batch"]))
        lines.append(f"| {model} | {form} | " + " | ".join(cells) + " |")
    return lines


def _series(result: dict[str, Any]) -> list[tuple[str, str]]:
    return [(m, f) for m in result["config"]["models"] for f in result["candidates"][m]["forms"]]


def _find_dense(result: dict[str, Any], model: str, form: str, kind: str, size: str, precision: str
                ) -> dict[str, Any] | None:
    for row in result["rows"]:
        if (row["model"], row["form"], row["kind"], row["size"], row["precision"]) == (model, form, kind, size,
                                                                                       precision):
            return row
    return None


def plot_dense_time_vs_size(result: dict[str, Any], path: Path) -> str | None:
    """Milliseconds per image at each inference size (sizes by pixel count), one line per model and form."""
    from open_fastervit.bench_plots import _pyplot

    cfg = result["config"]
    sizes = sorted(cfg["sizes"], key=lambda s: (math.prod(int(v) for v in s.split("x")), s))
    if not sizes:
        return "skipped: no inference sizes"
    precision = cfg["precisions"][0]
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 5))
    drawn = 0
    for model, form in _series(result):
        pts = []
        for i, size in enumerate(sizes):
            row = _find_dense(result, model, form, "infer", size, precision)
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
    from matplotlib import ticker

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
