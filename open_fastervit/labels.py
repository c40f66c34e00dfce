"""Labelled data helpers: flat ``labels.csv`` datasets, class names and ImageNet-1K label maps.

Two dataset forms are understood:

* an ImageFolder tree (``root/<split>/<class>/<image>``) or anything else the training data accepts
  (:func:`open_fastervit.data.open_dataset`); targets are the sorted class-folder indices;
* a flat folder of images with a ``labels.csv`` (images beside it or in ``images/``), read by
  :class:`ReaderLabelsCsv` inside timm's ``ImageDataset``. The ``filename`` column names the image; the
  target is the first integer column among :data:`TARGET_COLUMNS` (or the ImageNet-1K index of a
  ``wnid`` column); the class name comes from the first of :data:`NAME_COLUMNS`.
"""

from __future__ import annotations

import csv
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from timm.data import ImageDataset, ImageNetInfo
from timm.data.readers.reader import Reader
from torch.utils.data import Dataset, default_collate

from open_fastervit.data import DECODE_ERRORS, DatasetError, SkipUnreadable, class_names, open_dataset, read_image

__all__ = [
    "ClassNameMismatch",
    "ReadableImages",
    "ReaderLabelsCsv",
    "class_name_map",
    "class_names_of",
    "imagenet_class_names",
    "imagenet_label_map",
    "load_label_map",
    "no_readable_image",
    "open_eval_dataset",
    "readable_collate",
    "resolve_class_names",
]

LABELS_CSV = "labels.csv"
TARGET_COLUMNS = ("class_index", "in1k_index", "target", "label", "folder_index")
NAME_COLUMNS = ("name", "in1k_name", "words")
IMAGENET_1K = 1000


