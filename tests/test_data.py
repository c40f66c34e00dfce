"""Data pipeline for training: resumable order, sharding, dataset checks, unreadable-image skipping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from open_fastervit.data import (
    DatasetError,
    LoaderOptions,
    ResumableBatchSampler,
    ShardSampler,
    SkipUnreadable,
    build_eval_loader,
    class_names,
    ensure_randaugment_compat,
    open_dataset,
)
from open_fastervit.paths import data_path

TINY = data_path("tiny-imagenet-10")


def _steps(sampler: ResumableBatchSampler) -> list[list[int]]:
    return list(iter(sampler))


def test_global_order_independent_of_ranks_and_accumulation():
    """1 process x accum 4 sees exactly the micro-batches of 2 processes x accum 2 and 4 processes x accum 1."""
    size, batch = 103, 4
    single = _steps(ResumableBatchSampler(size, batch, accum_steps=4, seed=3))
    assert len(single) == (size // 16) * 4 and all(len(b) == batch for b in single)
    for world, accum in ((2, 2), (4, 1)):
        per_rank = [_steps(ResumableBatchSampler(size, batch, world_size=world, rank=r, accum_steps=accum, seed=3))
                    for r in range(world)]
        for step in range(size // 16):
            micro = [sorted(per_rank[r][step * accum + a]) for r in range(world) for a in range(accum)]
            reference = [sorted(b) for b in single[step * 4:(step + 1) * 4]]
            assert sorted(micro) == sorted(reference)


def test_sampler_epochs_seeds_resume_and_subset():
    sampler = ResumableBatchSampler(50, 5, seed=1)
    first = _steps(sampler)
    assert sorted(i for b in first for i in b) == list(range(50))  # a permutation, nothing dropped
    assert _steps(sampler) == first  # deterministic
    sampler.set_epoch(1)
    assert _steps(sampler) != first
    sampler.set_epoch(0, start_batch=7)
    assert len(sampler) == 3 and _steps(sampler) == first[7:]
    with pytest.raises(ValueError):
        sampler.set_epoch(0, start_batch=11)
    subset = ResumableBatchSampler(50, 5, seed=1, indices=range(10, 30))
    assert sorted(i for b in _steps(subset) for i in b) == list(range(10, 30))


def test_shard_sampler_covers_each_sample_once():
    shards = [list(ShardSampler(11, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))
    assert list(ShardSampler(11, 2, 1, indices=[5, 6, 7, 8])) == [6, 8]


def test_open_dataset_reads_tiny_imagenet():
    train = open_dataset(str(TINY), "train", is_training=True)
    val = open_dataset(str(TINY), "val", is_training=False)
    assert isinstance(train, SkipUnreadable) and len(train) == 5000 and len(val) == 500
    image, target = train[0]
    assert image.size == (64, 64) and 0 <= target < 10


def _folder(root: Path, layout: dict[str, int]) -> Path:
    """ImageFolder of symlinks to real tiny-imagenet images: {class: count}."""
    sources = sorted((TINY / "train" / "n01443537").iterdir())
    for name, count in layout.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            os.symlink(sources[i], root / name / f"{i}.JPEG")
    return root


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: root / "absent", "does not exist"),
        (lambda root: _folder(root / "train", {"a": 2, "b": 2}).parent, "no 'val' split"),
        (lambda root: (root / "val").mkdir(parents=True) or root, "holds no images"),
        (lambda root: _folder(root / "val", {"only": 3}).parent, "1 class folder"),
    ],
)
def test_bad_datasets_fail_clearly(tmp_path, make, message):
    with pytest.raises(DatasetError, match=message):
        open_dataset(str(make(tmp_path)), "val", is_training=False)


def test_images_directly_in_split_folder_is_a_clear_error(tmp_path):
    split = _folder(tmp_path / "val", {"a": 2, "b": 2})
    (split / "stray.JPEG").write_bytes((split / "a" / "0.JPEG").read_bytes())
    with pytest.raises(DatasetError, match="images directly in"):
        open_dataset(str(tmp_path), "val", is_training=False)


def test_unreadable_images_are_skipped_counted_and_named(tmp_path):
    split = _folder(tmp_path / "val", {"a": 6, "b": 6})
    (split / "a" / "3.JPEG").unlink()
    (split / "a" / "3.JPEG").write_bytes(b"not a jpeg at all")
    truncated = (TINY / "train" / "n01443537").iterdir().__next__().read_bytes()[:300]
    (split / "b" / "1.JPEG").unlink()
    (split / "b" / "1.JPEG").write_bytes(truncated)
    dataset = open_dataset(str(tmp_path), "val", is_training=False)
    from timm.data import create_transform

    options = LoaderOptions(workers=2, persistent_workers=False)  # workers exit when the pass ends
    loader = build_eval_loader(dataset, create_transform(32), 4, options)  # skips counted across workers
    images = torch.cat([batch[0] for batch in loader])
    assert images.shape == (12, 3, 32, 32)  # every index yields an image (bad ones replaced)
    assert int(dataset.bad.sum()) == 2
    assert sorted(Path(p).relative_to(split).as_posix() for p in dataset.skipped()) == ["a/3.JPEG", "b/1.JPEG"]


def test_posterize_zero_bits_works_for_randaugment():
    """timm's RandAugment maps magnitude 10 to posterize(0 bits), which Pillow >= 13 rejects."""
    from timm.data.auto_augment import NAME_TO_OP

    ensure_randaugment_compat()
    image = Image.new("RGB", (4, 4), (200, 100, 50))
    assert NAME_TO_OP["PosterizeIncreasing"](image, 0).getextrema() == ((0, 0), (0, 0), (0, 0))
    assert NAME_TO_OP["PosterizeIncreasing"](image, 2).getpixel((0, 0)) == (192, 64, 0)


