"""One inference path: load -> inference form -> data config -> transform -> batched forward -> outputs.

:class:`Predictor` is that path, written once; ``fastervit predict``, ``validate``, ``serve`` and the calibration
of ``fastervit quantize`` all go through it::

    predictor = Predictor("fastervit_0")                 # any source open_fastervit.load_model takes, or a module
    top = predictor(["cat.jpg", "dog.png"], topk=5)      # [TopK(indices, labels, probs), ...]
    logits = predictor.infer(predictor.preprocess(images))   # (B, classes) float32

What it does, in order:

1. **load**: ``source`` is a model name, a weights file (our ``.safetensors``, a training checkpoint, an official
   ``.pth.tar``), a run folder's checkpoint, a Hugging Face / timm folder, or a runtime file registered with the
   loader (exported ``.pt2``, ``.onnx`` of ``fastervit export`` / ``fastervit quantize``), read by
   :func:`open_fastervit.loading.load_model`; or an ``nn.Module``, used as it is given (put in eval mode);
2. **inference form**: a model loaded here runs in its exact inference form
   (:func:`open_fastervit.fused.inference_form`) unless ``fuse=False``;
3. **data config**: :func:`data_config_for`: the model's pretrained cfg, then the file's stored preprocessing,
   then the caller's overrides;
4. **transform**: timm's evaluation transform of that config (resize, crop, normalise), resampling only the
   cropped region (:func:`open_fastervit.data.eval_transform`);
5. **batched forward** on ``device`` (default: CUDA when visible) under the precision ``amp``
   (``"none"``/``"fp32"``, ``"bf16"``, ``"fp16"``: :mod:`open_fastervit.runtime`), in ``inference_mode``;
6. **outputs**: float32 logits, probabilities, or the top-k classes with their names
   (:func:`open_fastervit.labels.resolve_class_names`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from PIL import Image
from timm.data import resolve_data_config
from torch import Tensor, nn

from .data import eval_transform, read_image
from .fused import inference_form
from .labels import resolve_class_names
from .loading import DEFAULT_MODEL, load_model
from .runtime import amp_dtype, resolve_device

__all__ = ["ImageInput", "Predictor", "TopK", "data_config_for"]

#: What :meth:`Predictor.preprocess` takes per image: a PIL image or the path of an image file.
ImageInput = Union[Image.Image, str, os.PathLike]


def data_config_for(model: nn.Module, info: Mapping[str, Any] | None = None, **overrides: Any) -> dict:
    """Evaluation preprocessing of ``model``: its pretrained cfg, updated by the weights' ``data_config`` /
    ``img_size`` metadata (``info``, e.g. ``model.weights_info``), then by explicit ``overrides`` (``img_size``,
    ``crop_pct``, ``crop_mode``, ``interpolation``; ``None`` values are ignored).

    Returns:
        timm's data config: ``input_size`` ``(C, H, W)`` in pixels, ``interpolation``, ``mean``, ``std``,
        ``crop_pct``, ``crop_mode``.
    """
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


@dataclass
class TopK:
    """The ``k`` most probable classes of one image, most probable first: parallel lists of class indices, names
    and softmax probabilities."""

    indices: list[int]
    labels: list[str]
    probs: list[float]


class Predictor:
    """A classifier ready to run on images (see the module docstring for the steps).

    Args:
        source: a model name, file or folder (as :func:`open_fastervit.loading.load_model` takes; ``None``:
            :data:`~open_fastervit.loading.DEFAULT_MODEL`), or a module (used as given, in eval mode).
        architecture: the timm name to build for a weights file (default: the file's).
        model_kwargs: architecture arguments (override those stored in the file).
        use_ema: training checkpoints: ``None`` prefers the EMA weights, ``False`` takes the raw ones.
        pretrained: for a model name: the published weights, or random ones with ``False``.
        fuse: run a model loaded here in its inference form (same outputs, faster).
        device: where to run (default: CUDA when visible, else CPU).
        amp: precision of the forward pass: ``"none"``/``"fp32"`` (default), ``"bf16"``, ``"fp16"``, or a dtype.
        img_size, crop_pct, crop_mode, interpolation: preprocessing overrides (:func:`data_config_for`).
        classes: class names: a list, a text file (one per line) or a dataset folder (default: the weights' names,
            ImageNet's for 1000 outputs, else the indices).
        batch_size: images per forward pass of :meth:`__call__`.

    Attributes:
        model: the module that runs (on ``device``).
        info: what was loaded (``model.weights_info``).
        device: where the model runs.
        amp_dtype: the autocast dtype of the forward pass (``None``: float32).
        data_config: timm's preprocessing settings (``input_size`` ``(C, H, W)`` in pixels, mean, std, crop).
        transform: the evaluation transform of ``data_config`` (:func:`open_fastervit.data.eval_transform`: PIL image
            -> ``(C, H, W)`` float tensor).
        num_classes: the number of outputs.
        name: the architecture.
        loaded: ``True`` when ``source`` was not a module (the predictor loaded it).

    Raises:
        CheckpointError: weights that cannot be had (offline), read or fitted; a file of an unknown type.
        ValueError: unknown model name, bad architecture arguments, device, precision, batch size, ``img_size`` < 1 or
            ``crop_pct`` outside (0, 1].
    """

    def __init__(
        self,
        source: str | Path | nn.Module | None = None,
        *,
        architecture: str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        use_ema: bool | None = None,
        pretrained: bool = True,
        fuse: bool = True,
        device: str | torch.device | None = None,
        amp: str | torch.dtype | None = None,
        img_size: int | None = None,
        crop_pct: float | None = None,
        crop_mode: str | None = None,
        interpolation: str | None = None,
        classes: str | Path | Sequence[str] | None = None,
        batch_size: int = 16,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if img_size is not None and img_size < 1:
            raise ValueError(f"img_size must be >= 1 (pixels), got {img_size}")
        if crop_pct is not None and not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.device = resolve_device(device)
        self.amp_dtype = amp if isinstance(amp, torch.dtype) else amp_dtype(amp)
        self.loaded = not isinstance(source, nn.Module)
        if isinstance(source, nn.Module):
            model = source
        else:
            model = load_model(source or DEFAULT_MODEL, architecture=architecture, model_kwargs=model_kwargs,
                               use_ema=use_ema, pretrained=pretrained)
        self.info: dict[str, Any] = dict(getattr(model, "weights_info", None) or {})
        model = model.eval().to(self.device)
        if fuse and self.loaded:
            model = inference_form(model)
            model.weights_info = self.info
        self.model = model
        self.data_config = data_config_for(model, self.info, img_size=img_size, crop_pct=crop_pct,
                                           crop_mode=crop_mode, interpolation=interpolation)
        self.transform = eval_transform(self.data_config)
        self.num_classes = int(model.num_classes)
        self.name = str((getattr(model, "pretrained_cfg", None) or {}).get("architecture")
                        or self.info.get("architecture") or type(model).__name__)
        self.batch_size = batch_size
        self._classes = classes
        self._names: list[str] | None = None

    @property
    def class_names(self) -> list[str]:
        """One name per output (resolved on first use, see ``classes``).

        Raises:
            FileNotFoundError, ValueError: as :func:`open_fastervit.labels.resolve_class_names`.
        """
        if self._names is None:
            self._names = resolve_class_names(self.num_classes, self._classes, self.info)
        return self._names

    def preprocess(self, images: Sequence[ImageInput]) -> Tensor:
        """Images -> the model's input batch ``(B, C, H, W)`` float32 on CPU (the evaluation transform). Paths are
        read with :func:`open_fastervit.data.read_image` (8-bit RGB; 16-bit images scaled).

        Raises:
            FileNotFoundError, ImageDecodeError, OSError: a path that is missing or not a readable image.
            ValueError: no images.
        """
        if not images:
            raise ValueError("no images to preprocess")
        pictures = [image if isinstance(image, Image.Image) else read_image(image) for image in images]
        return torch.stack([self.transform(picture) for picture in pictures])

    def infer(self, batch: Tensor) -> Tensor:
        """One forward pass: ``(B, C, H, W)`` float images -> ``(B, num_classes)`` float32 logits on ``device``."""
        with torch.inference_mode():
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                return self.model(batch.to(self.device)).float()

    def postprocess(self, logits: Tensor, topk: int = 5) -> list[TopK]:
        """``(B, num_classes)`` logits -> one :class:`TopK` per row (``min(topk, num_classes)`` classes).

        Raises:
            ValueError: ``topk`` < 1.
        """
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        probs, indices = logits.softmax(dim=-1).topk(min(topk, self.num_classes), dim=-1)
        names = self.class_names
        return [TopK(i, [names[j] for j in i], p) for p, i in zip(probs.tolist(), indices.tolist())]

    def __call__(self, images: Sequence[ImageInput], topk: int = 5) -> list[TopK]:
        """The top-``topk`` classes of each image, in order, ``batch_size`` images per forward pass.

        Raises:
            ValueError: ``topk`` < 1, no images; and as :meth:`preprocess`.
        """
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        out: list[TopK] = []
        for start in range(0, len(images), self.batch_size):
            out.extend(self.postprocess(self.infer(self.preprocess(images[start:start + self.batch_size])), topk))
        return out
