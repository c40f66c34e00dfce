"""Semantic segmentation: smp UPerNet / FPN decoders on our backbone, mask folders, transforms, metrics, pictures,
and the third-party routes (smp ``tu-fastervit_0``, Hugging Face ``UperNetForSemanticSegmentation``)."""

from __future__ import annotations

import math
import subprocess
import sys
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import tv_tensors

from open_fastervit.data import DatasetError
from open_fastervit.paths import data_path
from open_fastervit.tasks.segmentation import (
    SegmentationFolder,
    SegmentationMetric,
    build_segmenter,
    collate_segmentation,
    eval_transforms,
    overlay_mask,
    read_mask,
    save_png,
    segmenter_backbone,
    segmenter_from_config,
    segmenter_param_groups,
    side_by_side,
    train_transforms,
)

# The tiny FasterViT of conftest.TINY, without its classifier settings.
TINY_ARCH = dict(dim=16, in_dim=8, depths=(1, 1, 2, 2), num_heads=(1, 2, 2, 4), window_size=(7, 7, 3, 3),
                 drop_path_rate=0.0)
# Decoder settings small enough for CPU tests (FPN blocks use GroupNorm(32, .): 32 channels minimum).
SMALL_DECODER = {"upernet": {"decoder_channels": 32}, "fpn": {"decoder_channels": 32, "segmentation_channels": 32}}


def tiny_segmenter(kind: str, num_classes: int = 3, **backbone_kwargs):
    return build_segmenter(kind, "fastervit_0", num_classes, backbone_kwargs=dict(model_kwargs=TINY_ARCH,
                                                                                  **backbone_kwargs),
                           **SMALL_DECODER[kind])


# ---- models ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["upernet", "fpn"])
def test_forward_any_size(kind):
    model = tiny_segmenter(kind, num_classes=5).eval()
    with torch.no_grad():
        for height, width in [(200, 300), (97, 130), (32, 32)]:
            logits = model(torch.rand(2, 3, height, width))
            assert logits.shape == (2, 5, height, width)
            assert torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="at least 32"):
        model(torch.rand(1, 3, 31, 64))
    with pytest.raises(ValueError, match="input channels"):
        model(torch.rand(1, 4, 64, 64))


def test_unknown_kind_and_options():
    with pytest.raises(ValueError, match="upernet, fpn"):
        build_segmenter("deeplab", num_classes=2)
    with pytest.raises(ValueError, match="segmentation_channels"):
        build_segmenter("upernet", num_classes=2, backbone_kwargs=dict(model_kwargs=TINY_ARCH),
                        segmentation_channels=32)
    with pytest.raises(ValueError, match="out_indices"):
        build_segmenter("fpn", num_classes=2, backbone_kwargs=dict(model_kwargs=TINY_ARCH, out_indices=(1, 2, 3)))


def test_train_step_respects_frozen_stages():
    model = tiny_segmenter("upernet", num_classes=3, frozen_stages=2).train()
    backbone = segmenter_backbone(model)
    images = torch.rand(2, 3, 64, 96)
    target = torch.randint(0, 3, (2, 64, 96))
    target[:, :8] = 255  # ignored rows
    loss = F.cross_entropy(model(images), target, ignore_index=255)
    loss.backward()
    assert torch.isfinite(loss)
    frozen = [backbone.stem, backbone.stages[0], backbone.stages[1]]
    for module in frozen:
        assert not module.training
        for p in module.parameters():
            assert not p.requires_grad and p.grad is None
    for stage in (backbone.stages[2], backbone.stages[3]):
        grads = [p.grad for p in stage.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is not None for p in model.decoder.parameters())
    assert model.segmentation_head[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["upernet", "fpn"])
