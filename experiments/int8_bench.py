"""int8 (onnxruntime static QDQ, ``fastervit quantize``) against fp32 on CPU: throughput and top-1.

Measures, at batch 16, side by side and interleaved (``open_fastervit.bench.measure_interleaved``: every candidate
in turn, A B C A B C ..., medians; each ratio is the median of per-round ratios):

- **the demo model** (``fastervit demo``'s 2.5M-parameter FasterViT, 64 px) and **FasterViT-0** (224 px);
- three forms of each: our fastest fp32 path (the fused inference form, ``inference_form``, eager torch,
  channels_last), the same fp32 graph in onnxruntime (``export_model``), and the int8 file of ``quantize_model``;
- top-1 of the demo model on tiny-imagenet-10 val, fp32 and int8, with ``open_fastervit.validate.validate``
  (the int8 file calibrated on the train split, so the val photos are held out).

FasterViT-0 without ``--f0-checkpoint`` has random weights: its speed is that of the trained model (the same
operations), its accuracy means nothing and is not reported. Prints a Markdown table and writes ``results.json``
and ``results.md`` under ``--out``.

Usage (a quiet machine; ``fastervit demo`` first writes demo_output/fastervit_demo.safetensors in ~7 min)::

    python experiments/int8_bench.py --demo-checkpoint demo_output/fastervit_demo.safetensors --out runs/int8
    python experiments/int8_bench.py --demo-checkpoint ... --threads 1    # one core

Threads: torch and onnxruntime get the same intra-op thread count (``--threads``, default torch's).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from open_fastervit.bench import auto_iters, cpu_name, measure_interleaved, summarize
from open_fastervit.deploy.export import export_model
from open_fastervit.deploy.quantize import load_quantized, quantize_model
from open_fastervit.fused import inference_form
from open_fastervit.inference import data_config_for
from open_fastervit.loading import load_model
from open_fastervit.paths import data_path
from open_fastervit.validate import validate

FORMS = ("fp32 torch (fused)", "fp32 onnxruntime", "int8 onnxruntime")


def time_forms(forms: dict[str, Any], x: torch.Tensor, rounds: int, warmup: int, min_block_s: float
               ) -> dict[str, dict[str, float]]:
    """img/s (median) of each callable on ``x``, interleaved; ratios to the first (median of per-round ratios)."""
    steps = {name: (lambda f=f: f(x)) for name, f in forms.items()}
    with torch.inference_mode():
        _, errors = measure_interleaved(steps, warmup=warmup, rounds=0)
        if errors:
            raise RuntimeError(f"a candidate failed: {errors}")
        iters = {k: auto_iters(s, min_block_s, lambda: None, time.perf_counter) for k, s in steps.items()}
        samples, errors = measure_interleaved(steps, warmup=0, rounds=rounds, iters=iters)
    if errors:
        raise RuntimeError(f"a candidate failed: {errors}")
    first = next(iter(forms))
    out = {}
    for name, times in samples.items():
        stats = summarize(times)
        out[name] = {
            "img_per_s": x.shape[0] / stats.median, "spread_pct": stats.spread_pct, "iters": iters[name],
            "vs_torch_fp32": statistics.median(b / t for b, t in zip(samples[first], times)),
            "vs_ort_fp32": statistics.median(b / t for b, t in zip(samples[FORMS[1]], times)),
        }
    return out


def ort_fp32(path: Path) -> Any:
    """The fp32 ONNX file in onnxruntime with the int8 file's session options (``load_quantized``: intra-op threads =
    torch's, one inter-op thread): an idle pool of more threads would spin and slow the next candidate's turn."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


