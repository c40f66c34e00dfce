"""Images and classification datasets: the one image decoder, timm datasets, unreadable-image skipping.

* ``open_dataset`` opens an ImageFolder tree (``ROOT/train/<class>/*.jpg``), an image tar, or any timm
  dataset spec (``hfds/...``, ``wds/...``, ``tfds/...``, ``torch/...``) through timm's ``create_dataset``
  and fails early, with a message, on a missing path, an empty split or a mis-shaped tree.
* ``read_image`` is the one image decoder of the package (training, validation and ``predict``): any
  Pillow mode becomes 8-bit RGB, with 16-bit samples scaled by 255/65535 instead of clipped to white. It refuses,
  before decoding, images over a pixel limit (:data:`MAX_PIXELS`) and formats that Pillow decodes through an
  external program (:data:`EXTERNAL_PROGRAM_FORMATS`, EPS through Ghostscript); ``formats`` narrows the formats
  further (the server takes :data:`UPLOAD_FORMATS` only).
* ``eval_transform`` is timm's evaluation transform of a data config whose resize-then-center-crop resamples only
  the part of the image that the crop keeps, so its work is bounded by the output size and the decoded image, not
  by the aspect ratio (an 8000 x 1 image is never resized to 256 x 2,048,000 first).
* ``SkipUnreadable`` decodes images itself (through ``read_image``) so that a corrupt or truncated file is
  replaced by the next readable one (batch shapes stay fixed), counted in shared memory (works across loader
  workers) and reported by name at the end of each epoch.
* The loaders that serve these datasets in a resumable, seeded order are the training engine's
  (``open_fastervit.train.loader``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data import ImageDataset, auto_augment, create_dataset, create_transform
from timm.data.transforms import ResizeKeepRatio
from torch.utils.data import Dataset, IterableDataset
from torchvision import transforms
from torchvision.transforms.functional import pil_modes_mapping

from . import compat

__all__ = [
    "EXTERNAL_PROGRAM_FORMATS",
    "MAX_PIXELS",
    "UPLOAD_FORMATS",
    "BoundedCenterCrop",
    "DatasetError",
    "ImageDecodeError",
    "ImageFormatError",
    "ImageTooLargeError",
    "SkipUnreadable",
    "class_names",
    "describe_data",
    "ensure_randaugment_compat",
    "eval_transform",
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


class ImageTooLargeError(ImageDecodeError):
    """An image whose header claims more pixels than the reader's limit (refused before decoding)."""


class ImageFormatError(ImageDecodeError):
    """An image in a format the reader does not accept (refused before decoding); names the accepted formats."""


#: Largest image ``read_image`` decodes by default, width x height: Pillow's own refusal limit (twice its default
#: ``Image.MAX_IMAGE_PIXELS``; 0.54 GB as 8-bit RGB). Larger headers are refused before any pixel is decoded.
MAX_PIXELS = 178_956_970
#: Pillow formats that Pillow decodes by running an external program (EPS: Ghostscript, found by scanning Pillow's
#: plugins for ``subprocess``; the other users of it only write files or are called explicitly). ``read_image``
#: never decodes them.
EXTERNAL_PROGRAM_FORMATS = frozenset({"EPS"})
#: The formats users upload: what the HTTP server (``open_fastervit.deploy.serve``) decodes; others answer 415.
UPLOAD_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")


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


def _read_formats(formats: Collection[str] | None) -> tuple[str, ...]:
    """The Pillow format names ``read_image`` tries: ``formats`` (default: every format Pillow opens) less
    :data:`EXTERNAL_PROGRAM_FORMATS`."""
    if formats is None:
        Image.init()
        formats = Image.OPEN
    return tuple(f.upper() for f in formats if f.upper() not in EXTERNAL_PROGRAM_FORMATS)


def _sniff_format(source: str | os.PathLike | IO[bytes]) -> str | None:
    """The Pillow format of ``source``: the format whose header parser accepts it (header only, nothing decoded),
    else an :data:`EXTERNAL_PROGRAM_FORMATS` format whose signature matches (its plugin is not run); ``None``."""
    if not isinstance(source, (str, os.PathLike)):
        source.seek(0)  # where Image.open reads the header
    try:
        with Image.open(source, formats=_read_formats(None)) as image:
            return image.format
    except Exception:  # noqa: BLE001  (unknown to every plugin that decodes by itself)
        pass
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            head = f.read(64)
    else:
        source.seek(0)
        head = source.read(64)
    for fmt in sorted(EXTERNAL_PROGRAM_FORMATS):
        accept = Image.OPEN.get(fmt, (None, None))[1]
        if accept is not None and accept(head):
            return fmt
    return None


