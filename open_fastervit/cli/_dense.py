"""``fastervit detect`` and ``fastervit segment``: ``train`` / ``evaluate`` / ``predict`` sub-commands over
``open_fastervit.tasks.detection`` and ``open_fastervit.tasks.segmentation``.

``train`` takes one option per field of the task's config (``DetectionConfig`` / ``SegmentationConfig``) and
``--recipe``, exactly as ``fastervit train`` does; it runs under ``torchrun`` as one DDP rank per process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from open_fastervit.cli._common import non_negative_int
from open_fastervit.cli.train import MISMATCH_EXIT, build_parser, config_from_args, interrupted_exit
from open_fastervit.data import DatasetError
from open_fastervit.tasks.detection import evaluate_detector, predict_detector
from open_fastervit.tasks.segmentation import evaluate_segmenter, predict_segmenter
from open_fastervit.train import RunExistsError, TrainingDiverged, get_task, json_safe, train
from open_fastervit.train.checkpoint import ResumeMismatchError

__all__ = ["dense_main"]

TASKS = {"detect": "detection", "segment": "segmentation"}
EXAMPLES = {
    "detect": "fastervit detect train --data ../shared/data/trees-neon --kind faster_rcnn --min-size 320 384 448 "
              "--max-size 640 --epochs 20 --output runs/trees; fastervit detect evaluate runs/trees --data "
              "../shared/data/trees-neon --json runs/trees/eval.json; fastervit detect predict runs/trees "
              "../shared/data/trees-neon/val --output runs/trees/pred",
    "segment": "fastervit segment train --data ../shared/data/nuclei-dsb2018 --kind fpn --crop-size 192 --epochs 30 "
               "--output runs/nuclei; fastervit segment evaluate runs/nuclei --data ../shared/data/nuclei-dsb2018 "
               "--json runs/nuclei/eval.json; fastervit segment predict runs/nuclei "
               "../shared/data/nuclei-dsb2018/val/images --output runs/nuclei/pred",
}


def _usage(command: str) -> str:
    return (f"usage: fastervit {command} {{train,evaluate,predict}} [options]\n\n"
            f"  train      train or fine-tune a {TASKS[command]} model (options: fastervit {command} train --help)\n"
            f"  evaluate   {'COCO box/mask mAP' if command == 'detect' else 'mIoU and pixel accuracy'} of a trained "
            f"model on a split\n"
            f"  predict    {'boxes/masks drawn on' if command == 'detect' else 'masks and overlays of'} images, "
            f"plus a results json\n\nexample: {EXAMPLES[command]}")


def _train(command: str, argv: list[str]) -> int:
    config_cls = get_task(TASKS[command]).config_class
    parser = build_parser(config_cls, f"fastervit {command} train",
                          f"Train or fine-tune a FasterViT {TASKS[command]} model (DDP under torchrun). Options "
                          f"override the recipe, which overrides the defaults. Example: {EXAMPLES[command]}")
    try:
        cfg = config_from_args(argv, config_cls, parser)
        result = train(cfg)
    except ResumeMismatchError as err:  # --resume with another model than the run's
        print(f"fastervit {command} train: error: {err}", file=sys.stderr)
        return MISMATCH_EXIT
    except (DatasetError, TrainingDiverged, RunExistsError, ValueError, FileNotFoundError) as err:  # CheckpointError
        print(f"fastervit {command} train: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:  # one line with the --resume command, exit 130
        return interrupted_exit(err, f"fastervit {command} train")
    if int(os.environ.get("RANK", "0")) == 0:  # strict JSON, as results.json: a NaN score (no EMA) prints null
        summary = {k: v for k, v in result.items() if k not in ("final", "build_config")}
        print(json.dumps(json_safe(summary), indent=2, allow_nan=False))
    return 0


def _evaluate_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"fastervit {command} evaluate",
                                description=f"Evaluate a trained {TASKS[command]} model on one split.")
    p.add_argument("weights", help="a run folder, its best.safetensors / last.safetensors / last.pt")
    p.add_argument("--data", required=True, help="dataset root (as for training)")
    p.add_argument("--split", default="val", help="split to evaluate (default: %(default)s)")
    if command == "detect":
        p.add_argument("--ann", default=None, help="COCO json (default: ROOT/annotations/instances_<split>.json)")
    else:
        p.add_argument("--images", default="images", help="image folder name (default: %(default)s)")
        p.add_argument("--masks", default="masks", help="mask folder name (default: %(default)s)")
        p.add_argument("--ignore-index", type=int, default=255, help="mask value left out (default: %(default)s)")
        p.add_argument("--reduce-zero-label", action="store_true", help="ADE20K: label 0 is ignored, 1.. become 0..")
    p.add_argument("--json", dest="json_path", default=None, metavar="PATH", help="write the metrics here")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument("--no-fuse", dest="fuse", action="store_false", help="evaluate the plain (unfused) backbone")
    p.add_argument("--workers", type=non_negative_int, default=1, help="data-loading processes (default: %(default)s)")
    return p


def _evaluate(command: str, argv: list[str]) -> int:
    args = _evaluate_parser(command).parse_args(argv)
    try:
        if command == "detect":
            metrics: dict[str, Any] = evaluate_detector(args.weights, args.data, args.split, ann_file=args.ann,
                                                        json_path=args.json_path, device=args.device, fuse=args.fuse,
                                                        workers=args.workers)
            for iou, values in metrics.items():
                print(f"{iou}: mAP {values['mAP']:.4f}  mAP50 {values['mAP50']:.4f}  mAP75 {values['mAP75']:.4f}")
        else:
            metrics = evaluate_segmenter(args.weights, args.data, args.split, images=args.images, masks=args.masks,
                                         ignore_index=args.ignore_index, reduce_zero_label=args.reduce_zero_label,
                                         json_path=args.json_path, device=args.device, fuse=args.fuse,
                                         workers=args.workers)
            print(f"mIoU {metrics['mIoU']:.4f}  pixel accuracy {metrics['pixel_accuracy']:.4f}")
            for name, iou in metrics["per_class_iou"].items():
                print(f"  IoU {name}: {iou:.4f}")
    except (DatasetError, ValueError, FileNotFoundError) as err:
        print(f"fastervit {command} evaluate: error: {err}", file=sys.stderr)
        return 1
    if args.json_path:
        print(f"metrics written to {args.json_path}")
    return 0


def _predict_parser(command: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"fastervit {command} predict",
                                description=f"Run a trained {TASKS[command]} model on images and write PNGs + json. "
                                            "Exits 1 when no image could be processed.")
    p.add_argument("weights", help="a run folder, its best.safetensors / last.safetensors / last.pt")
    p.add_argument("inputs", nargs="+", help="image files or folders (a folder's sub-folders only with --recursive)")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--recursive", "-r", action="store_true",
                   help="also take the images in the sub-folders of each folder given; their outputs go to the same "
                        "sub-folders of the output folder")
    if command == "detect":
        p.add_argument("--score-threshold", type=float, default=0.5, help="draw and keep detections scoring at "
                                                                          "least this (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cpu)")
    p.add_argument("--no-fuse", dest="fuse", action="store_false", help="run the plain (unfused) backbone")
    return p


def _predict(command: str, argv: list[str]) -> int:
    """``fastervit detect|segment predict``: each image that cannot be used is named once on stderr; exit 0 when at
    least one image was processed (the skipped ones counted), 1 when none was or on a one-line error."""
    args = _predict_parser(command).parse_args(argv)
    prog = f"fastervit {command} predict"

    def report(path: object, message: str) -> None:
        print(f"{prog}: skipped {message}", file=sys.stderr)

    common: dict[str, Any] = dict(recursive=args.recursive, on_error=report, device=args.device, fuse=args.fuse)
    try:
        if command == "detect":
            summary = predict_detector(args.weights, args.inputs, args.output, score_threshold=args.score_threshold,
                                       **common)
            done = (f"{summary['images']} image(s), {summary['detections']} detection(s) >= {args.score_threshold}: "
                    f"PNGs in {args.output}, results in {summary['json']}")
        else:
            summary = predict_segmenter(args.weights, args.inputs, args.output, **common)
            done = f"{summary['images']} image(s): masks and overlays in {args.output}, summary in {summary['json']}"
    except (DatasetError, ValueError, FileNotFoundError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    skipped = len(summary["skipped"])
    if summary["images"] == 0:
        print(f"{prog}: error: no image could be processed ({skipped} skipped)", file=sys.stderr)
        return 1
    print(done + (f"; {skipped} image(s) skipped" if skipped else ""))
    return 0


def dense_main(command: str, argv: list[str] | None = None) -> int:
    """``fastervit detect|segment SUB ...``: 0 on success, 1 with a one-line message on bad data/weights, 2 for a
    missing or unknown sub-command; ``--help`` exits 0 through SystemExit, as argparse does."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(_usage(command))
        raise SystemExit(0)  # as argparse does for --help
    if not argv:
        print(f"fastervit {command}: a sub-command is needed\n\n{_usage(command)}", file=sys.stderr)
        return 2
    sub, rest = argv[0], argv[1:]
    handlers = {"train": _train, "evaluate": _evaluate, "predict": _predict}
    if sub not in handlers:
        print(f"fastervit {command}: unknown sub-command {sub!r}\n\n{_usage(command)}", file=sys.stderr)
        return 2
    return handlers[sub](command, rest)
