"""``create_backbone``: multi-scale maps, frozen stages, norm_eval, checkpointing, lr groups, weights, fused form."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TINY

from open_fastervit import create_backbone, create_model, save_weights
from open_fastervit.backbone import FasterViTBackbone
from open_fastervit.serialization import CheckpointError

ARCH = {k: v for k, v in TINY.items() if k != "num_classes"}


def _backbone(**kwargs) -> FasterViTBackbone:
    return create_backbone("fastervit_0", model_kwargs=ARCH, **kwargs)


@pytest.mark.parametrize("size", [(64, 64), (97, 130), (200, 300)])
def test_maps_at_strides_4_to_32_at_any_size(size):
    backbone = _backbone().eval()
    maps = backbone(torch.randn(2, 3, *size))
    assert backbone.strides == [4, 8, 16, 32] and backbone.out_channels == [16, 32, 64, 128]
    for x, stride, channels in zip(maps, backbone.strides, backbone.out_channels):
        assert x.shape == (2, channels, -(-size[0] // stride), -(-size[1] // stride))


def test_maps_equal_the_classifiers_stage_outputs():
    torch.manual_seed(0)
    model = create_model("fastervit_0", **ARCH).eval()
    backbone = FasterViTBackbone(copy.deepcopy(model), out_indices=(3, 1)).eval()
    x = torch.randn(1, 3, 96, 128)
    expected = model.forward_intermediates(x, indices=[3, 1], intermediates_only=True)
    for got, want in zip(backbone(x), expected):
        torch.testing.assert_close(got, want)
    assert backbone.out_channels == [128, 32] and len(backbone.stages) == 4


def test_frozen_stages_get_no_gradient_and_stay_in_eval_mode():
    backbone = _backbone(frozen_stages=2).train()
    sum(x.mean() for x in backbone(torch.randn(2, 3, 64, 64))).backward()
    for name, p in backbone.named_parameters():
        frozen = name.startswith(("stem.", "stages.0.", "stages.1."))
        assert p.requires_grad is not frozen, name
        assert (p.grad is None) is frozen or name.startswith("stages.3") and p.grad is None, name
    assert not backbone.stem.training and not backbone.stages[1].training and backbone.stages[2].training


def test_norm_eval_keeps_batchnorm_statistics():
    backbone = _backbone(norm_eval=True).train()
    before = {k: v.clone() for k, v in backbone.state_dict().items() if "running" in k}
    backbone(torch.randn(2, 3, 64, 64) * 3 + 1)
    after = backbone.state_dict()
    assert before and all(torch.equal(v, after[k]) for k, v in before.items())
    plain = _backbone().train()
    stats = {k: v.clone() for k, v in plain.state_dict().items() if "running_mean" in k}
    plain(torch.randn(2, 3, 64, 64) * 3 + 1)
    assert any(not torch.equal(v, plain.state_dict()[k]) for k, v in stats.items())


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    a = _backbone()
    b = copy.deepcopy(a)
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 64, 64)
    for model in (a, b):
        model.eval()  # no dropout / drop path: identical forward passes
        sum(y.square().mean() for y in model(x)).backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, msg=name)


def test_layer_decay_groups_cover_every_trainable_parameter_once():
    backbone = _backbone(frozen_stages=0)
    groups = backbone.param_groups(weight_decay=0.05, layer_decay=0.5, lr=1e-3, prefix="backbone.")
    names = [n for g in groups for n in g["param_names"]]
    trainable = [f"backbone.{n}" for n, p in backbone.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable) and len(names) == len(set(names))
    scales = {g["lr_scale"] for g in groups}
    assert max(scales) == 1.0 and min(scales) < 0.1  # blocks near the input learn slower
    assert all(g["weight_decay"] == 0.0 for g in groups if any(n.endswith(".bias") for n in g["param_names"]))
    assert all(g["lr"] == pytest.approx(1e-3 * g["lr_scale"]) for g in groups)


def test_inference_form_gives_the_same_maps():
    backbone = _backbone().eval()
    x = torch.randn(1, 3, 97, 130)
    with torch.no_grad():
        expected = backbone(x)
        fused = copy.deepcopy(backbone).fuse()
        got = fused(x)
    assert not list(fused.parameters())
    for g, e in zip(got, expected):
        assert float((g - e).abs().max() / e.abs().max()) < 1e-5


def test_weights_from_our_file_and_errors(tmp_path):
    torch.manual_seed(1)
    model = create_model("fastervit_0", **ARCH)
    path = save_weights(model, tmp_path / "w.safetensors")
    backbone = create_backbone("fastervit_0", checkpoint=path, model_kwargs=ARCH)
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[key], msg=key)
    with pytest.raises(CheckpointError):
        create_backbone("fastervit_0", checkpoint=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="out_indices"):
        _backbone(out_indices=(1, 1))
    with pytest.raises(ValueError, match="frozen_stages"):
        _backbone(frozen_stages=7)
    with pytest.raises(ValueError, match="channels|in_chans"):
        _backbone().eval()(torch.randn(1, 1, 64, 64))


def test_official_checkpoint_loads_into_the_backbone(tmp_path, oracle):
    """The authors' checkpoint layout (random weights of their model) through the one loader."""
    import timm

    official = timm.create_model("faster_vit_0_224")
    path = tmp_path / "official.pth.tar"
    torch.save({"state_dict": official.state_dict()}, path)
    backbone = create_backbone("fastervit_0", checkpoint=path).eval()
    from open_fastervit.loading import load_official

    reference = load_official("fastervit_0", path).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        expected = reference.forward_intermediates(x, intermediates_only=True)
        got = backbone(x)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e)