def read_image(
    source: str | os.PathLike | IO[bytes], mode: str = "RGB", *, name: str | None = None,
    max_pixels: int = MAX_PIXELS, formats: Collection[str] | None = None,
) -> Image.Image:
    """Decode an image file completely into an 8-bit Pillow image of ``mode`` (default RGB).

    Every reader of the package goes through here (training and validation datasets, ``predict``, the server), so
    all see the same pixels. Conversion rules: 16-bit samples (PNG/TIFF grayscale, Pillow mode ``I;16``) are
    scaled by 255/65535 and rounded, not clipped (Pillow's own ``convert`` turns them white); 16-bit RGB(A)
    PNGs are reduced to 8 bits by Pillow itself; 32-bit integer (``I``) and float (``F``) images are scaled
    when their values fit 0..65535 (integers) or 0..1 (floats) and refused otherwise; 1-bit, grayscale,
    palette, CMYK and YCbCr images are converted by Pillow, and alpha channels are dropped (as timm does).
    EXIF orientation is not applied (timm's datasets do not apply it either, so accuracy stays comparable).

    Before any pixel is decoded, the header's size is checked against ``max_pixels`` and the format against
    ``formats``; formats in :data:`EXTERNAL_PROGRAM_FORMATS` (EPS) are never decoded.

    Args:
        source: a path or a binary file object (not closed here).
        mode: Pillow mode of the result (``RGB``; ``L`` for one channel).
        name: file name for error messages (default: the path or the file object's ``name``).
        max_pixels: largest accepted width x height (default :data:`MAX_PIXELS`; Pillow itself refuses more).
        formats: Pillow format names to accept (e.g. :data:`UPLOAD_FORMATS`; default: every format Pillow opens
            except :data:`EXTERNAL_PROGRAM_FORMATS`).

    Raises:
        FileNotFoundError: ``source`` is a path that does not exist.
        ImageTooLargeError: the header claims more than ``max_pixels`` pixels (an ImageDecodeError).
        ImageFormatError: a format outside ``formats`` (an ImageDecodeError naming the accepted formats).
        ImageDecodeError: the file is not an image, is corrupt or truncated, or its samples cannot be mapped
            to 8 bits; the message names the file.
    """
    name = name or _source_name(source)
    accepted = _read_formats(formats)
    try:
        with Image.open(source, formats=accepted) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageTooLargeError(f"{name}: {width}x{height} = {width * height:,} pixels, over the limit of "
                                         f"{max_pixels:,}")
            image.load()  # decode now: truncated files fail here, not later in a transform
            return _to_8bit(image, name).convert(mode)
    except FileNotFoundError:
        raise
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageTooLargeError(f"{name}: image too large ({err})") from err
    except Image.UnidentifiedImageError as err:
        found = _sniff_format(source)
        if found is not None and found not in accepted:
            shown = ", ".join(sorted(formats)) if formats is not None else "any format Pillow decodes itself"
            raise ImageFormatError(f"{name}: {found} images are not accepted (accepted: {shown})") from err
        raise ImageDecodeError(f"{name}: not a readable image (unknown or corrupt format)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"{name}: cannot decode image ({err})") from err


#: Widest support, in source pixels at unit scale, of Pillow's resampling filters (Lanczos: 3).
FILTER_REACH = 3
#: Largest intermediate image (pixels) and resized side (pixels) for which the resize runs its passes over their full
#: extent (exact pixels); past either, it resamples boxes (bounded work). 4 M pixels: 16 MB in Pillow's 4-byte RGB;
#: 65536 pixels of side: 4 MB of Pillow's filter coefficients per pass.
EXACT_RESAMPLE_PIXELS = 4 * 2**20
EXACT_RESAMPLE_SIDE = 2**16


class BoundedCenterCrop:
    """Resize so that the image covers ``resize`` (shortest side, as torchvision's ``Resize(int)``, or timm's
    ``ResizeKeepRatio`` for a ``(h, w)`` target), then center-crop ``size`` ``(h, w)`` - resampling only the
    source pixels the crop keeps.

    The crop's place in source pixels is known before resizing, so Pillow resizes that box alone
    (``Image.resize(..., box=...)``, which still reads the pixels around the box for its filter): the work is
    bounded by the output size and the decoded image, whatever the aspect ratio. The result equals torchvision's
    ``Resize`` then ``CenterCrop`` (including the black padding when the crop is larger than the resized image)
    to within rounding of the box's float coordinates.

    Args:
        resize: target of the resize: an int (shortest side) or ``(h, w)`` (scale so that both sides cover it).
        size: ``(h, w)`` of the crop, pixels.
        interpolation: torchvision ``InterpolationMode`` of the resize.
    """

    def __init__(self, resize: int | tuple[int, int], size: tuple[int, int],
                 interpolation: transforms.InterpolationMode) -> None:
        self.resize = resize
        self.size = (int(size[0]), int(size[1]))
        self.interpolation = interpolation

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """``(w, h)`` of the full resized image (as torchvision / timm compute it)."""
        if isinstance(self.resize, int):
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.resize, int(self.resize * long / short)
            return (new_short, new_long) if width <= height else (new_long, new_short)
        ratio = min(height / self.resize[0], width / self.resize[1])  # ResizeKeepRatio, longest=0
        return round(width / ratio), round(height / ratio)

    @staticmethod
    def _axis(length: int, crop: int) -> tuple[int, int, int]:
        """Along one axis of the resized image: (first kept pixel, end, offset of it in the crop)."""
        start = -((crop - length) // 2) if crop > length else int(round((length - crop) / 2.0))
        first, end = max(start, 0), min(start + crop, length)
        return first, end, first - start

    def _resample(self, image: Image.Image, resized: tuple[int, int], region: tuple[int, int, int, int]) -> Image.Image:
        """Pixels ``region`` (x0, y0, x1, y1) of ``image`` resized to ``resized`` ``(w, h)``, computed as Pillow's full
        resize computes them: a horizontal pass, then a vertical one, each rounded to 8 bits (the order matters where
        the filter overshoots and clips).

        While the horizontal pass over all rows and the vertical pass over the kept columns stay under
        :data:`EXACT_RESAMPLE_PIXELS` (and the resized sides under :data:`EXACT_RESAMPLE_SIDE`), both run over their
        full extent, giving Pillow's pixels exactly (every ordinary photo). Otherwise (long thin images) each pass
        resamples a box: the horizontal pass only the rows the vertical filter reads (a box of unit vertical scale at
        whole rows, which leaves them as they are), the vertical pass only the kept rows; Pillow takes box corners as
        32-bit floats, so a few values may differ by
        1/255 (2/255 on noise)."""
        width, height = image.size
        x0, y0, x1, y1 = region
        sx, sy = width / resized[0], height / resized[1]
        resample = pil_modes_mapping[self.interpolation]
        if (max(resized) <= EXACT_RESAMPLE_SIDE
                and resized[0] * height + (x1 - x0) * resized[1] <= EXACT_RESAMPLE_PIXELS):
            # cheap enough to resample the full extent of each pass: Pillow's own passes, bit for bit
            columns = image.resize((resized[0], height), resample).crop((x0, 0, x1, height))
            return columns.resize((x1 - x0, resized[1]), resample).crop((0, y0, x1 - x0, y1))
        reach = FILTER_REACH * max(sy, 1.0) + 2  # source rows the vertical filter may read around the region
        r0, r1 = max(0, math.floor(y0 * sy - reach)), min(height, math.ceil(y1 * sy + reach))
        rows = image.resize((x1 - x0, r1 - r0), resample, box=(x0 * sx, r0, x1 * sx, r1))
        return rows.resize((x1 - x0, y1 - y0), resample, box=(0, y0 * sy - r0, x1 - x0, y1 * sy - r0))

    def __call__(self, image: Image.Image) -> Image.Image:
        """PIL image -> PIL image of ``size`` ``(h, w)``."""
        width, height = image.size
        new_w, new_h = self.resized_size(width, height)
        crop_h, crop_w = self.size
        x0, x1, paste_x = self._axis(new_w, crop_w)
        y0, y1, paste_y = self._axis(new_h, crop_h)
        if (new_w, new_h) == (width, height):
            region = image.crop((x0, y0, x1, y1))
        else:
            region = self._resample(image, (new_w, new_h), (x0, y0, x1, y1))
        if region.size == (crop_w, crop_h):
            return region
        canvas = Image.new(image.mode, (crop_w, crop_h))
        canvas.paste(region, (paste_x, paste_y))
        return canvas

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}(resize={self.resize}, size={self.size}, interpolation={self.interpolation.value})"


def eval_transform(data_config: Mapping[str, Any]) -> transforms.Compose:
    """timm's evaluation transform of ``data_config`` (``create_transform(**data_config)``: resize, center crop,
    to tensor, normalise) with a bounded resize: for the center crop mode (timm's default), its leading
    ``Resize`` + ``CenterCrop`` are replaced by :class:`BoundedCenterCrop`, which gives the same pixels but
    resamples only the region the crop keeps. The ``squash`` and ``border`` modes resize to the target size
    directly and are kept as they are.

    Args:
        data_config: timm's data config (``input_size`` ``(C, H, W)`` pixels, ``interpolation``, ``mean``, ``std``,
            ``crop_pct``, ``crop_mode``), e.g. from ``timm.data.resolve_data_config``.

    Returns:
        PIL image -> ``(C, H, W)`` float32 tensor, normalised.
    """
    config = {k: v for k, v in data_config.items() if k != "is_training"}
    transform = create_transform(**config, is_training=False)
    steps = list(transform.transforms)
    if (config.get("crop_mode") in (None, "center") and len(steps) >= 2
            and isinstance(steps[0], (transforms.Resize, ResizeKeepRatio))
            and isinstance(steps[1], transforms.CenterCrop)
            and getattr(steps[0], "max_size", None) is None):
        first = steps[0]
        if isinstance(first, transforms.Resize):
            resize = first.size if isinstance(first.size, int) else first.size[0]
            if not isinstance(first.size, int) and len(first.size) != 1:
                return transform
        else:
            if first.longest != 0 or first.random_scale_prob or first.random_aspect_prob:
                return transform
            resize = tuple(first.size)
        crop = tuple(steps[1].size)
        steps[:2] = [BoundedCenterCrop(resize, (crop[0], crop[-1]), first.interpolation)]
        transform = transforms.Compose(steps)
    return transform


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
        + ("" if is_training else f"; if {root} holds the class folders itself, pass split '.' (fastervit validate "
           f"--split .)")
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
