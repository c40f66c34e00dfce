"""Images and classification datasets: the one image decoder, timm datasets, unreadable-image skipping.

* ``open_dataset`` opens an ImageFolder tree (``ROOT/train/<class>/*.jpg``), an image tar, or any timm
  dataset spec (``hfds/...``, ``wds/...``, ``tfds/...``, ``torch/...``) through timm's ``create_dataset``
  and fails early, with a message, on a missing path, an empty split or a mis-shaped tree.
* ``read_image`` is the one image decoder of the package (training, validation and ``predict``): any
  Pillow mode becomes 8-bit RGB, with 16-bit samples scaled by 255/65535 instead of clipped to white.
* ``SkipUnreadable`` decodes images itself (through ``read_image``) so that a corrupt or truncated file is
  replaced by the next readable one (batch shapes stay fixed), counted in shared memory (works across loader
  workers) and reported by name at the end of each epoch.
* The loaders that serve these datasets in a resumable, seeded order are the training engine's
  (``open_fastervit.train.loader``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import ImageDataset, auto_augment, create_dataset
from torch.utils.data import Dataset, IterableDataset

from . import compat

__all__ = [
    "DatasetError",
    "ImageDecodeError",
    "SkipUnreadable",
    "class_names",
    "describe_data",
    "ensure_randaugment_compat",
    "open_dataset",
    "read_image",
]

#: timm dataset-name prefixes; anything else is a local path (folder or .tar).
SPEC_PREFIXES = ("hfds/", "hfids/", "wds/", "tfds/", "torch/")
#: How many consecutive unreadable files ``SkipUnreadable`` tolerates before giving up.
MAX_CONSECUTIVE_FAILURES = 64
#: Exceptions for files that cannot be decoded (``read_image`` raises ``ImageDecodeError``, a ValueError).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


class DatasetError(ValueError):
    """The dataset cannot be used for training (missing, empty or mis-shaped)."""


class ImageDecodeError(ValueError):
    """An image file cannot be decoded, or holds samples that cannot be mapped to 8 bits; names the file."""


#: Pillow modes of one 16-bit unsigned sample per pixel (16-bit PNG / TIFF / PGM grayscale).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
#: Largest 16-bit sample; 16-bit images are scaled by 255 / SIXTEEN_BIT_MAX to 8 bits.
SIXTEEN_BIT_MAX = 65535


def _source_name(source: str | os.PathLike | IO[bytes]) -> str:
    """The file name of a path or an open file (for error messages)."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return str(getattr(source, "name", None) or f"<{type(source).__name__}>")


def _scaled_to_8bit(samples: np.ndarray, scale: float) -> Image.Image:
    """A mode ``L`` image of ``round(samples * scale)`` (samples already checked to land in 0..255)."""
    return Image.fromarray(np.clip(np.rint(samples.astype(np.float64) * scale), 0, 255).astype(np.uint8), "L")


def _to_8bit(image: Image.Image, name: str) -> Image.Image:
    """Map images with more than 8 bits per sample to an 8-bit mode ``L`` image; others are returned as they are.

    * ``I;16*`` (16-bit unsigned): scaled by 255/65535 and rounded (30000 -> 117).
    * ``I`` (32-bit signed): Pillow also opens 16-bit files in this mode, so values within 0..65535 are
      scaled as 16-bit samples; anything outside is refused.
    * ``F`` (32-bit float): values within 0..1 are scaled by 255; anything else (or NaN) is refused.

    Raises:
        ImageDecodeError: ``I`` / ``F`` samples outside the ranges above (no safe 8-bit mapping).
    """
    mode = image.mode
    if mode in SIXTEEN_BIT_MODES or mode.startswith("I;16"):
        samples = np.asarray(image)
        if samples.dtype.kind == "i" and samples.size and samples.min() < 0:
            raise ImageDecodeError(f"{name}: signed 16-bit samples (mode {mode}) below 0 are not supported")
        return _scaled_to_8bit(samples, 255 / SIXTEEN_BIT_MAX)
    if mode == "I":
        samples = np.asarray(image)
        low, high = (int(samples.min()), int(samples.max())) if samples.size else (0, 0)
        if low < 0 or high > SIXTEEN_BIT_MAX:
            raise ImageDecodeError(
                f"{name}: 32-bit integer samples in {low}..{high}; only 0..{SIXTEEN_BIT_MAX} (16-bit data) can be "
                "mapped to 8 bits - convert the image to 8 or 16 bits per channel"
            )
        return _scaled_to_8bit(samples, 255 / SIXTEEN_BIT_MAX)
    if mode == "F":
        samples = np.asarray(image)
        finite = bool(np.isfinite(samples).all())
        low, high = (float(samples.min()), float(samples.max())) if samples.size and finite else (0.0, 0.0)
        if not finite or low < 0 or high > 1:
            raise ImageDecodeError(
                f"{name}: 32-bit float samples " + (f"in {low:g}..{high:g}" if finite else "with NaN/inf")
                + "; only 0..1 can be mapped to 8 bits - convert the image to 8 or 16 bits per channel"
            )
        return _scaled_to_8bit(samples, 255)
    return image


