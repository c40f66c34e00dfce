"""Evaluation: top-1 / top-5 accuracy and loss of a model on a labelled dataset.

``evaluate`` scores an already-built model on any loader of ``(images, targets)`` batches (the trainer
calls it every epoch). ``validate`` is the end-to-end API behind ``fastervit validate``: it takes the
model, its inference form and evaluation preprocessing from :class:`open_fastervit.inference.Predictor`,
opens the dataset and calls ``evaluate``.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import create_loader
from timm.utils import AverageMeter, accuracy

from open_fastervit import loading
from open_fastervit.inference import Predictor
from open_fastervit.inference import data_config_for as data_config_for  # older imports took it from here
from open_fastervit.labels import (
    ReadableImages,
    class_name_map,
    load_label_map,
    no_readable_image,
    open_eval_dataset,
    readable_collate,
)
from open_fastervit.serialization import ema_mode, read_weights

__all__ = ["evaluate", "read_checkpoint", "validate"]

LabelMap = Mapping[int, int] | Sequence[int]


def _label_lookup(label_map: LabelMap, device: torch.device) -> torch.Tensor:
    """Dense lookup tensor ``lookup[dataset_target] = model_output_index`` from a mapping or a sequence."""
    if isinstance(label_map, Mapping):
        if not label_map:
            raise ValueError("label_map is empty")
        size = max(int(k) for k in label_map) + 1
        lookup = torch.full((size,), -1, dtype=torch.long)
        for target, index in label_map.items():
            lookup[int(target)] = int(index)
    else:
        lookup = torch.as_tensor(list(label_map), dtype=torch.long)
        if lookup.numel() == 0:
            raise ValueError("label_map is empty")
    return lookup.to(device)


def _map_targets(targets: torch.Tensor, lookup: torch.Tensor | None) -> torch.Tensor:
    """Dataset targets -> model output indices; errors name the first target the map does not cover."""
    if lookup is None:
        return targets
    outside = (targets < 0) | (targets >= lookup.numel())
    mapped = lookup[targets.clamp(0, lookup.numel() - 1)]
    missing = outside | (mapped < 0)
    if missing.any():
        bad = int(targets[missing][0])
        raise ValueError(f"label_map has no entry for dataset target {bad}")
    return mapped


def _model_device(model: torch.nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def evaluate(
    model: torch.nn.Module,
    loader: Iterable,
    *,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    label_map: LabelMap | None = None,
) -> dict:
    """Top-1 / top-k accuracy (percent) and mean cross-entropy of ``model`` over ``loader``.

    Args:
        model: a classifier returning logits (B, num_classes). It is run in eval mode; its previous
            train/eval mode is restored afterwards.
        loader: iterable of ``(images, targets, ...)`` batches; extra items are ignored, empty batches (all of
            their images unreadable, :func:`open_fastervit.labels.readable_collate`) are passed over.
        device: where to run; defaults to the device of the model's parameters.
        amp_dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``) or None for full precision.
        label_map: dataset target index -> model output index (a dict or a sequence indexed by target),
            e.g. ImageFolder indices of an ImageNet subset -> ImageNet-1K indices.

    Returns:
        ``{'top1': %, 'top5': % (top-min(5, classes)), 'loss': mean CE, 'count': images scored}``.

    Raises:
        ValueError: no image to score, or a target outside the model's outputs / the label map.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    lookup = _label_lookup(label_map, device) if label_map is not None else None
    top1, top5, losses = AverageMeter(), AverageMeter(), AverageMeter()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in loader:
                if batch[0].shape[0] == 0:
                    continue
                images, targets = batch[0].to(device), batch[1].to(device)
                targets = _map_targets(targets, lookup)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(images)
                logits = logits.float()
                if targets.numel() and int(targets.max()) >= logits.shape[-1]:
                    raise ValueError(
                        f"target {int(targets.max())} is outside the model's {logits.shape[-1]} outputs; "
                        "pass a label map (label_map= in Python, --label-map on the command line) or a model with more "
                        "classes"
                    )
                k = min(5, logits.shape[-1])
                acc1, acck = accuracy(logits, targets, topk=(1, k))
                n = images.shape[0]
                losses.update(F.cross_entropy(logits, targets).item(), n)
                top1.update(acc1.item(), n)
                top5.update(acck.item(), n)
    finally:
        model.train(was_training)
    if top1.count == 0:
        raise ValueError("evaluate() got an empty loader: no images to score")
    return {"top1": top1.avg, "top5": top5.avg, "loss": losses.avg, "count": int(top1.count)}


