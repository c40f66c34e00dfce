"""``fastervit demo detection`` and ``fastervit demo segmentation``: train from scratch on the real demo data, evaluate
on the held-out split, draw predictions, write a report.

* detection: tree crowns in aerial images (``trees-neon``: 43 training and 13 validation tiles of 400 x 400 px from
  other scenes and sites, 1,177 boxes, one class), a FasterViT + FPN Faster R-CNN; COCO box mAP / mAP50 on the
  validation tiles.
* segmentation: fluorescence nuclei (``nuclei-dsb2018``: 3 training images and 1 held-out image of 256 x 256 px,
  background / nucleus masks), a FasterViT + FPN segmenter; mIoU and pixel accuracy on the held-out image.

Both use the public API only (``train_detector`` / ``train_segmenter``, ``evaluate_*``, ``predict_*``), with the
number of epochs chosen to fit a time budget measured on this machine (a probe of a few training steps), and write
``OUTPUT/REPORT.md``, ``report.json``, the run folder (weights, curves.png, summary.csv, TensorBoard) and a PNG of
predictions next to the ground truth. No pretrained weights are used (none can be downloaded on the demo machines);
``backbone_checkpoint`` may give a FasterViT trained by ``fastervit demo`` (classification) as the starting point.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms.v2.functional import pil_to_tensor
from torchvision.utils import make_grid

from open_fastervit.data import read_image
from open_fastervit.demos import DENSE_MINUTES
from open_fastervit.paths import data_path
from open_fastervit.tasks.dense import inference_copy
from open_fastervit.tasks.detection import CocoDetection, draw_detections
from open_fastervit.tasks.detection import save_png as save_detection_png
from open_fastervit.tasks.detection.train import (
    DetectionConfig,
    evaluate_detector,
    load_detector,
    predict_detector,
    train_detector,
)
from open_fastervit.tasks.segmentation import read_mask, side_by_side
from open_fastervit.tasks.segmentation import save_png as save_segmentation_png
from open_fastervit.tasks.segmentation.train import (
    SegmentationConfig,
    evaluate_segmenter,
    load_segmenter,
    predict_segmenter,
    train_segmenter,
)
from open_fastervit.train.reporting import json_safe

__all__ = ["DenseDemoConfig", "run_dense_demo"]

#: The demos' backbone: FasterViT-0's layout (2 conv stages, HAT in stage 2) at half width and reduced depth.
DENSE_DEMO_MODEL_KWARGS: dict[str, Any] = dict(
    dim=32, in_dim=32, depths=(1, 2, 3, 2), num_heads=(1, 2, 4, 8), window_size=(7, 7, 7, 7),
)


@dataclass
class DenseDemoConfig:
    """What a dense demo runs (``quick``: one short epoch, to check the pipeline)."""

    task: str = "detection"  # or "segmentation"
    data: str | None = None  # default: trees-neon / nuclei-dsb2018 in $FASTERVIT_DATA
    output: str | None = None  # default: demo_output/<task>
    minutes: float = DENSE_MINUTES  # training budget; the epochs are chosen to fit it
    epochs: int | None = None  # a fixed number of epochs instead
    max_epochs: int = 200
    quick: bool = False
    workers: int = 0  # loading in the training process: both cores compute (the images are small)
    seed: int = 0
    backbone_checkpoint: str | None = None
    progress: bool = True
    model_kwargs: dict[str, Any] = field(default_factory=lambda: dict(DENSE_DEMO_MODEL_KWARGS))


def _log(cfg: DenseDemoConfig, message: str) -> None:
    if cfg.progress:
        print(f"[demo {cfg.task}] {message}", file=sys.stderr, flush=True)


def _task_config(cfg: DenseDemoConfig, data: Path, out: Path, epochs: int) -> Any:
    """The training settings of the demo (tuned on 2 CPU cores for the demo data, from scratch)."""
    common = dict(data=str(data), model="fastervit_0", model_kwargs=dict(cfg.model_kwargs), epochs=epochs,
                  output=str(out / "run"), workers=cfg.workers, seed=cfg.seed, progress=cfg.progress,
                  backbone_checkpoint=cfg.backbone_checkpoint, opt="adamw", clip_grad=1.0, hflip=0.5, vflip=0.5,
                  eval_every=max(1, epochs // 4), tensorboard=True, overwrite=True)
    if cfg.task == "detection":
        return DetectionConfig(kind="faster_rcnn", min_size=[352, 384, 416, 448], max_size=448,
                               anchor_sizes=[16, 32, 64, 128, 256], fpn_channels=128, box_head_channels=256,
                               rois_per_image=256, batch_size=2, lr=2e-3, weight_decay=0.05, crop="random",
                               detections_per_img=200, **common)
    return SegmentationConfig(kind="fpn", crop_size=256, decoder_channels=128, batch_size=4, repeats=8, lr=1e-3,
                              weight_decay=0.01, **common)


def _short_run(task_cfg: Any, images: int, steps: int) -> Any:
    """``task_cfg`` cut to about ``steps`` optimizer steps per epoch over a dataset of ``images`` images (a subset,
    or repeats of a dataset smaller than that many batches)."""
    wanted = task_cfg.batch_size * steps
    if images >= wanted:
        return replace(task_cfg, train_images=wanted, repeats=1)
    return replace(task_cfg, train_images=0, repeats=-(-wanted // images))


def _probe_seconds_per_step(task_cfg: Any, images: int, steps: int = 6) -> float:
    """Seconds per optimizer step of the demo's run on this machine: a one-epoch run of about ``steps`` steps on
    the real data (no evaluation), timed by the trainer itself (the epoch's time, without building the model)."""
    probe = replace(_short_run(task_cfg, images, steps), epochs=1, output=str(Path(task_cfg.output).parent / "probe"),
                    val_split="", progress=False, tensorboard=False, eval_every=1)
    result = _train(probe)
    shutil.rmtree(probe.output, ignore_errors=True)
    return float(result["final"]["seconds"]) / max(1, int(result["global_step"]))


def _train(task_cfg: Any) -> dict[str, Any]:
    if isinstance(task_cfg, DetectionConfig):
        return train_detector(task_cfg)
    return train_segmenter(task_cfg)


def _train_images(cfg: DenseDemoConfig, data: Path) -> int:
    split = data / "train"
    if cfg.task == "detection":
        return len([p for p in split.iterdir() if p.is_file()])
    return len(list((split / "images").iterdir()))


def plan_epochs(cfg: DenseDemoConfig, task_cfg: Any, data: Path) -> tuple[int, float | None]:
    """``cfg.epochs`` if given, else as many epochs as fit ``cfg.minutes`` (probe time per step x steps per epoch,
    plus 10 % for evaluation and checkpoints). Returns (epochs, estimated seconds per epoch)."""
    if cfg.epochs:
        return cfg.epochs, None
    images = _train_images(cfg, data)
    per_step = _probe_seconds_per_step(task_cfg, images)
    steps = max(1, images * getattr(task_cfg, "repeats", 1) // task_cfg.batch_size)
    epoch_seconds = 1.1 * per_step * steps
    return max(1, min(cfg.max_epochs, int(60 * cfg.minutes / epoch_seconds))), epoch_seconds


def _prediction_figure(cfg: DenseDemoConfig, data: Path, out: Path, weights: Path) -> Path:
    """A PNG of held-out predictions next to the ground truth (detection: the detections scoring at least 0.5, or
    the 30 best of them when fewer score that high, down to 0.05; the labels show the scores)."""
    pictures = []
    if cfg.task == "detection":
        dataset = CocoDetection(data / "val", data / "annotations" / "instances_val.json")
        model = inference_copy(load_detector(weights))
        for index in range(min(4, len(dataset))):
            image, target = dataset[index]
            image = image.float() / 255 if image.dtype == torch.uint8 else image
            truth = {"boxes": target["boxes"], "labels": target["labels"], "scores": torch.ones(len(target["labels"]))}
            with torch.inference_mode():
                output = model([image])[0]
            scores = output["scores"]
            shown = float(scores.topk(min(len(scores), 30)).values.min()) if len(scores) else 1.0
            pictures += [draw_detections(image, truth, ["tree"], 0.5),
                         draw_detections(image, output, ["tree"], max(0.05, min(0.5, shown)))]
        path = out / "predictions.png"
        save_detection_png(make_grid(pictures, nrow=2, padding=4), path)
        return path
    model = inference_copy(load_segmenter(weights))
    for image_path in sorted((data / "val" / "images").iterdir()):
        image = pil_to_tensor(read_image(image_path)).float() / 255
        mask = torch.from_numpy(read_mask(data / "val" / "masks" / image_path.name).astype("int64"))
        with torch.inference_mode():
            prediction = model(image[None])[0].argmax(0)
        pictures.append(side_by_side(image, mask, prediction, 2))
    path = out / "predictions.png"
    save_segmentation_png(make_grid(pictures, nrow=1, padding=4), path)
    return path


def _report(cfg: DenseDemoConfig, out: Path, facts: dict[str, Any]) -> Path:
    lines = [f"# FasterViT {cfg.task} demo", ""]
    if cfg.task == "detection":
        bbox = facts["evaluate"]["bbox"]
        lines += [f"Tree-crown detection on `trees-neon` (aerial RGB, 400 x 400 tiles), Faster R-CNN + FPN on a "
                  f"{facts['params_m']:.1f}M-parameter FasterViT trained from scratch.", "",
                  "| held-out split | box mAP | mAP50 | mAP75 |", "|---|---|---|---|",
                  f"| val (13 tiles, 461 trees) | {bbox['mAP']:.3f} | {bbox['mAP50']:.3f} | {bbox['mAP75']:.3f} |"]
    else:
        ev = facts["evaluate"]
        lines += [f"Nucleus segmentation on `nuclei-dsb2018` (fluorescence, 256 x 256), FPN decoder on a "
                  f"{facts['params_m']:.1f}M-parameter FasterViT trained from scratch.", "",
                  "| held-out image | mIoU | pixel accuracy | IoU background | IoU nucleus |", "|---|---|---|---|---|",
                  f"| val (1 image, 29 nuclei) | {ev['mIoU']:.4f} | {ev['pixel_accuracy']:.4f} | "
                  + " | ".join(f"{v:.4f}" for v in ev["per_class_iou"].values()) + " |"]
    lines += ["", f"Training: {facts['epochs']} epochs, {facts['train']['global_step']} optimizer steps in "
                  f"{facts['train_seconds'] / 60:.1f} min; whole demo {facts['seconds'] / 60:.1f} min on "
                  f"{facts['machine']}.", "",
              "Files: `run/` (best.safetensors, last.pt, curves.png, summary.csv, tb/), `evaluate.json`, "
              "`predict/` (one PNG per image + results json), `predictions.png` (ground truth | prediction).", "",
              "![predictions](predictions.png)", ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines))
    return path


def run_dense_demo(cfg: DenseDemoConfig) -> dict[str, Any]:
    """Train, evaluate, predict and report; returns the facts (also in ``OUTPUT/report.json``).

    Raises:
        FileNotFoundError: the demo data is missing.
    """
    if cfg.task not in ("detection", "segmentation"):
        raise ValueError(f"unknown demo task {cfg.task!r}; expected detection or segmentation")
    started = time.perf_counter()
    name = "trees-neon" if cfg.task == "detection" else "nuclei-dsb2018"
    data = Path(cfg.data).expanduser() if cfg.data else data_path(name)
    if not data.is_dir():
        raise FileNotFoundError(f"demo data {data} not found (set FASTERVIT_DATA or --data)")
    out = Path(cfg.output or f"demo_output/{cfg.task}")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.quick:
        cfg = replace(cfg, epochs=cfg.epochs or 1)
    task_cfg = _task_config(cfg, data, out, 1)
    if cfg.quick:
        task_cfg = _short_run(task_cfg, _train_images(cfg, data), 2)
    _log(cfg, "timing a few training steps to plan the epochs" if not cfg.epochs else f"{cfg.epochs} epoch(s)")
    epochs, epoch_seconds = plan_epochs(cfg, task_cfg, data)
    task_cfg = replace(task_cfg, epochs=epochs, eval_every=max(1, epochs // 4))
    if epoch_seconds:
        _log(cfg, f"~{epoch_seconds:.1f} s per epoch: {epochs} epochs fit {cfg.minutes:g} min")
    train_start = time.perf_counter()
    result = _train(task_cfg)
    train_seconds = time.perf_counter() - train_start
    weights = Path(result["best_checkpoint"])
    if cfg.task == "detection":
        evaluation = evaluate_detector(weights, data, "val", json_path=out / "evaluate.json")
        prediction = predict_detector(weights, [data / "val"], out / "predict", score_threshold=0.5)
        params = sum(p.numel() for p in load_detector(weights).parameters())
    else:
        evaluation = evaluate_segmenter(weights, data, "val", json_path=out / "evaluate.json")
        prediction = predict_segmenter(weights, [data / "val" / "images"], out / "predict")
        params = sum(p.numel() for p in load_segmenter(weights).parameters())
    figure = _prediction_figure(cfg, data, out, weights)
    facts: dict[str, Any] = {
        "task": cfg.task, "data": str(data), "epochs": epochs, "train_seconds": train_seconds,
        "train": {k: v for k, v in result.items() if k not in ("final", "build_config")},
        "evaluate": evaluation, "predict": {k: v for k, v in prediction.items() if k != "pngs"},
        "figure": str(figure), "params_m": params / 1e6, "config": asdict(cfg),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
    }
    facts["seconds"] = time.perf_counter() - started
    facts["report"] = str(_report(cfg, out, facts))
    (out / "report.json").write_text(json.dumps(json_safe(facts), indent=2, default=str, allow_nan=False))
    return facts