@functools.lru_cache(maxsize=1)
def _imagenet() -> ImageNetInfo:
    return ImageNetInfo("imagenet-1k")


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1K class names (first WordNet lemma of each synset), in class-index order."""
    info = _imagenet()
    return [info.index_to_description(i).split(",")[0].strip() for i in range(IMAGENET_1K)]


def _wnid_index() -> dict[str, int]:
    return {wnid: i for i, wnid in enumerate(_imagenet().label_names())}


def _read_rows(csv_path: Path) -> list[dict[str, str]]:
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise FileNotFoundError(f"cannot read {csv_path}: {e}") from e
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    return rows


class ReaderLabelsCsv(Reader):
    """timm ``Reader`` over a flat image folder described by a ``labels.csv``.

    Args:
        root: folder holding ``labels.csv`` and the images (directly or in ``images/``).
        label_column: target column; default the first present of :data:`TARGET_COLUMNS`, else ``wnid``
            mapped to its ImageNet-1K index.
    """

    def __init__(self, root: str | Path, label_column: str | None = None):
        super().__init__()
        self.root = Path(root)
        csv_path = self.root / LABELS_CSV
        rows = _read_rows(csv_path)
        columns = list(rows[0])
        if "filename" not in columns:
            raise ValueError(f"{csv_path} needs a 'filename' column; it has {columns}")
        self.image_dir = self._find_image_dir(rows[0]["filename"])
        targets = self._targets(rows, label_column, csv_path)
        name_column = next((c for c in NAME_COLUMNS if c in columns), None)
        self.samples = [(self.image_dir / row["filename"], t) for row, t in zip(rows, targets)]
        self.names: dict[int, str] = {}
        if name_column:  # "goldfish, Carassius auratus" -> "goldfish"
            self.names = {t: row[name_column].split(",")[0].strip() for row, t in zip(rows, targets)}

    def _find_image_dir(self, first_file: str) -> Path:
        for folder in (self.root, self.root / "images"):
            if (folder / first_file).is_file():
                return folder
        raise FileNotFoundError(
            f"{first_file!r} listed in {self.root / LABELS_CSV} is neither in {self.root} "
            f"nor in {self.root / 'images'}"
        )

    @staticmethod
    def _targets(rows: list[dict[str, str]], column: str | None, csv_path: Path) -> list[int]:
        columns = list(rows[0])
        if column is None:
            column = next((c for c in TARGET_COLUMNS if c in columns), None)
        if column is None and "wnid" in columns:
            wnids = _wnid_index()
            unknown = sorted({r["wnid"] for r in rows} - wnids.keys())
            if unknown:
                raise ValueError(f"{csv_path}: wnids {unknown[:3]} are not ImageNet-1K classes")
            return [wnids[r["wnid"]] for r in rows]
        if column is None or column not in columns:
            raise ValueError(f"{csv_path}: no label column {column or TARGET_COLUMNS}; columns are {columns}")
        try:
            return [int(r[column]) for r in rows]
        except ValueError as e:
            raise ValueError(f"{csv_path}: column {column!r} must hold integer class indices ({e})") from e

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        return open(path, "rb"), target

    def __len__(self) -> int:
        return len(self.samples)

    def _filename(self, index: int, basename: bool = False, absolute: bool = False) -> str:
        path = self.samples[index][0]
        if basename:
            return path.name
        return str(path if absolute else path.relative_to(self.root))


def open_eval_dataset(root: str | Path, split: str = "val", label_column: str | None = None) -> Dataset:
    """An evaluation dataset for ``root``: a flat folder with a ``labels.csv`` (read by
    :class:`ReaderLabelsCsv`, images decoded by :func:`open_fastervit.data.read_image`), else whatever
    :func:`open_fastervit.data.open_dataset` accepts (an ImageFolder root with a ``split`` sub-folder, a
    ``.tar``, a timm spec). Errors name the path and what was expected."""
    path = Path(root)
    if path.is_dir() and (path / LABELS_CSV).is_file() and not (path / split).exists():
        # images decoded by data.read_image (16-bit scaled, not clipped), like every other dataset here
        return SkipUnreadable(ImageDataset(str(path), reader=ReaderLabelsCsv(path, label_column)))
    return open_dataset(str(root), split, is_training=False)


def _csv_reader(dataset: Dataset) -> ReaderLabelsCsv | None:
    reader = getattr(dataset, "reader", None)
    return reader if isinstance(reader, ReaderLabelsCsv) else None


def _folders(dataset: Dataset) -> list[str]:
    folders = class_names(dataset)
    if folders is None:
        raise ValueError(f"{type(dataset).__name__} does not name its classes")
    return folders


def class_names_of(dataset: Dataset) -> list[str]:
    """Human-readable names of a dataset's classes, indexed by target.

    ImageFolder: the folder names, replaced by the ``name`` column of a ``classes.csv`` beside the split
    folders (``folder_index,wnid,...,name``) or by the ImageNet-1K lemma when the folders are wnids.
    labels.csv: the name column (indices without a row get their number).
    """
    csv_reader = _csv_reader(dataset)
    if csv_reader is not None:
        size = max(t for _, t in csv_reader.samples) + 1
        return [csv_reader.names.get(i, str(i)) for i in range(size)]
    folders = _folders(dataset)
    root = getattr(getattr(dataset, "reader", None), "root", None)
    classes_csv = Path(str(root)).parent / "classes.csv" if root else None
    if classes_csv is not None and classes_csv.is_file():
        by_wnid = {r.get("wnid"): r.get("name") for r in _read_rows(classes_csv)}
        if all(by_wnid.get(f) for f in folders):
            return [by_wnid[f] for f in folders]
    wnids = _wnid_index()
    names = imagenet_class_names()
    return [names[wnids[f]] if f in wnids else f for f in folders]


def imagenet_label_map(dataset: Dataset) -> dict[int, int]:
    """Dataset target -> ImageNet-1K index for an ImageFolder whose class folders are wnids.

    labels.csv datasets already carry ImageNet-1K indices, so they get the identity map.
    """
    csv_reader = _csv_reader(dataset)
    if csv_reader is not None:
        return {t: t for _, t in csv_reader.samples}
    folders = _folders(dataset)
    wnids = _wnid_index()
    unknown = [f for f in folders if f not in wnids]
    if unknown:
        raise ValueError(f"class folders {unknown[:3]} are not ImageNet-1K wnids; cannot map to ImageNet-1K")
    return {index: wnids[wnid] for index, wnid in enumerate(folders)}


def load_label_map(spec: str | Path | Mapping[int, int] | Sequence[int] | None,
                   dataset: Dataset) -> Mapping[int, int] | Sequence[int] | None:
    """Resolve a label-map option: None, ``'in1k'`` (wnid folders -> ImageNet-1K), a dict/sequence, or a CSV
    file with columns ``folder_index`` (dataset target) and ``in1k_index`` (model output)."""
    if spec is None or isinstance(spec, (Mapping, list, tuple)):
        return spec
    if str(spec).lower() in ("in1k", "imagenet", "imagenet-1k"):
        return imagenet_label_map(dataset)
    rows = _read_rows(Path(spec))
    if not {"folder_index", "in1k_index"} <= rows[0].keys():
        raise ValueError(f"label map {spec} needs columns folder_index,in1k_index; it has {list(rows[0])}")
    return {int(r["folder_index"]): int(r["in1k_index"]) for r in rows}


def resolve_class_names(
    num_classes: int,
    classes: str | Path | Sequence[str] | None = None,
    info: Mapping[str, Any] | None = None,
) -> list[str]:
    """Names for a model's ``num_classes`` outputs, from the first of: ``classes`` (a list, a text file with one
    name per line, or a dataset folder whose ``train`` split names the classes), the ``class_names`` of the weights
    (``info``, e.g. ``model.weights_info``), timm's ``ImageNetInfo`` for 1000 outputs, else the class index.

    Raises:
        FileNotFoundError: ``classes`` names a path that does not exist.
        ValueError: as many names as outputs are not given.
    """
    names: Sequence[str] | None = None
    if isinstance(classes, (str, Path)):
        path = Path(classes)
        if path.is_dir():
            names = class_names_of(open_eval_dataset(path, split="train"))
        elif path.is_file():
            names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
        else:
            raise FileNotFoundError(f"class names {path}: no such file or folder")
    elif classes is not None:
        names = list(classes)
    elif info and info.get("class_names"):
        names = list(info["class_names"])
    elif num_classes == IMAGENET_1K:
        names = imagenet_class_names()
    if names is None:
        return [str(i) for i in range(num_classes)]
    if len(names) != num_classes:
        raise ValueError(f"{len(names)} class names given for a model with {num_classes} outputs")
    return list(names)


# ---- scoring only what was read ----------------------------------------------------------------------------------


class ReadableImages(Dataset):
    """Evaluation view of a map-style image dataset (``SkipUnreadable`` or timm ``ImageDataset``): an image that
    cannot be decoded is dropped from the score, never replaced by another one.

    ``dataset[i]`` is ``(image, target)``, or ``(None, target)`` for an unreadable file, which is flagged in a
    shared-memory tensor (seen across loader workers); :func:`readable_collate` leaves such items out of the batch.
    ``skipped()`` names the flagged files, ``root`` is the folder the images come from (for messages).
    """

    def __init__(self, dataset: Dataset) -> None:
        base = dataset.dataset if isinstance(dataset, SkipUnreadable) else dataset
        self.reader = base.reader
        self.mode = getattr(base, "input_img_mode", None) or "RGB"
        self.transform: Any = None
        self.bad = torch.zeros(len(self.reader), dtype=torch.uint8).share_memory_()
        self.root = str(getattr(self.reader, "root", "") or "")

    def __len__(self) -> int:
        return len(self.reader)

    def filename(self, index: int) -> str:
        return str(self.reader.filename(index, absolute=True))

    def __getitem__(self, index: int) -> tuple[Any, int]:
        source, target = self.reader[index][:2]
        try:
            image = read_image(source, self.mode, name=self.filename(index))
        except DECODE_ERRORS:
            self.bad[index] = 1
            return None, -1 if target is None else target
        finally:
            if hasattr(source, "close"):  # timm readers hand out open files and leave closing to the caller
                source.close()
        if self.transform is not None:
            image = self.transform(image)
        return image, -1 if target is None else target

    def skipped(self) -> list[str]:
        """Names (relative to :attr:`root`) of the images found unreadable so far, in dataset order."""
        names = []
        for index in torch.nonzero(self.bad).flatten().tolist():
            path = Path(self.filename(int(index)))
            try:
                names.append(str(path.relative_to(self.root)) if self.root else path.name)
            except ValueError:
                names.append(path.name)
        return names


def readable_collate(batch: Sequence[tuple[Any, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``default_collate`` of the items of a :class:`ReadableImages` batch that were read; a batch with none gives
    empty tensors ``(0,)`` (``evaluate`` skips it)."""
    readable = [item for item in batch if item[0] is not None]
    if not readable:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    images, targets = default_collate(readable)[:2]
    return images, targets