def read_image(source: str | os.PathLike | IO[bytes], mode: str = "RGB", *, name: str | None = None) -> Image.Image:
    """Decode an image file completely into an 8-bit Pillow image of ``mode`` (default RGB).

    Every reader of the package goes through here (training and validation datasets, ``predict``), so all
    see the same pixels. Conversion rules: 16-bit samples (PNG/TIFF grayscale, Pillow mode ``I;16``) are
    scaled by 255/65535 and rounded, not clipped (Pillow's own ``convert`` turns them white); 16-bit RGB(A)
    PNGs are reduced to 8 bits by Pillow itself; 32-bit integer (``I``) and float (``F``) images are scaled
    when their values fit 0..65535 (integers) or 0..1 (floats) and refused otherwise; 1-bit, grayscale,
    palette, CMYK and YCbCr images are converted by Pillow, and alpha channels are dropped (as timm does).
    EXIF orientation is not applied (timm's datasets do not apply it either, so accuracy stays comparable).

    Args:
        source: a path or a binary file object (not closed here).
        mode: Pillow mode of the result (``RGB``; ``L`` for one channel).
        name: file name for error messages (default: the path or the file object's ``name``).

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        ImageDecodeError: the file is not an image, is corrupt or truncated, or its samples cannot be mapped
            to 8 bits; the message names the file.
    """
    name = name or _source_name(source)
    try:
        with Image.open(source) as image:
            image.load()  # decode now: truncated files fail here, not later in a transform
            return _to_8bit(image, name).convert(mode)
    except FileNotFoundError:
        raise
    except ImageDecodeError:
        raise
    except Image.UnidentifiedImageError as err:
        raise ImageDecodeError(f"{name}: not a readable image (unknown or corrupt format)") from err
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"{name}: cannot decode image ({err})") from err


def _is_spec(data: str) -> bool:
    return data.lower().startswith(SPEC_PREFIXES)


def _local_split_root(root: Path, split: str, is_training: bool) -> Path:
    """``ROOT/split`` (a folder or ``split.tar``); a lone ``.tar`` file serves the training split only."""
    if not root.exists():
        raise DatasetError(f"dataset path {root} does not exist")
    if root.is_file():
        if root.suffix != ".tar":
            raise DatasetError(f"dataset path {root} is a file but not a .tar archive of images")
        if not is_training:
            raise DatasetError(
                f"{root} is one .tar (the training split); for {split!r} put {split}.tar beside train.tar in a "
                "folder and pass the folder, or skip evaluation with --val-split ''"
            )
        return root
    for candidate in (root / split, root / f"{split}.tar"):
        if candidate.exists():
            return candidate
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise DatasetError(
        f"no {split!r} split in {root}: expected {root / split}/<class>/<image> "
        f"(or {split}.tar); found sub-folders {subdirs[:10]}"
    )


