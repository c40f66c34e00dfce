"""Semantic segmentation data: image / class-index mask folders, joint transforms, collation.

``SegmentationFolder`` pairs images with masks by file stem and checks every pair once when it is opened: images
without masks, masks without images, unreadable files, image / mask size mismatches and label values outside
``0..num_classes-1`` (other than ``ignore_index``) are reported (a logged warning and ``dataset.problems``) and the
pair is left out; nothing of that kind raises. Images that pass the header check but fail to decode when loaded
(truncated files) are replaced by the next readable pair in training, as ``open_fastervit.data.SkipUnreadable``
does; an evaluation folder (``substitute_unreadable=False``) serves ``None`` for them instead, which
``collate_segmentation`` drops, so they are left out of the metrics rather than a neighbour being counted twice.

Masks are class-index images: 8-bit grayscale, 16-bit grayscale, 1-bit or palette (``P``) PNGs, whose *indices* are
the labels (a palette PNG is never converted to its RGB colours). Colour (RGB / RGBA) masks are refused: they need a
colour -> class table that this folder format does not carry.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ...data import DECODE_ERRORS, MAX_CONSECUTIVE_FAILURES, DatasetError, ImageDecodeError, read_image

__all__ = [
    "IMAGE_EXTENSIONS",
    "MASK_EXTENSIONS",
    "DataProblem",
    "RandomRescale",
    "SegmentationFolder",
    "collate_segmentation",
    "describe_folder",
    "eval_transforms",
    "read_mask",
    "train_transforms",
]

logger = logging.getLogger(__name__)

#: File suffixes taken as images (case-insensitive).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
#: File suffixes taken as masks (lossless formats only).
MASK_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp", ".pgm", ".ppm")
#: Split names tried for each other (ADE20K spells its splits ``training`` / ``validation``).
SPLIT_ALIASES = {"train": ("train", "training"), "training": ("training", "train"),
                 "val": ("val", "validation"), "validation": ("validation", "val"), "test": ("test", "testing"),
                 "testing": ("testing", "test")}
#: Mask folder names tried when ``masks`` is left at its default ``"masks"``.
DEFAULT_MASK_DIRS = ("masks", "annotations")
#: Files in ``root`` that may list the class names, one per line, in label order.
CLASS_FILES = ("classes.txt", "class_names.txt")
#: Pillow modes read as class indices (palette images give their indices, 16-bit ones their raw values).
INDEX_MODES = ("1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N")


@dataclass(frozen=True)
class DataProblem:
    """One problem found in a segmentation folder (the pair concerned is left out).

    ``kind`` is one of ``missing_mask``, ``missing_image``, ``duplicate``, ``unreadable_image``,
    ``unreadable_mask``, ``size_mismatch``, ``label_out_of_range``, ``class_names``.
    """

    kind: str
    path: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.path}: {self.detail}"


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Decode a class-index mask into an ``int64`` array ``(H, W)`` of labels.

    8-bit / 16-bit / 32-bit integer grayscale values are taken as they are, 1-bit masks give 0 / 1 and palette
    (``P``) images give their palette indices (not colours).

    Raises:
        FileNotFoundError: no such file.
        ImageDecodeError: not an image, corrupt or truncated, or a colour / multi-channel image (no class indices).
    """
    name = str(path)
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode not in INDEX_MODES:
                raise ImageDecodeError(f"{name}: mask of mode {image.mode} (colour or multi-channel); expected a "
                                       "class-index image (8/16-bit grayscale or palette PNG)")
            return np.asarray(image).astype(np.int64)
    except (FileNotFoundError, ImageDecodeError):
        raise
    except DECODE_ERRORS as err:
        raise ImageDecodeError(f"{name}: cannot decode mask ({err})") from err


