"""One-command GPU benchmark (``make bench-gpu``): FasterViT-0..4 at the paper's Figure 1 setting against timm peers and
the official implementation, plus one dense-prediction row, eager and compiled, bf16 and fp16, in one run.

::

    python experiments/bench_gpu.py --out runs/bench_gpu                       # CUDA, about 7.5 minutes at most
    python experiments/bench_gpu.py --dry-run --device cpu --out runs/gpu_dry   # tiny settings, seconds (the tests)
    python experiments/bench_gpu.py --dry-run --out runs/gpu_smoke              # tiny settings on the GPU

Items, in this order (each one interleaved over its models and both precisions, ``channels_last``, every model in
its inference form: ours ``fuse()``, the official one ``reparameterize_model``; peers as built):

1. ``cls_eager``: classification, batch 128, 224 px: ``fastervit_0..4``, ``swin_tiny_patch4_window7_224``,
   ``convnext_tiny`` and, when the official ``fastervit`` package is importable, ``faster_vit_0..4_224`` (a timing
   oracle only: this script imports it through ``fastervit bench``'s ``--import`` mechanism; the library never does).
   The paper's A100 numbers (5802 / 4188 / 3161 / 1780 / 849 img/s) are reference columns.
2. ``dense_eager``: backbones (four stage maps) at 800x1216, batch 2: FasterViT-2 (plain and fused) against Swin-T and
   ConvNeXt-T (``open_fastervit.bench.dense``).
3. ``cls_compile``: item 1 with ``torch.compile`` for FasterViT-0, Swin-T and ConvNeXt-T.
4. ``dense_compile``: item 2 compiled (FasterViT-2 fused).
5. ``cls_compile_fastervit_1`` .. ``_4``: each of the other FasterViTs compiled alone (one item each, so that the
   budget guard can stop between them; compare with the eager rows of item 1).
6. ``tensorrt``: FasterViT-0 as a TensorRT fp16 engine built from our ONNX export (``fastervit export``: batch
   dynamic, 224 px) with one optimisation profile over batch 1 / 16 / 128 (:func:`trt_profile`; a dynamic-size
   file also spans its height / width range), LayerNorm kept in fp32 (``OBEY_PRECISION_CONSTRAINTS``: fp16
   LayerNorm is the known accuracy risk), checked against the fp32 eager model (:func:`fp16_check`: relative
   logit error and top-1 agreement), timed at batch 128 next to eager fp16 autocast and ``torch.compile``. Where
   ``import tensorrt`` fails the item says so in its note and the run goes on.

Timing is ``open_fastervit.bench.measure_interleaved``: ``torch.cuda.synchronize`` before and after every timed
turn, ``time.perf_counter`` around it, ``cudnn.benchmark`` on, memory from ``torch.cuda.max_memory_allocated``.

Budget guard: before an item starts, its estimated duration (scaled by how much slower than estimated the finished
items were) must fit in what is left of ``--budget-min`` (default 7.5); otherwise it and the rest that do not fit are
skipped with a note. A running item is not interrupted. An item that fails (compile error, out of memory) is
recorded with its error and the run goes on; inside an item a failing model is recorded and the others go on.

Writes ``bench_gpu.json`` (everything, including each item's full result) and ``bench_gpu.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import json
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

from open_fastervit.bench import (
    BenchConfig,
    BenchError,
    environment,
    measure_interleaved,
    resolve_device,
    run_benchmark,
)
from open_fastervit.bench.dense import DenseConfig, run_dense
from open_fastervit.deploy.export import export_model, load_exported
from open_fastervit.fused import inference_form

SCHEMA = "open_fastervit.bench_gpu/1"
OURS = [f"fastervit_{i}" for i in range(5)]
OFFICIAL = [f"faster_vit_{i}_224" for i in range(5)]
SWIN_T, CONVNEXT_T = "swin_tiny_patch4_window7_224", "convnext_tiny"
PEERS = [SWIN_T, CONVNEXT_T]
#: The paper's Figure 1 / the authors' README: A100, batch 128, 224 px, img/s.
PAPER_A100 = {"fastervit_0": 5802, "fastervit_1": 4188, "fastervit_2": 3161, "fastervit_3": 1780, "fastervit_4": 849}
DEFAULT_BUDGET_MIN = 7.5
#: ~0.3M-parameter FasterViT for the dry run (HAT active in stage 2 at 64 px).
TINY = {"dim": 16, "in_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4], "window_size": [7, 7, 2, 2],
        "drop_path_rate": 0.0}

Clock = Callable[[], float]


class BudgetGuard:
    """Wall-clock budget of the run: may an item of a given estimated duration still start?

    Estimates are scaled by the slowdown seen so far (actual / estimated seconds of the finished items, at least 1).
    """

    def __init__(self, budget_s: float, clock: Clock = time.monotonic) -> None:
        self.budget_s = budget_s
        self.clock = clock
        self.start = clock()
        self.estimated = 0.0
        self.actual = 0.0

    def elapsed(self) -> float:
        """Seconds since the guard was made."""
        return self.clock() - self.start

    def remaining(self) -> float:
        """Seconds left (negative once over budget)."""
        return self.budget_s - self.elapsed()

    @property
    def slowdown(self) -> float:
        """Actual / estimated seconds of the finished items (1 before any, never below 1)."""
        return max(1.0, self.actual / self.estimated) if self.estimated > 0 else 1.0

    def allows(self, estimate_s: float) -> bool:
        """True when an item estimated at ``estimate_s`` seconds is expected to end within the budget."""
        return estimate_s * self.slowdown <= self.remaining()

    def record(self, estimate_s: float, actual_s: float) -> None:
        """Account a finished item."""
        self.estimated += estimate_s
        self.actual += actual_s


@dataclass
class Item:
    """One measured unit of the suite: its runner returns a JSON-ready result."""

    name: str
    kind: str  # "classification", "dense" or "tensorrt"
    compiled: bool
    estimate_s: float
    run: Callable[[], dict[str, Any]]
    description: str = ""


@dataclass
class Settings:
    """Sizes and rounds of the run: the real suite or the dry run."""

    device: str
    dry_run: bool
    batch: int = 128
    img_size: int = 224
    dense_size: tuple[int, int] = (800, 1216)
    dense_batch: int = 2
    warmup: int = 3
    rounds: int = 5
    iters: int = 0
    min_block_s: float = 0.2
    precisions: list[str] = field(default_factory=lambda: ["bf16", "fp16"])
    ours: list[str] = field(default_factory=lambda: list(OURS))
    peers: list[str] = field(default_factory=lambda: list(PEERS))
    official: list[str] = field(default_factory=list)
    dense_ours: str = "fastervit_2"
    compile_first: list[str] = field(default_factory=lambda: ["fastervit_0"])
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    compile_mode: str = "default"
    compile_backend: str = "inductor"
    gemm_size: int = 8192
    macs: bool = True
    scale: float = 1.0  # estimates in seconds are multiplied by this

    @classmethod
    def make(cls, args: argparse.Namespace, official: bool) -> Settings:
        """Real settings, or tiny ones with ``--dry-run`` (batch 2, 64 px, 1 warm-up + 1 round, a tiny FasterViT-0 and
        ``test_convnext``; compile with the ``eager`` backend unless ``--compile-backend`` is given)."""
        if not args.dry_run:
            return cls(device=args.device, dry_run=False, official=list(OFFICIAL) if official else [],
                       compile_mode=args.compile_mode, compile_backend=args.compile_backend or "inductor")
        kwargs = {"fastervit_0": dict(TINY)}
        if official:
            kwargs["faster_vit_0_224"] = dict(TINY)
        return cls(device=args.device, dry_run=True, batch=2, img_size=64, dense_size=(64, 96), dense_batch=2,
                   warmup=1, rounds=1, iters=1, min_block_s=0.0, ours=["fastervit_0"], peers=["test_convnext"],
                   official=["faster_vit_0_224"] if official else [], dense_ours="fastervit_0",
                   compile_first=["fastervit_0"], model_kwargs=kwargs, compile_mode=args.compile_mode,
                   compile_backend=args.compile_backend or "eager", gemm_size=64, macs=False, scale=0.02)


# --------------------------------------------------------------------------------------------------
# Items
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def compile_backend(backend: str) -> Iterator[None]:
    """Make ``torch.compile`` use ``backend`` inside the block (``open_fastervit.bench`` only passes ``mode``).

    The default ``inductor`` leaves ``torch.compile`` untouched; the dry run uses ``eager`` (no C++/Triton build).
    """
    if backend == "inductor":
        yield
        return
    original = torch.compile
    torch.compile = functools.partial(original, backend=backend)  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.compile = original  # type: ignore[assignment]


def classification_item(name: str, models: list[str], settings: Settings, compiled: bool, estimate_s: float,
                        description: str) -> Item:
    """``fastervit bench`` on one workload (batch, 224 px, both precisions), in the inference forms."""
    baselines = [p for p in settings.peers if p in models] or [models[0]]
    config = BenchConfig(
        models=models, batch_sizes=[settings.batch], img_sizes=[settings.img_size], precisions=settings.precisions,
        train_batch=0, scaling_sizes=[], device=settings.device, channels_last=True,
        compile_mode=settings.compile_mode if compiled else None, fuse=True, warmup=settings.warmup,
        rounds=settings.rounds, iters=settings.iters, min_block_s=settings.min_block_s, baselines=baselines,
        imports=["fastervit"] if any(m in settings.official for m in models) else [],
        model_kwargs={k: v for k, v in settings.model_kwargs.items() if k in models}, macs=settings.macs,
        gemm_size=settings.gemm_size, command=f"experiments/bench_gpu.py item {name}")

    def run() -> dict[str, Any]:
        with compile_backend(settings.compile_backend if compiled else "inductor"):
            return run_benchmark(config, progress=False)

    return Item(name, "classification", compiled, estimate_s * settings.scale, run, description)


def dense_item(name: str, settings: Settings, compiled: bool, estimate_s: float, description: str) -> Item:
    """``fastervit bench --dense`` at one size: FasterViT (plain and fused, or fused when compiled) and the peers."""
    models = [settings.dense_ours, *settings.peers]
    config = DenseConfig(
        models=models, sizes=[settings.dense_size], batch=settings.dense_batch, train_sizes=[], train_batch=0,
        precisions=settings.precisions, forms=["fused"] if compiled else ["plain", "fused"],
        baseline=settings.peers[0], device=settings.device, channels_last=True,
        compile_mode=settings.compile_mode if compiled else None, compile_backend=settings.compile_backend,
        warmup=settings.warmup, rounds=settings.rounds, iters=settings.iters, min_block_s=settings.min_block_s,
        model_kwargs={k: v for k, v in settings.model_kwargs.items() if k in models}, macs=settings.macs,
        command=f"experiments/bench_gpu.py item {name}")
    return Item(name, "dense", compiled, estimate_s * settings.scale, lambda: run_dense(config, progress=False),
                description)


def plan_items(settings: Settings) -> list[Item]:
    """The suite's items, most important first (the budget guard skips from the end)."""
    cls_models = [*settings.ours, *settings.peers, *settings.official]
    first = [m for m in settings.compile_first if m in settings.ours]
    more = [m for m in settings.ours if m not in first]
    items = [
        classification_item("cls_eager", cls_models, settings, False, 120 + 10 * len(settings.official),
                            f"batch {settings.batch}, {settings.img_size} px, eager"),
        dense_item("dense_eager", settings, False, 45,
                   f"backbones at {settings.dense_size[0]}x{settings.dense_size[1]}, batch {settings.dense_batch}, "
                   "eager"),
        classification_item("cls_compile", [*first, *settings.peers], settings, True, 150,
                            f"batch {settings.batch}, {settings.img_size} px, torch.compile"),
        dense_item("dense_compile", settings, True, 90, "backbones, torch.compile"),
    ]
    items.insert(1, tensorrt_item(settings, 150))
    items += [classification_item(f"cls_compile_{m}", [m], settings, True, 60 + 15 * i,
                                  f"{m} alone, batch {settings.batch}, torch.compile (ratios: eager table)")
              for i, m in enumerate(more)]
    return items


