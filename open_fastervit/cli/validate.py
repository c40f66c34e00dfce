"""``fastervit validate``: top-1/top-5 and loss of a model or checkpoint on an image dataset."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from open_fastervit.cli._common import (
    AMP_CHOICES,
    add_model_args,
    amp_word,
    model_call_args,
    non_negative_int,
    positive_int,
    random_weights_note,
)
from open_fastervit.runtime import AMP_DTYPES
from open_fastervit.validate import validate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastervit validate",
        description="Top-1/top-5 accuracy and loss of a model or checkpoint on an image dataset (--checkpoint also "
        "takes an int8 .onnx file of `fastervit quantize`).",
    )
    parser.add_argument("data", help="ImageFolder root (with a SPLIT sub-folder) or a folder with labels.csv")
    add_model_args(parser)
    parser.add_argument("--split", default="val", help="sub-folder of an ImageFolder root (default val)")
    parser.add_argument("--label-map", default=None,
                        help="'in1k' (wnid class folders -> ImageNet-1K indices) or a CSV with columns "
                        "folder_index,in1k_index")
    parser.add_argument("--label-column", default=None, help="target column of labels.csv (default: auto)")
    parser.add_argument("--crop-pct", type=float, default=None, help="override the cfg's crop_pct")
    parser.add_argument("--crop-mode", choices=("center", "squash", "border"), default=None)
    parser.add_argument("--interpolation", default=None, help="override the cfg's interpolation")
    parser.add_argument("--by-index", action="store_true",
                        help="score class folder i as model output i even when the weights' class names differ "
                        "from the folder names (default: match by name, stop on folders no name matches)")
    parser.add_argument("--batch-size", "-b", type=positive_int, default=None, help="default 32 on CPU, 128 on GPU")
    parser.add_argument("--workers", "-j", type=non_negative_int, default=None,
                        help="loader workers (default: half the CPU cores up to 4; on GPU up to 8)")
    parser.add_argument("--amp", type=amp_word, default="none", metavar="{" + ",".join(AMP_CHOICES) + "}",
                        help="autocast dtype (default none)")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    return parser


def scored_text(result: dict, shown: int = 5) -> str:
    """``N images`` or ``N images (M unreadable, skipped: a.jpg, b.jpg, ...)`` of a :func:`validate` result."""
    text = f"{result['images']} images"
    if result.get("skipped"):
        files = result.get("skipped_files") or []
        names = ", ".join(files[:shown]) + (", ..." if len(files) > shown else "")
        text += f" ({result['skipped']} unreadable, skipped: {names})"
    return text


def main(argv: list[str] | None = None) -> int:
    """Run ``fastervit validate``; 0 on success, 1 with a one-line message for bad data, weights or arguments."""
    args = build_parser().parse_args(argv)
    random_weights_note("validate", args)
    try:
        result = validate(
            args.model, args.data, split=args.split, label_map=args.label_map, label_column=args.label_column,
            crop_pct=args.crop_pct, crop_mode=args.crop_mode, interpolation=args.interpolation,
            batch_size=args.batch_size, workers=args.workers, amp_dtype=AMP_DTYPES[args.amp], by_index=args.by_index,
            **model_call_args(args),
        )
    except (FileNotFoundError, ValueError) as e:  # CheckpointError, DatasetError, ClassNameMismatch are ValueErrors
        print(f"fastervit validate: error: {e}", file=sys.stderr)
        return 1
    print(
        f"{result['model']} ({result['weights']} weights) on {result['data']}: "
        f"top-1 {result['top1']:.2f}% on {scored_text(result)}; top-5 {result['top5']:.2f}%, loss {result['loss']:.4f} "
        f"(input {tuple(result['input_size'])}, crop_pct {result['crop_pct']}, "
        f"{result['crop_mode']}, {result['interpolation']}; classes {result['label_mapping']}; "
        f"{result['seconds']:.1f} s)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