def _image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` from the file header (no decoding). Raises ImageDecodeError when it is not an image."""
    try:
        with Image.open(path) as image:
            return image.size
    except DECODE_ERRORS as err:
        raise ImageDecodeError(f"{path}: not a readable image ({err})") from err


def _files_by_stem(folder: Path, extensions: Sequence[str]) -> tuple[dict[str, Path], list[Path]]:
    """Files under ``folder`` (recursively, hidden ones skipped) keyed by their relative path without suffix;
    also the files whose key was already taken (duplicates, e.g. ``a.jpg`` and ``a.png``)."""
    found: dict[str, Path] = {}
    duplicates: list[Path] = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or path.suffix.lower() not in extensions:
            continue
        if not path.is_file():
            continue
        key = rel.with_suffix("").as_posix()
        if key in found:
            duplicates.append(path)
        else:
            found[key] = path
    return found, duplicates


def _find_split_dirs(root: Path, split: str | None, images: str, masks: str) -> tuple[Path, Path, list[Path]]:
    """The image and mask folders of ``split``, and every pair of folders tried (for the error message)."""
    splits = SPLIT_ALIASES.get(split, (split,)) if split else (None,)
    mask_names = DEFAULT_MASK_DIRS if masks == "masks" else (masks,)
    tried: list[Path] = []
    for name in splits:
        for mask_name in mask_names:
            if name is None:
                candidates = [(root / images, root / mask_name)]
            else:  # split first (ROOT/train/images), then folder first (ROOT/images/training, ADE20K)
                candidates = [(root / name / images, root / name / mask_name),
                              (root / images / name, root / mask_name / name)]
            for image_dir, mask_dir in candidates:
                tried.append(image_dir)
                if image_dir.is_dir() and mask_dir.is_dir():
                    return image_dir, mask_dir, tried
    return Path(), Path(), tried


def _read_class_names(root: Path) -> list[str] | None:
    for file_name in CLASS_FILES:
        path = root / file_name
        if path.is_file():
            lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
            while lines and not lines[-1]:
                lines.pop()
            return lines
    return None


class _PairError(Exception):
    """A pair that failed at load time: which check (a ``DataProblem`` kind), which file, why."""

    def __init__(self, kind: str, path: Path, detail: object) -> None:
        super().__init__(f"{kind}: {path}: {detail}")
        self.kind, self.path, self.detail = kind, str(path), str(detail)


class SegmentationFolder(Dataset):
    """Image / class-index mask pairs from a folder tree, matched by file stem.

    Layouts found (first match wins; ``SPLIT`` also tries its alias: ``train``/``training``, ``val``/``validation``,
    ``test``/``testing``; with ``masks="masks"`` (default) a folder named ``annotations`` is also accepted):

    * split first: ``ROOT/SPLIT/<images>/...`` and ``ROOT/SPLIT/<masks>/...``;
    * folder first (ADE20K): ``ROOT/<images>/SPLIT/...`` and ``ROOT/<masks>/SPLIT/...``
      (``ADEChallengeData2016/images/training``, ``.../annotations/training``);
    * no split (``split=None``): ``ROOT/<images>/...`` and ``ROOT/<masks>/...``.

    Within the two folders files are searched recursively and paired by their relative path without suffix
    (``images/a/x.jpg`` <-> ``masks/a/x.png``). Image suffixes: ``IMAGE_EXTENSIONS``; mask suffixes:
    ``MASK_EXTENSIONS``; hidden files are ignored.

    Opening the folder reads every image header and decodes every mask once (to check sizes and labels; for a
    large dataset this takes a while, ``check_labels=False`` skips the label decoding). Problems (``DataProblem``
    records in ``problems``, also logged) leave the pair out; they never raise.

    Labels: with ``reduce_zero_label`` (ADE20K's convention) label 0 becomes ``ignore_index`` and every other
    label ``l`` becomes ``l - 1`` (``ignore_index`` itself stays). ``num_classes``: when given, masks holding
    labels ``>= num_classes`` (or negative), other than ``ignore_index``, are reported and left out; when not given,
    it is the number of lines of ``classes.txt`` / ``class_names.txt`` in ``root`` if there is one, else the
    largest label found + 1 (so a stray large value inflates it: pass ``num_classes`` for real datasets).
    ``class_names`` are read from that file (one per line, in label order) or are ``class_0 .. class_{K-1}``.

    Items: ``(image, mask)`` with ``image`` float ``(3, H, W)`` in [0, 1] and ``mask`` int64 ``(H, W)``, after
    ``transforms(image, mask)`` (torchvision v2 style, called with a uint8 ``tv_tensors.Image`` and an int64
    ``tv_tensors.Mask``; a uint8 result is scaled to [0, 1] here).

    Args:
        root: dataset root.
        split: split name (``None`` for the no-split layout).
        images, masks: folder names.
        transforms: joint transform ``(image, mask) -> (image, mask)``, e.g. ``train_transforms()``.
        check_labels: decode masks while opening to check label values (required when ``num_classes`` is None).
        substitute_unreadable: what a pair that fails to decode when loaded gives: True (training) the next
            readable pair, so batch shapes never change; False (evaluation) ``None``, so it is left out of the
            metrics (``collate_segmentation`` drops it) instead of a neighbour being counted twice.

    Attributes:
        samples: ``(image_path, mask_path)`` pairs kept. problems: ``DataProblem`` list. class_pixel_counts:
        int64 array ``(num_classes,)`` of labelled pixels per class over the kept masks (None without
        ``check_labels``). max_label: the largest label (after ``reduce_zero_label``, ``ignore_index`` left out)
        in any mask checked, kept or left out (-1 when every pixel is ignored; None when no mask was checked):
        ``max_label + 1`` is the class count the masks need, to check a given ``num_classes`` against.

    Raises:
        DatasetError: no image / mask folders for ``split`` under ``root`` (the message lists the paths tried), or
            no usable pair (the message names the folders).
        ValueError: ``num_classes`` is None and ``check_labels`` is False.
    """

    def __init__(self, root: str | os.PathLike, split: str | None = "train", images: str = "images",
                 masks: str = "masks", transforms: Callable | None = None, reduce_zero_label: bool = False,
                 ignore_index: int = 255, num_classes: int | None = None, *, check_labels: bool = True,
                 substitute_unreadable: bool = True) -> None:
        self.root = Path(root).expanduser()
        self.substitute_unreadable = bool(substitute_unreadable)
        self.split = split
        self.transforms = transforms
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = int(ignore_index)
        self.problems: list[DataProblem] = []
        self.max_label: int | None = None
        given_classes = num_classes
        if not self.root.is_dir():
            raise DatasetError(f"segmentation dataset root {self.root} does not exist or is not a folder")
        image_dir, mask_dir, tried = _find_split_dirs(self.root, split, images, masks)
        if not image_dir.parts:
            raise DatasetError(f"no {images!r} / {masks!r} folders for split {split!r} under {self.root}; tried "
                               f"{', '.join(str(p) for p in tried)} (each with its mask folder beside it)")
        self.image_dir, self.mask_dir = image_dir, mask_dir
        names = _read_class_names(self.root)
        if num_classes is None and names:
            num_classes = len(names)
        if num_classes is None and not check_labels:
            raise ValueError("SegmentationFolder needs num_classes (or a classes.txt) when check_labels=False")
        self.samples, self.class_pixel_counts, self.num_classes = self._scan(num_classes, check_labels)
        if names is not None and len(names) != self.num_classes:
            self._report("class_names", self.root, f"{len(names)} names for {self.num_classes} classes; "
                                                   "missing names become class_<i>, extra ones are dropped")
        names = list(names or [])[: self.num_classes]
        self.class_names = names + [f"class_{i}" for i in range(len(names), self.num_classes)]
        if self.problems:
            shown = "\n  ".join(str(p) for p in self.problems[:10])
            more = f"\n  ... and {len(self.problems) - 10} more" if len(self.problems) > 10 else ""
            logger.warning("%s: %d problem(s), pairs left out:\n  %s%s", self.image_dir, len(self.problems),
                           shown, more)
        if not self.samples:
            hint = ""
            if given_classes is not None and self.max_label is not None and self.max_label >= given_classes:
                hint = (f"; the masks hold labels up to {self.max_label} ({self.max_label + 1} classes) but "
                        f"num_classes is {given_classes}: leave num_classes out to infer it from the masks")
            raise DatasetError(f"no usable image / mask pair in {self.image_dir} and {self.mask_dir}"
                               + (f" ({len(self.problems)} problem(s), first: {self.problems[0]})"
                                  if self.problems else "") + hint)
        self.bad = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    # ---- scanning ------------------------------------------------------------------------------------------

    def _report(self, kind: str, path: str | os.PathLike, detail: str) -> None:
        self.problems.append(DataProblem(kind, str(path), detail))

    def _labels(self, mask: np.ndarray) -> np.ndarray:
        """Apply ``reduce_zero_label`` to a raw mask (int64)."""
        if not self.reduce_zero_label:
            return mask
        ignored = (mask == 0) | (mask == self.ignore_index)
        mask = mask - 1
        mask[ignored] = self.ignore_index
        return mask

    def _scan(self, num_classes: int | None,
              check_labels: bool) -> tuple[list[tuple[Path, Path]], np.ndarray | None, int]:
        images, dup_images = _files_by_stem(self.image_dir, IMAGE_EXTENSIONS)
        masks, dup_masks = _files_by_stem(self.mask_dir, MASK_EXTENSIONS)
        for path in dup_images + dup_masks:
            self._report("duplicate", path, "another file has the same stem; this one is ignored")
        for key in sorted(set(masks) - set(images)):
            self._report("missing_image", masks[key], f"no image named {key}.* in {self.image_dir}")
        pairs: list[tuple[Path, Path, np.ndarray | None]] = []
        for key in sorted(images):
            image_path = images[key]
            if key not in masks:
                self._report("missing_mask", image_path, f"no mask named {key}.* in {self.mask_dir}")
                continue
            mask_path = masks[key]
            try:
                image_size = _image_size(image_path)
            except ImageDecodeError as err:
                self._report("unreadable_image", image_path, str(err))
                continue
            try:
                if check_labels:
                    raw = read_mask(mask_path)
                    mask_size = (raw.shape[1], raw.shape[0])
                else:
                    raw, mask_size = None, _image_size(mask_path)
            except ImageDecodeError as err:
                self._report("unreadable_mask", mask_path, str(err))
                continue
            if image_size != mask_size:
                self._report("size_mismatch", mask_path, f"mask {mask_size[0]}x{mask_size[1]} (WxH) but image "
                                                         f"{image_path.name} is {image_size[0]}x{image_size[1]}")
                continue
            pairs.append((image_path, mask_path, None if raw is None else self._labels(raw)))
        if not check_labels:
            return [(i, m) for i, m, _ in pairs], None, int(num_classes)  # type: ignore[arg-type]
        kept: list[tuple[Path, Path]] = []
        counts: list[np.ndarray] = []
        for image_path, mask_path, labels in pairs:
            valid = labels[labels != self.ignore_index]
            low, high = (int(valid.min()), int(valid.max())) if valid.size else (0, -1)
            self.max_label = max(self.max_label if self.max_label is not None else -1, high)
            limit = num_classes if num_classes is not None else None
            if low < 0 or (limit is not None and high >= limit):
                allowed = f"0..{limit - 1}" if limit is not None else ">= 0"
                self._report("label_out_of_range", mask_path,
                             f"labels {low}..{high} outside {allowed} (ignore_index {self.ignore_index})")
                continue
            kept.append((image_path, mask_path))
            counts.append(np.bincount(valid, minlength=0))
        if num_classes is None:
            num_classes = max((len(c) for c in counts), default=0)
        total = np.zeros(max(int(num_classes), 0), dtype=np.int64)
        for c in counts:
            total[: len(c)] += c
        return kept, total, int(num_classes)

    # ---- loading -------------------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, index: int) -> tuple[Tensor, Tensor]:
        """Decode pair ``index``; raises ``_PairError`` naming the file that failed."""
        image_path, mask_path = self.samples[index]
        try:
            image = TF.pil_to_tensor(read_image(image_path, "RGB"))
        except (FileNotFoundError, *DECODE_ERRORS) as err:
            raise _PairError("unreadable_image", image_path, err) from err
        try:
            mask = torch.from_numpy(self._labels(read_mask(mask_path)))
        except (FileNotFoundError, *DECODE_ERRORS) as err:
            raise _PairError("unreadable_mask", mask_path, err) from err
        if tuple(image.shape[-2:]) != tuple(mask.shape):  # a file changed since the scan
            raise _PairError("size_mismatch", mask_path, f"mask {tuple(mask.shape)} vs image {tuple(image.shape[-2:])}")
        return image, mask

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor] | None:
        """``(image float (3, H, W) in [0, 1], mask int64 (H, W))`` after ``transforms``. A pair that fails to
        decode is flagged in ``bad`` (shared across loader workers) and reported (in this process's ``problems`` and
        the log); then with ``substitute_unreadable`` (training) the next pair is served instead, so batch shapes
        never change, and without it (evaluation) ``None`` is returned: the pair is left out, never replaced.

        Raises:
            RuntimeError: ``MAX_CONSECUTIVE_FAILURES`` consecutive pairs could not be decoded (training).
        """
        if not self.substitute_unreadable:
            try:
                image, mask = self._load(index)
            except _PairError as err:
                if not self.bad[index]:
                    self.bad[index] = 1
                    self._report(err.kind, err.path, f"{err.detail} (left out of the evaluation)")
                    logger.warning("leaving unreadable pair %s out of the evaluation: %s", err.path, err.detail)
                return None
            return self._finish(image, mask)
        for attempt in range(MAX_CONSECUTIVE_FAILURES):
            current = (index + attempt) % len(self)
            try:
                image, mask = self._load(current)
                break
            except _PairError as err:
                if not self.bad[current]:
                    self.bad[current] = 1
                    self._report(err.kind, err.path, f"{err.detail} (skipped when loading)")
                    logger.warning("skipping unreadable pair %s: %s", err.path, err.detail)
        else:
            raise RuntimeError(f"{MAX_CONSECUTIVE_FAILURES} consecutive unreadable pairs from index {index} in "
                               f"{self.image_dir}; is the dataset corrupt?")
        return self._finish(image, mask)

    def _finish(self, image: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``transforms`` applied to a decoded pair (uint8 ``(3, H, W)``, int64 ``(H, W)``); the image as float."""
        image, mask = tv_tensors.Image(image), tv_tensors.Mask(mask)
        if self.transforms is not None:
            image, mask = self.transforms(image, mask)
        image = image.as_subclass(Tensor)
        if not image.is_floating_point():
            image = TF.to_dtype(image, torch.float32, scale=True)
        return image, mask.as_subclass(Tensor).to(torch.int64)

    def skipped(self) -> list[str]:
        """Image paths of the pairs that failed to decode at load time so far (from every loader worker): replaced
        by a neighbour in training, left out in evaluation."""
        return [str(self.samples[int(i)][0]) for i in torch.nonzero(self.bad).flatten()]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.image_dir}, pairs={len(self)}, num_classes={self.num_classes}, "
                f"problems={len(self.problems)})")


# ---- transforms ----------------------------------------------------------------------------------------------


class RandomRescale:
    """Resize every input, keeping the aspect ratio, to fit ``base_size`` ``(H, W)`` times a factor drawn uniformly
    from ``scale_range`` (torch's RNG): the usual random-scale step of segmentation training.

    Called as ``rescale(image, mask, ...)`` with tv_tensors; images are resized bilinearly (``antialias``), masks with
    nearest neighbours (torchvision's ``resize`` dispatches on the type). The new size is
    ``round(side * min(base_h / H, base_w / W) * factor)``. (torchvision's ``ScaleJitter`` is similar but takes its
    target as ``(W, H)``; sizes here are ``(H, W)`` throughout.)
    """

    def __init__(self, base_size: tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0),
                 antialias: bool = True) -> None:
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be 0 < low <= high, got {scale_range}")
        self.base_size = (int(base_size[0]), int(base_size[1]))
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.antialias = antialias

    def __call__(self, *inputs: Tensor) -> Any:
        height, width = inputs[0].shape[-2:]
        low, high = self.scale_range
        factor = low + float(torch.rand(())) * (high - low)
        ratio = min(self.base_size[0] / height, self.base_size[1] / width) * factor
        size = [max(1, int(height * ratio + 0.5)), max(1, int(width * ratio + 0.5))]
        out = tuple(TF.resize(x, size, antialias=self.antialias) for x in inputs)
        return out if len(out) > 1 else out[0]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_size={self.base_size}, scale_range={self.scale_range})"


def train_transforms(crop_size: int | tuple[int, int] = 512, scale_range: tuple[float, float] = (0.5, 2.0),
                     hflip: float = 0.5, vflip: float = 0.0, *, base_size: tuple[int, int] | None = None,
                     ignore_index: int = 255, color_jitter: float = 0.2) -> v2.Compose:
    """Training augmentation, applied jointly to the image and the mask (torchvision v2).

    1. Random rescale (``RandomRescale``): the image is resized, keeping its aspect ratio, to fit ``base_size``
       ``(H, W)`` times a factor drawn from ``scale_range`` (default base ``(crop_h, 4 * crop_w)``: the usual
       ADE20K recipe, 2048x512 with ratio 0.5-2.0, for a 512 crop). Masks use nearest-neighbour resizing.
    2. Random crop of ``crop_size``, padding first where the image is smaller (image with 0, mask with
       ``ignore_index``, so padding never counts in the loss or the metric).
    3. Horizontal / vertical flips with probabilities ``hflip`` / ``vflip``.
    4. Light photometric jitter: brightness, contrast and saturation by ``color_jitter``, hue by a quarter of it
       (0 disables); image only.
    5. Image to float32 in [0, 1]; the mask stays int64.

    Returns:
        A ``v2.Compose`` called as ``transform(image, mask)`` with tv_tensors (``SegmentationFolder`` does that).
    """
    crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    base = tuple(base_size) if base_size is not None else (crop[0], 4 * crop[1])
    steps: list[Callable] = [
        RandomRescale(base, scale_range),
        v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: ignore_index}),
    ]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if vflip > 0:
        steps.append(v2.RandomVerticalFlip(vflip))
    if color_jitter > 0:
        steps.append(v2.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter,
                                    hue=min(0.5, color_jitter / 4)))
    steps.append(v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True))
    return v2.Compose(steps)


def eval_transforms() -> v2.Compose:
    """Evaluation: the full image at its own size (the segmenters take any size >= 32 px), float32 in [0, 1]; the
    mask is untouched, so metrics are computed at the original resolution."""
    return v2.Compose([v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True)])


def collate_segmentation(batch: Sequence[tuple[Tensor, Tensor] | None],
                         ignore_index: int = 255) -> tuple[Tensor, Tensor]:
    """Stack ``(image (C, H, W), mask (H, W))`` pairs into ``(B, C, H_max, W_max)`` / ``(B, H_max, W_max)``.

    ``None`` items (unreadable pairs of an evaluation ``SegmentationFolder``) are dropped, so ``B`` counts the
    readable ones; a batch of ``None`` only gives empty tensors ``(0, 3, 0, 0)`` / ``(0, 0, 0)``, which callers
    skip.

    Equal sizes (training crops) are stacked as they are. Different sizes (evaluation at native resolution) are
    padded at the bottom / right: images with 0, masks with ``ignore_index``, so padded pixels never count. (The
    padding can still change predictions near the border a little; batch size 1 avoids it.) Use
    ``functools.partial(collate_segmentation, ignore_index=...)`` for another ignore value.

    Raises:
        ValueError: an empty batch, or an image and mask of different sizes.
    """
    if not batch:
        raise ValueError("collate_segmentation got an empty batch")
    pairs = [item for item in batch if item is not None]
    if not pairs:
        return torch.zeros(0, 3, 0, 0), torch.zeros(0, 0, 0, dtype=torch.int64)
    for image, mask in pairs:
        if tuple(image.shape[-2:]) != tuple(mask.shape[-2:]):
            raise ValueError(f"image {tuple(image.shape)} and mask {tuple(mask.shape)} differ in size")
    height = max(int(image.shape[-2]) for image, _ in pairs)
    width = max(int(image.shape[-1]) for image, _ in pairs)
    images: list[Tensor] = []
    masks: list[Tensor] = []
    for image, mask in pairs:
        pad = (0, width - image.shape[-1], 0, height - image.shape[-2])
        images.append(torch.nn.functional.pad(image, pad, value=0) if any(pad) else image)
        masks.append(torch.nn.functional.pad(mask, pad, value=ignore_index) if any(pad) else mask)
    return torch.stack(images), torch.stack(masks)


def describe_folder(dataset: SegmentationFolder) -> dict[str, Any]:
    """A short JSON-ready summary of a ``SegmentationFolder`` (pairs, classes, problems by kind)."""
    kinds: dict[str, int] = {}
    for problem in dataset.problems:
        kinds[problem.kind] = kinds.get(problem.kind, 0) + 1
    return {"images": str(dataset.image_dir), "masks": str(dataset.mask_dir), "pairs": len(dataset),
            "num_classes": dataset.num_classes, "class_names": dataset.class_names, "problems": kinds}