def test_norm_eval_keeps_backbone_batchnorm_statistics(kind):
    model = tiny_segmenter(kind, num_classes=2, norm_eval=True).train()
    backbone_bns = [m for m in segmenter_backbone(model).modules() if isinstance(m, torch.nn.BatchNorm2d)]
    decoder_bns = [m for m in model.decoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert backbone_bns and all(not bn.training for bn in backbone_bns)
    before = [(bn.running_mean.clone(), bn.running_var.clone()) for bn in backbone_bns]
    decoder_before = [bn.running_mean.clone() for bn in decoder_bns]
    model(torch.rand(2, 3, 64, 64))
    for bn, (mean, var) in zip(backbone_bns, before):
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    if decoder_bns:  # the decoder's own BatchNorms (UPerNet) still train
        assert any(not torch.equal(bn.running_mean, m) for bn, m in zip(decoder_bns, decoder_before))


def test_param_groups_and_rebuild_from_config():
    model = tiny_segmenter("fpn", num_classes=4, frozen_stages=1)
    groups = segmenter_param_groups(model, lr=1e-3, weight_decay=0.05, layer_decay=0.8)
    names = [n for g in groups for n in g["param_names"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable)  # every trainable parameter once, frozen ones left out
    assert not any(n.startswith("backbone.stem.") for n in names)
    scales = {g["lr_scale"] for g in groups if g["param_names"][0].startswith("backbone.")}
    assert len(scales) > 1 and max(scales) <= 1.0
    for group in groups:
        assert math.isclose(group["lr"], 1e-3 * group["lr_scale"])
        if any(n.endswith(".bias") for n in group["param_names"]):
            assert group["weight_decay"] == 0.0
    decoder_groups = [g for g in groups if g["param_names"][0].startswith(("decoder.", "segmentation_head."))]
    assert {g["weight_decay"] for g in decoder_groups} == {0.05, 0.0}
    torch.optim.AdamW(groups)  # a valid optimizer spec

    config = model.build_config
    assert config["kind"] == "fpn" and config["num_classes"] == 4 and config["segmentation_channels"] == 32
    rebuilt = segmenter_from_config(config)
    rebuilt.load_state_dict(model.state_dict())
    x = torch.rand(1, 3, 64, 80)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.eval()(x), model.eval()(x))
    with pytest.raises(TypeError):
        segmenter_backbone(torch.nn.Linear(2, 2))


def test_importing_the_package_does_not_load_smp():
    code = ("import sys, open_fastervit.tasks.segmentation as s; "
            "assert 'segmentation_models_pytorch' not in sys.modules; s.SegmentationMetric; "
            "assert 'segmentation_models_pytorch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


# ---- data --------------------------------------------------------------------------------------------------


def test_nuclei_folder_real_data():
    root = data_path("nuclei-dsb2018")
    train = SegmentationFolder(root, "train", transforms=train_transforms(crop_size=64))
    val = SegmentationFolder(root, "val", transforms=eval_transforms())
    assert len(train) == 3 and len(val) == 1
    assert train.problems == [] and val.problems == []
    assert train.num_classes == 2 and train.class_names == ["class_0", "class_1"]
    assert train.class_pixel_counts.sum() == 3 * 256 * 256 and (train.class_pixel_counts > 0).all()
    image, mask = val[0]
    assert image.shape == (3, 256, 256) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    assert mask.shape == (256, 256) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) == {0, 1}
    images, masks = collate_segmentation([train[0], train[1]])
    assert images.shape == (2, 3, 64, 64) and masks.shape == (2, 64, 64)
    assert set(masks.unique().tolist()) <= {0, 1, 255}

    # one training step of a tiny segmenter on the real crops
    model = tiny_segmenter("upernet", num_classes=2).train()
    loss = F.cross_entropy(model(images), masks, ignore_index=255)
    loss.backward()
    assert torch.isfinite(loss)


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path) if mode else Image.fromarray(array).save(path)


