"""Data loading for training and evaluation: a resumable, seeded data order that any task's datasets plug into.

* ``ResumableBatchSampler`` gives every epoch one seeded permutation and cuts it into micro-batches so that the
  global data order depends only on (seed, epoch, global batch), not on how the global batch is split between
  ranks and gradient-accumulation steps; it can start mid-epoch for ``--resume``.
* ``SeededSamples`` makes the random augmentation of a training sample a function of (seed, epoch, position of
  the sample in the epoch's order) only: the sampler sends that key with each index and the wrapper seeds
  Python's ``random``, numpy and torch from it around the transform, in whichever process runs it. A run
  therefore sees the same augmented images whatever the number of loader workers (0 included) and whether it
  was interrupted and resumed mid-epoch, and the main process's RNG (mixup/cutmix, drop path) is left untouched.
* ``TrainLoader`` serves one epoch of micro-batches from any position, for map-style datasets (through the
  sampler) and for streaming ones (webdataset, TFDS, streaming HF: the reader shards and shuffles).
* ``build_eval_loader`` shards an evaluation set over ranks, each image once.

The datasets come from the task (classification: ``open_fastervit.data``; detection and segmentation: their own);
the loaders know nothing of what a sample holds.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from ..data import DatasetError

__all__ = ["LoaderOptions", "ResumableBatchSampler", "SampleKey", "SeededSamples", "ShardSampler", "TrainLoader",
           "build_eval_loader", "build_train_loader", "sample_rng", "shutdown_workers", "subset_indices"]


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


def subset_indices(size: int, count: int, seed: int) -> list[int] | None:
    """A fixed random subset of ``count`` indices (sorted), or None for all."""
    if not count or count >= size:
        return None
    generator = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(size, generator=generator)[:count].tolist())
