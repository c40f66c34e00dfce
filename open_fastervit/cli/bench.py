"""``fastervit bench``: interleaved throughput/latency/memory benchmark (``open_fastervit.bench.run_benchmark``)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from open_fastervit.bench.backbones import (
    DEFAULT_DENSE_MODELS,
    DEFAULT_DENSE_SIZES,
    DEFAULT_TRAIN_SIZES,
    DenseConfig,
    parse_sizes,
)
from open_fastervit.bench.candidates import import_plugins
from open_fastervit.bench.classification import (
    DEFAULT_MODELS,
    DEFAULT_SCALING_SIZES,
    BenchConfig,
    parse_model_kwargs,
    parse_top1,
    run_benchmark,
)
from open_fastervit.bench.dense import run_dense
from open_fastervit.bench.profile import profile_forward
from open_fastervit.bench.report import dense_markdown, markdown_report, write_dense_reports, write_reports
from open_fastervit.bench.runtimes import FORMS, RuntimeConfig, markdown_runtimes, run_runtimes, write_runtime_reports
from open_fastervit.bench.timing import BenchError
from open_fastervit.cli._common import amp_word

#: ``--amp`` words -> the precision names of the benchmark's rows.
_BENCH_WORD = {"none": "fp32", "bf16": "bf16", "fp16": "fp16"}


def _amp_list(text: str, option: str = "--amp") -> list[str]:
    """Comma-separated ``--amp`` words (old spellings accepted with a note)."""
    return [amp_word(v, option) for v in text.split(",") if v.strip()]


def _deprecated_precisions(text: str) -> list[str]:
    print("fastervit: note: --precisions is deprecated; use --amp (none, bf16, fp16)", file=sys.stderr)
    return _amp_list(text, "--precisions")


def _baseline(text: str) -> str:
    """``NAME`` or ``NAME:AMP`` -> the benchmark's ``NAME`` / ``NAME:fp32|bf16|fp16``."""
    name, sep, word = text.rpartition(":")
    if not sep or not word:
        return text
    try:
        return f"{name}:{_BENCH_WORD[amp_word(word, '--baseline')]}"
    except argparse.ArgumentTypeError as exc:
        raise BenchError(f"--baseline {text!r}: {exc}") from None


