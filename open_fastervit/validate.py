"""Evaluation: top-1 / top-5 accuracy and loss of a model on a labelled dataset.

``evaluate`` scores an already-built model on any loader of ``(images, targets)`` batches (the trainer
calls it every epoch). ``validate`` is the end-to-end API behind ``fastervit validate``: it builds the
model (timm name + architecture overrides + checkpoint), resolves the evaluation preprocessing from
the model's pretrained cfg, opens the dataset and calls ``evaluate``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors
import timm
import torch
import torch.nn.functional as F
from timm.data import create_loader, resolve_data_config
from timm.utils import AverageMeter, accuracy

from open_fastervit.convert import (
    CheckpointError,
    check_fit,
    is_official_state_dict,
    load_checkpoint_file,
    official_to_ours,
    select_weights,
)
from open_fastervit.fused import inference_form
from open_fastervit.labels import load_label_map, open_eval_dataset

__all__ = ["add_model_args", "evaluate", "load_model", "read_checkpoint", "validate"]

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
        loader: iterable of ``(images, targets, ...)`` batches; extra items are ignored.
        device: where to run; defaults to the device of the model's parameters.
        amp_dtype: autocast dtype (``torch.bfloat16`` / ``torch.float16``) or None for full precision.
        label_map: dataset target index -> model output index (a dict or a sequence indexed by target),
            e.g. ImageFolder indices of an ImageNet subset -> ImageNet-1K indices.

    Returns:
        ``{'top1': %, 'top5': % (top-min(5, classes)), 'loss': mean CE, 'count': images}``.
    """
    device = torch.device(device) if device is not None else _model_device(model)
    lookup = _label_lookup(label_map, device) if label_map is not None else None
    top1, top5, losses = AverageMeter(), AverageMeter(), AverageMeter()
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for batch in loader:
                images, targets = batch[0].to(device), batch[1].to(device)
                targets = _map_targets(targets, lookup)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                    logits = model(images)
                logits = logits.float()
                if targets.numel() and int(targets.max()) >= logits.shape[-1]:
                    raise ValueError(
                        f"target {int(targets.max())} is outside the model's {logits.shape[-1]} outputs; "
                        "pass a label_map or a model with more classes"
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

#: Keys of a checkpoint dict (or safetensors metadata, JSON-encoded) that carry metadata we use.
META_KEYS = ("class_names", "data_config", "model_kwargs", "img_size", "architecture")


def _safetensors_meta(path: Path) -> dict:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except (safetensors.SafetensorError, OSError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e
    meta = {}
    for key in META_KEYS:
        if key in raw:
            try:
                meta[key] = json.loads(raw[key])
            except json.JSONDecodeError:
                meta[key] = raw[key]
    return meta


def read_checkpoint(path: str | Path, use_ema: bool = True) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and metadata from a ``.safetensors`` file or a ``.pt``/``.pth``/``.pth.tar`` checkpoint.

    Files are opened by ``open_fastervit.convert.load_checkpoint_file`` (``weights_only`` loading). A
    training checkpoint holding both raw and EMA weights gives the EMA ones when ``use_ema`` (the default;
    the official recipe selects models by EMA accuracy), else the raw ones.

    Returns:
        ``(state_dict, info)``; ``info["weights"]`` is ``"ema"``, ``"raw"`` or ``"plain"`` (a plain state
        dict), plus any of :data:`META_KEYS` stored in the file.
    """
    path = Path(path)
    obj = load_checkpoint_file(path)
    try:
        state, kind = select_weights(obj, "prefer" if use_ema else "avoid")
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from e
    if path.suffix == ".safetensors":
        info = _safetensors_meta(path)
    else:
        info = {k: obj[k] for k in META_KEYS if k in obj and not isinstance(obj[k], torch.Tensor)}
    return state, {"weights": kind, **info}


def _classes_in(state: Mapping[str, torch.Tensor], model: torch.nn.Module) -> int | None:
    """Number of classes of the checkpoint's classifier, found under the model's classifier name."""
    classifier = getattr(model, "pretrained_cfg", {}).get("classifier")
    weight = state.get(f"{classifier}.weight") if isinstance(classifier, str) else None
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


def _tuples(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """JSON lists -> tuples (architecture kwargs such as ``depths`` are per-stage tuples)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()}


def _create(name: str, kwargs: Mapping[str, Any]) -> torch.nn.Module:
    import open_fastervit  # noqa: F401  (registers the fastervit_* architectures with timm)

    if not timm.is_model(name):
        raise ValueError(f"unknown model {name!r}; FasterViT models: {timm.list_models('fastervit*')}")
    try:
        return timm.create_model(name, **_tuples(kwargs))
    except TypeError as e:
        raise ValueError(f"bad architecture arguments for {name}: {e}") from e


DEFAULT_MODEL = "fastervit_0"


def load_model(
    name: str | None,
    checkpoint: str | Path | None = None,
    *,
    model_kwargs: Mapping[str, Any] | None = None,
    use_ema: bool = True,
) -> tuple[torch.nn.Module, dict]:
    """Build timm model ``name`` (with architecture overrides) and load ``checkpoint`` into it.

    ``name`` None takes the ``architecture`` stored in the checkpoint, else :data:`DEFAULT_MODEL`.
    Official checkpoints are converted (``open_fastervit.convert.official_to_ours``); the classifier is
    resized to the checkpoint's class count; every other missing, unexpected or mis-shaped key is an error
    (``convert.check_fit``). Architecture kwargs stored in the checkpoint apply unless overridden.

    Returns:
        ``(model in eval mode, info)``; ``info`` as :func:`read_checkpoint` (``{'weights': 'random'}`` when
        no checkpoint is given) plus ``'num_classes'``.
    """
    kwargs = dict(model_kwargs or {})
    if checkpoint is None:
        model = _create(name or DEFAULT_MODEL, kwargs)
        return model.eval(), {"weights": "random", "num_classes": model.num_classes}
    state, info = read_checkpoint(checkpoint, use_ema=use_ema)
    if is_official_state_dict(state):
        state = official_to_ours(state)
        info["weights"] = f"official {info['weights']}"
    kwargs = {**(info.get("model_kwargs") or {}), **kwargs}
    name = name or info.get("architecture") or DEFAULT_MODEL
    model = _create(name, kwargs)
    num_classes = _classes_in(state, model)
    if num_classes is not None and num_classes != model.num_classes:
        model.reset_classifier(num_classes)
    check_fit(model, state, what=f"checkpoint {checkpoint}")
    model.load_state_dict(state)
    return model.eval(), {**info, "num_classes": model.num_classes}


def data_config_for(model: torch.nn.Module, info: Mapping | None = None, **overrides: Any) -> dict:
    """Evaluation preprocessing: the model's pretrained cfg, updated by the checkpoint's ``data_config`` /
    ``img_size`` metadata, then by explicit ``overrides`` (img_size, crop_pct, crop_mode, interpolation)."""
    info = info or {}
    args = dict(info.get("data_config") or {})
    if info.get("img_size") and "input_size" not in args:
        args["img_size"] = int(info["img_size"])
    if overrides.get("img_size"):
        args.pop("input_size", None)
    args.update({k: v for k, v in overrides.items() if v is not None})
    if "input_size" in args:
        args["input_size"] = tuple(args["input_size"])
    return resolve_data_config(args=args, model=model)


# --------------------------------------------------------------------------------------------------
# end-to-end validation
# --------------------------------------------------------------------------------------------------


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
    amp_dtype: torch.dtype | None = None,
    fuse: bool = True,
) -> dict:
    """Top-1/top-5 and loss of a model (timm name and/or checkpoint, or a module) on a dataset folder.

    Preprocessing follows the model's pretrained cfg (``resolve_data_config``: input size, crop_pct,
    crop_mode such as ``squash``, interpolation, mean/std) via timm's ``create_loader``.
    ``data`` is an ImageFolder (``split`` sub-folder used when present) or a flat folder with a
    ``labels.csv``; ``label_map`` (``'in1k'``, a CSV path or a dict) maps its targets to model outputs.
    A model loaded here runs in its exact inference form (``fused.inference_form``) unless ``fuse=False``;
    a module passed in is used as it is.

    Returns:
        :func:`evaluate`'s metrics plus the model, weights, data and preprocessing used and the time taken.
    """
    info: dict = {"weights": "module"}
    device = torch.device(device) if device is not None else default_device()
    if model is None or isinstance(model, str):
        model, info = load_model(model, checkpoint, model_kwargs=model_kwargs, use_ema=use_ema)
        if fuse:
            model = inference_form(model.to(device))
    name = getattr(model, "pretrained_cfg", {}).get("architecture") or type(model).__name__
    dataset = open_eval_dataset(data, split=split, label_column=label_column)
    config = data_config_for(model, info, img_size=img_size, crop_pct=crop_pct, crop_mode=crop_mode,
                             interpolation=interpolation)
    batch_size = batch_size or _default_batch_size(device)
    workers = _default_workers(len(dataset), batch_size, device) if workers is None else workers
    loader = create_loader(
        dataset, input_size=config["input_size"], batch_size=batch_size, use_prefetcher=False,
        interpolation=config["interpolation"], mean=config["mean"], std=config["std"],
        crop_pct=config["crop_pct"], crop_mode=config["crop_mode"], num_workers=workers,
        device=device, persistent_workers=False,
    )
    start = time.perf_counter()
    metrics = evaluate(model.to(device), loader, device=device, amp_dtype=amp_dtype,
                       label_map=load_label_map(label_map, dataset))
    seconds = time.perf_counter() - start
    return {
        **metrics,
        "model": name,
        "checkpoint": str(checkpoint) if checkpoint else None,
        "weights": info["weights"],
        "data": str(data),
        "input_size": list(config["input_size"]),
        "crop_pct": config["crop_pct"],
        "crop_mode": config["crop_mode"],
        "interpolation": config["interpolation"],
        "seconds": seconds,
    }


