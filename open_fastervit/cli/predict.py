"""``fastervit predict``: classify images and print their top-k labels."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from open_fastervit.cli._common import add_model_args, model_call_args, positive_int, random_weights_note
from open_fastervit.deploy.forms import load_chosen
from open_fastervit.predict import ImageReadError, expand_images, format_prediction, load_image, predict
from open_fastervit.runtime import PRECISION_CHOICES, RUNTIMES

#: Images from which ``--runtime auto`` measures the forms (fewer: a cached choice, else torch fp32).
MEASURE_FROM = 64


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
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto",
                        help="who runs the model (default auto: the fastest available form that answers as fp32, "
                        f"measured once per machine and model for jobs of {MEASURE_FROM}+ images and cached; a "
                        "file of export / quantize runs in its own runtime)")
    parser.add_argument("--precision", choices=PRECISION_CHOICES, default="auto",
                        help="fp32, bf16, fp16 or auto (default: bf16 only where the hardware has it natively and "
                        "its top-1 agrees with fp32 on the images given)")
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

    call = model_call_args(args)
    try:
        count = len(expand_images(args.images, recursive=args.recursive, keep_missing=True))
        chosen = load_chosen(call.pop("checkpoint") or args.model,
                             architecture=args.model if args.checkpoint else None, runtime=args.runtime,
                             precision=args.precision, check_images=_check_images(args), device=call.pop("device"),
                             model_kwargs=call.pop("model_kwargs"), use_ema=None if call.pop("use_ema") else False,
                             pretrained=call.pop("pretrained"), fuse=call.pop("fuse"), img_size=call["img_size"],
                             measure=count >= MEASURE_FROM)
        print(f"fastervit predict: runtime {chosen.reason}", file=sys.stderr)
        preds = predict(args.images, chosen.module, classes=args.classes, topk=args.topk, on_error=report,
                        batch_size=args.batch_size, recursive=args.recursive, img_size=call["img_size"],
                        device=_device_of(chosen.module))
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


def _check_images(args: argparse.Namespace, limit: int = 32) -> list:
    """The first readable images to predict (at most ``limit``), for the agreement check of a reduced precision."""
    pictures = []
    for path in expand_images(args.images, recursive=args.recursive, keep_missing=True):
        if len(pictures) >= limit:
            break
        try:
            pictures.append(load_image(path))
        except ImageReadError:
            continue  # reported by predict
    return pictures


def _device_of(module: object) -> str:
    """The device of a module's first parameter or buffer (``cpu`` for a runtime's module without any)."""
    tensors = [*module.parameters(), *module.buffers()] if hasattr(module, "parameters") else []
    return str(tensors[0].device) if tensors else "cpu"
