"""Datasets and loaders for training: timm datasets, resumable data order, unreadable-image skipping.

* ``open_dataset`` opens an ImageFolder tree (``ROOT/train/<class>/*.jpg``), an image tar, or any timm
  dataset spec (``hfds/...``, ``wds/...``, ``tfds/...``, ``torch/...``) through timm's ``create_dataset``
  and fails early, with a message, on a missing path, an empty split or a mis-shaped tree.
* ``read_image`` is the one image decoder of the package (training, validation and ``predict``): any
  Pillow mode becomes 8-bit RGB, with 16-bit samples scaled by 255/65535 instead of clipped to white.
* ``SkipUnreadable`` decodes images itself (through ``read_image``) so that a corrupt or truncated file is
  replaced by the next readable one (batch shapes stay fixed), counted in shared memory (works across loader
  workers) and reported by name at the end of each epoch.
* ``ResumableBatchSampler`` gives every epoch one seeded permutation and cuts it into micro-batches so
  that the global data order depends only on (seed, epoch, global batch), not on how the global batch is
  split between ranks and gradient-accumulation steps; it can start mid-epoch for ``--resume``.
* ``SeededSamples`` makes the random augmentation of a training sample a function of (seed, epoch, position of
  the sample in the epoch's order) only: the sampler sends that key with each index and the wrapper seeds
  Python's ``random``, numpy and torch from it around the transform, in whichever process runs it. A run
  therefore sees the same augmented images whatever the number of loader workers (0 included) and whether it
  was interrupted and resumed mid-epoch, and the main process's RNG (mixup/cutmix, drop path) is left untouched.
* ``TrainLoader`` serves one epoch of micro-batches from any position, for map-style datasets (through
  the sampler) and for streaming ones (webdataset, TFDS, streaming HF: the reader shards and shuffles).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from timm.data import ImageDataset, create_dataset
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

__all__ = [
    "DatasetError",
    "ImageDecodeError",
    "LoaderOptions",
    "ResumableBatchSampler",
    "SampleKey",
    "SeededSamples",
    "ShardSampler",
    "SkipUnreadable",
    "TrainLoader",
    "build_eval_loader",
    "build_train_loader",
    "class_names",
    "describe_data",
    "ensure_randaugment_compat",
    "open_dataset",
    "read_image",
    "sample_rng",
    "shutdown_workers",
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


class SampleKey(NamedTuple):
    """What ``SeededSamples`` needs to load and augment one training sample reproducibly."""

    epoch: int
    position: int  # place of the sample in the epoch's order (unique within the epoch, repeats included)
    index: int  # the dataset index


def _sample_seeds(seed: int, epoch: int, position: int) -> tuple[int, int, int]:
    """Seeds for Python's ``random``, numpy and torch, mixed from (seed, epoch, position) by numpy's SeedSequence."""
    words = np.random.SeedSequence([seed % 2**63, epoch, position]).generate_state(5, np.uint32).tolist()
    return (words[0] << 32) | words[1], words[2], (words[3] << 32) | words[4]


@contextmanager
def sample_rng(seed: int, epoch: int, position: int, restore: bool = True) -> Iterator[None]:
    """Python's ``random``, numpy's global RNG and torch's CPU generator seeded from (seed, epoch, position) inside
    the block and, with ``restore``, put back to their previous states afterwards (CUDA generators are not
    touched). A loader worker, whose RNGs serve nothing else, skips the restore (numpy's costs ~0.1 ms)."""
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state()) if restore else None
    python_seed, numpy_seed, torch_seed = _sample_seeds(seed, epoch, position)
    random.seed(python_seed)
    np.random.seed(numpy_seed)
    torch.default_generator.manual_seed(torch_seed)  # torch.manual_seed would also reseed the CUDA generators
    try:
        yield
    finally:
        if saved is not None:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class SeededSamples(Dataset):
    """Map-style dataset wrapper whose item ``SampleKey(epoch, position, index)`` is ``dataset[index]`` computed
    under ``sample_rng(seed, epoch, position)``.

    The random augmentation of a sample is thereby fixed by (seed, epoch, position in the epoch's order), not by
    the RNG stream of the loader worker that happens to load it: the same in every worker, with no workers, and
    after a mid-epoch resume (where the loader restarts its workers at the resume point). The position rather
    than the dataset index keys the seed so that an index repeated within an epoch is augmented differently.
    A plain integer item is ``dataset[item]`` with the process's own RNG.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: SampleKey | int) -> Any:
        if not isinstance(key, tuple):
            return self.dataset[key]
        epoch, position, index = key
        with sample_rng(self.seed, epoch, position, restore=get_worker_info() is None):  # main process: restore
            return self.dataset[index]


class ResumableBatchSampler(Sampler[list[int]]):
    """Seeded per-epoch order, cut into micro-batches shared between ranks; can start mid-epoch.

    One optimizer step consumes ``world_size * accum_steps`` consecutive micro-batches of the epoch's
    permutation; local micro-step ``a`` of rank ``r`` takes micro-batch ``a * world_size + r``. A run on
    one process with ``accum_steps = k * W`` therefore sees exactly the micro-batches of W processes with
    ``accum_steps = k`` (the same BatchNorm batches, the same gradients). Incomplete steps are dropped.

    With ``keyed=True`` a micro-batch is a list of ``SampleKey(epoch, position, index)`` instead of indices
    (``position``: the sample's place in the epoch's permutation, the same for every split of the global batch),
    for ``SeededSamples``.
    """

    def __init__(
        self, size: int, batch_size: int, *, world_size: int = 1, rank: int = 0, accum_steps: int = 1,
        seed: int = 0, shuffle: bool = True, indices: Sequence[int] | None = None, keyed: bool = False,
    ) -> None:
        if batch_size < 1 or accum_steps < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad sampler args: batch {batch_size}, accum {accum_steps}, rank {rank}/{world_size}")
        self.indices = torch.as_tensor(indices if indices is not None else range(size), dtype=torch.long)
        size = len(self.indices)
        self.size, self.batch_size, self.world_size, self.rank = size, batch_size, world_size, rank
        self.accum_steps, self.seed, self.shuffle, self.keyed = accum_steps, seed, shuffle, keyed
        self.epoch, self.start_batch = 0, 0
        self.steps_per_epoch = size // (batch_size * world_size * accum_steps)

    @property
    def batches_per_epoch(self) -> int:
        """Micro-batches one rank draws in a full epoch."""
        return self.steps_per_epoch * self.accum_steps

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation and skip the first ``start_batch`` local micro-batches."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")
        self.epoch, self.start_batch = epoch, start_batch

    def _order(self) -> torch.Tensor:
        if not self.shuffle:
            return self.indices
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return self.indices[torch.randperm(self.size, generator=generator)]

    def __iter__(self) -> Iterator[list[int] | list[SampleKey]]:
        order = self._order()
        per_step = self.world_size * self.accum_steps
        for local in range(self.start_batch, self.batches_per_epoch):
            step, micro = divmod(local, self.accum_steps)
            block = step * per_step + micro * self.world_size + self.rank
            first = block * self.batch_size
            batch = order[first:first + self.batch_size].tolist()
            if self.keyed:
                yield [SampleKey(self.epoch, first + offset, index) for offset, index in enumerate(batch)]
            else:
                yield batch

    def __len__(self) -> int:
        return self.batches_per_epoch - self.start_batch


class ShardSampler(Sampler[int]):
    """Rank ``r`` of ``W`` takes positions r, r+W, ... of ``indices`` (default all): each sample once, no padding."""

    def __init__(self, size: int, world_size: int = 1, rank: int = 0, indices: Sequence[int] | None = None) -> None:
        self.indices = list(indices if indices is not None else range(size))[rank::world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _seed_numpy_in_worker(worker_id: int) -> None:
    """Torch seeds ``random`` and itself per worker; numpy (used by some augmentations) needs this."""
    np.random.seed(torch.initial_seed() % 2**32)


@dataclass
class LoaderOptions:
    """How batches are moved to the device (shared by the train and eval loaders)."""

    workers: int = 2
    pin_memory: bool = False
    persistent_workers: bool = True


def _loader(dataset: Dataset, options: LoaderOptions, seed: int, **kwargs) -> DataLoader:
    workers = options.workers
    return DataLoader(
        dataset,
        num_workers=workers,
        pin_memory=options.pin_memory,
        persistent_workers=options.persistent_workers and workers > 0,
        worker_init_fn=_seed_numpy_in_worker if workers > 0 else None,
        # a private generator: creating an iterator never consumes the global RNG (exact resume)
        generator=torch.Generator().manual_seed(seed),
        prefetch_factor=4 if workers > 0 else None,
        **kwargs,
    )


class TrainLoader:
    """Epochs of training micro-batches that can start mid-epoch (for ``--resume``).

    Map-style datasets use a ``ResumableBatchSampler`` (exact position). Iterable datasets (webdataset,
    streaming HF, TFDS) shard and shuffle themselves per rank and epoch (``set_epoch``); a mid-epoch
    start reads and drops the batches already trained on, which is exact when the stream is seeded.
    """

    def __init__(self, loader: DataLoader, batches_per_epoch: int, accum_steps: int) -> None:
        self.loader, self.accum_steps = loader, accum_steps
        self.batches_per_epoch = batches_per_epoch - batches_per_epoch % accum_steps
        self.steps_per_epoch = self.batches_per_epoch // accum_steps

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator:
        """This rank's micro-batches of ``epoch`` from local micro-batch ``start_batch`` on."""
        sampler = self.loader.batch_sampler
        if isinstance(sampler, ResumableBatchSampler):
            sampler.set_epoch(epoch, start_batch)
            yield from self.loader
            return
        if hasattr(self.loader.dataset, "set_epoch"):
            self.loader.dataset.set_epoch(epoch)
        for index, batch in enumerate(self.loader):
            if index >= self.batches_per_epoch:
                break
            if index >= start_batch:
                yield batch


