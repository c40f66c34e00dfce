"""Detection: torchvision detectors on a tiny FasterViT + FPN, COCO datasets and transforms, COCO metrics."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torch.utils.data import DataLoader
from torchvision import tv_tensors

import open_fastervit.tasks.detection as detection
from open_fastervit.backbone import create_backbone
from open_fastervit.data import DatasetError
from open_fastervit.paths import data_path
from open_fastervit.tasks.detection import (
    CocoDetection,
    InstanceMaskFolder,
    build_detector,
    coco_evaluate,
    collate_detection,
    detector_backbone,
    detector_from_config,
    detector_param_groups,
    draw_detections,
    eval_transforms,
    instance_folder_to_coco,
    instances_from_label_image,
    save_png,
    to_coco_results,
    train_transforms,
)

TINY_ARCH = dict(dim=16, in_dim=8, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), window_size=(7, 7, 3, 3),
                 drop_path_rate=0.0)
#: Small heads and sizes so that one training step takes about a second on one thread.
SMALL = dict(min_size=(96, 128), max_size=192, fpn_channels=32)
KIND_KWARGS = {
    "mask_rcnn": dict(box_head_channels=64, mask_head_channels=16),
    "faster_rcnn": dict(box_head_channels=64),
    "retinanet": dict(score_thresh=0.0),  # untrained heads score ~0.01: keep every candidate to check boxes
    "fcos": dict(score_thresh=0.0),
}


def tiny_detector(kind: str, num_classes: int = 2, frozen_stages: int = 1, **kwargs) -> torch.nn.Module:
    options = {**SMALL, **KIND_KWARGS[kind], **kwargs}
    return build_detector(kind, "fastervit_0", num_classes,
                          backbone_kwargs=dict(model_kwargs=TINY_ARCH, frozen_stages=frozen_stages), **options)


def synthetic_batch(with_masks: bool) -> tuple[list[torch.Tensor], list[dict]]:
    """Two images of different sizes with 1 and 2 objects (labels in 1..2)."""
    images = [torch.rand(3, 120, 160), torch.rand(3, 150, 130)]
    boxes = [torch.tensor([[10.0, 12.0, 70.0, 60.0]]),
             torch.tensor([[20.0, 30.0, 100.0, 90.0], [5.0, 5.0, 40.0, 45.0]])]
    targets = []
    for image, box, labels in zip(images, boxes, (torch.tensor([1]), torch.tensor([2, 1]))):
        target = {"boxes": box, "labels": labels}
        if with_masks:
            masks = torch.zeros(len(box), *image.shape[-2:], dtype=torch.uint8)
            for k, (x1, y1, x2, y2) in enumerate(box.int().tolist()):
                masks[k, y1:y2, x1:x2] = 1
            target["masks"] = masks
        targets.append(target)
    return images, targets


# ---- models --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mask_rcnn", "faster_rcnn", "retinanet", "fcos"])
def test_detector_trains_and_predicts(kind):
    model = tiny_detector(kind)
    body = detector_backbone(model)
    assert body is model.backbone.body and model.backbone.out_channels == 32
    images, targets = synthetic_batch(with_masks=kind == "mask_rcnn")
    losses = model(images, targets)
    expected = {"mask_rcnn": {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"},
                "faster_rcnn": {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"},
                "retinanet": {"classification", "bbox_regression"},
                "fcos": {"classification", "bbox_regression", "bbox_ctrness"}}[kind]
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    # frozen_stages=1: the stem and stage 0 get no gradient; every later stage does
    for module in (body.stem, body.stages[0]):
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())
    for i in range(1, 4):
        grads = [p.grad for p in body.stages[i].parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), f"no gradient in stage {i}"

    model.eval()
    with torch.no_grad():
        (output,) = model([torch.rand(3, 200, 300)])  # non-square, not a multiple of 32
    boxes = output["boxes"]
    assert len(boxes) > 0 and boxes.shape[1] == 4
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
    assert (boxes[:, 2] <= 300).all() and (boxes[:, 3] <= 200).all()
    assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
    assert output["labels"].dtype == torch.int64 and output["labels"].max() <= 2
    assert output["scores"].shape == (len(boxes),)
    if kind == "mask_rcnn":
        assert output["masks"].shape == (len(boxes), 1, 200, 300)


def test_detector_configuration():
    model = tiny_detector("mask_rcnn", num_classes=3)
    # the heads count the background: 3 object classes -> 4 outputs
    assert model.roi_heads.box_predictor.cls_score.out_features == 4
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 4
    assert model.backbone.level_names == ["0", "1", "2", "3", "pool"]
    assert model.backbone.level_strides == [4, 8, 16, 32, 64]
    assert model.rpn.anchor_generator.num_anchors_per_location() == [3] * 5
    # images in [0, 1], normalised with the backbone's ImageNet statistics; multi-scale min_size kept
    assert model.transform.image_mean == [0.485, 0.456, 0.406]
    assert model.transform.image_std == [0.229, 0.224, 0.225]
    assert tuple(model.transform.min_size) == (96, 128)

    retina = tiny_detector("retinanet")
    assert retina.backbone.level_names == ["0", "1", "2", "p6", "p7"]
    assert retina.backbone.level_strides == [8, 16, 32, 64, 128]
    assert retina.anchor_generator.num_anchors_per_location() == [9] * 5
    assert detector_backbone(retina).out_indices == (1, 2, 3)
    fcos = tiny_detector("fcos")
    assert fcos.anchor_generator.num_anchors_per_location() == [1] * 5


def test_detector_rebuilds_from_config():
    model = tiny_detector("mask_rcnn")
    config = json.loads(json.dumps(model.build_config))  # JSON-ready
    assert config["kind"] == "mask_rcnn" and config["num_classes"] == 2 and config["min_size"] == [96, 128]
    rebuilt = detector_from_config(config)
    rebuilt.load_state_dict(model.state_dict())  # strict: the same architecture
    model.eval()
    rebuilt.eval()
    image = torch.rand(3, 100, 140)
    with torch.no_grad():
        a, b = model([image])[0], rebuilt([image])[0]
    torch.testing.assert_close(a["boxes"], b["boxes"])


def test_param_groups_cover_trainable_parameters_once():
    model = tiny_detector("faster_rcnn")
    groups = detector_param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    ids = [id(p) for g in groups for p in g["params"]]
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert len(ids) == len(set(ids)) and set(ids) == trainable
    names = dict(model.named_parameters())
    for group in groups:
        assert group["lr"] == pytest.approx(1e-3 * group["lr_scale"])
        assert all(names[n] is p for n, p in zip(group["param_names"], group["params"]))
        if group["weight_decay"] > 0:
            assert all(p.ndim > 1 for p in group["params"])
    scales = {g["lr_scale"] for g in groups if g["param_names"][0].startswith("backbone.body.")}
    assert min(scales) < 1.0 and max(scales) == pytest.approx(1.0)  # layer decay in the backbone
    head = [g for g in groups if not g["param_names"][0].startswith("backbone.body.")]
    assert {g["weight_decay"] for g in head} == {0.0, 0.05} and all(g["lr_scale"] == 1.0 for g in head)
    torch.optim.AdamW(groups)  # valid optimizer groups (the extra keys are kept by torch)


def test_detector_argument_errors():
    with pytest.raises(ValueError, match="mask_rcnn, faster_rcnn, retinanet, fcos"):
        build_detector("yolo")
    with pytest.raises(ValueError, match="num_classes"):
        build_detector("fcos", "fastervit_0", 0)
    body = create_backbone(model_kwargs=TINY_ARCH, out_indices=(2, 3))
    with pytest.raises(ValueError, match="strides"):
        build_detector("faster_rcnn", body, 1)
    with pytest.raises(ValueError, match="backbone_kwargs"):
        build_detector("retinanet", body, 1, backbone_kwargs={"frozen_stages": 1})
    with pytest.raises(ValueError, match="mask_head_channels"):
        build_detector("faster_rcnn", body, 1, mask_head_channels=8)
    # a hyphenated kind and a backbone instance work; the config then refuses a blind rebuild
    body = create_backbone(model_kwargs=TINY_ARCH, out_indices=(1, 2, 3))
    model = build_detector("RetinaNet", body, 1, min_size=64, max_size=128, fpn_channels=16)
    assert model.build_config["kind"] == "retinanet" and model.backbone.body is body
    assert build_detector("Faster-RCNN", "fastervit_0", 1, backbone_kwargs=dict(model_kwargs=TINY_ARCH),
                          **SMALL).build_config["kind"] == "faster_rcnn"
    with pytest.raises(ValueError, match="instance"):
        detector_from_config(model.build_config)


# ---- metrics: hand-made cases with known answers -------------------------------------------------------------


def gt_coco(boxes_per_image: list[list[list[float]]], height: int = 200, width: int = 200):
    """A ground-truth COCO index, one category (id 7), boxes in xywh."""
    images, annotations = [], []
    for image_id, boxes in enumerate(boxes_per_image, start=1):
        images.append({"id": image_id, "file_name": f"{image_id}.png", "height": height, "width": width})
        for box in boxes:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 7, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0})
    from open_fastervit.tasks.detection.data import quiet_coco

    return quiet_coco({"images": images, "annotations": annotations, "categories": [{"id": 7, "name": "x"}]})


def xywh_to_output(boxes: list[list[float]], shift: float = 0.0) -> dict[str, torch.Tensor]:
    """Detections (score 1, label 1) at the given xywh boxes, each moved right by ``shift`` times its width."""
    xyxy = torch.tensor([[x + shift * w, y, x + shift * w + w, y + h] for x, y, w, h in boxes]).reshape(-1, 4)
    return {"boxes": xyxy, "scores": torch.ones(len(boxes)), "labels": torch.ones(len(boxes), dtype=torch.int64)}


GT_BOXES = [[[10.0, 10.0, 100.0, 100.0]], [[50.0, 20.0, 100.0, 100.0], [0.0, 120.0, 60.0, 60.0]]]


def test_coco_metrics_perfect_and_shifted_predictions():
    gt = gt_coco(GT_BOXES)
    perfect = to_coco_results([xywh_to_output(b) for b in GT_BOXES], [1, 2], {1: 7})
    assert perfect[0] == {"image_id": 1, "category_id": 7, "bbox": [10.0, 10.0, 100.0, 100.0], "score": 1.0}
    metrics = coco_evaluate(gt, perfect)["bbox"]
    assert metrics["mAP"] == metrics["mAP50"] == metrics["mAP75"] == metrics["AR100"] == 1.0

    # every prediction shifted right by a fifth of its width: IoU = (1 - 0.2) / (1 + 0.2) = 2/3 exactly, so each
    # object is found at IoU thresholds 0.50, 0.55, 0.60, 0.65 (4 of COCO's 10) and missed at 0.70 .. 0.95
    shifted = to_coco_results([xywh_to_output(b, shift=0.2) for b in GT_BOXES], [1, 2], {1: 7})
    metrics = coco_evaluate(gt, shifted)
    assert metrics["bbox"]["mAP50"] == 1.0 and metrics["bbox"]["mAP75"] == 0.0
    assert metrics["bbox"]["mAP"] == pytest.approx(0.4) and metrics["bbox"]["AR100"] == pytest.approx(0.4)
    assert "Average Precision" in metrics.summary["bbox"]


def test_coco_metrics_missed_object_and_empty_results():
    gt = gt_coco([GT_BOXES[1]])
    found_one = to_coco_results([xywh_to_output(GT_BOXES[1][:1])], [1], {1: 7})
    # One of two objects found by a perfect detection: precision 1 up to recall 0.5, nothing beyond. COCOeval
    # samples precision at the 101 recall points 0.00, 0.01, ..., 1.00 (taking the best precision at recall >= r);
    # points 0.00 .. 0.50 (51 of them) get 1, the 50 above 0.5 get 0, so AP = 51/101 at every IoU threshold.
    metrics = coco_evaluate(gt, found_one)["bbox"]
    for name in ("mAP", "mAP50", "mAP75"):
        assert metrics[name] == pytest.approx(51 / 101), name
    assert metrics["AR100"] == pytest.approx(0.5)
    assert coco_evaluate(gt, [])["bbox"] == dict.fromkeys(metrics, 0.0)
    # restricting the evaluation to an image with no prediction: all of its objects are missed
    assert coco_evaluate(gt_coco(GT_BOXES), found_one, image_ids=[1])["bbox"]["mAP"] == 0.0


def test_coco_metrics_errors():
    gt = gt_coco(GT_BOXES)
    with pytest.raises(ValueError, match="absent from the ground truth"):
        coco_evaluate(gt, to_coco_results([xywh_to_output(GT_BOXES[0])], [99], {1: 7}))
    with pytest.raises(ValueError, match="segm"):
        coco_evaluate(gt, [], iou_types=("segm",))  # boxes-only ground truth
    with pytest.raises(ValueError, match="iou_types"):
        coco_evaluate(gt, [], iou_types=("keypoints",))
    with pytest.raises(ValueError, match="label 3"):
        to_coco_results([{**xywh_to_output(GT_BOXES[0]), "labels": torch.tensor([3])}], [1], {1: 7})


# ---- instance-id folders and mask evaluation -----------------------------------------------------------------


def write_instance_folder(root: Path, split: str = "train") -> np.ndarray:
    """One 48x64 image and its 16-bit instance-id PNG: id 300 a rectangle, id 5 an L shape."""
    (root / split / "images").mkdir(parents=True)
    (root / split / "instances").mkdir(parents=True)
    ids = np.zeros((48, 64), dtype=np.uint16)
    ids[4:14, 10:30] = 300
    ids[20:40, 40:44] = 5
    ids[36:40, 44:60] = 5
    Image.fromarray(ids).save(root / split / "instances" / "a.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(
        root / split / "images" / "a.png")
    Image.fromarray(np.zeros((48, 64, 3), dtype=np.uint8)).save(root / split / "images" / "no_instances.png")
    return ids


def test_instance_folder_masks_boxes_and_segm_metrics(tmp_path):
    ids = write_instance_folder(tmp_path)
    target = instances_from_label_image(tmp_path / "train" / "instances" / "a.png")
    assert target["masks"].shape == (2, 48, 64) and target["masks"].dtype == torch.uint8
    # increasing id order: 5 (the L shape) then 300; boxes cover the pixels (x2 = last column + 1, COCO's bbox)
    assert target["boxes"].tolist() == [[40.0, 20.0, 60.0, 40.0], [10.0, 4.0, 30.0, 14.0]]
    assert target["area"].tolist() == [float((ids == 5).sum()), 200.0]
    assert torch.equal(target["masks"][1], torch.from_numpy((ids == 300).astype(np.uint8)))

    dataset = InstanceMaskFolder(tmp_path, "train", class_name="cell")
    assert len(dataset) == 1 and "no_instances.png" in dataset.problems[0]
    image, sample = dataset[0]
    assert image.shape == (3, 48, 64) and image.dtype == torch.float32 and sample["image_id"] == 1
    json_path = instance_folder_to_coco(tmp_path, "train", tmp_path / "gt.json", class_name="cell")
    output = {"boxes": sample["boxes"], "labels": sample["labels"], "scores": torch.ones(2),
              "masks": sample["masks"][:, None].float()}
    results = to_coco_results([output], [sample["image_id"]], dataset.label_to_category, masks=True)
    metrics = coco_evaluate(json_path, results, iou_types=("bbox", "segm"))
    assert metrics["bbox"]["mAP"] == 1.0 and metrics["segm"]["mAP"] == 1.0
    # the json reads back through CocoDetection with the same masks and boxes
    coco = CocoDetection(tmp_path / "train" / "images", json_path, masks=True)
    _, again = coco[0]
    assert torch.equal(again["masks"], sample["masks"]) and torch.equal(again["boxes"], sample["boxes"])


def test_nuclei_instance_folder():
    root = data_path("nuclei-dsb2018")
    train, val = InstanceMaskFolder(root, "train"), InstanceMaskFolder(root, "val")
    assert (len(train), len(val)) == (3, 1) and not train.problems
    counts = [len(train[i][1]["labels"]) for i in range(3)]
    assert sum(counts) == 108
    image, target = val[0]
    assert image.shape == (3, 256, 256) and target["masks"].shape == (29, 256, 256)
    for mask, (x1, y1, x2, y2) in zip(target["masks"], target["boxes"].int().tolist()):
        assert mask.sum() == mask[y1:y2, x1:x2].sum() > 0


def test_dataset_batches_train_a_mask_rcnn():
    """The datasets' targets (tv_tensors, through the augmentation and the collate) feed the detector as they are."""
    dataset = InstanceMaskFolder(data_path("nuclei-dsb2018"), "train",
                                 transforms=train_transforms(hflip=0.5, vflip=0.5, crop="iou"))
    images, targets = next(iter(DataLoader(dataset, batch_size=2, collate_fn=collate_detection)))
    model = tiny_detector("mask_rcnn", num_classes=1)
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values()) and losses["loss_mask"] > 0
    sum(losses.values()).backward()


