"""Which CPU kernels the inference form should use on *this* machine: the measurements behind the two rules in
``open_fastervit/layers/fused.py``.

1. ``conv-layout``: oneDNN lays a packed convolution weight out for the input shape it is told. Time convolutions
   of FasterViT-0's shapes with weights packed for batch 1 and for batch 16, each run at batch 1 and 16.
2. ``linear-rows``: packed oneDNN linear (GELU / residual add fused) against MKL's GEMM plus the separate op, for
   FasterViT's linear shapes and a range of row counts (tokens per call). Above 1: the packed kernel is faster.
3. ``model``: FasterViT-0's inference form with the current rules, with every linear packed, with no linear packed
   and without packing at all, interleaved rounds at batch 1 and 16.

    python experiments/cpu_kernels.py                  # all three, about 4 minutes on 2 cores
    python experiments/cpu_kernels.py --only linear-rows
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import timm
import torch
import torch.nn.functional as F

import open_fastervit  # noqa: F401  (registers the models)
from open_fastervit.layers import fused as fused_mod

ops = torch.ops.mkldnn


def median_time(fn: Callable[[], object], reps: int, rounds: int = 5) -> float:
    """Median over ``rounds`` of the mean time of ``reps`` calls, in seconds."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        samples.append((time.perf_counter() - start) / reps)
    return statistics.median(samples)


def conv_layout() -> None:
    print("## conv-layout: ms per call, weights packed for batch HINT, run at batch RUN (channels_last, fp32)")
    shapes = ((3, 224, 2, 64), (64, 112, 2, 64), (64, 56, 1, 64), (128, 28, 1, 128), (256, 14, 2, 512))
    for cin, side, stride, cout in shapes:
        w, b = torch.randn(cout, cin, 3, 3), torch.randn(cout)
        geometry = ([1, 1], [stride, stride], [1, 1], 1)
        cells = []
        for hint in (1, 16):
            packed = ops._reorder_convolution_weight(w, [1, 1], [stride, stride], [1, 1], 1, [hint, cin, side, side])
            for run in (1, 16):
                x = torch.randn(run, cin, side, side).to(memory_format=torch.channels_last)
                with torch.inference_mode():
                    ops._convolution_pointwise(x, packed, b, *geometry, "none", [], "")
                    def call(x=x, packed=packed, b=b, geometry=geometry) -> torch.Tensor:
                        return ops._convolution_pointwise(x, packed, b, *geometry, "none", [], "")

                    t = median_time(call, reps=20 if run == 1 else 3, rounds=7)
                cells.append(f"hint {hint:2d} / run {run:2d}: {t * 1e3:7.2f}")
        print(f"{cin:4d}->{cout:4d} ch, {side:3d} px, stride {stride}:  " + " | ".join(cells))


def linear_rows() -> None:
    print("## linear-rows: (MKL GEMM + separate op time) / (packed oneDNN time); > 1: packed is faster")
    rows = (16, 64, 212, 784, 3392, 12544)
    shapes = ((256, 768, "none"), (256, 256, "add"), (256, 1024, "gelu"), (1024, 256, "add"), (512, 2048, "gelu"),
              (2048, 512, "add"))
    with torch.inference_mode():
        for k, n, act in shapes:
            w, b = torch.randn(n, k), torch.randn(n)
            cells = []
            for m in rows:
                x, r = torch.randn(m, k), torch.randn(m, n)
                pw = ops._reorder_linear_weight(w, m)

                def packed(x=x, r=r, pw=pw, b=b, act=act) -> torch.Tensor:
                    if act == "add":
                        return ops._linear_pointwise.binary(x, r, pw, b, "add")
                    return ops._linear_pointwise(x, pw, b, act, [], "none" if act == "gelu" else "")

                def plain(x=x, r=r, w=w, b=b, act=act) -> torch.Tensor:
                    y = F.linear(x, w, b)
                    return F.gelu(y) if act == "gelu" else r + y if act == "add" else y

                reps = max(2, 30000 // m)
                cells.append(f"{m}: {median_time(plain, reps) / median_time(packed, reps):.2f}")
            print(f"K {k:4d} N {n:4d} {act:4s}  " + "  ".join(cells))


def whole_model(rounds: int) -> None:
    print("## model: FasterViT-0 inference form, ms per image batch (median of interleaved rounds)")
    torch.manual_seed(0)
    base = timm.create_model("fastervit_0").eval()

    def form(linear_limit: object, pack: bool = True) -> torch.nn.Module:
        model = copy.deepcopy(base).fuse(pack=pack).to(memory_format=torch.channels_last)
        model._linear_limit = linear_limit  # read by the patched policy below
        return model

    variants = {"current rules": form("policy"), "every linear packed": form(None),
                "no linear packed": form(0), "nothing packed": form("policy", pack=False)}
    policy = fused_mod.packed_linear_max_rows
    for batch, calls in ((1, 10), (16, 1)):
        x = torch.randn(batch, 3, 224, 224).to(memory_format=torch.channels_last)
        times: dict[str, list[float]] = {name: [] for name in variants}
        with torch.inference_mode():
            for r in range(rounds + 1):
                for name, model in variants.items():
                    limit = model._linear_limit
                    fused_mod.packed_linear_max_rows = policy if limit == "policy" else (lambda v=limit: v)
                    t = median_time(lambda m=model, x=x: m(x), reps=calls, rounds=1)
                    if r:
                        times[name].append(t)
        fused_mod.packed_linear_max_rows = policy
        ref = statistics.median(times["current rules"])
        cells = [f"{name}: {statistics.median(v) * 1e3:.1f} ms ({statistics.median(v) / ref:.2f}x)"
                 for name, v in times.items()]
        print(f"batch {batch:2d}: " + " | ".join(cells))
    print(f"(this CPU: {torch.backends.cpu.get_cpu_capability()}, packed linears up to {policy()} rows)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=("conv-layout", "linear-rows", "model"))
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the whole-model comparison")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not fused_mod.onednn_available():
        raise SystemExit("this torch build has no oneDNN fusion kernels: nothing to compare")
    if args.only in (None, "conv-layout"):
        conv_layout()
    if args.only in (None, "linear-rows"):
        linear_rows()
    if args.only in (None, "model"):
        whole_model(args.rounds)


if __name__ == "__main__":
    main()