# --------------------------------------------------------------------------------------------------
# TensorRT
# --------------------------------------------------------------------------------------------------

#: Batch sizes of the TensorRT optimisation profile: min, opt, max.
TRT_BATCHES = (1, 16, 128)
#: Largest side of a dynamic-size profile, as a multiple of the optimum side (TensorRT needs a finite maximum).
TRT_MAX_SIDE_FACTOR = 2
#: fp16 engine vs fp32 eager: largest accepted ``max|out - ref| / max|ref|`` and lowest top-1 agreement.
TRT_REL_TOL = 2e-2
TRT_TOP1_MIN = 0.99


def trt_profile(input_range: dict[str, Any], opt_size: tuple[int, int], batches: tuple[int, int, int] = TRT_BATCHES
                ) -> dict[str, tuple[int, int, int, int]]:
    """``{"min", "opt", "max"}`` input shapes ``(B, C, H, W)`` of a TensorRT profile for an exported file's stored
    range (``open_fastervit.input_range``: ``height`` / ``width`` as ``[min, max|None]``, ``in_chans``).

    A fixed size stays fixed; a dynamic axis spans its minimum to ``max(opt, min) * TRT_MAX_SIDE_FACTOR`` (or the
    stored maximum), with the optimum at ``opt_size`` clamped into that span.

    Raises:
        ValueError: batches not ordered ``1 <= min <= opt <= max``.
    """
    b0, b1, b2 = batches
    if not 1 <= b0 <= b1 <= b2:
        raise ValueError(f"profile batches must satisfy 1 <= min <= opt <= max, got {batches}")
    chans = int(input_range.get("in_chans", 3))
    sides = []
    for axis, opt in zip(("height", "width"), opt_size):
        lo, hi = input_range[axis]
        top = int(hi) if hi is not None else max(int(opt), int(lo)) * TRT_MAX_SIDE_FACTOR
        sides.append((int(lo), min(max(int(opt), int(lo)), top), top))
    (h0, h1, h2), (w0, w1, w2) = sides
    return {"min": (b0, chans, h0, w0), "opt": (b1, chans, h1, w1), "max": (b2, chans, h2, w2)}