# --------------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------------

AMP_DTYPES = {"none": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from e
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object such as '{{\"dim\": 32}}', got {text!r}")
    return value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options naming a model: timm name, checkpoint, architecture overrides, EMA/raw, input size, device."""
    parser.add_argument("--model", "-m", default=None,
                        help=f"timm model name (default: the checkpoint's architecture, else {DEFAULT_MODEL})")
    parser.add_argument("--checkpoint", "-c", default=None,
                        help="weights: our .safetensors, a training checkpoint or an official .pth.tar")
    parser.add_argument("--model-kwargs", type=_json_dict, default={},
                        help='architecture overrides as JSON, e.g. \'{"dim": 32, "depths": [1, 1, 2, 1]}\'')
    parser.add_argument("--raw", action="store_true",
                        help="use the raw weights of a training checkpoint instead of its EMA weights")
    parser.add_argument("--img-size", type=int, default=None, help="input size (default: from the model cfg)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--no-fuse", dest="fuse", action="store_false",
                        help="run the model as built instead of its fused inference form (same outputs, slower)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastervit validate",
        description="Top-1/top-5 accuracy and loss of a model or checkpoint on an image dataset.",
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
    parser.add_argument("--batch-size", "-b", type=int, default=None, help="default 32 on CPU, 128 on GPU")
    parser.add_argument("--workers", "-j", type=int, default=None,
                        help="loader workers (default: half the CPU cores up to 4; on GPU up to 8)")
    parser.add_argument("--amp", choices=tuple(AMP_DTYPES), default="none", help="autocast dtype")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = validate(
            args.model, args.data, checkpoint=args.checkpoint, model_kwargs=args.model_kwargs,
            split=args.split, label_map=args.label_map, label_column=args.label_column, use_ema=not args.raw,
            img_size=args.img_size, crop_pct=args.crop_pct, crop_mode=args.crop_mode,
            interpolation=args.interpolation, batch_size=args.batch_size, workers=args.workers,
            device=args.device, amp_dtype=AMP_DTYPES[args.amp], fuse=args.fuse,
        )
    except (FileNotFoundError, ValueError) as e:
        print(f"fastervit validate: error: {e}", file=sys.stderr)
        return 1
    print(
        f"{result['model']} ({result['weights']} weights) on {result['data']}: "
        f"top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  loss {result['loss']:.4f}  "
        f"({result['count']} images, input {tuple(result['input_size'])}, crop_pct {result['crop_pct']}, "
        f"{result['crop_mode']}, {result['interpolation']}; {result['seconds']:.1f} s)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0
