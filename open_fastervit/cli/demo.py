"""``fastervit demo``: train, evaluate, predict and benchmark on the demo data (``open_fastervit.demos``)."""

from __future__ import annotations

import argparse
import sys

from open_fastervit.cli._common import non_negative_int, positive_int
from open_fastervit.data import DatasetError
from open_fastervit.demos import CLASSIFICATION_MINUTES, DENSE_MINUTES


def positive_float(text: str) -> float:
    """A number > 0 given on the command line (argparse names the option in its error).

    Raises:
        argparse.ArgumentTypeError: not a number, or not above 0.
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastervit demo",
        description="Train a small FasterViT from scratch on tiny-imagenet-10 for as many epochs as fit --minutes "
        "(about 7 min in all on 2 CPU cores), validate it, classify held-out photos, benchmark it and write "
        "OUTPUT/REPORT.md.",
    )
    parser.add_argument("task", nargs="?", default="classification",
                        choices=("classification", "detection", "segmentation"),
                        help="classification (default; tiny-imagenet-10), detection (tree crowns, trees-neon: "
                        "Faster R-CNN) or segmentation (nuclei, nuclei-dsb2018: FPN); each trains from scratch")
    parser.add_argument("--data", default=None,
                        help="dataset root (default: the task's demo data in $FASTERVIT_DATA)")
    parser.add_argument("--output", "-o", default=None,
                        help="output folder (default demo_output, demo_output/detection, demo_output/segmentation)")
    parser.add_argument("--backbone-checkpoint", default=None,
                        help="detection/segmentation: start the backbone from these weights (e.g. the "
                        "classification demo's model) instead of random ones")
    parser.add_argument("--quick", action="store_true", help="tiny budget (under a minute): checks the pipeline")
    parser.add_argument("--minutes", type=positive_float, default=None,
                        help="training budget in minutes; the epochs are chosen to fit it (default "
                        f"{CLASSIFICATION_MINUTES:g} for classification, {DENSE_MINUTES:g} for the others)")
    parser.add_argument("--epochs", type=positive_int, default=None,
                        help="a fixed number of epochs instead of --minutes")
    parser.add_argument("--no-bench", action="store_true", help="skip the speed comparison")
    parser.add_argument("--workers", "-j", type=non_negative_int, default=2, help="data-loading processes (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 on success, 1 with a one-line message for missing data or bad arguments."""
    args = build_parser().parse_args(argv)
    if args.task != "classification":
        return _dense(args)
    # here, after parsing: the demos load training and the benchmarks (seconds), which --help does not need
    from open_fastervit.demos.classification import DemoConfig, run_demo

    cfg = DemoConfig(data=args.data, output=args.output or "demo_output", quick=args.quick, epochs=args.epochs,
                     minutes=args.minutes or CLASSIFICATION_MINUTES, bench=not args.no_bench, workers=args.workers,
                     seed=args.seed)
    try:
        summary = run_demo(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"fastervit demo: error: {e}", file=sys.stderr)
        return 1
    val = summary["validate"]
    print(f"val top-1 {val['top1']:.1f}%  top-5 {val['top5']:.1f}%  ({summary['seconds'] / 60:.1f} min); "
          f"report: {summary['report']}")
    return 0


def _dense(args: argparse.Namespace) -> int:
    """``fastervit demo detection|segmentation``."""
    # here, after parsing: the dense demos load detection and segmentation (seconds), which --help does not need
    from open_fastervit.demos.dense import DenseDemoConfig, run_dense_demo

    cfg = DenseDemoConfig(task=args.task, data=args.data, output=args.output, quick=args.quick, epochs=args.epochs,
                          minutes=args.minutes or DENSE_MINUTES, workers=0,
                          seed=args.seed, backbone_checkpoint=args.backbone_checkpoint)
    try:
        facts = run_dense_demo(cfg)
    except (FileNotFoundError, ValueError, DatasetError) as e:
        print(f"fastervit demo: error: {e}", file=sys.stderr)
        return 1
    ev = facts["evaluate"]
    score = (f"held-out box mAP {ev['bbox']['mAP']:.3f}, mAP50 {ev['bbox']['mAP50']:.3f}" if args.task == "detection"
             else f"held-out mIoU {ev['mIoU']:.4f}, pixel accuracy {ev['pixel_accuracy']:.4f}")
    print(f"{score} ({facts['epochs']} epochs, {facts['seconds'] / 60:.1f} min); report: {facts['report']}")
    return 0