class _Stream(torch.utils.data.IterableDataset):
    """A seeded stream like timm's webdataset / TFDS readers: per-epoch order, ``set_epoch``, a length."""

    def __init__(self, size: int) -> None:
        self.size, self.epoch, self.transform = size, 0, None

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.epoch))
        for i in order.tolist():
            yield self.transform(torch.full((3, 2, 2), float(i))), i


def test_iterable_datasets_train_per_epoch_and_resume_mid_epoch():
    from open_fastervit.data import build_train_loader

    loader = build_train_loader(_Stream(23), lambda x: x, 4, LoaderOptions(workers=0), accum_steps=2)
    assert loader.steps_per_epoch == 2  # 23 // 4 = 5 micro-batches, 4 of them make 2 whole steps
    first = [batch[1].tolist() for batch in loader.epoch(0)]
    assert len(first) == 4 and [batch[1].tolist() for batch in loader.epoch(0)] == first
    assert [batch[1].tolist() for batch in loader.epoch(1)] != first
    assert [batch[1].tolist() for batch in loader.epoch(0, start_batch=2)] == first[2:]
    with pytest.raises(DatasetError, match="fewer than one global batch"):
        build_train_loader(_Stream(7), lambda x: x, 4, LoaderOptions(workers=0), accum_steps=2)


def test_image_tars_per_split(tmp_path):
    import tarfile

    sources = sorted((TINY / "train" / "n01443537").iterdir())
    for split in ("train", "val"):
        with tarfile.open(tmp_path / f"{split}.tar", "w") as tar:
            for label in ("cat", "dog"):
                for i in range(3):
                    tar.add(sources[i], arcname=f"{label}/{i}.JPEG")
    train = open_dataset(str(tmp_path), "train", is_training=True)
    assert len(train) == 6 and class_names(train) == ["cat", "dog"]
    image, target = train[4]
    assert image.size == (64, 64) and target == 1
    assert len(open_dataset(str(tmp_path / "train.tar"), "train", is_training=True)) == 6
    with pytest.raises(DatasetError, match="one .tar"):
        open_dataset(str(tmp_path / "train.tar"), "val", is_training=False)


def test_shutdown_workers_stops_persistent_workers_now():
    import multiprocessing

    from timm.data import create_transform

    from open_fastervit.data import shutdown_workers

    dataset = open_dataset(str(TINY), "val", is_training=False)
    loader = build_eval_loader(dataset, create_transform(32), 50, LoaderOptions(workers=2), indices=range(100))
    assert sum(len(batch[1]) for batch in loader) == 100
    assert len(multiprocessing.active_children()) == 2  # persistent: alive between passes
    shutdown_workers(loader)
    assert multiprocessing.active_children() == []
    assert sum(len(batch[1]) for batch in loader) == 100  # a later pass starts new workers
    shutdown_workers(loader)
