"""Detection and instance-segmentation datasets (COCO json, instance-id PNG folders) and their transforms.

Every dataset here returns ``(image, target)`` in the format of torchvision's detection models:

* ``image``: float32 tensor ``(3, H, W)`` in [0, 1] (decoded by ``open_fastervit.data.read_image``);
* ``target``: ``boxes`` (N, 4) float32 ``tv_tensors.BoundingBoxes`` in ``XYXY`` pixels, ``labels`` (N,) int64 in
  ``1..K`` (0 is the background), ``image_id`` (int, the COCO image id), ``area`` (N,) float32 (COCO's area:
  mask pixels or box area), ``iscrowd`` (N,) int64 (always 0: crowd regions are left out of training targets),
  and with masks ``masks`` (N, H, W) uint8 ``tv_tensors.Mask``.

Training augmentation uses ``torchvision.transforms.v2``, which moves boxes and masks with the image
(``train_transforms``); resizing, including multi-scale training, is done by the detector's own transform
(``build_detector(min_size=(...))``), not here. ``collate_detection`` batches into lists (images of different
sizes). Problems in the data are reported (``logging`` warnings, ``dataset.problems``) rather than raised: a
listed image file that is missing is skipped, boxes are clipped to the image or dropped when degenerate, and an
image that cannot be decoded at load time is replaced by the next readable one (as ``SkipUnreadable`` does).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from ...data import DECODE_ERRORS, MAX_CONSECUTIVE_FAILURES, DatasetError, ImageDecodeError, read_image

__all__ = [
    "CocoDetection",
    "InstanceMaskFolder",
    "NoMasksError",
    "RandomCropFraction",
    "collate_detection",
    "eval_transforms",
    "instance_folder_to_coco",
    "instances_from_label_image",
    "train_transforms",
]

logger = logging.getLogger(__name__)

#: Image file extensions of ``InstanceMaskFolder``.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
#: Per-box target fields filtered together with the boxes by ``SanitizeBoundingBoxes``.
PER_BOX_FIELDS = ("labels", "area", "iscrowd")
#: How many example names a problem report lists.
_EXAMPLES = 5


class NoMasksError(DatasetError):
    """Masks were asked of a COCO json whose annotations have none (boxes only): Mask R-CNN cannot train on it."""


def quiet_coco(dataset: dict[str, Any]) -> COCO:
    """A pycocotools ``COCO`` index over an already-loaded json dict, without its prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"annotation file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"annotation file {path} is not valid JSON ({err})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"annotation file {path} is not COCO json: expected an object with an 'images' list")
    if not isinstance(data.setdefault("annotations", []), list):
        raise DatasetError(f"annotation file {path}: 'annotations' must be a list")
    categories = data.get("categories")
    if not isinstance(categories, list) or not categories:
        raise DatasetError(f"annotation file {path} lists no 'categories'")
    ids = [c.get("id") if isinstance(c, dict) else None for c in categories]
    if any(not isinstance(i, int) for i in ids) or len(set(ids)) != len(ids):
        raise DatasetError(f"annotation file {path}: category ids must be distinct integers, got {ids}")
    _check_unique(path, data)
    return data


def _repeated(values: Sequence[Any]) -> list[Any]:
    """The values that occur more than once, in first-occurrence order."""
    counts = Counter(values)
    return [v for v in dict.fromkeys(values) if counts[v] > 1]


def _check_unique(path: Path, data: dict[str, Any]) -> None:
    """Image ids, image file names and annotation ids must each be distinct: a repeated image would be trained and
    scored twice (its boxes counted twice in mAP), a repeated annotation id breaks the COCO evaluation.

    Raises:
        DatasetError: naming the repeated values (the first few) and how many there are.
    """
    images = [i for i in data["images"] if isinstance(i, dict)]
    checks = (("image id", [i["id"] for i in images if "id" in i]),
              ("image file_name", [i["file_name"] for i in images if i.get("file_name")]),
              ("annotation id", [a["id"] for a in data["annotations"] if isinstance(a, dict) and "id" in a]))
    problems = []
    for what, values in checks:
        try:
            repeated = _repeated(values)
        except TypeError:  # unhashable ids (lists, objects): malformed entries, reported where they are read
            continue
        if repeated:
            problems.append(f"{len(repeated)} {what}(s) listed more than once: {_examples([str(v) for v in repeated])}")
    if problems:
        raise DatasetError(f"annotation file {path}: " + "; ".join(problems) + " (each must be listed once)")