def _make_ade_folder(root):
    """ADE-style tree: images/training/*.jpg|png, annotations/training/*.png with every kind of problem."""
    rng = np.random.default_rng(0)
    img_dir, ann_dir = root / "images" / "training", root / "annotations" / "training"
    rgb = lambda h, w: rng.integers(0, 255, (h, w, 3), dtype=np.uint8)  # noqa: E731
    # good pairs: 8-bit mask, 16-bit mask, palette mask
    _png(img_dir / "ok8.jpg", rgb(40, 48))
    labels8 = np.arange(40 * 48, dtype=np.uint8).reshape(40, 48) % 4
    _png(ann_dir / "ok8.png", labels8)
    _png(img_dir / "ok16.png", rgb(36, 44))
    labels16 = np.zeros((36, 44), np.uint16)
    labels16[:, 20:] = 2
    Image.fromarray(labels16).save(ann_dir / "ok16.png")  # mode I;16
    _png(img_dir / "pal.png", rgb(32, 40))
    palette_mask = Image.fromarray((np.arange(32 * 40).reshape(32, 40) % 2).astype(np.uint8), "L").convert("P")
    palette_mask.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)  # index 1 is red: must read back as 1, not 200
    palette_mask.save(ann_dir / "pal.png")
    # problems
    _png(img_dir / "nomask.png", rgb(32, 32))
    _png(ann_dir / "orphan.png", np.zeros((32, 32), np.uint8))
    _png(img_dir / "mismatch.png", rgb(40, 40))
    _png(ann_dir / "mismatch.png", np.zeros((30, 40), np.uint8))
    (img_dir / "corrupt.png").write_bytes(b"this is not an image")
    _png(ann_dir / "corrupt.png", np.zeros((32, 32), np.uint8))
    # a truncated PNG passes the header scan and fails at load time
    _png(img_dir / "truncated.png", rgb(64, 64))
    data = (img_dir / "truncated.png").read_bytes()
    (img_dir / "truncated.png").write_bytes(data[: len(data) // 2])
    _png(ann_dir / "truncated.png", np.zeros((64, 64), np.uint8))
    return labels8, labels16, palette_mask


def test_ade_style_folder_reports_and_skips(tmp_path, caplog):
    labels8, labels16, _ = _make_ade_folder(tmp_path)
    with caplog.at_level("WARNING"):
        dataset = SegmentationFolder(tmp_path, "train", masks="annotations")
    assert "problem" in caplog.text
    kinds = {p.kind: p.path for p in dataset.problems}
    assert set(kinds) == {"missing_mask", "missing_image", "size_mismatch", "unreadable_image"}
    assert kinds["missing_mask"].endswith("nomask.png") and kinds["missing_image"].endswith("orphan.png")
    assert kinds["size_mismatch"].endswith("mismatch.png") and kinds["unreadable_image"].endswith("corrupt.png")
    stems = [image.stem for image, _ in dataset.samples]
    assert stems == ["ok16", "ok8", "pal", "truncated"]
    assert dataset.num_classes == 4 and dataset.class_names == [f"class_{i}" for i in range(4)]

    # 16-bit and palette masks are read as class indices
    _, mask16 = dataset[0]
    assert torch.equal(mask16, torch.from_numpy(labels16.astype(np.int64)))
    _, mask8 = dataset[1]
    assert torch.equal(mask8, torch.from_numpy(labels8.astype(np.int64)))
    image, mask_p = dataset[2]
    assert image.shape == (3, 32, 40) and set(mask_p.unique().tolist()) == {0, 1}
    # the truncated image is replaced by the next pair (wrapping around) and reported
    image, mask = dataset[3]
    assert image.shape == (3, 36, 44) and torch.equal(mask, mask16)
    assert dataset.skipped() == [str(tmp_path / "images" / "training" / "truncated.png")]
    assert dataset.problems[-1].kind == "unreadable_image" and "skipped when loading" in dataset.problems[-1].detail

    # default masks="masks" also finds annotations/, and "training" works as a split name
    assert len(SegmentationFolder(tmp_path, "training")) == 4


def test_labels_classes_and_reduce_zero_label(tmp_path):
    root = tmp_path / "data"
    row = np.array([0] * 8 + [1] * 8 + [255] * 16, np.uint8)  # labels 0, 1 and ignored pixels
    _png(root / "val" / "images" / "a.png", np.zeros((32, 32, 3), np.uint8))
    _png(root / "val" / "masks" / "a.png", np.tile(row, (32, 1)))
    _png(root / "val" / "images" / "b.png", np.zeros((32, 32, 3), np.uint8))
    _png(root / "val" / "masks" / "b.png", np.full((32, 32), 7, np.uint8))
    (root / "classes.txt").write_text("sky\ntree\n\n")
    dataset = SegmentationFolder(root, "validation")  # alias of "val"; num_classes from classes.txt
    assert dataset.num_classes == 2 and dataset.class_names == ["sky", "tree"]
    assert [s.stem for s, _ in dataset.samples] == ["a"]
    assert [(p.kind, p.path.endswith("b.png")) for p in dataset.problems] == [("label_out_of_range", True)]
    assert dataset.class_pixel_counts.tolist() == [8 * 32, 8 * 32]  # ignored pixels not counted
    with pytest.raises(DatasetError, match="no usable"):
        SegmentationFolder(root, "val", num_classes=1)

    # ADE20K convention: 0 -> ignore, l -> l - 1, 255 stays; b's 7 becomes 6, still out of range for 3 classes
    reduced = SegmentationFolder(root, "val", reduce_zero_label=True, num_classes=3)
    assert len(reduced) == 1 and {p.kind for p in reduced.problems} == {"label_out_of_range", "class_names"}
    assert reduced.class_names == ["sky", "tree", "class_2"]
    _, mask = reduced[0]
    assert mask[:, :8].eq(255).all() and mask[:, 8:16].eq(0).all() and mask[:, 16:].eq(255).all()


def test_empty_and_missing_folders(tmp_path):
    (tmp_path / "train" / "images").mkdir(parents=True)
    (tmp_path / "train" / "masks").mkdir(parents=True)
    with pytest.raises(DatasetError, match=str(tmp_path / "train" / "images")):
        SegmentationFolder(tmp_path, "train")
    with pytest.raises(DatasetError, match="tried"):
        SegmentationFolder(tmp_path, "val")
    with pytest.raises(DatasetError, match="does not exist"):
        SegmentationFolder(tmp_path / "nowhere", "train")


def test_read_mask_refuses_colour(tmp_path):
    _png(tmp_path / "colour.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="class-index"):
        read_mask(tmp_path / "colour.png")


# ---- transforms and collation ------------------------------------------------------------------------------


def _pattern(height=40, width=60):
    """A uint8 image whose red channel encodes the label (label * 80) and its label mask."""
    labels = torch.zeros(height, width, dtype=torch.int64)
    labels[:, : width // 3] = 1
    labels[: height // 2, width // 2:] = 2
    image = torch.zeros(3, height, width, dtype=torch.uint8)
    image[0] = (labels * 80).to(torch.uint8)
    return tv_tensors.Image(image), tv_tensors.Mask(labels)


def test_train_transforms_move_the_mask_with_the_image():
    image, labels = _pattern()
    flip = train_transforms(crop_size=(40, 60), scale_range=(1.0, 1.0), hflip=1.0, base_size=(40, 60),
                            color_jitter=0.0)
    out_image, out_mask = flip(image, labels)
    assert out_image.dtype == torch.float32 and out_mask.dtype == torch.int64
    assert torch.equal(out_mask, labels.flip(-1))
    assert torch.equal((out_image[0] * 255).round().long() // 80, out_mask)

    # random scale + crop + flips + jitter: image and mask stay aligned (nearest-looking in block interiors)
    augment = train_transforms(crop_size=32, scale_range=(0.5, 2.0), hflip=0.5, vflip=0.5, base_size=(40, 60),
                               color_jitter=0.0)
    for _ in range(5):
        out_image, out_mask = augment(image, labels)
        assert out_image.shape == (3, 32, 32) and out_mask.shape == (32, 32)
        valid = out_mask != 255
        agree = ((out_image[0] * 255 / 80).round().long() == out_mask)[valid].float().mean()
        assert agree > 0.9

    # a crop larger than the image pads the mask with ignore_index (and the image with 0)
    pad = train_transforms(crop_size=64, scale_range=(1.0, 1.0), hflip=0.0, base_size=(40, 60), color_jitter=0.0)
    out_image, out_mask = pad(image, labels)
    assert out_mask.shape == (64, 64)
    assert (out_mask == 255).sum() == 64 * 64 - 40 * 60
    assert out_image[:, out_mask == 255].abs().sum() == 0


def test_collate_pads_with_ignore_index():
    a = (torch.rand(3, 32, 40), torch.zeros(32, 40, dtype=torch.int64))
    b = (torch.rand(3, 36, 33), torch.ones(36, 33, dtype=torch.int64))
    images, masks = collate_segmentation([a, b])
    assert images.shape == (2, 3, 36, 40) and masks.shape == (2, 36, 40)
    assert (masks[0, 32:] == 255).all() and (masks[1, :, 33:] == 255).all() and (masks[1, :, :33] == 1).all()
    assert images[0, :, 32:].abs().sum() == 0
    _, masks = partial(collate_segmentation, ignore_index=-1)([a, b])
    assert (masks[0, 32:] == -1).all()
    same_images, _ = collate_segmentation([a, a])
    assert torch.equal(same_images[1], a[0])


# ---- metrics -----------------------------------------------------------------------------------------------


def test_metric_hand_made_cases():
    metric = SegmentationMetric(num_classes=3, ignore_index=255)
    # target [[0, 0], [1, 255]], prediction [[0, 1], [1, 2]]: the ignored pixel (predicted 2) is not counted.
    # class 0: TP 1, union 2 -> 1/2; class 1: TP 1, T 1 + P 2 - 1 = 2 -> 1/2; class 2: never seen -> NaN.
    target = torch.tensor([[[0, 0], [1, 255]]])
    metric.update(torch.tensor([[[0, 1], [1, 2]]]), target)
    assert metric.confusion.tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 0]]
    result = metric.compute()
    assert result["per_class_iou"][:2] == [0.5, 0.5] and math.isnan(result["per_class_iou"][2])
    assert result["mIoU"] == 0.5
    assert result["pixel_accuracy"] == pytest.approx(2 / 3)
    assert result["mean_accuracy"] == pytest.approx((1 / 2 + 1) / 2)  # class 0: 1/2, class 1: 1/1

    # logits input; class 2 predicted but absent: IoU 0, counted in the mean.
    # target [[0, 0], [0, 1]], prediction [[0, 2], [0, 1]]: class 0 IoU 2/3, class 1 IoU 1, class 2 IoU 0
    metric.reset()
    pred = torch.tensor([[0, 2], [0, 1]])
    logits = F.one_hot(pred, 3).permute(2, 0, 1).float()[None]
    metric.update(logits, torch.tensor([[[0, 0], [0, 1]]]))
    result = metric.compute()
    assert result["per_class_iou"] == pytest.approx([2 / 3, 1.0, 0.0])
    assert result["mIoU"] == pytest.approx(5 / 9)
    assert result["pixel_accuracy"] == pytest.approx(3 / 4)
    assert math.isnan(result["per_class_accuracy"][2])

    # accumulation over updates equals one update of everything; IoU 1/3 case
    metric.reset()
    metric.update(torch.tensor([[1, 1], [1, 0]]), torch.tensor([[1, 0], [0, 0]]))  # class 1: TP 1, T 1, P 3
    assert metric.compute()["per_class_iou"][1] == pytest.approx(1 / 3)
    metric.update(torch.tensor([[2, 2]]), torch.tensor([[255, 255]]))  # fully ignored: nothing changes
    assert metric.confusion.sum() == 4

    empty = SegmentationMetric(2).compute()
    assert math.isnan(empty["mIoU"]) and math.isnan(empty["pixel_accuracy"])
    with pytest.raises(ValueError, match="outside"):
        metric.update(torch.tensor([[3]]), torch.tensor([[0]]))
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, 2, 3, dtype=torch.long))


# ---- pictures ----------------------------------------------------------------------------------------------


def test_overlay_and_side_by_side(tmp_path):
    image = torch.full((3, 8, 10), 0.5)
    mask = torch.zeros(8, 10, dtype=torch.int64)
    mask[:, 5:] = 1
    mask[0, 0] = 255
    overlay = overlay_mask(image, mask, num_classes=2, alpha=1.0)
    assert overlay.dtype == torch.uint8 and overlay.shape == (3, 8, 10)
    assert overlay[:, 0, 0].tolist() == [128, 128, 128]  # ignored pixel untouched
    assert not torch.equal(overlay[:, 1, 0], overlay[:, 1, 9])  # classes differ in colour
    logits = F.one_hot(mask.clamp(max=1), 2).permute(2, 0, 1).float()
    strip = side_by_side(image, mask, logits, gap=2)
    assert strip.dtype == torch.uint8 and strip.shape == (3, 8, 34)
    path = save_png(strip, tmp_path / "report" / "strip.png")
    assert np.asarray(Image.open(path)).shape == (8, 34, 3)


# ---- third-party routes through our timm registration ------------------------------------------------------


def test_smp_timm_universal_encoder_route():
    import segmentation_models_pytorch as smp

    upernet = smp.UPerNet(encoder_name="tu-fastervit_0", encoder_weights=None, classes=2).eval()
    fpn = smp.FPN(encoder_name="tu-fastervit_0", encoder_weights=None, classes=2).eval()
    assert upernet.encoder.out_channels == [3, 0, 64, 128, 256, 512]
    with torch.no_grad():
        assert upernet(torch.rand(1, 3, 224, 224)).shape == (1, 2, 224, 224)
        assert fpn(torch.rand(1, 3, 224, 224)).shape == (1, 2, 224, 224)
        # smp's models refuse sides that are not multiples of 32 (its check; our backbone takes any size) ...
        with pytest.raises(RuntimeError, match="divisible by 32"):
            fpn(torch.rand(1, 3, 97, 130))
        # ... but smp's UPerNet decoder itself works when the check is off (output at 4 * ceil(side / 4))
        upernet.requires_divisible_input_shape = False
        assert upernet(torch.rand(1, 3, 200, 300)).shape == (1, 2, 200, 300)
        assert upernet(torch.rand(1, 3, 97, 130)).shape == (1, 2, 100, 132)


def test_transformers_upernet_with_timm_backbone():
    from transformers import TimmBackboneConfig, UperNetConfig, UperNetForSemanticSegmentation

    backbone = TimmBackboneConfig(backbone="fastervit_0", use_pretrained_backbone=False, out_indices=(0, 1, 2, 3))
    config = UperNetConfig(backbone_config=backbone, num_labels=3, hidden_size=32, use_auxiliary_head=False)
    model = UperNetForSemanticSegmentation(config).eval()
    assert list(model.backbone.channels) == [64, 128, 256, 512]
    with torch.no_grad():
        assert model(pixel_values=torch.rand(1, 3, 128, 128)).logits.shape == (1, 3, 128, 128)
        assert model(pixel_values=torch.rand(1, 3, 97, 130)).logits.shape == (1, 3, 97, 130)


# ---- evaluation leaves unreadable images out ---------------------------------------------------------------


class _Oracle(torch.nn.Module):
    """A perfect 3-class 'model' for images whose red channel holds the true label (value / 255)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        labels = (images[:, 0] * 255).round().long().clamp(0, 2)
        return F.one_hot(labels, 3).permute(0, 3, 1, 2).float()


def _oracle_folder(root, sizes=((32, 40), (36, 48), (40, 56)), corrupt: int = 1) -> list[int]:
    """ROOT/{train,val}/{images,masks}/{a,b,c}.png whose images carry the mask in their red channel; image
    ``corrupt`` of each split passes the header check but cannot be decoded. Returns each pair's pixel count."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for i, (name, (height, width)) in enumerate(zip("abc", sizes)):
            labels = rng.integers(0, 3, (height, width)).astype(np.uint8)
            _png(root / split / "masks" / f"{name}.png", labels)
            image = root / split / "images" / f"{name}.png"
            _png(image, np.stack([labels, labels * 40, np.full_like(labels, 7)], axis=-1))
            if i == corrupt:  # keep the header, replace the rest of the data stream by garbage bytes
                data = image.read_bytes()
                image.write_bytes(data[: len(data) // 2] + b"\x00garbage\xff" * 8)
    return [h * w for h, w in sizes]


@pytest.mark.parametrize("batch_size", [1, 2])
def test_an_unreadable_validation_image_is_left_out_of_evaluation_not_counted_twice(tmp_path, caplog, batch_size):
    """Before: the neighbour of an unreadable val image was evaluated in its place, so its pixels were counted
    twice. Now the eval folder serves None for it, collate drops it, and only the readable images count."""
    from open_fastervit.tasks.segmentation.train import SegmentationConfig, open_segmentation_data, segment_dataset

    pixels = _oracle_folder(tmp_path)
    train_set, val_set = open_segmentation_data(SegmentationConfig(data=str(tmp_path), num_classes=3))
    assert train_set.substitute_unreadable and not val_set.substitute_unreadable and len(val_set) == 3
    loader = torch.utils.data.DataLoader(val_set, batch_size=batch_size,
                                         collate_fn=partial(collate_segmentation, ignore_index=255))
    with caplog.at_level("WARNING"):
        metric, count = segment_dataset(_Oracle(), loader, torch.device("cpu"), 3, 255)
    values = metric.compute()
    assert count == 2 and int(metric.confusion.sum()) == pixels[0] + pixels[2]  # 1280 + 2240
    assert values["mIoU"] == 1.0 and values["pixel_accuracy"] == 1.0
    assert val_set.skipped() == [str(tmp_path / "val" / "images" / "b.png")]
    assert "leaving unreadable pair" in caplog.text and "b.png out of the evaluation" in caplog.text
    # training still substitutes (batch shapes never change): the same loop then counts c twice
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=1, collate_fn=collate_segmentation)
    train_set.transforms = eval_transforms()
    substituted, _ = segment_dataset(_Oracle(), train_loader, torch.device("cpu"), 3, 255)
    assert int(substituted.confusion.sum()) == pixels[0] + 2 * pixels[2]
    assert collate_segmentation([None])[0].shape == (0, 3, 0, 0)


def test_evaluate_segmenter_leaves_an_unreadable_image_out(tmp_path, monkeypatch, caplog):
    """`fastervit segment evaluate` builds its folder without substitution: perfect predictions give mIoU 1.0 and a
    warning naming the unreadable image."""
    import open_fastervit.tasks.segmentation.train as seg_train

    _oracle_folder(tmp_path)
    oracle = _Oracle()
    oracle.build_config, oracle.class_names = {"num_classes": 3}, ["a", "b", "c"]
    monkeypatch.setattr(seg_train, "load_segmenter", lambda source, device=None: oracle)
    with caplog.at_level("WARNING"):
        out = seg_train.evaluate_segmenter("unused", tmp_path, "val", fuse=False, workers=0)
    assert out["mIoU"] == 1.0 and out["per_class_iou"] == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert "1 of 3 image(s) could not be read and were left out of the evaluation" in caplog.text
    assert str(tmp_path / "val" / "images" / "b.png") in caplog.text


# ---- auxiliary FCN head ------------------------------------------------------------------------------------


def _aux_segmenter(num_classes: int = 3):
    return build_segmenter("upernet", "fastervit_0", num_classes, backbone_kwargs=dict(model_kwargs=TINY_ARCH),
                           decoder_channels=32, aux_head=True)


def test_aux_head_layout_and_inference_unchanged():
    from open_fastervit.tasks.dense import inference_copy

    torch.manual_seed(0)
    model = _aux_segmenter()
    conv, norm, _, drop, classifier = model.aux_head
    assert (conv.in_channels, conv.out_channels, conv.kernel_size) == (segmenter_backbone(model).out_channels[2],
                                                                        256, (3, 3))
    assert isinstance(norm, torch.nn.BatchNorm2d) and isinstance(drop, torch.nn.Dropout2d) and drop.p == 0.1
    assert (classifier.out_channels, classifier.kernel_size) == (3, (1, 1))
    assert model.build_config["aux_head"] is True and model.build_config["aux_channels"] == 256
    plain = tiny_segmenter("upernet", num_classes=3)
    assert plain.aux_head is None and "aux_head" not in plain.build_config
    missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
    assert not missing and unexpected and all(k.startswith("aux_head.") for k in unexpected)
    calls: list[int] = []
    model.aux_head.register_forward_hook(lambda *_: calls.append(1))
    x = torch.rand(2, 3, 97, 130)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), plain.eval()(x))  # same weights: the head changes nothing in eval
        assert calls == []
        model.train()
        torch.manual_seed(1)
        alone = model(x)
        torch.manual_seed(1)
        logits, aux = model(x, return_aux=True)
    assert calls == [1] and torch.equal(alone, logits)
    assert logits.shape == aux.shape == (2, 3, 97, 130) and torch.isfinite(aux).all()
    assert plain.train()(x, return_aux=True)[1] is None
    plain.load_state_dict(model.state_dict(), strict=False)  # the BatchNorm statistics moved in train mode
    with torch.no_grad():  # the inference form (what evaluation runs) does not run it either
        assert torch.equal(inference_copy(model)(x), inference_copy(plain)(x)) and calls == [1]


def test_aux_loss_is_main_plus_weighted_aux_and_trains_the_head():
    from open_fastervit.tasks.segmentation.train import SegmentationConfig, SegmentationTask
    from open_fastervit.train.distributed import DistInfo

    def task_for(weight: float) -> SegmentationTask:  # only the task's model and loss are exercised
        cfg = SegmentationConfig(kind="upernet", model_kwargs=TINY_ARCH, decoder_channels=32, num_classes=3,
                                 aux_loss_weight=weight)
        task = SegmentationTask(cfg, DistInfo(torch.device("cpu")))
        torch.manual_seed(0)
        task.train_model = task.build_dense_model().train()
        return task

    trainer = task_for(0.4)
    model = trainer.train_model
    assert model.aux_head is not None and task_for(0.0).train_model.aux_head is None
    images = torch.rand(2, 3, 64, 80)
    targets = torch.randint(0, 3, (2, 64, 80))
    targets[:, :6] = 255
    torch.manual_seed(3)
    loss = trainer.loss(model, images, targets)
    torch.manual_seed(3)
    with torch.no_grad():
        logits, aux = model(images, return_aux=True)
    main = F.cross_entropy(logits, targets, ignore_index=255)
    aux_loss = F.cross_entropy(aux, targets, ignore_index=255)
    torch.testing.assert_close(loss.detach(), main + 0.4 * aux_loss, rtol=1e-6, atol=1e-6)
    assert float(aux_loss) > 0.5  # 3 classes from random weights: about ln 3, so the sum really holds the aux term
    loss.backward()
    grads = [p.grad for p in model.aux_head.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and all(g.abs().sum() > 0 for g in grads)


def test_aux_head_survives_save_and_load(tmp_path):
    from open_fastervit.tasks.segmentation.train import load_segmenter
    from open_fastervit.weights import save_weights

    torch.manual_seed(0)
    model = _aux_segmenter(num_classes=4)
    with torch.no_grad():  # weights and BatchNorm statistics unlike any fresh initialisation
        for value in model.aux_head.state_dict().values():
            if value.is_floating_point():
                value.add_(torch.rand_like(value))
    path = save_weights(model, tmp_path / "seg.safetensors", metadata={
        "task": "segmentation", "architecture": "fastervit_0", "build_config": model.build_config})
    loaded = load_segmenter(path)
    assert loaded.build_config["aux_head"] is True and loaded.aux_head is not None
    saved = model.state_dict()
    aux_keys = [k for k in saved if k.startswith("aux_head.")]
    assert len(aux_keys) == 8  # conv weight, BN (weight, bias, running mean / var, count), classifier weight + bias
    assert all(torch.equal(loaded.state_dict()[k], saved[k]) for k in aux_keys)
    assert segmenter_from_config(model.build_config).aux_head is not None