def _int_list(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    """Options of ``fastervit bench``."""
    p = argparse.ArgumentParser(
        prog="fastervit bench",
        description="Interleaved throughput/latency/training-step/memory benchmark of FasterViT, its "
                    "official implementation and timm peers, on CPU or CUDA.",
        epilog="Example (ours vs official with the same weights, and two peers): fastervit bench "
               "--import fastervit --models fastervit_0,faster_vit_0_224,swin_tiny_patch4_window7_224,"
               "convnext_tiny --batch-sizes 1,16 --train-batch 8 --amp none,bf16")
    p.add_argument("--models", type=_str_list, default=list(DEFAULT_MODELS), metavar="LIST",
                   help="comma-separated candidates: ours (fastervit_0), timm (convnext_tiny), official "
                        "(faster_vit_0_224, needs --import fastervit), int8 files of `fastervit quantize` (PATH.onnx: "
                        f"CPU, --train-batch 0); default: {','.join(DEFAULT_MODELS)}")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (timm plug-ins registering models); repeatable")
    p.add_argument("--model-kwargs", action="append", default=[], metavar="JSON",
                   help="create_model overrides: '{\"dim\": 32}' for all or 'NAME={...}' for one; repeatable")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier width (default: %(default)s)")
    p.add_argument("--batch-sizes", type=_int_list, default=[1, 16], metavar="LIST",
                   help="inference batch sizes (default: 1,16; '' for none)")
    p.add_argument("--img-sizes", "--resolutions", type=_int_list, default=[224], metavar="LIST",
                   help="input sides in px (default: 224)")
    p.add_argument("--amp", type=_amp_list, default=["none"], metavar="LIST",
                   help="comma-separated autocast precisions to compare: none, bf16, fp16 (fp16 is meant for "
                        "CUDA); default: none")
    p.add_argument("--precisions", dest="amp", type=_deprecated_precisions, metavar="LIST",
                   help=argparse.SUPPRESS)
    p.add_argument("--train-batch", type=int, default=8, help="training-step batch (0: skip)")
    p.add_argument("--scaling-sizes", type=_int_list, default=list(DEFAULT_SCALING_SIZES), metavar="LIST",
                   help="input sides of the cost-vs-size sweep, first precision only ('' to skip); "
                        f"default: {','.join(map(str, DEFAULT_SCALING_SIZES))}")
    p.add_argument("--scaling-batch", type=int, default=1, help="batch of the size sweep")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=False,
                   help="models and inputs in channels_last (--quick: on)")
    p.add_argument("--compile", dest="compile_mode", nargs="?", const="default", default=None,
                   metavar="MODE", help="torch.compile (MODE: default, reduce-overhead, max-autotune)")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=False,
                   help="inference: each model's inference form, model.fuse() or timm reparameterize_model "
                        "(--quick: on)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--warmup", type=int, default=3, help="untimed rounds before timing")
    p.add_argument("--rounds", type=int, default=7, help="timed interleaved rounds")
    p.add_argument("--iters", type=int, default=0, help="calls per timed turn (0: auto, >= --min-block)")
    p.add_argument("--min-block", dest="min_block_s", type=float, default=0.2,
                   help="seconds per timed turn when --iters is 0")
    p.add_argument("--baseline", dest="baselines", action="append", default=[], metavar="NAME[:AMP]",
                   help="throughput ratios against NAME (same precision) or NAME:AMP (none, bf16, fp16); repeatable; "
                        "default: the first model")
    p.add_argument("--top1", action="append", default=[], metavar="NAME=ACC",
                   help="top-1 for the accuracy-vs-throughput plot; repeatable")
    p.add_argument("--no-macs", dest="macs", action="store_false", help="skip MAC counting")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip peak-memory measurement")
    p.add_argument("--gemm-size", type=int, default=None,
                   help="side of the GEMM giving the peak rate (default 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model weights (default: %(default)s)")
    p.add_argument("--out", "--output", "-o", dest="out", type=Path, default=Path("runs/bench"),
                   help="output folder (default: %(default)s; --dense: runs/bench_dense)")
    p.add_argument("--quick", action="store_true",
                   help="about a minute on 2 CPU cores: batch 1,8, train batch 4, 1 warm-up, 3 rounds, "
                        "sizes 224,448, --fuse --channels-last; with --runtimes: a tiny FasterViT at 64 px, a few "
                        "minutes (explicit options still win)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_dense_options(p)
    add_runtime_options(p)
    return p


def add_runtime_options(p: argparse.ArgumentParser) -> None:
    """Options of ``fastervit bench --runtimes`` (one model in every runtime, side by side)."""
    g = p.add_argument_group(
        "runtimes (--runtimes)",
        "One model in every runtime on CPU: the authors' package (fp32 baseline), torch fp32 / bf16 / "
        "torch.compile, onnxruntime fp32 / int8, OpenVINO fp32 / bf16 / int8; interleaved rounds, medians, ratios "
        "vs our fp32 and the authors' fp32, top-1 agreement with our fp32 on real images, top-1 accuracy with "
        "--checkpoint and --data. Reuses the first of --models (default fastervit_0), --model-kwargs, the first "
        "--img-sizes, --batch-sizes (default 1,16), --threads, --warmup (default 2), --rounds (default 5), --out "
        "(default runs/bench_runtimes). --quick: a tiny model at 64 px, batch 1,4, no torch.compile.")
    g.add_argument("--runtimes", action="store_true", help="run the runtime comparison instead")
    g.add_argument("--checkpoint", default=None, metavar="RUN_OR_FILE",
                   help="a trained model (run folder or weights file) instead of random weights")
    g.add_argument("--data", default=None, metavar="VAL_DIR",
                   help="labelled images (ImageFolder split) for top-1 accuracy of every form")
    g.add_argument("--images", default=None, metavar="DIR",
                   help="real images for the agreement check (default: the data folder's ImageNet sample)")
    g.add_argument("--calib", default=None, metavar="DIR", help="calibration images of the int8 forms "
                   "(default: --images)")
    g.add_argument("--num-calib", type=int, default=32, help="calibration images (default: %(default)s)")
    g.add_argument("--forms", type=_str_list, default=list(FORMS), metavar="LIST",
                   help=f"forms to compare (default: all: {','.join(FORMS)})")


#: ``--runtimes --quick``: a tiny FasterViT at 64 px, a few minutes in all (explicit options still win).
RUNTIMES_QUICK: dict[str, Any] = {
    "model_kwargs": {"dim": 16, "in_dim": 8, "depths": [1, 1, 2, 2], "num_heads": [1, 2, 2, 4],
                     "window_size": [7, 7, 3, 3], "num_classes": 10},
    "img_size": 64, "batch_sizes": [1, 4], "warmup": 1, "rounds": 2, "num_calib": 8, "num_check": 16,
    "forms": [f for f in FORMS if f != "torch.compile"]}
_RUNTIME_OPTIONS = {"model_kwargs": "--model-kwargs", "img_size": "--img-sizes", "batch_sizes": "--batch-sizes",
                    "warmup": "--warmup", "rounds": "--rounds", "num_calib": "--num-calib", "num_check": "",
                    "forms": "--forms"}


def runtime_config_from_args(args: argparse.Namespace, argv: Sequence[str]) -> RuntimeConfig:
    """A :class:`open_fastervit.bench.runtimes.RuntimeConfig` from parsed options (``--quick`` fills the rest)."""
    given = _given_options(argv)
    kwargs = parse_model_kwargs(args.model_kwargs)
    model = args.models[0] if "--models" in given else "fastervit_0"
    values: dict[str, Any] = {
        "model": model, "model_kwargs": {**kwargs.get("*", {}), **kwargs.get(model, {})},
        "checkpoint": args.checkpoint, "data": args.data, "images": args.images, "calib": args.calib,
        "img_size": args.img_sizes[0] if "--img-sizes" in given and args.img_sizes else None,
        "batch_sizes": args.batch_sizes, "forms": args.forms, "threads": args.threads,
        "warmup": args.warmup if "--warmup" in given else 2, "rounds": args.rounds if "--rounds" in given else 5,
        "num_calib": args.num_calib, "command": " ".join(["fastervit", "bench", *argv]),
    }
    if args.quick:
        for key, value in RUNTIMES_QUICK.items():
            if _RUNTIME_OPTIONS[key] not in given and not (key == "model_kwargs" and args.checkpoint):
                values[key] = value
    return RuntimeConfig(**values)


def runtimes_main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``fastervit bench --runtimes``: run, write runtimes.{json,md}, print the table."""
    given = _given_options(argv) | {a for a in argv if a == "-o" or a.startswith("-o=")}
    out = args.out if given & {"--out", "--output", "-o", "-o="} else Path("runs/bench_runtimes")
    try:
        import_plugins(args.imports)  # --import fastervit: the authors' baseline
        result = run_runtimes(runtime_config_from_args(args, argv),
                              log=lambda line: print(f"fastervit bench: {line}", file=sys.stderr))
    except BenchError as exc:
        print(f"fastervit bench: error: {exc}", file=sys.stderr)
        return 2
    try:
        paths = write_runtime_reports(result, out)
    except OSError as exc:
        print(f"fastervit bench: error: cannot write the reports into {out}: {exc}", file=sys.stderr)
        return 2
    print(markdown_runtimes(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0


def _sizes(text: str) -> list[tuple[int, int]]:
    try:
        return parse_sizes(text)
    except BenchError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_dense_options(p: argparse.ArgumentParser) -> None:
    """Options of ``fastervit bench --dense`` (backbones at detection/segmentation sizes) and ``--profile``."""
    def sizes_text(sizes: Sequence[tuple[int, int]]) -> str:
        return ",".join(f"{h}x{w}" for h, w in sizes)

    g = p.add_argument_group(
        "dense prediction (--dense)",
        "Backbones returning the four stage maps (FasterViT via create_backbone, plain eval path and fused "
        "inference form; timm peers with features_only) at detection/segmentation sizes. Reuses --models (default: "
        f"{','.join(DEFAULT_DENSE_MODELS)}), --model-kwargs, --amp, --device, --channels-last, --compile, "
        "--threads, --warmup (default 1), --rounds (default 5), --iters (default 1), --baseline (default "
        "swin_tiny_patch4_window7_224), --no-macs, --no-memory, --out (default runs/bench_dense), --quick.")
    g.add_argument("--dense", action="store_true", help="run the dense-prediction benchmark instead")
    g.add_argument("--dense-sizes", type=_sizes, default=list(DEFAULT_DENSE_SIZES), metavar="HxW,...",
                   help=f"inference sizes (default: {sizes_text(DEFAULT_DENSE_SIZES)}; '' for none)")
    g.add_argument("--dense-batch", type=int, default=1, help="inference batch (default: %(default)s)")
    g.add_argument("--dense-train-sizes", type=_sizes, default=list(DEFAULT_TRAIN_SIZES), metavar="HxW,...",
                   help=f"training-step sizes (default: {sizes_text(DEFAULT_TRAIN_SIZES)}; '' for none)")
    g.add_argument("--dense-train-batch", type=int, default=2,
                   help="training-step batch: forward + backward of the sum of the maps' means (0: skip; default: "
                        "%(default)s)")
    g.add_argument("--dense-forms", type=_str_list, default=["plain", "fused"], metavar="LIST",
                   help="FasterViT forms at inference: plain (eval, no fusion), fused (fuse()); default: both")
    g.add_argument("--dense-check-tol", type=float, default=1e-5,
                   help="largest allowed max|fused - plain| / max|plain| of any map, fp32 (default: %(default)g)")
    g.add_argument("--profile", nargs="?", const="", default=None, metavar="MODEL",
                   help="instead of timing: torch.profiler on one call of MODEL (default: the first model) and the "
                        "top operators by self CPU time with shares, written into --out")
    g.add_argument("--profile-form", choices=["plain", "fused", "train"], default="fused",
                   help="form profiled (default: %(default)s; peers run as built for plain and fused)")
    g.add_argument("--profile-size", type=_sizes, default=None, metavar="HxW",
                   help="size profiled (default: the first --dense-sizes, or the first training size for train)")
    g.add_argument("--profile-top", type=int, default=25, help="operators listed (default: %(default)s)")


QUICK = {"batch_sizes": [1, 8], "train_batch": 4, "warmup": 1, "rounds": 3, "iters": 1,
         "scaling_sizes": [224, 448], "fuse": True, "channels_last": True}


def config_from_args(args: argparse.Namespace, argv: Sequence[str]) -> BenchConfig:
    """A :class:`BenchConfig` from parsed options; ``--quick`` fills the options not given explicitly."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(BenchConfig) if hasattr(args, f.name)}
    values["precisions"] = [_BENCH_WORD[w] for w in args.amp]
    values["baselines"] = [_baseline(b) for b in args.baselines]
    values["model_kwargs"] = parse_model_kwargs(args.model_kwargs)
    values["top1"] = parse_top1(args.top1)
    values["command"] = " ".join(["fastervit", "bench", *argv])
    if args.quick:
        given = {a.split("=")[0].replace("--no-", "--") for a in argv if a.startswith("--")}
        for key, value in QUICK.items():
            if f"--{key.replace('_', '-')}" not in given:
                values[key] = value
    return BenchConfig(**values)


#: ``--dense --quick``: a few seconds per model on 2 CPU cores (explicit options still win).
DENSE_QUICK: dict[str, Any] = {
    "models": ["fastervit_0", "swin_tiny_patch4_window7_224", "convnext_tiny"], "sizes": [(384, 640)],
    "train_sizes": [(256, 384)], "train_batch": 1, "warmup": 0, "rounds": 2, "iters": 1, "channels_last": True}
#: Defaults of ``--dense`` that differ from the classification benchmark's, by DenseConfig field and option.
_DENSE_DEFAULTS: dict[str, tuple[str, Any]] = {
    "warmup": ("--warmup", 1), "rounds": ("--rounds", 5), "iters": ("--iters", 1)}
#: DenseConfig field -> (option, namespace attribute) of the dense options.
_DENSE_FIELDS = {"sizes": ("--dense-sizes", "dense_sizes"), "batch": ("--dense-batch", "dense_batch"),
                 "train_sizes": ("--dense-train-sizes", "dense_train_sizes"),
                 "train_batch": ("--dense-train-batch", "dense_train_batch"), "forms": ("--dense-forms", "dense_forms"),
                 "check_tol": ("--dense-check-tol", "dense_check_tol")}


def _given_options(argv: Sequence[str]) -> set[str]:
    """Long options present on the command line (``--no-x`` counted as ``--x``)."""
    return {a.split("=")[0].replace("--no-", "--") for a in argv if a.startswith("--")}


def dense_config_from_args(args: argparse.Namespace, argv: Sequence[str]) -> DenseConfig:
    """A :class:`open_fastervit.bench.backbones.DenseConfig` from parsed options (``--quick`` fills those not given)."""
    given = _given_options(argv)
    values: dict[str, Any] = {
        "models": args.models if "--models" in given else list(DEFAULT_DENSE_MODELS),
        "precisions": [_BENCH_WORD[w] for w in args.amp],
        "baseline": _baseline(args.baselines[0]).partition(":")[0] if args.baselines else "",
        "model_kwargs": parse_model_kwargs(args.model_kwargs),
        "command": " ".join(["fastervit", "bench", *argv]),
    }
    for key in ("device", "channels_last", "compile_mode", "threads", "min_block_s", "imports", "macs", "memory",
                "seed"):
        values[key] = getattr(args, key)
    for key, (option, default) in _DENSE_DEFAULTS.items():
        values[key] = getattr(args, key) if option in given else default
    for key, (_, attr) in _DENSE_FIELDS.items():
        values[key] = getattr(args, attr)
    if args.quick:
        options = {**{k: o for k, (o, _) in _DENSE_FIELDS.items()}, **{k: o for k, (o, _) in _DENSE_DEFAULTS.items()},
                   "models": "--models", "channels_last": "--channels-last"}
        for key, value in DENSE_QUICK.items():
            if options[key] not in given:
                values[key] = value
    return DenseConfig(**values)


def dense_main(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """``fastervit bench --dense`` / ``--profile``: run, write the reports, print the Markdown table."""
    given = _given_options(argv) | {a for a in argv if a == "-o" or a.startswith("-o=")}
    out = args.out if given & {"--out", "--output", "-o", "-o="} else Path("runs/bench_dense")
    try:
        config = dense_config_from_args(args, argv)
        if args.profile is not None:
            model = args.profile or config.models[0]
            kind_sizes = config.train_sizes if args.profile_form == "train" else config.sizes
            size = (args.profile_size or kind_sizes or config.sizes or config.train_sizes)[0]
            result = profile_forward(config, model, args.profile_form, size, out, top=args.profile_top)
            print(Path(result["paths"][1]).read_text())
            print("wrote " + ", ".join(result["paths"]), file=sys.stderr)
            return 0
        result = run_dense(config, progress=args.progress)
    except BenchError as exc:
        print(f"fastervit bench: error: {exc}", file=sys.stderr)
        return 2
    try:
        paths = write_dense_reports(result, out)
    except OSError as exc:
        print(f"fastervit bench: error: cannot write the reports into {out}: {exc}", file=sys.stderr)
        return 2
    print(dense_markdown(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    if not result["checks_ok"]:
        print("fastervit bench: warning: the fused maps differ from the plain ones beyond --dense-check-tol",
              file=sys.stderr)
    return 0


def warn_if_busy() -> None:
    """Tell the user when other processes already keep the CPUs busy (timings will be noisy)."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 0.75 * cores:
        print(f"fastervit bench: warning: the 1-minute load average is {load:.1f} on {cores} cores; other "
              "processes compete for the CPU. Interleaving keeps ratios comparable, but absolute numbers "
              "will be low; with fewer free cores than threads, try --threads 1.", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``fastervit bench``: run, write the reports, print the Markdown table."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    warn_if_busy()
    if args.runtimes:
        return runtimes_main(args, argv)
    if args.dense or args.profile is not None:
        return dense_main(args, argv)
    try:
        result = run_benchmark(config_from_args(args, argv), progress=args.progress)
    except BenchError as exc:
        print(f"fastervit bench: error: {exc}", file=sys.stderr)
        return 2
    try:
        paths = write_reports(result, args.out)
    except OSError as exc:
        print(f"fastervit bench: error: cannot write the reports into {args.out}: {exc}", file=sys.stderr)
        return 2
    print(markdown_report(result))
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0