def _valid_segmentation(segm: Any, height: int, width: int) -> bool:
    """Polygons (lists of >= 3 x,y points) or an RLE of the image's size: what ``annToMask`` can decode."""
    if isinstance(segm, list):
        return bool(segm) and all(
            isinstance(poly, list) and len(poly) >= 6 and len(poly) % 2 == 0
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in poly)
            for poly in segm
        )
    if isinstance(segm, dict):
        size = segm.get("size")
        return "counts" in segm and isinstance(size, (list, tuple)) and [int(v) for v in size] == [height, width]
    return False


def _box_mask(box: Sequence[float], height: int, width: int) -> np.ndarray:
    """A uint8 (H, W) mask filling an xyxy box (rounded outward to whole pixels)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    x1, y1 = max(int(math.floor(box[0])), 0), max(int(math.floor(box[1])), 0)
    x2, y2 = min(int(math.ceil(box[2])), width), min(int(math.ceil(box[3])), height)
    mask[y1:y2, x1:x2] = 1
    return mask


def _per_box_fields(inputs: Any) -> tuple[Tensor, ...]:
    """``labels_getter`` of ``SanitizeBoundingBoxes``: the per-box fields of the target dict (module level, so
    the transforms pickle for loader workers)."""
    target = inputs[1] if isinstance(inputs, (tuple, list)) else inputs
    if not isinstance(target, dict):
        raise ValueError(f"detection transforms expect (image, target dict), got {type(target).__name__}")
    return tuple(target[k] for k in PER_BOX_FIELDS if isinstance(target.get(k), Tensor))


def _finish(image: Tensor, target: dict[str, Any], transforms: Callable | None) -> tuple[Tensor, dict[str, Any]]:
    """Apply ``transforms`` to a uint8 ``tv_tensors.Image`` and its target; return a plain float32 [0, 1] image."""
    if transforms is not None:
        image, target = transforms(image, target)
    image = F.to_dtype(image, torch.float32, scale=True)
    return image.as_subclass(Tensor), target


def _report(problems: list[str], message: str) -> None:
    problems.append(message)
    logger.warning(message)


def _examples(names: Sequence[str]) -> str:
    shown = ", ".join(str(n) for n in names[:_EXAMPLES])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _EXAMPLES else "")


class _SkippingDataset(Dataset):
    """Shared load loop: an index whose image cannot be decoded is flagged (shared memory, visible across loader
    workers) and the next index is tried, so batches keep their size."""

    transforms: Callable | None
    _problems: list[str]

    def _init_skipping(self, size: int) -> None:
        self.bad = torch.zeros(max(size, 1), dtype=torch.uint8).share_memory_()

    def __len__(self) -> int:
        raise NotImplementedError

    def _load(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        raise NotImplementedError

    def filename(self, index: int) -> str:
        raise NotImplementedError

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        for attempt in range(min(MAX_CONSECUTIVE_FAILURES, len(self))):
            current = (index + attempt) % len(self)
            try:
                image, target = self._load(current)
                break
            except (*DECODE_ERRORS, FileNotFoundError) as err:
                if not self.bad[current]:
                    logger.warning("skipping unreadable image %s: %s", self.filename(current), err)
                self.bad[current] = 1
        else:
            raise RuntimeError(f"no readable image from index {index} on ({self.filename(index)} and the "
                               f"following ones fail to decode); is the dataset corrupt?")
        return _finish(image, target, self.transforms)

    def skipped(self) -> list[str]:
        """File names of the images that could not be decoded so far (in this process and loader workers)."""
        return [self.filename(int(i)) for i in torch.nonzero(self.bad[: len(self)]).flatten()]

    @property
    def problems(self) -> list[str]:
        """Everything reported about the data: construction-time findings, then images unreadable so far."""
        return list(self._problems) + [f"unreadable image skipped: {name}" for name in self.skipped()]


class CocoDetection(_SkippingDataset):
    """A COCO-format detection / instance-segmentation dataset (json read with pycocotools).

    Labels are contiguous: the json's category ids in increasing order become labels ``1..K``
    (``label_to_category[label]`` maps back for COCO results). Images keep their COCO ids (``target["image_id"]``).

    The annotations are checked at construction; findings are logged and kept in ``problems``:

    * a listed image whose file is missing is skipped (so are images without ``file_name`` / ``id``);
    * a box partly outside its image is clipped to it; a box with non-positive width or height, one entirely
      outside, or a malformed one is dropped; annotations of unknown images or categories are dropped;
    * crowd annotations (``iscrowd=1``) are left out of the targets (COCOeval still uses them from ``coco``);
    * with ``masks=True``, an annotation without a decodable segmentation gets its (clipped) box as mask, when
      some annotations have one; when none has (a boxes-only json) ``NoMasksError`` is raised instead, before
      anything is reported, as box-shaped masks would teach a mask head nothing.

    Images without any remaining annotation are kept (negative examples).

    Args:
        images_dir: folder holding the images (``file_name`` is relative to it).
        ann_file: COCO json (``images``, ``annotations``, ``categories``).
        transforms: called as ``transforms(image, target)`` on a uint8 ``tv_tensors.Image`` (3, H, W) and the
            target (``train_transforms()`` / ``eval_transforms()``); the image is converted to float [0, 1] after.
        masks: also return ``masks`` (N, H, W) uint8, decoded from polygons or RLE (``COCO.annToMask``).

    Attributes:
        coco: the pycocotools ``COCO`` index (ground truth for ``coco_evaluate``).
        image_ids: COCO ids of the usable images, in dataset order.
        category_ids: COCO category ids in label order; ``class_names``: their names;
        label_to_category: ``{label: category_id}``.

    Raises:
        DatasetError: ``ann_file`` missing or not COCO json, ``images_dir`` missing, or no usable image.
        NoMasksError: ``masks=True`` and no kept annotation has a decodable segmentation (a ``DatasetError``).
    """

    def __init__(self, images_dir: str | Path, ann_file: str | Path, transforms: Callable | None = None,
                 masks: bool = False) -> None:
        self.images_dir = Path(images_dir)
        self.ann_file = Path(ann_file)
        self.transforms = transforms
        self.masks = bool(masks)
        data = _read_json(self.ann_file)
        if not self.images_dir.is_dir():
            raise DatasetError(f"image folder {self.images_dir} (for {self.ann_file}) does not exist")
        self._problems: list[str] = []
        categories = sorted(data["categories"], key=lambda c: c["id"])
        self.category_ids = [int(c["id"]) for c in categories]
        self.class_names = [str(c.get("name", c["id"])) for c in categories]
        self.label_to_category = {label: cid for label, cid in enumerate(self.category_ids, start=1)}
        self._category_to_label = {cid: label for label, cid in self.label_to_category.items()}
        self.coco = quiet_coco(data)
        self._records: list[dict[str, Any]] = []
        self._index_images(data)
        self._init_skipping(len(self._records))
        self.image_ids = [r["id"] for r in self._records]
        if not self._records:
            raise DatasetError(
                f"{self.ann_file}: no usable image ({len(data['images'])} listed, none found in {self.images_dir})"
                + (f"; {self._problems[0]}" if self._problems else "")
            )

    def _index_images(self, data: dict[str, Any]) -> None:
        counts: Counter[str] = Counter()
        missing: list[str] = []
        malformed_images = 0
        known_images = set()
        for info in data["images"]:
            if not isinstance(info, dict) or "id" not in info or not info.get("file_name"):
                malformed_images += 1
                continue
            path = self.images_dir / str(info["file_name"])
            known_images.add(info["id"])
            if not path.is_file():
                missing.append(str(info["file_name"]))
                continue
            width, height = info.get("width"), info.get("height")
            if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
                try:
                    with Image.open(path) as im:
                        width, height = im.size
                except DECODE_ERRORS:
                    missing.append(str(info["file_name"]))
                    continue
                info["width"], info["height"] = width, height  # annToMask reads the size from here
            annotations = [self._check_annotation(a, width, height, counts)
                           for a in self.coco.imgToAnns.get(info["id"], [])]
            self._records.append({"id": info["id"], "file": path, "width": width, "height": height,
                                  "annotations": [a for a in annotations if a is not None]})
        kept = sum(len(r["annotations"]) for r in self._records)
        if self.masks and kept and counts["box_mask"] == kept:
            raise NoMasksError(f"{self.ann_file}: the annotations have no segmentation masks (none of the {kept} "
                               "usable annotations has a polygon or RLE segmentation), but masks were asked for")
        orphans = sum(1 for a in data["annotations"]
                      if not isinstance(a, dict) or a.get("image_id") not in known_images)
        if malformed_images:
            _report(self._problems, f"{self.ann_file}: {malformed_images} image entries without id/file_name skipped")
        if missing:
            _report(self._problems, f"{self.ann_file}: {len(missing)} image file(s) missing or unreadable in "
                                    f"{self.images_dir}, skipped: {_examples(missing)}")
        if orphans:
            _report(self._problems, f"{self.ann_file}: {orphans} annotation(s) of unknown images dropped")
        messages = {
            "clipped": "box(es) partly outside their image clipped to it",
            "degenerate": "box(es) with non-positive width or height dropped",
            "outside": "box(es) entirely outside their image dropped",
            "malformed": "annotation(s) with a missing or malformed bbox dropped",
            "category": "annotation(s) of unknown categories dropped",
            "crowd": "crowd annotation(s) left out of the training targets",
            "box_mask": "annotation(s) without a decodable segmentation given their box as mask",
        }
        for key, text in messages.items():
            if counts[key]:
                _report(self._problems, f"{self.ann_file}: {counts[key]} {text}")

    def _check_annotation(self, ann: dict[str, Any], width: int, height: int,
                          counts: Counter[str]) -> dict[str, Any] | None:
        """A kept annotation as ``{box (xyxy, clipped), label, area, ann}``; None (and counted) when dropped."""
        if ann.get("iscrowd", 0):
            counts["crowd"] += 1
            return None
        if ann.get("category_id") not in self._category_to_label:
            counts["category"] += 1
            return None
        bbox = ann.get("bbox")
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
            counts["malformed"] += 1
            return None
        x, y, w, h = (float(v) for v in bbox)
        if w <= 0 or h <= 0:
            counts["degenerate"] += 1
            return None
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
        if x2 <= x1 or y2 <= y1:
            counts["outside"] += 1
            return None
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            counts["clipped"] += 1
        segm_ok = _valid_segmentation(ann.get("segmentation"), height, width)
        if self.masks and not segm_ok:
            counts["box_mask"] += 1
        area = ann.get("area")
        area = float(area) if isinstance(area, (int, float)) and area > 0 else (x2 - x1) * (y2 - y1)
        return {"box": (x1, y1, x2, y2), "label": self._category_to_label[ann["category_id"]], "area": area,
                "ann": ann if segm_ok else None}

    def evaluation_coco(self) -> COCO:
        """The ground truth as this dataset sees it, for ``coco_evaluate``: the usable images, and their annotations
        as cleaned at construction (boxes clipped to the image, degenerate / outside / malformed ones and unknown
        categories dropped); crowd regions are kept as ``iscrowd=1`` so COCOeval ignores detections on them. A
        detection of a clipped object at the image edge therefore matches its clipped box."""
        images, annotations = [], []
        kept_ids = {r["id"] for r in self._records}
        for record in self._records:
            images.append({"id": record["id"], "file_name": str(Path(record["file"]).name),
                           "width": record["width"], "height": record["height"]})
            for a in record["annotations"]:
                x1, y1, x2, y2 = a["box"]
                entry = {"id": len(annotations) + 1, "image_id": record["id"], "iscrowd": 0,
                         "category_id": self.label_to_category[a["label"]], "bbox": [x1, y1, x2 - x1, y2 - y1],
                         "area": a["area"]}
                if a["ann"] is not None and a["ann"].get("segmentation") is not None:
                    entry["segmentation"] = a["ann"]["segmentation"]
                annotations.append(entry)
        for ann in self.coco.dataset.get("annotations", []):
            if ann.get("iscrowd", 0) and ann.get("image_id") in kept_ids and isinstance(ann.get("bbox"), list):
                annotations.append({**ann, "id": len(annotations) + 1})
        categories = [{"id": cid, "name": name} for cid, name in zip(self.category_ids, self.class_names)]
        return quiet_coco({"images": images, "annotations": annotations, "categories": categories})

    def __len__(self) -> int:
        return len(self._records)

    def filename(self, index: int) -> str:
        """Path of the image file of ``index``."""
        return str(self._records[index]["file"])

    def _load(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        record = self._records[index]
        name = str(record["file"])
        pil = read_image(record["file"])
        if pil.size != (record["width"], record["height"]):
            raise ImageDecodeError(f"{name}: image is {pil.size[0]}x{pil.size[1]} but {self.ann_file} says "
                                   f"{record['width']}x{record['height']}")
        image = tv_tensors.Image(F.pil_to_tensor(pil))
        height, width = record["height"], record["width"]
        anns = record["annotations"]
        boxes = torch.tensor([a["box"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor([a["label"] for a in anns], dtype=torch.int64),
            "image_id": int(record["id"]),
            "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        if self.masks:
            planes = [self.coco.annToMask(a["ann"]) if a["ann"] is not None else _box_mask(a["box"], height, width)
                      for a in anns]
            stack = np.stack(planes) if planes else np.zeros((0, height, width), dtype=np.uint8)
            target["masks"] = tv_tensors.Mask(torch.from_numpy(stack.astype(np.uint8, copy=False)))
        return image, target


# ---- instance-id PNG folders (nuclei-style) ------------------------------------------------------------------


def _read_label_image(path: str | Path) -> np.ndarray:
    """An (H, W) integer array of instance ids (0 = background) from a 8/16/32-bit single-channel image."""
    try:
        with Image.open(path) as im:
            im.load()
            array = np.array(im)
    except FileNotFoundError:
        raise
    except DECODE_ERRORS as err:
        raise ImageDecodeError(f"{path}: cannot decode instance image ({err})") from err
    if array.ndim == 3:
        if array.shape[2] >= 3 and not (array[..., 0] == array[..., 1]).all():
            raise ImageDecodeError(f"{path}: colour instance images are not supported; save instance ids as one "
                                   "8/16-bit channel (0 = background)")
        array = array[..., 0]
    if array.ndim != 2 or array.dtype.kind not in "iub":
        raise ImageDecodeError(f"{path}: expected one channel of integer instance ids, got {array.dtype} "
                               f"{array.shape}")
    return array.astype(np.int64)


def instances_from_label_image(label_png_path: str | Path) -> dict[str, Tensor]:
    """Instance masks, boxes and areas from an instance-id image (each id > 0 one object, 0 the background).

    Returns:
        ``masks`` (N, H, W) uint8 ``tv_tensors.Mask`` in increasing id order, ``boxes`` (N, 4) float32 ``XYXY``
        ``tv_tensors.BoundingBoxes`` covering the pixels (``x2 = last column + 1``, as COCO's bbox),
        ``labels`` (N,) int64 ones, ``area`` (N,) float32 pixel counts, ``iscrowd`` (N,) int64 zeros.

    Raises:
        FileNotFoundError: no such file; ImageDecodeError: not a single-channel integer image.
    """
    ids_image = _read_label_image(label_png_path)
    height, width = ids_image.shape
    ids = np.unique(ids_image)
    ids = ids[ids > 0]
    masks = torch.from_numpy((ids_image[None] == ids[:, None, None]).astype(np.uint8))
    boxes = torch.zeros((len(ids), 4), dtype=torch.float32)
    for k in range(len(ids)):
        rows = torch.nonzero(masks[k].any(dim=1)).flatten()
        cols = torch.nonzero(masks[k].any(dim=0)).flatten()
        boxes[k] = torch.tensor([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], dtype=torch.float32)
    return {
        "masks": tv_tensors.Mask(masks),
        "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(height, width)),
        "labels": torch.ones(len(ids), dtype=torch.int64),
        "area": masks.flatten(1).sum(1).to(torch.float32),
        "iscrowd": torch.zeros(len(ids), dtype=torch.int64),
    }


def _instance_pairs(root: Path, split: str, problems: list[str]) -> list[tuple[Path, Path]]:
    images_dir, instances_dir = root / split / "images", root / split / "instances"
    for folder in (images_dir, instances_dir):
        if not folder.is_dir():
            raise DatasetError(f"{folder} does not exist: expected {root}/{split}/images/* and "
                               f"{root}/{split}/instances/* (instance-id images of the same names)")
    pairs, unmatched = [], []
    for image in sorted(p for p in images_dir.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        candidates = [instances_dir / image.name] + [instances_dir / (image.stem + ext) for ext in (".png", ".tif",
                                                                                                    ".tiff")]
        label = next((c for c in candidates if c.is_file()), None)
        if label is None:
            unmatched.append(image.name)
        else:
            pairs.append((image, label))
    if unmatched:
        _report(problems, f"{instances_dir}: no instance image for {len(unmatched)} image(s), skipped: "
                          f"{_examples(unmatched)}")
    if not pairs:
        raise DatasetError(f"{images_dir}: no image with a matching instance image in {instances_dir}")
    return pairs


class InstanceMaskFolder(_SkippingDataset):
    """Instance segmentation from ``ROOT/SPLIT/images/*`` and ``ROOT/SPLIT/instances/*`` (same names; integer
    instance ids, 0 = background, e.g. 16-bit PNGs), one object class; boxes are derived from the masks.

    Returns the same ``(image, target)`` as ``CocoDetection(masks=True)``; image ids are ``1..N`` in file-name
    order, as in the json of ``instance_folder_to_coco(root, split, ...)`` (the ground truth for evaluation).
    Images without instance file are skipped and reported; undecodable ones are skipped at load time.

    Raises:
        DatasetError: a missing folder or no image with a matching instance image.
    """

    def __init__(self, root: str | Path, split: str = "train", transforms: Callable | None = None, *,
                 class_name: str = "object") -> None:
        self.root = Path(root)
        self.split = split
        self.transforms = transforms
        self._problems: list[str] = []
        self._pairs = _instance_pairs(self.root, split, self._problems)
        self._init_skipping(len(self._pairs))
        self.image_ids = list(range(1, len(self._pairs) + 1))
        self.category_ids = [1]
        self.class_names = [class_name]
        self.label_to_category = {1: 1}

    def __len__(self) -> int:
        return len(self._pairs)

    def filename(self, index: int) -> str:
        """Path of the image file of ``index``."""
        return str(self._pairs[index][0])

    def _load(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image_path, label_path = self._pairs[index]
        pil = read_image(image_path)
        target: dict[str, Any] = dict(instances_from_label_image(label_path))
        height, width = target["masks"].shape[-2:]
        if pil.size != (width, height):
            raise ImageDecodeError(f"{image_path}: image is {pil.size[0]}x{pil.size[1]} but its instance image "
                                   f"{label_path} is {width}x{height}")
        target["image_id"] = self.image_ids[index]
        return tv_tensors.Image(F.pil_to_tensor(pil)), target


def instance_folder_to_coco(root: str | Path, split: str, out_json: str | Path, *,
                            class_name: str = "object") -> Path:
    """Write a COCO json (RLE masks, boxes, areas) of an ``InstanceMaskFolder`` split, for pycocotools evaluation.

    Image ids are ``1..N`` in file-name order (as ``InstanceMaskFolder`` numbers them) and ``file_name`` is
    relative to ``ROOT/SPLIT/images``, so ``CocoDetection(root/split/"images", out_json, masks=True)`` reads the
    same data. Images whose instance image is missing or undecodable are left out (logged).

    Returns:
        ``out_json`` as a Path (parent folders are created).

    Raises:
        DatasetError: see ``InstanceMaskFolder``.
    """
    problems: list[str] = []
    pairs = _instance_pairs(Path(root), split, problems)
    images, annotations = [], []
    for image_id, (image_path, label_path) in enumerate(pairs, start=1):
        try:
            ids_image = _read_label_image(label_path)
        except (*DECODE_ERRORS, FileNotFoundError) as err:
            _report(problems, f"{label_path}: left out ({err})")
            continue
        height, width = ids_image.shape
        images.append({"id": image_id, "file_name": image_path.name, "height": int(height), "width": int(width)})
        for instance in np.unique(ids_image[ids_image > 0]):
            rle = mask_utils.encode(np.asfortranarray((ids_image == instance).astype(np.uint8)))
            annotations.append({
                "id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "iscrowd": 0,
                "segmentation": {"size": [int(height), int(width)], "counts": rle["counts"].decode("ascii")},
                "area": float(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)],
            })
    out = Path(out_json)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": 1, "name": class_name}]}, f)
    return out


# ---- transforms ----------------------------------------------------------------------------------------------


class RandomCropFraction(v2.Transform):
    """Crop a random rectangle covering a fraction ``scale`` of the image area with aspect ratio (w / h) in
    ``ratio``, without resizing (the detector resizes); boxes and masks follow. Falls back to the whole image
    after 10 failed draws. Follow it with ``ClampBoundingBoxes`` and ``SanitizeBoundingBoxes``.

    Raises:
        ValueError: ``scale`` not within (0, 1] or ``ratio`` not positive and increasing.
    """

    def __init__(self, scale: tuple[float, float] = (0.3, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        super().__init__()
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        self.scale, self.ratio = tuple(scale), tuple(ratio)

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            area = height * width * float(torch.empty(1).uniform_(*self.scale))
            aspect = math.exp(float(torch.empty(1).uniform_(*log_ratio)))
            w, h = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,)))
                left = int(torch.randint(0, width - w + 1, (1,)))
                return {"top": top, "left": left, "height": h, "width": w}
        return {"top": 0, "left": 0, "height": height, "width": width}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(F.crop, inpt, **params)


def train_transforms(hflip: float = 0.5, vflip: float = 0.0, crop: str | None = None, *,
                     crop_scale: tuple[float, float] = (0.3, 1.0), min_box_size: float = 1.0) -> v2.Compose:
    """Training augmentation for ``(image, target)`` pairs; boxes and masks move with the image.

    Args:
        hflip: probability of a horizontal flip.
        vflip: probability of a vertical flip (for aerial / microscopy images, which have no "up").
        crop: None; ``"iou"`` (SSD's ``RandomIoUCrop``: crops keeping boxes at a minimum IoU); or ``"random"``
            (``RandomCropFraction(crop_scale)``: a random crop of 30-100 % of the area, a scale jitter since the
            detector resizes the crop back to ``min_size``).
        min_box_size: boxes narrower or lower than this (pixels) after the crop are removed with their labels,
            masks, areas.

    Returns:
        A ``v2.Compose``: flips, crop, ``ClampBoundingBoxes``, ``SanitizeBoundingBoxes``, ``ToDtype(float32)``.

    Raises:
        ValueError: a probability outside [0, 1] or an unknown ``crop``.
    """
    for name, p in (("hflip", hflip), ("vflip", vflip)):
        if not 0 <= p <= 1:
            raise ValueError(f"{name} is a probability in [0, 1], got {p}")
    steps: list[Callable] = []
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if vflip > 0:
        steps.append(v2.RandomVerticalFlip(vflip))
    if crop == "iou":
        steps.append(v2.RandomIoUCrop())
    elif crop == "random":
        steps.append(RandomCropFraction(crop_scale))
    elif crop is not None:
        raise ValueError(f"crop must be None, 'iou' or 'random', got {crop!r}")
    steps += [v2.ClampBoundingBoxes(), v2.SanitizeBoundingBoxes(min_size=min_box_size, labels_getter=_per_box_fields),
              v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose(steps)


def eval_transforms() -> v2.Compose:
    """Evaluation transform: only ``ToDtype(float32, scale=True)`` (the detector resizes and normalises)."""
    return v2.Compose([v2.ToDtype(torch.float32, scale=True)])


def collate_detection(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[list[Tensor], list[dict[str, Any]]]:
    """``DataLoader`` collate: ``[(image, target), ...]`` -> ``([image, ...], [target, ...])`` (no stacking: the
    images differ in size and the detector batches them itself)."""
    images = [sample[0] for sample in batch]
    targets = [sample[1] for sample in batch]
    return images, targets