def fp16_check(out: torch.Tensor, ref: torch.Tensor, rel_tol: float = TRT_REL_TOL,
               top1_min: float = TRT_TOP1_MIN) -> dict[str, Any]:
    """Reduced-precision logits ``out`` against fp32 ``ref`` (both ``(B, classes)``): ``max_rel_error``
    (``max|out - ref| / max|ref|``), ``top1_agreement`` and ``ok`` (error <= ``rel_tol`` and agreement >=
    ``top1_min``).

    Raises:
        ValueError: shapes that differ.
    """
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} differs from the reference {tuple(ref.shape)}")
    out, ref = out.float().cpu(), ref.float().cpu()
    rel = float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    agree = float((out.argmax(-1) == ref.argmax(-1)).float().mean())
    return {"max_rel_error": rel, "top1_agreement": agree, "ok": rel <= rel_tol and agree >= top1_min,
            "rel_tol": rel_tol, "top1_min": top1_min}


def trt_onnx(model: torch.nn.Module, path: Path, img_size: int) -> tuple[Path, dict[str, Any]]:
    """The ONNX file the TensorRT engine is built from: ``fastervit export`` of ``model`` (fp32, checked against
    the eager model, batch dynamic, ``img_size`` fixed) and its stored input range."""
    export_model(model, path, example_size=(img_size, img_size), fuse=True)
    return path, load_exported(path).input_range


