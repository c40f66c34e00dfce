"""``fastervit demo``: train, evaluate, predict and benchmark on the demo data (``open_fastervit.demo.run_demo``)."""

from __future__ import annotations

import argparse
import sys

from open_fastervit.demo import DemoConfig, run_demo


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastervit demo",
        description="Train a small FasterViT from scratch on tiny-imagenet-10 for as many epochs as fit --minutes "
        "(about 7 min in all on 2 CPU cores), validate it, classify held-out photos, benchmark it and write "
        "OUTPUT/REPORT.md.",
    )
    parser.add_argument("--data", default=None,
                        help="ImageFolder root with train/ and val/ (default: tiny-imagenet-10 in $FASTERVIT_DATA)")
    parser.add_argument("--output", "-o", default="demo_output", help="output folder (default demo_output)")
    parser.add_argument("--quick", action="store_true", help="tiny budget (under a minute): checks the pipeline")
    parser.add_argument("--minutes", type=float, default=DemoConfig.minutes,
                        help="training budget in minutes; the epochs are chosen to fit it (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=None, help="a fixed number of epochs instead of --minutes")
    parser.add_argument("--no-bench", action="store_true", help="skip the speed comparison")
    parser.add_argument("--workers", "-j", type=int, default=2, help="data-loading processes (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the demo; 0 on success, 1 with a one-line message for missing data or bad arguments."""
    args = build_parser().parse_args(argv)
    cfg = DemoConfig(data=args.data, output=args.output, quick=args.quick, epochs=args.epochs, minutes=args.minutes,
                     bench=not args.no_bench, workers=args.workers, seed=args.seed)
    try:
        summary = run_demo(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"fastervit demo: error: {e}", file=sys.stderr)
        return 1
    val = summary["validate"]
    print(f"val top-1 {val['top1']:.1f}%  top-5 {val['top5']:.1f}%  ({summary['seconds'] / 60:.1f} min); "
          f"report: {summary['report']}")
    return 0