# --------------------------------------------------------------------------------------------------
# checkpoints and models
# --------------------------------------------------------------------------------------------------

DEFAULT_MODEL = loading.DEFAULT_MODEL


def read_checkpoint(path: str | Path, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and metadata of a ``.safetensors`` file or a ``.pt``/``.pth``/``.pth.tar`` checkpoint
    (``open_fastervit.serialization.read_weights``; EMA weights preferred when ``use_ema``, else the raw ones).

    Raises:
        CheckpointError: missing, corrupt or unsafe file (the message names it).
    """
    return read_weights(path, ema_mode(None if use_ema else False))


def load_model(
    name: str | None,
    checkpoint: str | Path | None = None,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    use_ema: bool = True,
    pretrained: bool = True,
) -> tuple[torch.nn.Module, dict]:
    """Deprecated: use :func:`open_fastervit.load_model` (``model.weights_info`` is the ``info`` returned here).

    ``(model, info)`` of ``checkpoint`` (architecture ``name``, else the file's), else of model ``name`` (default
    :data:`DEFAULT_MODEL`) with its published weights, or random ones when ``pretrained=False``.

    Raises:
        CheckpointError, ValueError: as :func:`open_fastervit.load_model`.
    """
    warnings.warn("open_fastervit.validate.load_model is deprecated; use open_fastervit.load_model (the model's "
                  "weights_info is the info)", DeprecationWarning, stacklevel=2)
    if checkpoint is not None:
        model = loading.load_model(checkpoint, architecture=name, model_kwargs=model_kwargs,
                                   use_ema=None if use_ema else False)
    else:
        model = loading.load_model(name or DEFAULT_MODEL, model_kwargs=model_kwargs, pretrained=pretrained)
    return model, dict(model.weights_info)


# --------------------------------------------------------------------------------------------------
# end-to-end validation
# --------------------------------------------------------------------------------------------------


def _default_batch_size(device: torch.device) -> int:
    return 128 if device.type == "cuda" else 32


def _default_workers(num_images: int, batch_size: int, device: torch.device) -> int:
    """Loader workers: none when the whole set is one batch; on GPU up to 8; on CPU half the cores (up to 4),
    leaving the rest to the model."""
    cores = os.cpu_count() or 1
    if num_images <= batch_size:
        return 0
    return min(8, cores) if device.type == "cuda" else max(1, min(4, cores // 2))


def validate(
    model: str | torch.nn.Module | None,
    data: str | Path,
    *,
    checkpoint: str | Path | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    split: str = "val",
    label_map: str | Path | Mapping[int, int] | Sequence[int] | None = None,
    label_column: str | None = None,
    use_ema: bool = True,
    img_size: int | None = None,
    crop_pct: float | None = None,
    crop_mode: str | None = None,
    interpolation: str | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str | torch.device | None = None,
    amp_dtype: torch.dtype | str | None = None,
    fuse: bool = True,
    pretrained: bool = True,
    by_index: bool = False,
) -> dict:
    """Top-1/top-5 and loss of a model (timm name and/or checkpoint, or a module) on a dataset folder.

    The model, its inference form, device, precision and preprocessing come from
    :class:`open_fastervit.inference.Predictor`: the model's pretrained cfg (``resolve_data_config``: input size,
    crop_pct, crop_mode such as ``squash``, interpolation, mean/std), the file's stored preprocessing, then the
    arguments here; images are loaded by timm's ``create_loader``. ``amp_dtype`` is an autocast dtype or a
    precision word (``"none"``, ``"bf16"``, ``"fp16"``).
    ``data`` is an ImageFolder (``split`` sub-folder used when present) or a flat folder with a
    ``labels.csv``; ``label_map`` (``'in1k'``, a CSV path or a dict) maps its targets to model outputs.
    A model loaded here runs in its exact inference form (``fused.inference_form``) unless ``fuse=False``;
    a module passed in is used as it is. Without ``checkpoint`` a named model gets its published weights
    (``open_fastervit.load_model``), random ones only with ``pretrained=False``.

    Only images that were read are scored: an unreadable file is left out (never replaced by another image) and
    reported in ``skipped`` / ``skipped_files``. When the weights store class names (``fastervit train`` writes
    them) and no ``label_map`` is given, dataset classes are matched to model outputs by name; class folders that
    match no model name are an error unless ``by_index`` (score folder index ``i`` as output ``i``).

    Raises:
        FileNotFoundError: the dataset folder does not exist.
        DatasetError: no image of the dataset can be read (names the folder and the first files).
        ClassNameMismatch: dataset class folders that are not among the model's class names (without ``by_index``).
        CheckpointError: weights that cannot be had, read or fitted.
        ValueError: bad model name, arguments or label map; ``batch_size`` < 1 or ``workers`` < 0.

    Returns:
        :func:`evaluate`'s metrics; ``images`` (scored), ``skipped`` (count of unreadable files), ``skipped_files``
        (their names relative to the split folder), ``label_mapping`` (``"by name"``, ``"label map"`` or
        ``"by index"``); the model, weights, data and preprocessing used and the time taken.
    """
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    dataset = ReadableImages(open_eval_dataset(data, split=split, label_column=label_column))
    given = model if isinstance(model, torch.nn.Module) else None
    was_training = given is not None and given.training
    from_file = checkpoint is not None and given is None
    predictor = Predictor(checkpoint if from_file else model, architecture=model if from_file else None,
                          model_kwargs=model_kwargs, use_ema=None if use_ema else False, pretrained=pretrained,
                          fuse=fuse, device=device, amp=amp_dtype, img_size=img_size, crop_pct=crop_pct,
                          crop_mode=crop_mode, interpolation=interpolation)
    if given is not None:
        given.train(was_training)  # evaluate() runs it in eval mode and gives it back as it came
    device, config = predictor.device, predictor.data_config
    batch_size = batch_size or _default_batch_size(device)
    workers = _default_workers(len(dataset), batch_size, device) if workers is None else workers
    loader = create_loader(
        dataset, input_size=config["input_size"], batch_size=batch_size, use_prefetcher=False,
        interpolation=config["interpolation"], mean=config["mean"], std=config["std"],
        crop_pct=config["crop_pct"], crop_mode=config["crop_mode"], num_workers=workers,
        device=device, persistent_workers=False, collate_fn=readable_collate,
    )
    mapping = load_label_map(label_map, dataset)
    how = "label map" if mapping is not None else "by index"
    names = predictor.info.get("class_names")
    if mapping is None and names and not by_index:
        mapping = class_name_map(names, dataset)
        how = "by name" if mapping is not None else how
    start = time.perf_counter()
    try:
        metrics = evaluate(predictor.model, loader, device=device, amp_dtype=predictor.amp_dtype, label_map=mapping)
    except ValueError as e:
        if "empty loader" in str(e) and dataset.bad.any():
            raise no_readable_image(dataset, dataset.root or data) from None
        raise
    seconds = time.perf_counter() - start
    skipped = dataset.skipped()
    return {
        **metrics,
        "images": metrics["count"],
        "skipped": len(skipped),
        "skipped_files": skipped,
        "label_mapping": how,
        "model": predictor.name,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "weights": "module" if given is not None else predictor.info["weights"],
        "data": str(data),
        "input_size": list(config["input_size"]),
        "crop_pct": config["crop_pct"],
        "crop_mode": config["crop_mode"],
        "interpolation": config["interpolation"],
        "seconds": seconds,
    }