class TrtEngine:
    """A TensorRT engine built from an ONNX file (fp16, LayerNorm in fp32, one profile): ``engine(x) -> logits``,
    ``x`` a CUDA ``(B, C, H, W)`` float tensor inside the profile."""

    def __init__(self, onnx_path: Path, profile: dict[str, tuple[int, ...]], num_classes: int) -> None:
        import tensorrt as trt  # optional: on the GPU machine only

        self.trt, self.num_classes = trt, num_classes
        logger = trt.Logger(trt.Logger.WARNING)
        builder = trt.Builder(logger)
        network = builder.create_network(0)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(Path(onnx_path).read_bytes()):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise RuntimeError(f"TensorRT cannot parse {onnx_path}: {errors}")
        config = builder.create_builder_config()
        config.set_flag(trt.BuilderFlag.FP16)
        config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
        kept = 0
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.NORMALIZATION:
                layer.precision = trt.float32
                layer.set_output_type(0, trt.float32)
                kept += 1
        self.fp32_norm_layers = kept
        self.input_name = network.get_input(0).name
        self.output_name = network.get_output(0).name
        opt_profile = builder.create_optimization_profile()
        opt_profile.set_shape(self.input_name, profile["min"], profile["opt"], profile["max"])
        config.add_optimization_profile(opt_profile)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise RuntimeError("TensorRT could not build the engine (see its log above)")
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
        self.context = self.engine.create_execution_context()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous().float()
        out = torch.empty(x.shape[0], self.num_classes, device=x.device, dtype=torch.float32)
        self.context.set_input_shape(self.input_name, tuple(x.shape))
        self.context.set_tensor_address(self.input_name, x.data_ptr())
        self.context.set_tensor_address(self.output_name, out.data_ptr())
        self.context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        return out


