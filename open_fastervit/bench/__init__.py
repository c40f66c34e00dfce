"""Benchmarks of ``fastervit bench``: speed, memory and compute of FasterViT against its peers.

The subpackage uses the package's public API only and is imported by the command line, the demos and the
experiments; nothing in the product imports it. Modules, lowest first:

- :mod:`~open_fastervit.bench.timing`: interleaved rounds, medians and quartiles, the device barrier, autocast;
- :mod:`~open_fastervit.bench.memory`: peak memory of a step, multiply-accumulates, the GEMM reference rate;
- :mod:`~open_fastervit.bench.candidates`: where a model name comes from, name checks, official/ours pairs;
- :mod:`~open_fastervit.bench.environment`: versions, hardware and load recorded with every result;
- :mod:`~open_fastervit.bench.plots` and :mod:`~open_fastervit.bench.report`: PNG figures; JSON, CSV, Markdown;
- :mod:`~open_fastervit.bench.classification`: ``fastervit bench`` (:func:`run_benchmark`);
- :mod:`~open_fastervit.bench.backbones`, :mod:`~open_fastervit.bench.profile` and
  :mod:`~open_fastervit.bench.dense`: ``fastervit bench --dense`` (:func:`run_dense`) and ``--profile``
  (:func:`profile_forward`).

Python API: ``run_benchmark(BenchConfig(...))`` then ``write_reports(result, folder)``; ``run_dense(DenseConfig(...))``
then ``write_dense_reports(result, folder)``.
"""

from __future__ import annotations

from open_fastervit.bench.backbones import DenseConfig, parse_sizes
from open_fastervit.bench.candidates import (
    OFFICIAL_PREFIX,
    check_model_names,
    import_plugins,
    official_to_ours_name,
    pairs_of,
    source_of,
)
from open_fastervit.bench.classification import (
    DEFAULT_MODELS,
    DEFAULT_SCALING_SIZES,
    PEER_TOP1,
    SCHEMA,
    BenchConfig,
    Group,
    Prepared,
    add_ratios,
    base_row,
    build_at_size,
    candidate_info,
    create_candidate,
    fuse_model,
    make_infer_step,
    make_inputs,
    make_optimizer,
    make_train_step,
    member_steps,
    parse_model_kwargs,
    parse_top1,
    plan_groups,
    prepare,
    probe_forward,
    run_benchmark,
    run_group,
    share_official_weights,
)
from open_fastervit.bench.dense import run_dense
from open_fastervit.bench.environment import cpu_name, environment
from open_fastervit.bench.memory import PeakTensorMemory, count_gmacs, measure_gemm, peak_memory_mb
from open_fastervit.bench.profile import profile_forward
from open_fastervit.bench.report import dense_markdown, markdown_report, write_dense_reports, write_reports
from open_fastervit.bench.timing import (
    BenchError,
    Stats,
    Step,
    Timer,
    auto_iters,
    autocast,
    device_sync,
    measure_interleaved,
    resolve_device,
    summarize,
    timing_fields,
)
from open_fastervit.runtime import PRECISIONS

__all__ = [
    "DEFAULT_MODELS",
    "DEFAULT_SCALING_SIZES",
    "OFFICIAL_PREFIX",
    "PEER_TOP1",
    "PRECISIONS",
    "SCHEMA",
    "BenchConfig",
    "BenchError",
    "DenseConfig",
    "Group",
    "PeakTensorMemory",
    "Prepared",
    "Stats",
    "Step",
    "Timer",
    "add_ratios",
    "auto_iters",
    "autocast",
    "base_row",
    "build_at_size",
    "candidate_info",
    "check_model_names",
    "count_gmacs",
    "cpu_name",
    "create_candidate",
    "dense_markdown",
    "device_sync",
    "environment",
    "fuse_model",
    "import_plugins",
    "make_infer_step",
    "make_inputs",
    "make_optimizer",
    "make_train_step",
    "markdown_report",
    "measure_gemm",
    "measure_interleaved",
    "member_steps",
    "official_to_ours_name",
    "pairs_of",
    "parse_model_kwargs",
    "parse_sizes",
    "parse_top1",
    "peak_memory_mb",
    "plan_groups",
    "prepare",
    "probe_forward",
    "profile_forward",
    "resolve_device",
    "run_benchmark",
    "run_dense",
    "run_group",
    "share_official_weights",
    "source_of",
    "summarize",
    "timing_fields",
    "write_dense_reports",
    "write_reports",
]