def no_readable_image(dataset: ReadableImages, where: str | Path) -> DatasetError:
    """The error for a dataset none of whose images could be read (names the folder and the first files)."""
    names = dataset.skipped()
    shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
    return DatasetError(f"no readable image in {where}: all {len(names)} files are unreadable ({shown})")


# ---- the model's class names against the dataset's ---------------------------------------------------------------


class ClassNameMismatch(ValueError):
    """The weights store class names and the dataset's class folders are not (all) among them."""


def _aliases(name: str) -> set[str]:
    """A class name and, for an ImageNet-1K wnid, its first lemma (``n01443537`` -> ``goldfish``)."""
    wnids = _wnid_index()
    out = {name, name.lower()}
    if name in wnids:
        lemma = imagenet_class_names()[wnids[name]]
        out |= {lemma, lemma.lower(), lemma.replace(" ", "_").lower()}
    return out


def class_name_map(model_names: Sequence[str], dataset: Dataset) -> dict[int, int] | None:
    """Dataset target -> model output index by class name, when the model's stored ``model_names`` and the dataset's
    class folders differ; None when they are equal (or the dataset does not name its classes).

    Names match exactly, or through the ImageNet-1K lemma of a wnid (``n01443537`` matches ``goldfish``).

    Raises:
        ClassNameMismatch: a dataset class matches no model class (or several); the message lists the dataset's
            unmatched folders and the model's names.
    """
    folders = class_names(dataset)
    model_names = [str(n) for n in model_names]
    if not folders or folders == model_names:
        return None
    by_alias: dict[str, set[int]] = {}
    for index, name in enumerate(model_names):
        for alias in _aliases(name):
            by_alias.setdefault(alias, set()).add(index)
    mapping: dict[int, int] = {}
    unmatched = []
    for target, folder in enumerate(folders):
        hits = set().union(*(by_alias.get(alias, set()) for alias in _aliases(folder)))
        if len(hits) == 1:
            mapping[target] = hits.pop()
        else:
            unmatched.append(folder)
    if unmatched:
        shown = ", ".join(model_names[:10]) + (f" ... (+{len(model_names) - 10} more)" if len(model_names) > 10 else "")
        raise ClassNameMismatch(
            f"{len(unmatched)} of the dataset's {len(folders)} class folders are not among the model's class names: "
            f"{', '.join(unmatched[:10])}{' ...' if len(unmatched) > 10 else ''}; the model's classes are {shown}. "
            "Rename the folders, pass a label map, or score by index anyway (by_index=True; command line: --by-index)"
        )
    return mapping
