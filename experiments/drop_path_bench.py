"""Training-step time with stochastic depth that skips dropped images (``layers/drop_path.py``) against the
mask-multiply form (timm's ``DropPath``), same model, same masks' distribution, interleaved rounds, medians.

    python experiments/drop_path_bench.py --model fastervit_0 --batch 8 --rounds 12

Prints the median step time of each form and the speed-up (multiply / skip), per round and as the median.
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn.functional as F
from timm.layers import DropPath

import open_fastervit  # noqa: F401  (registers the models)
import open_fastervit.layers.hat as hat
from open_fastervit.bench import make_optimizer
from open_fastervit.layers.drop_path import keep_mask, residual_drop_path


def mask_multiply(x, branch, drop_prob, training, mask=None):  # noqa: ANN001, ANN201
    """``x + branch(x) * mask / keep_prob``: the branch computed for every image (timm's DropPath)."""
    if not training or drop_prob == 0.0:
        return x + branch(x)
    mask = keep_mask(x.shape[0], 1 - drop_prob) if mask is None else mask
    return x + branch(x) * (mask / (1 - drop_prob)).view(-1, *([1] * (x.dim() - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fastervit_0")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model).train().to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,))

    def step() -> None:
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"skip": [], "multiply": []}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, form in (("skip", residual_drop_path), ("multiply", mask_multiply)):
            hat.residual_drop_path = form
            start = time.perf_counter()
            step()
            if r:
                times[name].append(time.perf_counter() - start)
    hat.residual_drop_path = residual_drop_path
    ratios = [m / s for m, s in zip(times["multiply"], times["skip"])]
    medians = {k: statistics.median(v) * 1000 for k, v in times.items()}
    rate = max((m.drop_prob for m in model.modules() if isinstance(m, DropPath)), default=0.0)
    print(f"{args.model} batch {args.batch} {args.img_size} px, drop path up to {rate:.2f}: "
          f"skip {medians['skip']:.0f} ms, multiply {medians['multiply']:.0f} ms per step; "
          f"speed-up {statistics.median(ratios):.3f}x (per round {min(ratios):.3f}-{max(ratios):.3f})")


if __name__ == "__main__":
    main()