def shutdown_workers(loader: DataLoader | TrainLoader | None) -> None:
    """Stop a loader's persistent worker processes now rather than whenever the loader is garbage-collected
    (a late collection stalls whatever code runs at that moment). Uses the DataLoader iterator's shutdown."""
    loader = loader.loader if isinstance(loader, TrainLoader) else loader
    iterator = getattr(loader, "_iterator", None)  # torch keeps the persistent-workers iterator here
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        loader._iterator = None


def build_train_loader(
    dataset: Dataset, transform: Callable, batch_size: int, options: LoaderOptions, *,
    world_size: int = 1, rank: int = 0, accum_steps: int = 1, seed: int = 0, indices: Sequence[int] | None = None,
    collate_fn: Callable | None = None,
) -> TrainLoader:
    """Training batches: a ``ResumableBatchSampler`` (map-style) or the reader's own sharding (iterable).
    ``collate_fn``: how samples form a batch (default: torch's stacking; detection keeps lists).

    A map-style dataset is served through ``SeededSamples``: each sample's augmentation depends only on
    (seed, epoch, position in the epoch), so the batches are the same for any number of workers and after a
    mid-epoch resume. Streaming datasets keep the per-worker RNG streams of their reader."""
    dataset.transform = transform
    global_batch = batch_size * world_size * accum_steps
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "set_loader_cfg"):
            dataset.set_loader_cfg(num_workers=options.workers)
        per_rank = len(dataset) if hasattr(dataset, "__len__") else 0  # timm readers: samples of this rank
        loader = TrainLoader(_loader(dataset, options, seed, batch_size=batch_size, drop_last=True,
                                     collate_fn=collate_fn),
                             per_rank // batch_size, accum_steps)
        size = per_rank * world_size
    else:
        sampler = ResumableBatchSampler(
            len(dataset), batch_size, world_size=world_size, rank=rank, accum_steps=accum_steps, seed=seed,
            indices=indices, keyed=True,
        )
        loader = TrainLoader(_loader(SeededSamples(dataset, seed), options, seed, batch_sampler=sampler,
                                     collate_fn=collate_fn),
                             sampler.batches_per_epoch, accum_steps)
        size = sampler.size
    if loader.steps_per_epoch == 0:
        raise DatasetError(f"{size} training images are fewer than one global batch of {global_batch}")
    return loader


def build_eval_loader(
    dataset: Dataset, transform: Callable, batch_size: int, options: LoaderOptions, *,
    world_size: int = 1, rank: int = 0, indices: Sequence[int] | None = None, collate_fn: Callable | None = None,
) -> DataLoader:
    """Evaluation loader: every image (of ``indices``, default all) exactly once across ranks, in order."""
    dataset.transform = transform
    iterable = isinstance(dataset, IterableDataset)
    sampler = None if iterable else ShardSampler(len(dataset), world_size, rank, indices)
    return _loader(dataset, options, 0, batch_size=batch_size, sampler=sampler, drop_last=False, collate_fn=collate_fn)


def _posterize_any_bits(img: Image.Image, bits_to_keep: int, **_: object) -> Image.Image:
    """Posterize that, like Pillow < 13, accepts 0 bits (a black image) - RandAugment's strongest level."""
    from PIL import ImageOps

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
    from PIL import ImageOps
    from timm.data import auto_augment

    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
    except ValueError:
        for name, op in list(auto_augment.NAME_TO_OP.items()):
            if op is auto_augment.posterize:
                auto_augment.NAME_TO_OP[name] = _posterize_any_bits


def describe_data(data: str) -> str:
    """Short human description of a dataset argument, for logs."""
    return data if _is_spec(data) else os.path.abspath(os.path.expanduser(data))
