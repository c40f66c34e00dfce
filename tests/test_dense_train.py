"""Detection and segmentation training on the shared trainer: real data, outputs, resume, CLI, clear failures.

Small configurations (a tiny FasterViT, small inputs) so the whole file runs in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file

from open_fastervit.cli import main as cli_main
from open_fastervit.data import DatasetError
from open_fastervit.paths import data_path
from open_fastervit.serialization import CheckpointError
from open_fastervit.tasks.detection.train import DetectionConfig, evaluate_detector, load_detector, train_detector
from open_fastervit.tasks.segmentation.train import SegmentationConfig, load_segmenter, train_segmenter

REPO = Path(__file__).resolve().parent.parent
ARCH = {k: v for k, v in TINY.items() if k not in ("num_classes", "drop_path_rate", "layer_scale",
                                                     "do_propagation")}
TREES = data_path("trees-neon")
NUCLEI = data_path("nuclei-dsb2018")
QUIET = dict(workers=0, progress=False, tensorboard=False, threads=2, seed=0)


def _two_tile_coco(tmp_path: Path) -> Path:
    """A COCO root whose train and val splits are the same two trees-neon tiles (for an overfit test)."""
    source = json.loads((TREES / "annotations" / "instances_train.json").read_text())
    images = source["images"][:2]
    ids = {im["id"] for im in images}
    subset = {"images": images, "categories": source["categories"],
              "annotations": [a for a in source["annotations"] if a["image_id"] in ids]}
    root = tmp_path / "two_tiles"
    (root / "annotations").mkdir(parents=True)
    for split in ("train", "val"):
        (root / split).mkdir()
        for im in images:
            (root / split / im["file_name"]).symlink_to(TREES / "train" / im["file_name"])
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(subset))
    return root


@pytest.fixture(scope="module")
def detection_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("detect")
    cfg = DetectionConfig(kind="faster_rcnn", data=str(TREES), model_kwargs=ARCH, min_size=[128, 160], max_size=160,
                          anchor_sizes=[8, 16, 32, 64, 128], fpn_channels=32, box_head_channels=64, rois_per_image=64,
                          epochs=2, batch_size=2, train_images=8, lr=1e-3, output=str(out), checkpoint_steps=2,
                          **QUIET)
    return cfg, train_detector(cfg)


def test_detection_run_writes_every_output(detection_run):
    cfg, result = detection_run
    out = Path(cfg.output)
    for name in ("best.safetensors", "last.safetensors", "last.pt", "summary.csv", "curves.png", "results.json",
                 "config.json"):
        assert (out / name).is_file(), name
    assert result["task"] == "detection" and result["metric"] == "bbox_mAP"
    assert result["global_step"] == 2 * (8 // 2)
    assert 0.0 <= result["best_bbox_mAP"] <= 1.0
    assert result["final"]["bbox_mAP50"] >= 0.0 and "train_loss" in result["final"]
    columns = (out / "summary.csv").read_text().splitlines()[0].split(",")
    assert {"bbox_mAP", "bbox_mAP50", "bbox_mAP75", "train_loss"} <= set(columns)


def test_detection_weights_rebuild_and_reproduce_the_logged_map(detection_run):
    cfg, result = detection_run
    model = load_detector(cfg.output)  # the run folder: best.safetensors
    assert model.class_names == ["tree"] and model.build_config["kind"] == "faster_rcnn"
    metrics = evaluate_detector(cfg.output, TREES, "val")
    best_row = result_history(Path(cfg.output))[result["best_epoch"] - 1]  # best.safetensors is that epoch's
    assert metrics["bbox"]["mAP"] == pytest.approx(best_row["bbox_mAP"], abs=1e-6)
    plain = evaluate_detector(cfg.output, TREES, "val", fuse=False)  # the inference form changes nothing
    assert plain["bbox"]["mAP50"] == pytest.approx(metrics["bbox"]["mAP50"], abs=2e-3)


def test_detect_cli_evaluate_json_and_predict(detection_run, tmp_path, capsys):
    cfg, _ = detection_run
    target = tmp_path / "eval.json"
    assert cli_main(["detect", "evaluate", cfg.output, "--data", str(TREES), "--json", str(target)]) == 0
    written = json.loads(target.read_text())
    assert set(written) == {"bbox"} and {"mAP", "mAP50", "mAP75"} <= set(written["bbox"])
    pred = tmp_path / "pred"
    tiles = sorted((TREES / "val").iterdir())[:2]
    assert cli_main(["detect", "predict", cfg.output, *map(str, tiles), "--output", str(pred),
                     "--score-threshold", "0.0"]) == 0
    assert sorted(p.name for p in pred.glob("*.png")) == sorted(t.stem + ".png" for t in tiles)
    results = json.loads((pred / "detections.json").read_text())
    assert results and {"image_id", "category_id", "bbox", "score", "file_name"} <= set(results[0])


def test_detection_resume_continues_to_the_same_weights(detection_run, tmp_path):
    """A run killed right after its first mid-epoch step checkpoint (as by SIGKILL: nothing after the write runs)
    and resumed from last.pt ends with the uninterrupted run's weights, bit for bit."""
    import open_fastervit.train as train_module

    cfg, _ = detection_run
    reference = dict(cfg.__dict__, output=str(tmp_path / "ref"), deterministic=True, threads=1)
    expected_result = train_detector(DetectionConfig(**reference))
    cut = dict(reference, output=str(tmp_path / "cut"))
    original = train_module.Trainer.save

    def save_then_die(self):
        original(self)
        if self.progress.step_in_epoch > 0:
            raise KeyboardInterrupt  # the process dies here

    train_module.Trainer.save = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            train_detector(DetectionConfig(**cut))
    finally:
        train_module.Trainer.save = original
    assert not (tmp_path / "cut" / "results.json").exists()
    resumed = train_detector(DetectionConfig(**dict(cut, resume=str(tmp_path / "cut" / "last.pt"))))
    assert resumed["resumed_from"] and resumed["global_step"] == expected_result["global_step"]
    expected, got = load_file(tmp_path / "ref" / "last.safetensors"), load_file(tmp_path / "cut" / "last.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)
    assert resumed["final"]["bbox_mAP"] == expected_result["final"]["bbox_mAP"]


def test_a_detector_overfits_two_tiles(tmp_path):
    """Trained and evaluated on the same two tree tiles (63 trees), Faster R-CNN reaches mAP50 > 0.5."""
    root = _two_tile_coco(tmp_path)
    cfg = DetectionConfig(kind="faster_rcnn", data=str(root), model_kwargs=ARCH, min_size=[400], max_size=400,
                          anchor_sizes=[16, 32, 64, 128, 256], fpn_channels=64, box_head_channels=128,
                          rois_per_image=128, epochs=60, batch_size=2, lr=2e-3, warmup_epochs=3, eval_every=60,
                          hflip=0.0, output=str(tmp_path / "run"), **QUIET)
    result = train_detector(cfg)
    losses = [row["train_loss"] for row in result_history(tmp_path / "run")]
    assert losses[-1] < 0.5 * losses[0]
    assert result["final"]["bbox_mAP50"] > 0.5, result["final"]


def result_history(out: Path) -> list[dict]:
    import csv

    with open(out / "summary.csv") as handle:
        return [{k: float(v) for k, v in row.items() if v not in ("", None) and k != "selected_weights"}
                for row in csv.DictReader(handle)]


def test_mask_rcnn_on_boxes_only_data_is_a_clear_error(tmp_path, caplog, capsys):
    """Reported: `fastervit detect train --data trees-neon` (default kind mask_rcnn) warned "716 annotation(s)
    without a decodable segmentation given their box as mask" and then failed for lack of masks. Expected: the
    error alone (exit 1, naming the boxes-only kinds), no box-as-mask warning before it."""
    cfg = DetectionConfig(kind="mask_rcnn", data=str(TREES), model_kwargs=ARCH, epochs=1, output=str(tmp_path),
                          **QUIET)
    with caplog.at_level("WARNING"), pytest.raises(DatasetError, match="no segmentation masks"):
        train_detector(cfg)
    assert not [r for r in caplog.records if "box as mask" in r.getMessage()]
    caplog.clear()
    assert cli_main(["detect", "train", "--data", str(TREES), "--epochs", "1", "--workers", "0", "--no-progress",
                     "--no-tensorboard", "--output", str(tmp_path / "cli")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastervit detect train: error:") and "no segmentation masks" in err
    assert "--kind faster_rcnn" in err and "box as mask" not in err
    assert not [r for r in caplog.records if "box as mask" in r.getMessage()]


def test_missing_annotations_and_wrong_task_files_are_clear_errors(tmp_path, detection_run):
    with pytest.raises(DatasetError, match="instances_train.json does not exist"):
        train_detector(DetectionConfig(data=str(tmp_path), model_kwargs=ARCH, output=str(tmp_path / "o"), **QUIET))
    cfg, _ = detection_run
    with pytest.raises(CheckpointError, match="expected a segmentation model"):
        load_segmenter(cfg.output)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a file")
    with pytest.raises(CheckpointError):
        load_detector(junk)


def test_mask_rcnn_trains_on_instance_folders():
    """Mask R-CNN on nuclei instance masks (16-bit instance PNGs): one short epoch, finite loss, box and mask AP."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        cfg = DetectionConfig(kind="mask_rcnn", data=str(NUCLEI), model_kwargs=ARCH, min_size=[128], max_size=128,
                              anchor_sizes=[8, 16, 32, 64, 128], fpn_channels=32, box_head_channels=64,
                              mask_head_channels=32, rois_per_image=64, epochs=1, batch_size=1, lr=1e-3, output=tmp,
                              **QUIET)
        result = train_detector(cfg)
        boxes_only = evaluate_detector(tmp, TREES, "val")  # a mask model on boxes-only data: box AP, no error
    assert result["global_step"] == 3
    assert {"bbox_mAP", "segm_mAP", "segm_mAP50"} <= set(result["final"])
    assert set(boxes_only) == {"bbox"}


@pytest.fixture(scope="module")
def segmentation_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("segment")
    cfg = SegmentationConfig(kind="fpn", data=str(NUCLEI), model_kwargs=ARCH, crop_size=96, batch_size=2, repeats=4,
                             epochs=3, lr=2e-3, output=str(out), **QUIET)
    return cfg, train_segmenter(cfg)


def test_segmentation_run_learns_and_writes_every_output(segmentation_run):
    cfg, result = segmentation_run
    out = Path(cfg.output)
    for name in ("best.safetensors", "last.pt", "summary.csv", "curves.png", "results.json"):
        assert (out / name).is_file(), name
    history = result_history(out)
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert result["metric"] == "mIoU" and 0 < result["best_mIoU"] <= 1
    assert {"pixel_accuracy", "IoU_background", "IoU_nucleus"} <= set(result["final"]) or \
        {"pixel_accuracy"} <= set(result["final"])


def test_segment_cli_evaluate_and_predict(segmentation_run, tmp_path):
    cfg, result = segmentation_run
    target = tmp_path / "eval.json"
    assert cli_main(["segment", "evaluate", cfg.output, "--data", str(NUCLEI), "--json", str(target)]) == 0
    written = json.loads(target.read_text())
    assert {"mIoU", "pixel_accuracy", "per_class_iou"} <= set(written) and len(written["per_class_iou"]) == 2
    assert written["mIoU"] == pytest.approx(result["best_mIoU"], abs=1e-6)  # the run folder's best.safetensors
    pred = tmp_path / "pred"
    assert cli_main(["segment", "predict", cfg.output, str(NUCLEI / "val" / "images"), "--output", str(pred)]) == 0
    names = sorted(p.name for p in pred.glob("*.png"))
    assert len(names) == 2 and any(n.endswith("_mask.png") for n in names)
    assert model_num_classes(cfg.output) == 2


def model_num_classes(path: str) -> int:
    return int(load_segmenter(path).build_config["num_classes"])


def test_segment_train_cli_bad_data_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "open_fastervit.cli", "segment", "train", "--data",
                           str(tmp_path / "nothing"), "--output", str(tmp_path / "o")], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.startswith("fastervit segment train: error:") and "Traceback" not in done.stderr


def test_unknown_dense_subcommand():
    assert cli_main(["detect", "fit"]) == 2


def test_segmentation_under_torchrun_with_two_cpu_ranks(tmp_path):
    """DDP (gloo, 2 processes): the ranks stay bit-identical, the global batch is 2 x batch, metrics are reduced."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={port}", "-m", "open_fastervit.cli", "segment", "train", "--data", str(NUCLEI),
               "--kind", "fpn", "--model-kwargs", json.dumps(ARCH), "--crop-size", "64", "--batch-size", "2",
               "--repeats", "4", "--epochs", "2", "--lr", "1e-3", "--workers", "0", "--no-progress",
               "--no-tensorboard", "--output", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["world_size"] == 2 and result["global_batch"] == 4 and result["global_step"] == 2 * (12 // 4)
    assert result["rank_divergence"] == 0.0
    assert 0 <= result["final"]["mIoU"] <= 1


@pytest.mark.parametrize("task", ["detection", "segmentation"])
def test_dense_demo_quick_runs_the_whole_pipeline(task, tmp_path):
    from open_fastervit.demos.dense import DenseDemoConfig, run_dense_demo

    facts = run_dense_demo(DenseDemoConfig(task=task, quick=True, output=str(tmp_path), workers=0, progress=False))
    for name in ("REPORT.md", "report.json", "predictions.png", "evaluate.json"):
        assert (tmp_path / name).is_file(), name
    assert facts["epochs"] == 1
    report = (tmp_path / "REPORT.md").read_text()
    assert ("mAP50" in report) if task == "detection" else ("mIoU" in report)


def _faulty_coco(tmp_path: Path) -> Path:
    """Two trees-neon tiles with a box partly outside, one outside, one degenerate, and a missing third image;
    categories with non-contiguous COCO ids (3: pine, 7: oak)."""
    from PIL import Image

    source = json.loads((TREES / "annotations" / "instances_val.json").read_text())
    images = source["images"][:2] + [{"id": 99, "file_name": "missing.jpg", "width": 400, "height": 400}]
    ids = {im["id"] for im in images}
    anns = [dict(a, category_id=3 if i % 2 else 7) for i, a in enumerate(source["annotations"]) if a["image_id"] in ids]
    first = images[0]["id"]
    anns += [dict(id=10_001, image_id=first, category_id=3, bbox=[380.0, 10.0, 40.0, 30.0], area=1200.0, iscrowd=0),
             dict(id=10_002, image_id=first, category_id=3, bbox=[450.0, 10.0, 20.0, 20.0], area=400.0, iscrowd=0),
             dict(id=10_003, image_id=first, category_id=7, bbox=[10.0, 10.0, 0.0, 20.0], area=0.0, iscrowd=0)]
    root = tmp_path / "faulty"
    (root / "annotations").mkdir(parents=True)
    (root / "val").mkdir()
    for im in images[:2]:
        Image.open(TREES / "val" / im["file_name"]).save(root / "val" / im["file_name"])
    data = {"images": images, "annotations": anns, "categories": [{"id": 3, "name": "pine"}, {"id": 7, "name": "oak"}]}
    (root / "annotations" / "instances_val.json").write_text(json.dumps(data))
    return root


def test_evaluation_scores_the_cleaned_annotations(tmp_path):
    """Boxes clipped or dropped by the dataset are scored as the dataset trains on them: its own targets as
    predictions give mAP 1.0 exactly (against the raw json, the clipped edge box would count as a miss)."""
    from open_fastervit.tasks.detection.data import CocoDetection
    from open_fastervit.tasks.detection.metrics import coco_evaluate, to_coco_results
    from open_fastervit.tasks.detection.train import ground_truth

    root = _faulty_coco(tmp_path)
    dataset = CocoDetection(root / "val", root / "annotations" / "instances_val.json")
    assert len(dataset) == 2 and any("clipped" in p for p in dataset.problems)
    outputs, ids = [], []
    for index in range(len(dataset)):
        _, target = dataset[index]
        n = len(target["labels"])
        outputs.append({"boxes": target["boxes"].as_subclass(torch.Tensor), "labels": target["labels"],
                        "scores": torch.ones(n)})
        ids.append(target["image_id"])
    results = to_coco_results(outputs, ids, dataset.label_to_category)
    metrics = coco_evaluate(ground_truth(dataset), results, image_ids=dataset.image_ids)
    assert metrics["bbox"]["mAP"] == pytest.approx(1.0)


def test_an_unreadable_image_is_left_out_of_evaluation_not_counted_twice():
    """The dataset replaces an unreadable image by its neighbour; evaluation drops the repeat."""
    from open_fastervit.tasks.detection.train import detect_dataset

    class Echo(torch.nn.Module):
        def forward(self, images):
            return [{"boxes": torch.tensor([[0.0, 0.0, 10.0, 10.0]]), "labels": torch.tensor([1]),
                     "scores": torch.tensor([0.9])} for _ in images]

    image = torch.zeros(3, 16, 16)
    loader = [([image], [{"image_id": 3}]), ([image], [{"image_id": 3}]), ([image, image], [{"image_id": 3},
                                                                                            {"image_id": 4}])]
    results, seen = detect_dataset(Echo(), loader, torch.device("cpu"), {1: 1}, masks=False)
    assert seen == [3, 4] and [r["image_id"] for r in results] == [3, 4]


def test_predict_writes_coco_category_ids_and_never_overwrites(tmp_path):
    from open_fastervit.tasks.detection.train import predict_detector

    root = _faulty_coco(tmp_path)
    for split in ("train",):
        (root / split).symlink_to(root / "val")
        (root / "annotations" / f"instances_{split}.json").symlink_to(root / "annotations" / "instances_val.json")
    cfg = DetectionConfig(kind="retinanet", data=str(root), model_kwargs=ARCH, min_size=[96], max_size=96,
                          fpn_channels=32, epochs=1, batch_size=2, lr=1e-3, output=str(tmp_path / "run"), **QUIET)
    train_detector(cfg)
    from PIL import Image

    inputs = tmp_path / "inputs"
    (inputs / "sub").mkdir(parents=True)
    tile = next((root / "val").iterdir())
    for target in (inputs / "tile.jpg", inputs / "sub" / "tile.jpg", inputs / "tile.png"):
        Image.open(tile).save(target)
    Image.new("RGB", (20, 20)).save(inputs / "small.png")
    summary = predict_detector(tmp_path / "run", [inputs], tmp_path / "pred", score_threshold=0.0)
    assert sorted(p.name for p in (tmp_path / "pred").glob("*.png")) == [
        "small.png", "tile.png", "tile_2.png"]  # the folder's own images; detection resizes small ones itself
    results = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert results and {r["category_id"] for r in results} <= {3, 7}
    assert {r["category_name"] for r in results} <= {"pine", "oak"} and summary["images"] == 3
    deep = predict_detector(tmp_path / "run", [inputs], tmp_path / "deep", score_threshold=0.0, recursive=True)
    written = sorted(p.relative_to(tmp_path / "deep").as_posix() for p in (tmp_path / "deep").rglob("*.png"))
    assert written == ["small.png", "sub/tile.png", "tile.png", "tile_2.png"] and deep["images"] == 4


def test_dense_recipes_load_into_their_configs_only():
    """The paper's dense settings as recipes, scaled to the user's batch; a recipe of another task is refused."""
    from open_fastervit.cli.train import build_parser, config_from_args
    from open_fastervit.recipes import list_recipes

    assert list_recipes("detection") == ["mask_rcnn_3x_coco"]
    assert list_recipes("segmentation") == ["upernet_ade20k_160k"]
    det = config_from_args(["--recipe", "mask_rcnn_3x_coco"], DetectionConfig, build_parser(DetectionConfig))
    assert (det.kind, det.lr_base, det.lr_base_size, det.weight_decay, det.epochs) == ("mask_rcnn", 1e-4, 16, 0.05, 36)
    assert det.min_size[0] == 480 and det.min_size[-1] == 800 and det.decay_milestones == [27, 33]
    seg = config_from_args(["--recipe", "upernet_ade20k_160k"], SegmentationConfig, build_parser(SegmentationConfig))
    assert (seg.kind, seg.lr_base, seg.weight_decay, seg.crop_size, seg.sched) == ("upernet", 6e-5, 0.01, 512, "poly")
    assert seg.decay_rate == 1.0  # timm's poly power: the paper's power 1 (timm's default 0.1 was used before)
    assert (seg.num_classes, seg.reduce_zero_label, det.num_classes) == (None, False, None)  # the data's, not set
    with pytest.raises(ValueError, match="detection recipe"):
        config_from_args(["--recipe", "mask_rcnn_3x_coco"])


def test_upernet_recipe_sets_the_aux_head_and_a_run_trains_and_saves_it(tmp_path):
    """The ADE20K recipe trains with the auxiliary FCN head (weight 0.4); other runs do not unless
    --aux-loss-weight asks; a run with it saves the head, and the loaded model evaluates without it."""
    from open_fastervit.cli.train import build_parser, config_from_args

    parser = build_parser(SegmentationConfig)
    assert "--aux-loss-weight" in parser.format_help()
    assert config_from_args(["--recipe", "upernet_ade20k_160k"], SegmentationConfig, parser).aux_loss_weight == 0.4
    assert config_from_args(["--recipe", "upernet_ade20k_160k", "--aux-loss-weight", "0"], SegmentationConfig,
                            build_parser(SegmentationConfig)).aux_loss_weight == 0.0
    assert SegmentationConfig().aux_loss_weight == 0.0
    with pytest.raises(ValueError, match="aux_loss_weight must be >= 0"):
        train_segmenter(SegmentationConfig(data=str(NUCLEI), aux_loss_weight=-0.4, output=str(tmp_path / "bad")))
    cfg = SegmentationConfig(kind="upernet", data=str(NUCLEI), model_kwargs=ARCH, decoder_channels=32, crop_size=64,
                             batch_size=2, epochs=1, lr=1e-3, aux_loss_weight=0.4, output=str(tmp_path / "run"),
                             **QUIET)
    result = train_segmenter(cfg)
    assert result["build_config"]["aux_head"] is True and 0 <= result["final"]["mIoU"] <= 1
    model = load_segmenter(cfg.output)
    saved = load_file(str(Path(cfg.output) / "best.safetensors"))
    assert model.aux_head is not None and torch.equal(model.state_dict()["aux_head.0.weight"],
                                                      saved["aux_head.0.weight"])


# ---- reported faults: recipes hold no dataset settings, predict exit codes and recursion, strict JSON ----------


def _strict_json(text: str) -> object:
    """``json.loads`` that refuses NaN / Infinity (what JavaScript's ``JSON.parse`` and strict parsers do)."""
    def refuse(constant: str) -> None:
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


@pytest.fixture(scope="module")
def ade_recipe_on_nuclei(tmp_path_factory):
    """The reported command, scaled down: `fastervit segment train --data nuclei-dsb2018 --recipe
    upernet_ade20k_160k --epochs 1` (a tiny backbone, 64 px crops); its stdout, output folder and result."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("ade_recipe_on_nuclei")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli_main(["segment", "train", "--data", str(NUCLEI), "--recipe", "upernet_ade20k_160k", "--epochs", "1",
                         "--crop-size", "64", "--model-kwargs", json.dumps(ARCH), "--decoder-channels", "32",
                         "--workers", "0", "--threads", "2", "--no-progress", "--no-tensorboard", "--output", str(out)])
    assert code == 0
    return out, stdout.getvalue()


def test_the_ade20k_recipe_on_nuclei_trains_the_datas_two_classes(ade_recipe_on_nuclei):
    """Reported: the recipe set num_classes 150 and reduce_zero_label true, so the nuclei background was ignored
    (mIoU 0.0000, pixel accuracy 0). Expected: the classes of the data, as without a recipe: 2 classes, labels
    kept (reduce_zero_label false), both recorded in config.json; the model has 2 outputs; the background counts."""
    out, _ = ade_recipe_on_nuclei
    config = _strict_json((out / "config.json").read_text())
    assert config["num_classes"] == 2 and config["reduce_zero_label"] is False
    assert config["kind"] == "upernet" and config["sched"] == "poly" and config["decay_rate"] == 1.0  # the recipe's
    result = _strict_json((out / "results.json").read_text())
    assert result["build_config"]["num_classes"] == 2 and model_num_classes(str(out)) == 2
    assert result["auto_settings"]["num_classes"]["value"] == 2
    assert {"IoU_class_0", "IoU_class_1"} <= set(result["final"]) and result["final"]["pixel_accuracy"] > 0


def test_dense_run_json_is_strict(ade_recipe_on_nuclei, tmp_path):
    """Reported: the run's JSON summary held a bare NaN (best_ema_mIoU, a run without EMA). Expected: every JSON a
    dense run writes or prints parses strictly, the missing EMA score as null."""
    from open_fastervit.train.reporting import write_json

    out, stdout = ade_recipe_on_nuclei
    printed = _strict_json(stdout)
    assert printed["best_ema_mIoU"] is None and printed["best_raw_mIoU"] == printed["best_mIoU"]
    assert _strict_json((out / "results.json").read_text())["best_ema_mIoU"] is None
    target = tmp_path / "eval.json"
    assert cli_main(["segment", "evaluate", str(out), "--data", str(NUCLEI), "--json", str(target)]) == 0
    assert set(_strict_json(target.read_text())["per_class_iou"]) == {"class_0", "class_1"}
    assert cli_main(["segment", "predict", str(out), str(NUCLEI / "val" / "images"), "-o", str(tmp_path / "p")]) == 0
    assert len(_strict_json((tmp_path / "p" / "predictions.json").read_text())) == 1
    written = write_json(tmp_path / "nan.json", {"mIoU": float("nan"), "per_class": [float("inf"), 0.5]})
    assert _strict_json(written.read_text()) == {"mIoU": None, "per_class": [None, 0.5]}


def test_no_recipe_sets_a_dataset_key(tmp_path, capsys):
    """Recipes are optimisation schedules: no shipped recipe file (bases included) sets a dataset key (data,
    splits, folders, annotation files, num_classes, reduce_zero_label, ignore_index...), and a recipe file that does
    is refused, naming the option to pass instead."""
    import yaml

    from open_fastervit.recipes import DATASET_KEYS, RECIPE_DIR, load_recipe

    assert {"data", "train_split", "val_split", "images", "masks", "train_ann", "val_ann", "num_classes",
            "reduce_zero_label", "ignore_index"} <= set(DATASET_KEYS)
    files = sorted(RECIPE_DIR.glob("*.yaml"))
    assert len(files) >= 14
    for path in files:
        assert not set(yaml.safe_load(path.read_text())) & set(DATASET_KEYS), path.name
    own = tmp_path / "my_ade.yaml"
    own.write_text("task: segmentation\nbase: " + str(RECIPE_DIR / "upernet_ade20k_160k.yaml") +
                   "\nnum_classes: 150\nreduce_zero_label: true\n")
    with pytest.raises(ValueError, match=r"dataset keys \['num_classes', 'reduce_zero_label'\].*--num-classes"):
        load_recipe(str(own))
    assert cli_main(["segment", "train", "--recipe", str(own), "--data", str(NUCLEI), "--output",
                     str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fastervit segment train: error: recipe") and "--reduce-zero-label" in err


def test_an_explicit_num_classes_is_checked_against_the_masks(tmp_path, capsys):
    """--num-classes that disagrees with the labels: fewer classes than the masks hold is an error (all pairs
    left out: the folder's error says why; some: the trainer's), more is a warning naming the unused classes."""
    import numpy as np
    from PIL import Image

    base = dict(kind="fpn", model_kwargs=ARCH, crop_size=64, batch_size=2, epochs=1, lr=1e-3, **QUIET)
    with pytest.raises(DatasetError, match=r"labels up to 1 \(2 classes\) but num_classes is 1"):
        train_segmenter(SegmentationConfig(data=str(NUCLEI), num_classes=1, output=str(tmp_path / "one"), **base))
    mixed = tmp_path / "mixed"
    for folder in ("images", "masks"):
        (mixed / "train" / folder).mkdir(parents=True)
    for name, top in (("a", 1), ("b", 1), ("c", 2)):
        Image.fromarray(np.full((40, 40, 3), 100, np.uint8)).save(mixed / "train" / "images" / f"{name}.png")
        labels = np.zeros((40, 40), np.uint8)
        labels[10:20, 10:20] = top
        Image.fromarray(labels).save(mixed / "train" / "masks" / f"{name}.png")
    with pytest.raises(ValueError, match=r"num_classes=2 but the 'train' masks hold labels up to 2 \(3 classes.*"
                                         r"1 pair\(s\) would be left out; leave --num-classes out to infer 3"):
        train_segmenter(SegmentationConfig(data=str(mixed), val_split="", num_classes=2,
                                           output=str(tmp_path / "two"), **base))
    capsys.readouterr()
    result = train_segmenter(SegmentationConfig(data=str(NUCLEI), num_classes=3, output=str(tmp_path / "three"),
                                                **base))
    err = capsys.readouterr().err
    assert "warning: num_classes=3 but the 'train' masks hold labels 0..1 only (2 classes" in err
    assert "classes 2..2 never occur" in err and result["build_config"]["num_classes"] == 3
    assert json.loads((tmp_path / "three" / "config.json").read_text())["num_classes"] == 3


def test_each_task_has_its_own_schedule_help():
    """Reported: `segment train --help` described --epochs with detection's 3x schedule and --min-lr as "of the
    cosine" though the ADE20K recipe uses poly. Expected: each task's own words."""
    from open_fastervit.cli.train import build_parser

    def option_help(config_cls: type, name: str) -> str:
        parser = build_parser(config_cls)
        action = next(a for a in parser._actions if f"--{name}" in a.option_strings)
        return action.help

    assert "ADE20K recipe: 127" in option_help(SegmentationConfig, "epochs")
    assert "3x" not in option_help(SegmentationConfig, "epochs")
    assert "poly" in option_help(SegmentationConfig, "min-lr") and "of the cosine" not in option_help(
        SegmentationConfig, "min-lr")
    assert "poly: the power" in option_help(SegmentationConfig, "decay-rate")
    assert "the paper's 3x schedule: 36" in option_help(DetectionConfig, "epochs")
    assert "multistep" in option_help(DetectionConfig, "min-lr")
    for config_cls in (SegmentationConfig, DetectionConfig):
        assert "20 of 300" not in option_help(config_cls, "warmup-epochs")  # classification's paper
        assert "never" in option_help(config_cls, "num-classes")  # inferred, not from a recipe


def test_dense_predict_exit_codes_and_one_line_per_skip(ade_recipe_on_nuclei, detection_run, tmp_path, capsys):
    """Reported: `segment predict` / `detect predict` exited 0 with "0 image(s)" when every input was skipped, and
    printed each skip twice with the path doubled. Expected: exit 1 when no image was processed, exit 0 with the
    skipped count otherwise; each skip on one stderr line naming its path once."""
    segment_run, _ = ade_recipe_on_nuclei
    detect_run = detection_run[0].output
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png")
    (bad / "b.jpg").write_text("not a jpeg")
    good = sorted((NUCLEI / "val" / "images").iterdir())[0]
    for command, run in (("segment", segment_run), ("detect", detect_run)):
        assert cli_main([command, "predict", str(run), str(bad), "-o", str(tmp_path / command / "none")]) == 1
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert lines[-1] == f"fastervit {command} predict: error: no image could be processed (2 skipped)"
        skips = [line for line in lines if "skipped" in line and "error" not in line]
        assert len(skips) == 2 and out == ""
        for line, name in zip(skips, ("a.png", "b.jpg")):
            assert line.startswith(f"fastervit {command} predict: skipped {bad / name}: ")
            assert line.count(str(bad / name)) == 1
        assert cli_main([command, "predict", str(run), str(bad), str(good), "-o", str(tmp_path / command / "some")]) \
            == 0
        out, err = capsys.readouterr()
        assert out.startswith("1 image(s)") and out.strip().endswith("; 2 image(s) skipped")
        assert err.count("skipped") == 2


def test_dense_predict_recursion_is_opt_in_and_mirrors_sub_folders(ade_recipe_on_nuclei, tmp_path, capsys):
    """Reported: `segment predict RUN nuclei-dsb2018` recursed into the dataset and segmented its mask PNGs as
    photos, writing flattened renamed outputs (..._2_mask.png). Expected: a folder's own images only (the dataset
    root has none: exit 1 saying sub-folders need --recursive); with --recursive the outputs mirror the input's
    sub-folders, names kept when they only collide across folders."""
    run, _ = ade_recipe_on_nuclei
    assert cli_main(["segment", "predict", str(run), str(NUCLEI), "-o", str(tmp_path / "root")]) == 1
    err = capsys.readouterr().err
    assert "no image files" in err and "without --recursive" in err and not (tmp_path / "root").exists()
    photos = tmp_path / "photos"
    image = sorted((NUCLEI / "val" / "images").iterdir())[0]
    for rel in ("x.png", "a/x.png", "b/x.png"):
        (photos / rel).parent.mkdir(parents=True, exist_ok=True)
        (photos / rel).write_bytes(image.read_bytes())
    assert cli_main(["segment", "predict", str(run), str(photos), "-o", str(tmp_path / "flat")]) == 0
    flat = sorted(p.relative_to(tmp_path / "flat").as_posix() for p in (tmp_path / "flat").rglob("*.png"))
    assert flat == ["x_mask.png", "x_overlay.png"]
    assert cli_main(["segment", "predict", str(run), str(photos), "--recursive", "-o", str(tmp_path / "deep")]) == 0
    deep = sorted(p.relative_to(tmp_path / "deep").as_posix() for p in (tmp_path / "deep").rglob("*.png"))
    assert deep == ["a/x_mask.png", "a/x_overlay.png", "b/x_mask.png", "b/x_overlay.png", "x_mask.png",
                    "x_overlay.png"]
    records = json.loads((tmp_path / "deep" / "predictions.json").read_text())
    assert [Path(r["mask"]).relative_to(tmp_path / "deep").as_posix() for r in records] == [
        "a/x_mask.png", "b/x_mask.png", "x_mask.png"]  # sorted by path relative to the folder given


@pytest.mark.parametrize("command, module, function", [
    ("detect", "open_fastervit.cli._dense", "train"),
    ("segment", "open_fastervit.cli._dense", "train"),
])
def test_ctrl_c_in_dense_training_prints_the_resume_line_and_exits_130(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, tmp_path: Path, command: str, module: str,
    function: str,
) -> None:
    """Ctrl-C during `fastervit detect|segment train`: one line naming the checkpoint and the --resume command, exit
    130, no traceback (the same handling as `fastervit train`)."""
    from open_fastervit.train import TrainingInterrupted

    run = str(tmp_path / "run")

    def interrupted(cfg):  # noqa: ANN001, ANN202
        raise TrainingInterrupted(run, 2, 5, 21, f"{run}/last.pt")

    monkeypatch.setattr(f"{module}.{function}", interrupted)
    data = "trees-neon" if command == "detect" else "nuclei-dsb2018"
    code = cli_main([command, "train", "--data", str(data_path(data)), "--output", run])
    err = capsys.readouterr().err
    assert code == 130
    assert "Traceback" not in err
    line = [x for x in err.splitlines() if x.startswith(f"fastervit {command} train: ")]
    assert len(line) == 1 and f"{run}/last.pt" in line[0] and f"--resume {run}" in line[0]