def tensorrt_item(settings: Settings, estimate_s: float) -> Item:
    """FasterViT-0: TensorRT fp16 engine vs eager fp16 autocast vs ``torch.compile`` fp16, batch ``settings.batch``."""

    def run() -> dict[str, Any]:
        name = settings.ours[0]
        device = torch.device(settings.device)
        model = timm.create_model(name, **settings.model_kwargs.get(name, {})).eval()
        result: dict[str, Any] = {"model": name, "batch": settings.batch, "img_size": settings.img_size}
        with tempfile.TemporaryDirectory(prefix="bench_gpu_trt_") as tmp:
            onnx_path, rng = trt_onnx(model, Path(tmp) / "model.onnx", settings.img_size)
            profile = trt_profile(rng, (settings.img_size, settings.img_size),
                                  (1, min(16, settings.batch), max(settings.batch, 1)))
            result["profile"] = profile
            try:
                import tensorrt  # optional: on the GPU machine only

                result["tensorrt"] = tensorrt.__version__
            except ImportError as e:
                result["note"] = f"TensorRT not importable ({e}): engine not built, only the ONNX file was checked"
                return result
            if device.type != "cuda":
                result["note"] = "TensorRT needs CUDA: engine not built"
                return result
            engine = TrtEngine(onnx_path, profile, int(model.num_classes))
        result["fp32_norm_layers"] = engine.fp32_norm_layers
        fused = inference_form(model).to(device).to(memory_format=torch.channels_last)
        x = torch.randn(settings.batch, 3, settings.img_size, settings.img_size, device=device)
        with torch.inference_mode():
            ref = fused(x)
            result["check"] = fp16_check(engine(x), ref)
            compiled = torch.compile(fused, mode=settings.compile_mode)

            def autocast(module: Callable[..., torch.Tensor]) -> Callable[[], torch.Tensor]:
                def step() -> torch.Tensor:
                    with torch.autocast("cuda", dtype=torch.float16):
                        return module(x.contiguous(memory_format=torch.channels_last))
                return step

            steps = {"tensorrt fp16": lambda: engine(x), "eager fp16": autocast(fused),
                     "compile fp16": autocast(compiled)}
            samples, errors = measure_interleaved(steps, warmup=settings.warmup, rounds=settings.rounds,
                                                  sync=lambda: torch.cuda.synchronize(device))
        result["img_s"] = {k: settings.batch / sorted(v)[len(v) // 2] for k, v in samples.items()}
        result["errors"] = errors
        return result

    return Item("tensorrt", "tensorrt", False, estimate_s * settings.scale, run,
                f"{settings.ours[0]} TensorRT fp16 engine from ONNX vs eager / compiled fp16, batch {settings.batch}")


def _free_device(device: torch.device) -> None:
    gc.collect()
    with contextlib.suppress(Exception):
        torch._dynamo.reset()  # compiled graphs of the previous item
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def run_items(items: list[Item], guard: BudgetGuard, device: torch.device, clock: Clock = time.monotonic
              ) -> list[dict[str, Any]]:
    """Run the items in order under the budget guard; a failing item is recorded and the run goes on."""
    records = []
    for item in items:
        record: dict[str, Any] = {"name": item.name, "kind": item.kind, "compiled": item.compiled,
                                  "description": item.description, "estimate_s": item.estimate_s}
        if not guard.allows(item.estimate_s):
            record.update(status="skipped", note=(
                f"skipped: estimated {item.estimate_s * guard.slowdown:.0f} s (x{guard.slowdown:.2f} slowdown so far) "
                f"> {max(guard.remaining(), 0):.0f} s left of the {guard.budget_s:.0f} s budget"))
            records.append(record)
            print(f"bench_gpu: {item.name}: {record['note']}", file=sys.stderr, flush=True)
            continue
        print(f"bench_gpu: {item.name} ({item.description}) ...", file=sys.stderr, flush=True)
        _free_device(device)
        started = clock()
        try:
            record.update(status="ok", result=item.run())
        except Exception as exc:  # one failing item (compile error, OOM, ...) must not stop the suite
            record.update(status="error", error=f"{type(exc).__name__}: {exc}"[:500],
                          traceback=traceback.format_exc(limit=8)[-4000:])
        record["elapsed_s"] = clock() - started
        guard.record(item.estimate_s, record["elapsed_s"])
        if device.type == "cuda":
            record["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        records.append(record)
        print(f"bench_gpu: {item.name}: {record['status']} in {record['elapsed_s']:.0f} s "
              f"({guard.elapsed():.0f} s of {guard.budget_s:.0f} s used)", file=sys.stderr, flush=True)
    _free_device(device)
    return records


# --------------------------------------------------------------------------------------------------
# Summary and reports
# --------------------------------------------------------------------------------------------------


def _ratio(ratios: list[dict[str, Any]], baseline_model: str) -> float | None:
    for ratio in ratios or []:
        if ratio["baseline"].split(":")[0] == baseline_model:
            return ratio["median"]
    return None


def summary_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per measured (item, model, form, precision): img/s, ms, ratios, paper reference."""
    rows = []
    for rec in records:
        if rec["status"] != "ok" or rec["kind"] == "tensorrt":
            continue
        for r in rec["result"]["rows"]:
            row: dict[str, Any] = {
                "item": rec["name"], "kind": rec["kind"], "compiled": rec["compiled"], "model": r["model"],
                "form": r.get("form", "inference form"), "precision": r["precision"], "batch": r["batch"],
                "size": r.get("size") or f"{r['img_size']}x{r['img_size']}", "status": r["status"],
                "img_per_s": r.get("img_per_s"), "latency_ms": r.get("latency_ms"),
                "peak_mem_mb": r.get("peak_mem_mb")}
            if rec["kind"] == "classification":
                row["vs_swin_t"] = _ratio(r.get("ratios", []), SWIN_T)
                row["vs_convnext_t"] = _ratio(r.get("ratios", []), CONVNEXT_T)
                paper = PAPER_A100.get(r["model"])
                row["paper_a100_img_s"] = paper
                if paper and r.get("img_per_s"):
                    row["measured_over_paper"] = r["img_per_s"] / paper
            else:
                row["vs_swin_t"] = (r.get("vs_baseline") or {}).get("median")
                row["fused_vs_plain"] = (r.get("fused_vs_plain") or {}).get("median")
            rows.append(row)
    return rows


def _num(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown(result: dict[str, Any]) -> str:
    """Tables of the run: classification (eager and compiled side by side), dense, items and their status."""
    env = result["env"]
    lines = [
        "# GPU benchmark (experiments/bench_gpu.py)" + (" - DRY RUN (tiny settings)" if result["dry_run"] else ""),
        "",
        f"- device: {env['device']} ({env.get('gpu') or env['cpu']}); torch {env['torch']}, "
        f"CUDA {env.get('cuda', '-')}, cuDNN {env.get('cudnn', '-')}, timm {env['timm']}; {env['date_utc']}",
        f"- {result['settings']['warmup']} warm-up + {result['settings']['rounds']} timed rounds per item, models "
        "interleaved, medians; channels_last; autocast bf16 and fp16; ours fused (`fuse()`), official "
        "`reparameterize_model`; compile mode "
        f"{result['settings']['compile_mode']} ({result['settings']['compile_backend']})",
        f"- budget {result['budget']['budget_s']:.0f} s, used {result['budget']['elapsed_s']:.0f} s; official "
        f"implementation: {result['official']['note']}",
        "- paper: A100, batch 128, 224 px (the authors' README / Figure 1); a different GPU, so `measured / paper` is "
        "context, not a pass mark",
    ]
    cls = [r for r in result["summary"] if r["kind"] == "classification"]
    if cls:
        settings = result["settings"]
        lines += ["", f"## Classification, batch {settings['batch']}, {settings['img_size']} px", "",
                  "| model | precision | eager img/s | compiled img/s | compiled / eager | vs Swin-T (eager) | "
                  "vs ConvNeXt-T (eager) | paper A100 img/s | eager / paper | peak MiB (eager) |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        order = {m: i for i, m in enumerate([*settings["ours"], *settings["peers"], *settings["official"]])}
        keys = sorted(dict.fromkeys((r["model"], r["precision"]) for r in cls),
                      key=lambda k: (order.get(k[0], len(order)), k[1]))
        for model, precision in keys:
            eager = next((r for r in cls if (r["model"], r["precision"]) == (model, precision) and not r["compiled"]),
                         None)
            comp = next((r for r in cls if (r["model"], r["precision"]) == (model, precision) and r["compiled"]), None)
            e_ips = eager["img_per_s"] if eager else None
            c_ips = comp["img_per_s"] if comp else None
            speed = c_ips / e_ips if e_ips and c_ips else None
            e_text = _num(e_ips) if eager is None or eager["status"] == "ok" else eager["status"][:60]
            c_text = _num(c_ips) if comp is None or comp["status"] == "ok" else comp["status"][:60]
            lines.append(
                f"| {model} | {precision} | {e_text} | {c_text} | {_x(speed)} "
                f"| {_x(eager and eager['vs_swin_t'])} | {_x(eager and eager['vs_convnext_t'])} "
                f"| {_num(PAPER_A100.get(model), 0)} | {_x(eager and eager.get('measured_over_paper'))} "
                f"| {_num(eager and eager['peak_mem_mb'], 0)} |")
    dense = [r for r in result["summary"] if r["kind"] == "dense"]
    if dense:
        lines += ["", f"## Dense backbones, {dense[0]['size']}, batch {dense[0]['batch']}", "",
                  "| model | form | precision | compile | ms | img/s | vs Swin-T | fused / plain | peak MiB |",
                  "|---|---|---|---|---:|---:|---:|---:|---:|"]
        for r in dense:
            if r["status"] != "ok":
                lines.append(f"| {r['model']} | {r['form']} | {r['precision']} | {r['compiled']} | {r['status'][:80]} "
                             "| | | | |")
                continue
            lines.append(f"| {r['model']} | {r['form']} | {r['precision']} | {'on' if r['compiled'] else 'off'} "
                         f"| {_num(r['latency_ms'], 2)} | {_num(r['img_per_s'])} | {_x(r['vs_swin_t'])} "
                         f"| {_x(r.get('fused_vs_plain'))} | {_num(r['peak_mem_mb'], 0)} |")
    trt = next((r for r in result["items"] if r["kind"] == "tensorrt" and r["status"] == "ok"), None)
    if trt:
        res = trt["result"]
        lines += ["", f"## TensorRT, {res['model']}, batch {res['batch']}, {res['img_size']} px", "",
                  f"- profile (min / opt / max): {res['profile']['min']} / {res['profile']['opt']} / "
                  f"{res['profile']['max']}; TensorRT {res.get('tensorrt', '-')}"]
        if res.get("note"):
            lines.append(f"- {res['note']}")
        if res.get("check"):
            c = res["check"]
            lines.append(f"- fp16 engine vs fp32 eager: relative logit error {c['max_rel_error']:.2e} (<= "
                         f"{c['rel_tol']:g}), top-1 agreement {100 * c['top1_agreement']:.1f}% "
                         f"({'ok' if c['ok'] else 'FAILS the check'}); LayerNorm layers kept fp32: "
                         f"{res.get('fp32_norm_layers')}")
        if res.get("img_s"):
            lines += ["", "| form | img/s |", "|---|---:|"]
            lines += [f"| {k} | {_num(v)} |" for k, v in res["img_s"].items()]
    lines += ["", "## Items", "", "| item | status | seconds | note |", "|---|---|---:|---|"]
    for rec in result["items"]:
        note = rec.get("note") or rec.get("error") or rec["description"]
        lines.append(f"| {rec['name']} | {rec['status']} | {_num(rec.get('elapsed_s'), 0)} | {note} |")
    return "\n".join(lines) + "\n"


def official_available() -> tuple[bool, str]:
    """Is the official ``fastervit`` package importable? (It is only imported later, by ``run_benchmark``.)"""
    if importlib.util.find_spec("fastervit") is None:
        return False, "not installed (pip package `fastervit`): not measured"
    return True, "measured as a timing oracle (faster_vit_*_224 via timm)"


def run_suite(args: argparse.Namespace, clock: Clock = time.monotonic,
              items: list[Item] | None = None) -> dict[str, Any]:
    """Plan (unless ``items`` are given), run under the budget, and return the JSON-ready result."""
    device = resolve_device(args.device)
    if device.type != "cuda" and not args.dry_run and args.device != "cpu":
        raise BenchError("no CUDA device; use --dry-run --device cpu for a CPU check of the script")
    has_official, note = official_available()
    if args.no_official:
        has_official, note = False, "left out (--no-official)"
    settings = Settings.make(args, has_official)
    settings.device = str(device)
    guard = BudgetGuard(args.budget_min * 60.0, clock)
    cudnn_before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda"
    try:
        planned = items if items is not None else plan_items(settings)
        if args.items:
            planned = [i for i in planned if i.name in args.items]
        records = run_items(planned, guard, device, clock)
    finally:
        torch.backends.cudnn.benchmark = cudnn_before
    settings_dict = {k: v for k, v in vars(settings).items()}
    return {"schema": SCHEMA, "dry_run": bool(args.dry_run), "env": environment(device), "settings": settings_dict,
            "budget": {"budget_s": guard.budget_s, "elapsed_s": guard.elapsed(),
                       "skipped": [r["name"] for r in records if r["status"] == "skipped"]},
            "official": {"available": has_official, "note": note}, "paper_a100_img_s": PAPER_A100,
            "items": records, "summary": summary_rows(records), "command": " ".join(sys.argv)}


def write_outputs(result: dict[str, Any], out: Path) -> list[Path]:
    """``bench_gpu.json`` and ``bench_gpu.md`` under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "bench_gpu.json", out / "bench_gpu.md"]
    paths[0].write_text(json.dumps(result, indent=2, default=str) + "\n")
    paths[1].write_text(markdown(result))
    return paths


def build_parser() -> argparse.ArgumentParser:
    """Options of the script."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/bench_gpu"), help="output folder (default: %(default)s)")
    p.add_argument("--device", default="auto", help="cuda, cuda:N, cpu or auto (default: cuda when available)")
    p.add_argument("--budget-min", type=float, default=DEFAULT_BUDGET_MIN,
                   help="wall-clock budget in minutes; items that would not fit are skipped (default: %(default)s)")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny settings: batch 2, 64 px, 1 warm-up and 1 timed round, tiny FasterViT-0 and "
                        "test_convnext (seconds)")
    p.add_argument("--items", type=lambda t: [v for v in t.split(",") if v], default=[], metavar="LIST",
                   help="run only these items (cls_eager, dense_eager, cls_compile, dense_compile, "
                        "cls_compile_fastervit_1 .. _4)")
    p.add_argument("--compile-mode", default="default", help="torch.compile mode (default: %(default)s)")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor; eager in the dry run)")
    p.add_argument("--no-official", action="store_true", help="leave out the official implementation")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the suite and write the reports; 2 for a request that cannot run."""
    args = build_parser().parse_args(argv)
    try:
        result = run_suite(args)
    except BenchError as exc:
        print(f"bench_gpu: error: {exc}", file=sys.stderr)
        return 2
    paths = write_outputs(result, args.out)
    print(markdown(result))
    print("wrote " + ", ".join(map(str, paths)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
