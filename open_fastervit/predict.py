"""Classify images and report the top-k labels (``fastervit predict``), and list image files.

The model side is :class:`open_fastervit.inference.Predictor`. Labels come from, in order: names given by the
caller (a list, a text file with one name per line, or a dataset folder), the ``class_names`` stored in the
checkpoint, timm's ``ImageNetInfo`` when the model has 1000 outputs, else the class index
(:func:`open_fastervit.labels.resolve_class_names`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from open_fastervit.data import ImageDecodeError, read_image
from open_fastervit.inference import Predictor
from open_fastervit.labels import resolve_class_names

__all__ = [
    "IMAGE_SUFFIXES",
    "ImageReadError",
    "Prediction",
    "describe_failure",
    "expand_image_entries",
    "expand_images",
    "format_prediction",
    "load_image",
    "predict",
    "report_skipped",
    "resolve_class_names",
]

_logger = logging.getLogger(__name__)

#: ``on_error`` of :func:`predict`: what an unreadable image does.
ON_ERROR = ("raise", "skip")
#: Suffixes (compared in lower case) of the files :func:`expand_images` takes from a folder.
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


class ImageReadError(ValueError):
    """An input image is missing, unreadable or not an image, or a folder given holds no image; the message names
    the file or folder."""


@dataclass
class Prediction:
    """Top-k result for one image: parallel lists of class indices, names and probabilities."""

    image: str
    indices: list[int]
    labels: list[str]
    probs: list[float]


def load_image(path: str | Path) -> Image.Image:
    """Open ``path`` as an 8-bit RGB image with :func:`open_fastervit.data.read_image` (the decoder training and
    validation use: 16-bit images scaled by 255/65535, not clipped to white), decoding it fully.

    Raises:
        ImageReadError: the file is missing, not an image, corrupt, or has samples that cannot be mapped to
            8 bits (32-bit integer / float values out of range); the message names the file.
    """
    path = Path(path)
    try:
        return read_image(path)
    except FileNotFoundError as e:
        raise ImageReadError(f"{path}: no such file") from e
    except (ImageDecodeError, UnidentifiedImageError) as e:
        raise ImageReadError(str(e)) from e
    except OSError as e:  # e.g. a folder or an unreadable file
        raise ImageReadError(f"{path}: cannot read image ({e})") from e


def expand_images(paths: Sequence[str | Path] | str | Path, *, recursive: bool = False,
                  keep_missing: bool = False) -> list[Path]:
    """The image files of ``paths``: the one listing behind ``fastervit predict``, ``detect predict`` and
    ``segment predict``.

    A file is taken as given (whatever its suffix: reading it tells whether it is an image). A folder is replaced by
    the files in it whose suffix is one of ``IMAGE_SUFFIXES`` (any case), sorted by their path relative to the
    folder; its sub-folders are searched only with ``recursive`` (the commands' ``--recursive``), so a dataset root
    given by mistake does not take its mask or label images for photos. Hidden entries (names starting with ``.``,
    such as macOS ``._x.jpg`` files) are skipped, and so are hidden sub-folders. The inputs keep their order; ``~``
    is expanded.

    Args:
        paths: image files and folders (a single path is accepted too).
        recursive: also list the images in the sub-folders of each folder.
        keep_missing: a path that does not exist is kept in the list (the caller reports it when it fails to read
            it, as ``predict(on_error=...)`` does) instead of raising.

    Returns:
        Paths of the image files, in input order, each folder's files sorted.

    Raises:
        ImageReadError: no path given, a path that does not exist (unless ``keep_missing``), or a folder holding no
            image file; the one-line message names the path.
    """
    return [path for path, _ in expand_image_entries(paths, recursive=recursive, keep_missing=keep_missing)]


def expand_image_entries(paths: Sequence[str | Path] | str | Path, *, recursive: bool = False,
                         keep_missing: bool = False) -> list[tuple[Path, Path]]:
    """``expand_images``, each file with where its outputs belong: its path relative to the folder it was found in
    (``sub/x.jpg`` for ``FOLDER/sub/x.jpg``), or its bare name for a file given. Writers that mirror the input
    tree (``detect predict`` / ``segment predict --recursive``) put a file's outputs in that relative folder.

    Raises:
        ImageReadError: as ``expand_images``.
    """
    items = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not items:
        raise ImageReadError("no image files or folders given")
    out: list[tuple[Path, Path]] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = _images_in(path, recursive)
            if not found:
                where = "this folder or its sub-folders" if recursive else \
                    "this folder (sub-folders not searched without --recursive)"
                raise ImageReadError(f"{path}: no image files ({' '.join(IMAGE_SUFFIXES)}) in {where}")
            out.extend((file, file.relative_to(path)) for file in found)
        elif path.exists() or keep_missing:
            out.append((path, Path(path.name)))
        else:
            raise ImageReadError(f"{path}: no such file or folder")
    return out


def describe_failure(path: str | Path, error: BaseException) -> str:
    """One line for an image that could not be used: the error's message, prefixed with the path unless the
    message already names it (decoding errors do), so the path is never shown twice."""
    message = str(error) or type(error).__name__
    return message if str(path) in message else f"{path}: {message}"


def report_skipped(path: str | Path, error: BaseException, skipped: list[str],
                   on_error: Callable[[Path, str], None] | None, logger: logging.Logger = _logger) -> None:
    """An image that could not be processed: its one-line description (:func:`describe_failure`) is appended to
    ``skipped`` and passed to ``on_error(path, message)`` when given, else logged as a warning on ``logger``."""
    message = describe_failure(path, error)
    skipped.append(message)
    if on_error is not None:
        on_error(Path(path), message)
    else:
        logger.warning("skipped %s", message)


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    """Image files (by suffix) in ``folder`` (and its sub-folders with ``recursive``), hidden ones skipped, sorted by
    their path relative to ``folder``."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    found = []
    for path in candidates:
        rel = path.relative_to(folder)
        if path.suffix.lower() in IMAGE_SUFFIXES and not any(part.startswith(".") for part in rel.parts) \
                and path.is_file():
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def predict(
    images: Sequence[str | Path],
    model: str | torch.nn.Module | None = None,
    *,
    checkpoint: str | Path | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    classes: str | Path | Sequence[str] | None = None,
    topk: int = 3,
    use_ema: bool = True,
    img_size: int | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 16,
    fuse: bool = True,
    pretrained: bool = True,
    on_error: str | Callable[[Path, ImageReadError], Any] = "raise",
    recursive: bool = False,
) -> list[Prediction]:
    """Top-k classes of each image, preprocessed with the model's evaluation transform.

    ``images`` are files and folders, listed by :func:`expand_images` (a folder gives its image files, sorted; its
    sub-folders only with ``recursive``). ``model`` is a timm name (None: the checkpoint's architecture) or a module. A
    model loaded here runs in its exact inference form (``fused.inference_form``) unless ``fuse=False``; a module
    passed in is used as it is. Without ``checkpoint`` a named model gets its published weights
    (``open_fastervit.load_model``); random weights only with ``pretrained=False``.

    ``on_error`` says what an image that is missing or unreadable does: ``"raise"`` (default) raises
    :class:`ImageReadError` before any inference; ``"skip"`` leaves it out of the results with a logged warning; a
    callable ``on_error(path, error)`` is called for it and it is left out (the command line reports each on stderr
    this way and exits with 1). The results then hold the readable images only, in order.

    Raises:
        ImageReadError: an image is missing or unreadable and ``on_error="raise"`` (all images are opened before
            any inference); whatever ``on_error``, a folder holding no image or an empty ``images``.
        CheckpointError: weights that cannot be had (offline), read or fitted.
        ValueError: ``topk`` < 1, unknown model, class names that do not match the model.
    """
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if not callable(on_error) and on_error not in ON_ERROR:
        raise ValueError(f"on_error must be 'raise', 'skip' or a callable, got {on_error!r}")
    paths, pictures = [], []
    for path in expand_images(images, recursive=recursive, keep_missing=True):
        try:
            pictures.append(load_image(path))
        except ImageReadError as e:
            if on_error == "raise":
                raise
            if callable(on_error):
                on_error(path, e)
            else:
                _logger.warning("skipped %s", e)
            continue
        paths.append(path)
    if not pictures:
        return []
    from_file = checkpoint is not None and not isinstance(model, nn.Module)
    predictor = Predictor(checkpoint if from_file else model, architecture=model if from_file else None,
                          model_kwargs=model_kwargs, use_ema=None if use_ema else False, pretrained=pretrained,
                          fuse=fuse, device=device, img_size=img_size, classes=classes, batch_size=batch_size)
    _ = predictor.class_names  # names that do not fit the model fail here, before any inference
    return [Prediction(str(path), top.indices, top.labels, top.probs)
            for path, top in zip(paths, predictor(pictures, topk))]


def format_prediction(pred: Prediction) -> str:
    """``image: label (prob%), label (prob%), ...`` on one line."""
    tops = ", ".join(f"{label} ({100 * prob:.1f}%)" for label, prob in zip(pred.labels, pred.probs))
    return f"{pred.image}: {tops}"