# ---- COCO datasets -------------------------------------------------------------------------------------------


def test_trees_neon_coco_dataset():
    root = data_path("trees-neon")
    train = CocoDetection(root / "train", root / "annotations" / "instances_train.json")
    assert len(train) == 43 and not train.problems
    assert train.class_names == ["tree"] and train.category_ids == [1] and train.label_to_category == {1: 1}
    image, target = train[0]
    assert image.shape == (3, 400, 400) and image.dtype == torch.float32 and 0 <= image.min() <= image.max() <= 1
    assert isinstance(target["boxes"], tv_tensors.BoundingBoxes) and target["boxes"].canvas_size == (400, 400)
    total = 0
    for i in range(len(train)):
        boxes, labels = train[i][1]["boxes"], train[i][1]["labels"]
        assert (boxes[:, 2:] > boxes[:, :2]).all() and (boxes >= 0).all() and (boxes <= 400).all()
        assert labels.dtype == torch.int64 and (labels == 1).all()
        total += len(labels)
    assert total == 716
    val = CocoDetection(root / "val", root / "annotations" / "instances_val.json")
    assert len(val) == 13 and sum(len(val[i][1]["labels"]) for i in range(13)) == 461


def polygon_and_rle_json(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """Images: ok.png (40x60, 6 annotations), missing.png (absent), corrupt.png (bad bytes), empty.png (no
    annotations)."""
    images = tmp_path / "images"
    images.mkdir()
    Image.fromarray(np.full((40, 60, 3), 128, dtype=np.uint8)).save(images / "ok.png")
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(images / "empty.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    rle_mask = np.zeros((40, 60), dtype=np.uint8)
    rle_mask[25:35, 40:55] = 1
    rle = mask_utils.encode(np.asfortranarray(rle_mask))
    anns = [
        {"bbox": [10, 10, 20, 10], "segmentation": [[10, 10, 30, 10, 30, 20, 10, 20]], "category_id": 3},
        {"bbox": [40, 25, 15, 10], "category_id": 9,
         "segmentation": {"size": [40, 60], "counts": rle["counts"].decode("ascii")}},
        {"bbox": [50, 30, 20, 20], "category_id": 3},  # partly outside: clipped to [50, 30, 60, 40]
        {"bbox": [5, 5, 0, 10], "category_id": 3},  # zero width: dropped
        {"bbox": [70, 5, 10, 10], "category_id": 3},  # entirely outside: dropped
        {"bbox": [0, 0, 40, 40], "category_id": 3, "iscrowd": 1},  # crowd: not a training target
    ]
    data = {
        "images": [{"id": 11, "file_name": "ok.png", "height": 40, "width": 60},
                   {"id": 12, "file_name": "missing.png", "height": 40, "width": 60},
                   {"id": 13, "file_name": "corrupt.png", "height": 40, "width": 60},
                   {"id": 14, "file_name": "empty.png", "height": 40, "width": 60}],
        "annotations": [{"id": i, "image_id": 11, **a} for i, a in enumerate(anns, start=1)]
        + [{"id": 99, "image_id": 12, "bbox": [1, 1, 5, 5], "category_id": 3}],
        "categories": [{"id": 9, "name": "nine"}, {"id": 3, "name": "three"}],
    }
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(data))
    return path, rle_mask


def test_coco_dataset_reports_and_skips_problems(tmp_path):
    ann_file, rle_mask = polygon_and_rle_json(tmp_path)
    dataset = CocoDetection(tmp_path / "images", ann_file, masks=True)
    assert len(dataset) == 3 and dataset.image_ids == [11, 13, 14]
    assert dataset.category_ids == [3, 9] and dataset.class_names == ["three", "nine"]
    assert dataset.label_to_category == {1: 3, 2: 9}
    report = "\n".join(dataset.problems)
    assert "missing.png" in report
    for expected in ("1 box(es) partly outside their image clipped", "1 box(es) with non-positive width",
                     "1 box(es) entirely outside", "1 crowd annotation(s)",
                     "1 annotation(s) without a decodable segmentation given their box as mask"):
        assert expected in report, expected

    image, target = dataset[0]
    assert image.shape == (3, 40, 60) and target["image_id"] == 11
    assert target["boxes"].tolist() == [[10, 10, 30, 20], [40, 25, 55, 35], [50, 30, 60, 40]]
    assert target["labels"].tolist() == [1, 2, 1]
    masks = target["masks"]
    assert isinstance(masks, tv_tensors.Mask) and masks.shape == (3, 40, 60) and masks.dtype == torch.uint8
    polygon = masks[0].nonzero()
    assert polygon[:, 0].min() >= 10 and polygon[:, 0].max() <= 20 and polygon[:, 1].min() >= 10
    assert polygon[:, 1].max() <= 30 and len(polygon) >= 150  # the 20x10 rectangle, rasterised by pycocotools
    assert torch.equal(masks[1], torch.from_numpy(rle_mask))
    assert masks[2].sum() == 10 * 10 and masks[2, 30:40, 50:60].all()  # no segmentation: the clipped box

    # the corrupt image (index 1) is replaced by its neighbour and reported
    _, neighbour = dataset[1]
    assert neighbour["image_id"] == 14 and neighbour["boxes"].shape == (0, 4) and neighbour["masks"].shape[0] == 0
    assert dataset.skipped() == [str(tmp_path / "images" / "corrupt.png")]
    assert any("corrupt.png" in p for p in dataset.problems)


def test_boxes_only_json_with_masks_is_one_error_without_a_box_mask_warning(tmp_path, caplog):
    """Reported: Mask R-CNN on trees-neon (boxes only) first warned "716 annotation(s) without a decodable
    segmentation given their box as mask", then failed for lack of masks. Expected: NoMasksError (a DatasetError)
    naming the 716 annotations and no warning before it; box masks still fill the gaps of a json that has masks
    (the partial case keeps its warning, see test_coco_dataset_reports_and_skips_problems)."""
    from open_fastervit.tasks.detection.data import NoMasksError

    root = data_path("trees-neon")
    with caplog.at_level("WARNING"), pytest.raises(NoMasksError, match="none of the 716 usable annotations"):
        CocoDetection(root / "train", root / "annotations" / "instances_train.json", masks=True)
    assert not [r for r in caplog.records if "box as mask" in r.getMessage()]
    assert issubclass(NoMasksError, DatasetError)
    boxes_only = CocoDetection(root / "train", root / "annotations" / "instances_train.json")
    assert len(boxes_only) > 0 and "masks" not in boxes_only[0][1]


def test_coco_dataset_in_loader_workers(tmp_path):
    ann_file, _ = polygon_and_rle_json(tmp_path)
    dataset = CocoDetection(tmp_path / "images", ann_file, transforms=train_transforms(crop="random"))
    pickle.loads(pickle.dumps(dataset))  # spawn-started workers receive a pickled copy
    loader = DataLoader(dataset, batch_size=3, num_workers=1, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert len(images) == len(targets) == 3 and all(isinstance(i, torch.Tensor) for i in images)
    assert [t["image_id"] for t in targets] == [11, 14, 14]
    assert dataset.skipped() == [str(tmp_path / "images" / "corrupt.png")]  # flagged in the worker, seen here


def test_coco_dataset_errors(tmp_path):
    with pytest.raises(DatasetError, match="nope.json"):
        CocoDetection(tmp_path, tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{ not json")
    with pytest.raises(DatasetError, match="bad.json"):
        CocoDetection(tmp_path, bad)
    no_images = tmp_path / "none.json"
    no_images.write_text(json.dumps({"images": [{"id": 1, "file_name": "gone.jpg", "height": 5, "width": 5}],
                                     "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(DatasetError, match=r"none\.json: no usable image"):
        CocoDetection(tmp_path, no_images)
    with pytest.raises(DatasetError, match="instances"):
        InstanceMaskFolder(tmp_path, "train")


# ---- transforms ----------------------------------------------------------------------------------------------


def test_flips_move_boxes_and_masks_with_the_image():
    image = tv_tensors.Image(torch.zeros(3, 40, 60, dtype=torch.uint8))
    image[:, 5:15, 10:30] = 255
    mask = torch.zeros(1, 40, 60, dtype=torch.uint8)
    mask[0, 5:15, 10:30] = 1
    target = {"boxes": tv_tensors.BoundingBoxes([[10, 5, 30, 15]], format="XYXY", canvas_size=(40, 60)),
              "labels": torch.tensor([1]), "area": torch.tensor([200.0]), "iscrowd": torch.tensor([0]),
              "masks": tv_tensors.Mask(mask)}
    out_image, out = train_transforms(hflip=1.0)(image, target)
    assert out["boxes"].tolist() == [[30, 5, 50, 15]]  # x -> 60 - x
    assert out_image.dtype == torch.float32 and out_image[0, 5:15, 30:50].min() == 1 and out_image.sum() == 3 * 200
    assert torch.equal(out["masks"], torch.flip(mask, dims=[-1]))
    out_image, out = train_transforms(hflip=0.0, vflip=1.0)(image, target)
    assert out["boxes"].tolist() == [[10, 25, 30, 35]]  # y -> 40 - y
    assert torch.equal(out["masks"], torch.flip(mask, dims=[-2])) and out_image[0, 25:35, 10:30].min() == 1
    _, same = eval_transforms()(image, target)
    assert same["boxes"].tolist() == [[10, 5, 30, 15]]


def test_random_crop_keeps_targets_consistent():
    torch.manual_seed(1)
    boxes = torch.tensor([[x, y, x + 8, y + 8] for x in range(0, 56, 12) for y in range(0, 36, 9)], dtype=torch.float)
    n = len(boxes)
    masks = torch.zeros(n, 40, 60, dtype=torch.uint8)
    for k, (x1, y1, x2, y2) in enumerate(boxes.int().tolist()):
        masks[k, y1:y2, x1:x2] = 1
    target = {"boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(40, 60)),
              "labels": torch.arange(1, n + 1), "area": torch.full((n,), 64.0), "iscrowd": torch.zeros(n, dtype=int),
              "masks": tv_tensors.Mask(masks)}
    transform = train_transforms(hflip=0.0, crop="random", crop_scale=(0.3, 0.5))
    for _ in range(5):
        image, out = transform(tv_tensors.Image(torch.zeros(3, 40, 60, dtype=torch.uint8)), target)
        h, w = image.shape[-2:]
        assert h * w < 40 * 60 and out["boxes"].canvas_size == (h, w)
        kept = len(out["labels"])
        assert kept < n and out["boxes"].shape == (kept, 4) and out["masks"].shape == (kept, h, w)
        assert out["area"].shape == out["iscrowd"].shape == (kept,)
        assert (out["boxes"] >= 0).all() and (out["boxes"][:, 2] <= w).all() and (out["boxes"][:, 3] <= h).all()
    with pytest.raises(ValueError, match="crop"):
        train_transforms(crop="zoom")


# ---- drawing and the package surface -------------------------------------------------------------------------


def test_draw_detections_and_save_png(tmp_path):
    image = torch.zeros(3, 50, 80)
    masks = torch.zeros(2, 1, 50, 80)
    masks[0, 0, 10:20, 10:30] = 0.9
    output = {"boxes": torch.tensor([[10.0, 10.0, 30.0, 20.0], [40.0, 5.0, 70.0, 45.0]]),
              "labels": torch.tensor([1, 2]), "scores": torch.tensor([0.9, 0.2]), "masks": masks}
    drawn = draw_detections(image, output, ["tree", "bush"], score_threshold=0.5)
    assert drawn.dtype == torch.uint8 and drawn.shape == (3, 50, 80)
    assert drawn[:, 12:18, 15:25].sum() > 0  # mask fill of the kept detection
    assert drawn[:, 25:47, 38:72].sum() == 0  # the low-score one (box 40..70 x 5..45) is not drawn below its top
    assert draw_detections(image, output, ["tree", "bush"], score_threshold=0.1)[:, 25:47, 38:72].sum() > 0
    path = save_png(drawn, tmp_path / "out" / "drawn.png")
    assert np.array_equal(np.asarray(Image.open(path)), drawn.permute(1, 2, 0).numpy())
    assert torch.equal(draw_detections(image, {**output, "scores": torch.zeros(2)}, None), torch.zeros_like(drawn))


def test_package_exports():
    assert set(detection.__all__) == set(detection._EXPORTS)
    for name in detection.__all__:
        assert getattr(detection, name) is not None
    with pytest.raises(AttributeError):
        detection.not_a_name  # noqa: B018


# ---- overfitting (slow: `make test-full`) ---------------------------------------------------------------------


@pytest.mark.full
def test_mask_rcnn_overfits_two_trees_neon_tiles():
    """A tiny randomly initialised Mask R-CNN learns two tiles (box masks) to mAP50 > 0.5 in 40 AdamW steps.

    trees-neon has boxes only: CocoDetection(masks=True) refuses it (NoMasksError), so the box masks are made here.
    """
    root = data_path("trees-neon")
    dataset = CocoDetection(root / "train", root / "annotations" / "instances_train.json")
    chosen = [i for i in range(len(dataset)) if len(dataset[i][1]["labels"]) >= 10][:2]
    images, targets = collate_detection([dataset[i] for i in chosen])
    for image, target in zip(images, targets):
        masks = torch.zeros(len(target["boxes"]), *image.shape[-2:], dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, target["boxes"].tolist()):
            mask[math.floor(y1):math.ceil(y2), math.floor(x1):math.ceil(x2)] = 1
        target["masks"] = masks
    model = build_detector("mask_rcnn", "fastervit_0", 1, min_size=256, max_size=256, fpn_channels=64,
                           anchor_sizes=(16, 32, 64, 128, 256), box_head_channels=256, mask_head_channels=32,
                           rpn_batch_size_per_image=128, box_batch_size_per_image=128,
                           backbone_kwargs=dict(model_kwargs=TINY_ARCH))
    optimizer = torch.optim.AdamW(detector_param_groups(model, lr=2e-3, weight_decay=0.0))
    for _ in range(40):
        losses = model(images, targets)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    ids = [t["image_id"] for t in targets]
    metrics = coco_evaluate(dataset.coco, to_coco_results(outputs, ids, dataset.label_to_category), image_ids=ids)
    assert math.isfinite(metrics["bbox"]["mAP50"]) and metrics["bbox"]["mAP50"] > 0.5
