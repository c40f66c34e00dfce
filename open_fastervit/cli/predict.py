"""``fastervit predict``: classify images and print their top-k labels."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from open_fastervit.cli._common import add_model_args, model_call_args, positive_int, random_weights_note
from open_fastervit.predict import format_prediction, predict


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastervit predict", description="Classify images and print their top-k labels."
    )
    parser.add_argument("images", nargs="+", help="image files or folders of images (a folder's sub-folders only "
                                                  "with --recursive)")
    parser.add_argument("--recursive", "-r", action="store_true",
                        help="also classify the images in the sub-folders of each folder given")
    add_model_args(parser)
    parser.add_argument("--topk", "-k", type=positive_int, default=3, help="labels per image (default 3)")
    parser.add_argument("--batch-size", "-b", type=positive_int, default=16,
                        help="images per forward pass (default 16)")
    parser.add_argument("--classes", default=None,
                        help="class names: a text file (one per line) or the training dataset folder")
    parser.add_argument("--json", action="store_true", help="print JSON lines instead of text")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``fastervit predict``: every readable image is classified; each unreadable one is named on stderr.

    Returns 0 when every image was classified, 1 when any image could not be read or on a one-line error for bad
    weights or arguments."""
    args = build_parser().parse_args(argv)
    random_weights_note("predict", args)
    failed: list[Path] = []

    def report(path: Path, error: Exception) -> None:
        failed.append(path)
        print(f"fastervit predict: error: {error}", file=sys.stderr)

    try:
        preds = predict(args.images, args.model, classes=args.classes, topk=args.topk, on_error=report,
                        batch_size=args.batch_size, recursive=args.recursive, **model_call_args(args))
    except (FileNotFoundError, ValueError) as e:  # CheckpointError and ImageReadError are ValueErrors
        print(f"fastervit predict: error: {e}", file=sys.stderr)
        return 1
    for pred in preds:
        print(json.dumps(asdict(pred)) if args.json else format_prediction(pred))
    if failed:
        print(f"fastervit predict: {len(failed)} of {len(failed) + len(preds)} images could not be read",
              file=sys.stderr)
        return 1
    return 0