class SkipUnreadable(Dataset):
    """Map-style wrapper over a timm ``ImageDataset`` that skips (and counts) undecodable images.

    A failing index is flagged in a shared-memory tensor (visible from every loader worker) and the next
    index is tried instead, so batch shapes never change. ``skipped()`` lists the flagged file names.
    """

    def __init__(self, dataset: ImageDataset, transform: Callable | None = None) -> None:
        self.dataset = dataset
        self.reader = dataset.reader
        self.mode = dataset.input_img_mode or "RGB"
        self.transform = transform
        self.bad = torch.zeros(len(dataset), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        return len(self.reader)

    def _load(self, index: int) -> tuple[Image.Image, int]:
        source, target = self.reader[index][:2]
        try:
            return read_image(source, self.mode, name=self.filename(index)), target
        finally:
            if hasattr(source, "close"):  # timm readers hand out open files and leave closing to the caller
                source.close()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        for attempt in range(MAX_CONSECUTIVE_FAILURES):
            current = (index + attempt) % len(self)
            try:
                image, target = self._load(current)
                break
            except DECODE_ERRORS:
                self.bad[current] = 1
        else:
            raise RuntimeError(
                f"{MAX_CONSECUTIVE_FAILURES} consecutive unreadable images from index {index}; "
                "is the dataset corrupt?"
            )
        if self.transform is not None:
            image = self.transform(image)
        return image, -1 if target is None else target

    def filename(self, index: int) -> str:
        return str(self.reader.filename(index, absolute=True))

    def skipped(self) -> list[str]:
        """File names of the images that could not be decoded so far."""
        return [self.filename(int(i)) for i in torch.nonzero(self.bad).flatten()]


def class_names(dataset: Dataset) -> list[str] | None:
    """Class names in label order for timm folder/tar datasets, None when the dataset does not say."""
    base = dataset.dataset if isinstance(dataset, SkipUnreadable) else dataset
    reader = getattr(base, "reader", None)
    mapping = getattr(reader, "class_to_idx", None) or getattr(reader, "class_name_to_idx", None)  # folder / tar
    if not mapping:
        return None
    return [name for name, _ in sorted(mapping.items(), key=lambda item: item[1])]


def _check_classes(dataset: Dataset, where: str) -> None:
    names = class_names(dataset)
    if names is None:
        return
    if "" in names or "." in names:
        raise DatasetError(
            f"images directly in {where}: expected one sub-folder per class ({where}/<class>/<image>)"
        )
    if len(names) < 2:
        raise DatasetError(f"{where} has {len(names)} class folder(s) {names}; classification needs >= 2")


def open_dataset(
    data: str, split: str, *, is_training: bool, data_dir: str | None = None, seed: int = 0,
    batch_size: int = 1, skip_unreadable: bool = True,
) -> Dataset:
    """A timm dataset for one split, checked to be non-empty and shaped as one folder per class.

    Args:
        data: local ImageFolder root (with ``split`` sub-folders), a ``.tar`` of images, or a timm spec
            such as ``hfds/NAME`` / ``wds/NAME`` / ``torch/cifar10`` (root in ``data_dir``).
        split: split name, e.g. ``train`` or ``val``.
        is_training: shuffling hint for iterable (streaming) datasets.
        skip_unreadable: wrap folder/tar datasets in ``SkipUnreadable``.
    """
    if not data:
        raise DatasetError("no dataset given: pass --data ROOT (ImageFolder with train/ and val/) or a timm spec")
    if _is_spec(data):
        dataset = create_dataset(
            data, root=data_dir, split=split, is_training=is_training, batch_size=batch_size, seed=seed,
            download=False,
        )
        where = f"{data}[{split}]"
    else:
        root = _local_split_root(Path(data).expanduser(), split, is_training)
        where = str(root)
        try:
            dataset = create_dataset("", root=str(root), split=split, search_split=False)
        except RuntimeError as err:  # timm's folder reader: "Found 0 images in subfolders of ..."
            raise DatasetError(f"{where} holds no images ({err})") from None
    if isinstance(dataset, ImageDataset) and skip_unreadable:
        dataset = SkipUnreadable(dataset)
    if not isinstance(dataset, IterableDataset) and len(dataset) == 0:
        raise DatasetError(f"{where} holds no images")
    _check_classes(dataset, where)
    return dataset


def _posterize_any_bits(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """Posterize that, like Pillow < 13, accepts 0 bits (a black image) - RandAugment's strongest level."""

    if bits_to_keep >= 8:
        return img
    if bits_to_keep >= 1:
        return ImageOps.posterize(img, bits_to_keep)
    return img.point([0] * 256 * len(img.getbands()))


def ensure_randaugment_compat() -> None:
    """Let timm's RandAugment run on Pillow >= 13, which rejects ``posterize(bits=0)``.

    timm maps magnitude 10 of ``PosterizeIncreasing`` to 0 bits (``rand-m9-mstd0.5-inc1`` reaches it for
    a few percent of images); Pillow 13 raises ValueError there. Only when Pillow rejects 0 bits, timm's
    posterize ops are pointed at ``_posterize_any_bits``, which keeps the old result.
    """

    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
    except ValueError:
        for name, op in list(auto_augment.NAME_TO_OP.items()):
            if op is auto_augment.posterize:
                auto_augment.NAME_TO_OP[name] = _posterize_any_bits


def describe_data(data: str) -> str:
    """Short human description of a dataset argument, for logs."""
    return data if _is_spec(data) else os.path.abspath(os.path.expanduser(data))


def __getattr__(name: str) -> Any:
    """Names that moved (the loaders: ``open_fastervit.train.loader``) keep working, with a deprecation warning."""
    return compat.moved_attribute(__name__, name)