def measure_model(label: str, source: str | torch.nn.Module, out: Path, calib: Path, num_calib: int,
                  args: argparse.Namespace, data: Path | None) -> dict[str, Any]:
    """Quantize ``source``, export its fp32 graph, time the three forms at batch 16 and (with ``data``) validate."""
    model = load_model(source) if isinstance(source, str) else source
    config = data_config_for(model, dict(getattr(model, "weights_info", {}) or {}))
    size = int(config["input_size"][-1])
    print(f"[{label}] quantizing ({num_calib} calibration images of {calib}) ...", file=sys.stderr, flush=True)
    int8_path = quantize_model(model, calib, out / f"{label}.int8.onnx", num_calib=num_calib)
    fused = inference_form(model)
    fp32_path = out / f"{label}.fp32.onnx"
    export_model(fused, fp32_path, example_size=(size, size), check=False)
    int8, fp32_ort = load_quantized(int8_path), ort_fp32(fp32_path)
    x = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    forms = {FORMS[0]: lambda _x: fused(x_cl), FORMS[1]: fp32_ort, FORMS[2]: int8}
    print(f"[{label}] timing batch {args.batch} at {size} px ...", file=sys.stderr, flush=True)
    result: dict[str, Any] = {"model": label, "img_size": size, "batch": args.batch,
                              "int8_file": str(int8_path), "int8_mib": int8_path.stat().st_size / 2**20,
                              "fp32_onnx_mib": fp32_path.stat().st_size / 2**20,
                              "quick_check": int8.quantization["check"],
                              "timing": time_forms(forms, x, args.rounds, args.warmup, args.min_block)}
    if data is not None:
        print(f"[{label}] validating fp32 and int8 on {data} ...", file=sys.stderr, flush=True)
        result["top1_fp32"] = validate(None, data, checkpoint=source, device="cpu")["top1"]
        result["top1_int8"] = validate(None, data, checkpoint=int8_path, device="cpu")["top1"]
    return result


def markdown(results: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = [
        f"int8 vs fp32 on {env['cpu']}, {env['threads']} thread(s), torch {env['torch']}, onnxruntime "
        f"{env['onnxruntime']}; batch {results[0]['batch']}, medians of {env['rounds']} interleaved rounds; load "
        f"average {env['load_start']:.1f} -> {env['load_end']:.1f}",
        "",
        "| model | px | " + " | ".join(f"{f} img/s" for f in FORMS)
        + " | int8 / fp32 torch | int8 / fp32 ORT | top-1 fp32 | top-1 int8 | int8 MiB |",
        "|---|---:|" + "---:|" * (len(FORMS) + 5),
    ]
    for r in results:
        t = r["timing"]
        top1 = (f"{r['top1_fp32']:.1f}% | {r['top1_int8']:.1f}%" if "top1_fp32" in r else "- | -")
        lines.append(
            f"| {r['model']} | {r['img_size']} | " + " | ".join(f"{t[f]['img_per_s']:.1f}" for f in FORMS)
            + f" | {t[FORMS[2]]['vs_torch_fp32']:.2f}x | {t[FORMS[2]]['vs_ort_fp32']:.2f}x | {top1} | "
            f"{r['int8_mib']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo-checkpoint", default="demo_output/fastervit_demo.safetensors",
                   help="the demo model (written by `fastervit demo`; default %(default)s)")
    p.add_argument("--f0-checkpoint", default=None,
                   help="FasterViT-0 weights (default: random weights, for speed only)")
    p.add_argument("--skip-f0", action="store_true", help="only the demo model")
    p.add_argument("--num-calib", type=int, default=128, help="calibration images of the demo model (default "
                   "%(default)s)")
    p.add_argument("--f0-num-calib", type=int, default=32,
                   help="calibration images of FasterViT-0 (default %(default)s; about 30 MB of memory each)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threads", type=int, default=None, help="torch and onnxruntime threads (default: torch's)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--min-block", type=float, default=0.3, help="seconds per timed turn")
    p.add_argument("--out", type=Path, default=Path("runs/int8"))
    args = p.parse_args(argv)
    demo = Path(args.demo_checkpoint)
    if not demo.is_file():
        print(f"int8_bench: {demo} does not exist; train the demo model first: fastervit demo --output "
              f"{demo.parent} (about 7 minutes on 2 cores)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    import onnxruntime

    args.out.mkdir(parents=True, exist_ok=True)
    data = data_path("tiny-imagenet-10")
    env = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "onnxruntime": onnxruntime.__version__, "rounds": args.rounds, "load_start": _load()}
    results = [measure_model("demo", str(demo), args.out, data / "train", args.num_calib, args, data)]
    if not args.skip_f0:
        if args.f0_checkpoint:
            f0: str | torch.nn.Module = args.f0_checkpoint
        else:
            torch.manual_seed(0)
            f0 = load_model("fastervit_0", pretrained=False)
        results.append(measure_model("fastervit_0", f0, args.out, data / "train", args.f0_num_calib, args,
                                     None))
    env["load_end"] = _load()
    table = markdown(results, env)
    print(table)
    (args.out / "results.json").write_text(json.dumps({"env": env, "results": results}, indent=2) + "\n")
    (args.out / "results.md").write_text(table + "\n")
    print(f"wrote {args.out / 'results.json'}, {args.out / 'results.md'}", file=sys.stderr)
    return 0


def _load() -> float:
    import os

    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


if __name__ == "__main__":
    sys.exit(main())
