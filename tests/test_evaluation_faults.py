"""Scoring what was really read, matching classes by name, options naming themselves, COCO duplicates.

The model here is a colour detector (logits = mean of each normalised channel), so every expected score is known:
a red image is class 0, a green one class 1, a blue one class 2.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from open_fastervit.cli import _dense
from open_fastervit.cli.demo import build_parser as demo_parser
from open_fastervit.cli.predict import build_parser as predict_parser
from open_fastervit.cli.validate import build_parser as validate_parser
from open_fastervit.cli.validate import main as validate_main
from open_fastervit.data import DatasetError, open_dataset
from open_fastervit.labels import ClassNameMismatch, ReadableImages, class_name_map, readable_collate
from open_fastervit.tasks.classification.task import classes_without_readable_images
from open_fastervit.tasks.detection.data import CocoDetection
from open_fastervit.train.run import RunExistsError, check_output
from open_fastervit.validate import validate

COLOURS = {0: (230, 20, 20), 1: (20, 230, 20), 2: (20, 20, 230)}
#: ImageNet-1K wnids of goldfish, koala and king penguin, in sorted (ImageFolder) order.
WNIDS = ["n01443537", "n01882714", "n02056570"]
LEMMAS = {"n01443537": "goldfish", "n01882714": "koala", "n02056570": "king_penguin"}


class Colour(nn.Module):
    """Logits (B, 3) = the mean of each normalised channel: a red image scores class 0 highest, and so on."""

    num_classes = 3

    def __init__(self, class_names: list[str] | None = None) -> None:
        super().__init__()
        self.zero = nn.Parameter(torch.zeros(1))
        if class_names:
            self.weights_info = {"class_names": class_names}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3)) + self.zero


def image_folder(root: Path, folders: list[str], per_class: int = 4, garbage: dict[int, int] | None = None) -> Path:
    """``root/val/<folder>/<i>.png``: solid images of the class's colour; ``garbage[c]`` of class c's files hold
    bytes that are no image."""
    for target, folder in enumerate(folders):
        (root / "val" / folder).mkdir(parents=True)
        for i in range(per_class):
            path = root / "val" / folder / f"{i}.png"
            if i < (garbage or {}).get(target, 0):
                path.write_bytes(b"this is not an image")
            else:
                Image.new("RGB", (40, 40), COLOURS[target]).save(path)
    return root


def run_validate(model: nn.Module, root: Path, **kwargs):
    return validate(model, root, img_size=32, workers=0, batch_size=3, device="cpu", **kwargs)


# ---- 2: unreadable images are left out of the score, never replaced -------------------------------------------------


def test_unreadable_images_are_skipped_not_replaced(tmp_path):
    intact = run_validate(Colour(), image_folder(tmp_path / "intact", ["a", "b", "c"]))
    assert (intact["top1"], intact["images"], intact["skipped"]) == (100.0, 12, 0)
    # every image of class b and one of class a unreadable: substitution by neighbours would score them wrong
    damaged = run_validate(Colour(), image_folder(tmp_path / "damaged", ["a", "b", "c"], garbage={0: 1, 1: 4}))
    assert damaged["top1"] == 100.0 and damaged["images"] == damaged["count"] == 7
    assert damaged["skipped"] == 5
    assert damaged["skipped_files"] == ["a/0.png", "b/0.png", "b/1.png", "b/2.png", "b/3.png"]


def test_cli_prints_and_writes_what_was_skipped(tmp_path, capsys):
    root = image_folder(tmp_path / "d", ["a", "b", "c"], garbage={1: 2})
    out = tmp_path / "r.json"
    from open_fastervit import save_weights
    from open_fastervit.loading import load_model

    model = load_model("resnet18", pretrained=False, num_classes=3)
    save_weights(model, tmp_path / "r18.safetensors")
    code = validate_main([str(root), "--checkpoint", str(tmp_path / "r18.safetensors"), "--img-size", "32",
                          "--workers", "0", "--json", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "% on 10 images (2 unreadable, skipped: b/0.png, b/1.png); top-5 " in printed
    result = json.loads(out.read_text())
    assert (result["images"], result["skipped"], result["skipped_files"]) == (10, 2, ["b/0.png", "b/1.png"])


def test_no_readable_image_is_a_clear_error(tmp_path, capsys):
    root = image_folder(tmp_path / "junk", ["a", "b"], per_class=2, garbage={0: 2, 1: 2})
    with pytest.raises(DatasetError, match=r"no readable image in .*junk.*val: all 4 files are unreadable "
                                           r"\(a/0.png, a/1.png, b/0.png, b/1.png\)"):
        run_validate(Colour(), root)


def test_cli_no_readable_image_exits_1_without_traceback(tmp_path, capsys):
    root = image_folder(tmp_path / "junk", ["a", "b"], per_class=2, garbage={0: 2, 1: 2})
    code = validate_main([str(root), "--model", "resnet18", "--random-weights", "--img-size", "32", "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "fastervit validate: error: no readable image in" in err and "Traceback" not in err


def test_readable_collate_drops_unreadable_items():
    images, targets = readable_collate([(torch.ones(3, 2, 2), 1), (None, 0), (torch.zeros(3, 2, 2), 2)])
    assert images.shape == (2, 3, 2, 2) and targets.tolist() == [1, 2]
    images, targets = readable_collate([(None, 0)])
    assert images.shape == (0,) and targets.shape == (0,)


def test_training_evaluation_counts_scored_and_skipped(tmp_path):
    """The evaluation inside classification training scores the readable val images only and says so."""
    from open_fastervit.tasks.classification.task import ClassificationTask
    from open_fastervit.train.distributed import DistInfo

    root = image_folder(tmp_path / "d", ["a", "b", "c"], garbage={1: 4, 2: 1})
    task = ClassificationTask.__new__(ClassificationTask)
    task.info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    task.val_set = ReadableImages(open_dataset(str(root), "val", is_training=False))
    task.train_set, task.train_indices, task.unreadable_classes = None, None, []
    from timm.data import create_transform

    from open_fastervit.train.loader import LoaderOptions, build_eval_loader

    loader = build_eval_loader(task.val_set, create_transform(32), 3, LoaderOptions(workers=0),
                               collate_fn=readable_collate)
    metrics = task.evaluate(Colour(), loader, torch.device("cpu"), None)
    assert metrics["count"] == 7 and metrics["val_skipped"] == 5 and metrics["top1"] == 100.0
    assert "7 val images" in task.describe_metrics(metrics)[0]


# ---- 4: the weights' class names against the dataset's folders ------------------------------------------------------


def test_validate_maps_classes_by_name(tmp_path):
    model = Colour(class_names=WNIDS)  # trained on wnid folders: goldfish red, koala green, king penguin blue
    by_wnid = run_validate(model, image_folder(tmp_path / "wnid", WNIDS))
    assert (by_wnid["top1"], by_wnid["label_mapping"]) == (100.0, "by index")
    # the same images in folders named by the lemma sort as goldfish, king_penguin, koala
    lemmas = [LEMMAS[w] for w in WNIDS]
    root = tmp_path / "lemma"
    for target, name in enumerate(lemmas):
        (root / "val" / name).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), COLOURS[target]).save(root / "val" / name / f"{i}.png")
    named = run_validate(model, root)
    assert (named["top1"], named["label_mapping"]) == (100.0, "by name")
    forced = run_validate(model, root, by_index=True)  # king_penguin (blue) read as index 1 (koala) and so on
    assert forced["top1"] == pytest.approx(100 / 3) and forced["label_mapping"] == "by index"


def test_class_name_map_exact_partial_and_unmatched():
    class Fake:
        def __init__(self, folders):
            self.reader = type("R", (), {"class_to_idx": {f: i for i, f in enumerate(folders)}})()

    assert class_name_map(["cat", "dog"], Fake(["cat", "dog"])) is None
    assert class_name_map(["dog", "cat", "fox"], Fake(["cat", "dog"])) == {0: 1, 1: 0}  # a subset, by name
    expected = r"1 of the dataset's 2 class folders are not among the model's class names: zebra; the model's " \
               r"classes are dog, cat, fox.*--by-index"
    with pytest.raises(ClassNameMismatch, match=expected):
        class_name_map(["dog", "cat", "fox"], Fake(["cat", "zebra"]))


def test_cli_stops_on_unmatched_folders(tmp_path, capsys):
    from open_fastervit import save_weights
    from open_fastervit.loading import load_model

    model = load_model("resnet18", pretrained=False, num_classes=3)
    save_weights(model, tmp_path / "r.safetensors", metadata={"class_names": ["a", "b", "c"]})
    root = image_folder(tmp_path / "d", ["a", "b", "zebra"], per_class=1)
    argv = [str(root), "--checkpoint", str(tmp_path / "r.safetensors"), "--img-size", "32", "--workers", "0"]
    assert validate_main(argv) == 1
    err = capsys.readouterr().err
    assert "1 of the dataset's 3 class folders are not among the model's class names: zebra" in err
    assert "the model's classes are a, b, c" in err
    assert validate_main(argv + ["--by-index"]) == 0
    assert "classes by index" in capsys.readouterr().out


# ---- 8: options name themselves -------------------------------------------------------------------------------------


@pytest.mark.parametrize("parser, argv, message", [
    (validate_parser, ["d", "--batch-size", "0"], "argument --batch-size/-b: must be >= 1, got 0"),
    (validate_parser, ["d", "--workers", "-1"], "argument --workers/-j: must be >= 0, got -1"),
    (predict_parser, ["x.jpg", "--topk", "0"], "argument --topk/-k: must be >= 1, got 0"),
    (predict_parser, ["x.jpg", "--batch-size", "0"], "argument --batch-size/-b: must be >= 1, got 0"),
    (demo_parser, ["--epochs", "0"], "argument --epochs: must be >= 1, got 0"),
    (demo_parser, ["--workers", "-2"], "argument --workers/-j: must be >= 0, got -2"),
    (demo_parser, ["--minutes", "0"], "argument --minutes: must be > 0, got 0"),
])
def test_cli_options_reject_bad_counts(parser, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parser().parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_dense_evaluate_rejects_negative_workers(capsys):
    with pytest.raises(SystemExit):
        _dense.dense_main("detect", ["evaluate", "run", "--data", "d", "--workers", "-1"])
    assert "argument --workers: must be >= 0, got -1" in capsys.readouterr().err


def test_validate_api_rejects_bad_counts(tmp_path):
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        validate(Colour(), tmp_path, batch_size=0)
    with pytest.raises(ValueError, match="workers must be >= 0, got -1"):
        validate(Colour(), tmp_path, workers=-1)


# ---- 9: duplicates in COCO json; a class with no readable training image -----------------------------------------


def _coco(tmp_path: Path, images: list[dict], annotations: list[dict]) -> Path:
    (tmp_path / "images").mkdir(exist_ok=True)
    for info in images:
        Image.new("RGB", (20, 20)).save(tmp_path / "images" / info["file_name"])
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations,
                               "categories": [{"id": 1, "name": "tree"}]}))
    return ann


def _box(ann_id: int, image_id: int) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": 1, "bbox": [2, 2, 5, 5], "area": 25, "iscrowd": 0}


@pytest.mark.parametrize("images, annotations, message", [
    ([{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}], [_box(1, 1)],
     r"1 image id\(s\) listed more than once: 1 \(each must be listed once\)"),
    ([{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "a.png"}], [_box(1, 1)],
     r"1 image file_name\(s\) listed more than once: a.png"),
    ([{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}], [_box(7, 1), _box(7, 2)],
     r"1 annotation id\(s\) listed more than once: 7"),
])
def test_coco_duplicates_are_refused(tmp_path, images, annotations, message):
    ann = _coco(tmp_path, images, annotations)
    with pytest.raises(DatasetError, match=message):
        CocoDetection(tmp_path / "images", ann)


def test_coco_unknown_images_and_categories_are_dropped_and_reported(tmp_path):
    ann = _coco(tmp_path, [{"id": 1, "file_name": "a.png"}],
                [_box(1, 1), _box(2, 9), {**_box(3, 1), "category_id": 5}])
    dataset = CocoDetection(tmp_path / "images", ann)
    assert len(dataset) == 1 and len(dataset[0][1]["boxes"]) == 1
    problems = " ".join(dataset.problems)
    assert "1 annotation(s) of unknown images dropped" in problems
    assert "1 annotation(s) of unknown categories dropped" in problems


def test_class_with_no_readable_training_image_is_named(tmp_path):
    root = tmp_path / "d"
    image_folder(root, ["a", "b", "c"], per_class=2, garbage={1: 2, 2: 1})
    (root / "val").rename(root / "train")
    train_set = open_dataset(str(root), "train", is_training=True)
    for index in range(len(train_set)):
        train_set[index]  # an epoch: unreadable files are flagged (and replaced, for training)
    assert classes_without_readable_images(train_set) == ["b"]
    assert classes_without_readable_images(train_set, indices=[0, 1, 2]) == ["b"]  # b/0.png, b/1.png: both bad
    assert classes_without_readable_images(train_set, indices=[0, 4, 5]) == []  # c has one readable image


# ---- 12, RunExistsError, progress bars ------------------------------------------------------------------------------


def test_python_m_train_says_which_command_trains(tmp_path, monkeypatch, capsys):
    """``python -m open_fastervit.train`` (run here as ``-m`` runs it) under torchrun's environment."""
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(sys, "argv", ["open_fastervit.train", "--data", str(tmp_path), "--epochs", "1"])
    with pytest.raises(SystemExit) as info:
        runpy.run_module("open_fastervit.train", run_name="__main__", alter_sys=True)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "nothing was trained" in err
    assert f"torchrun --nproc_per_node 2 -m open_fastervit.cli train --data {tmp_path} --epochs 1" in err
    assert f"fastervit train --data {tmp_path} --epochs 1" in err
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as info:
        runpy.run_module("open_fastervit.train", run_name="__main__", alter_sys=True)
    assert info.value.code == 2 and capsys.readouterr().err == ""  # one message per torchrun, from rank 0


def test_run_exists_error_names_python_and_cli(tmp_path):
    from open_fastervit.train.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "last.pt", {"progress": {"epoch": 1, "step_in_epoch": 0}})
    cfg = type("Cfg", (), {"output": str(tmp_path), "resume": None, "overwrite": False})()
    with pytest.raises(RunExistsError) as info:
        check_output(cfg)
    text = str(info.value)
    assert f"resume={str(tmp_path)!r} (command line: --resume {tmp_path})" in text
    assert "overwrite=True (--overwrite)" in text
