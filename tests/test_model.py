"""The model: zoo, any input size, padding/masking, carrier-token layout, timm contract, export/compile, errors."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY
from timm.optim import param_groups_layer_decay

import open_fastervit
from open_fastervit.layers import CarrierTokenInit, WindowGrid
from open_fastervit.model import HatStage

# SPEC.md section 1, parameter counts with 1000 classes
PARAMS = {
    "fastervit_0": 31_404_840,
    "fastervit_1": 53_366_696,
    "fastervit_2": 75_923_816,
    "fastervit_3": 159_547_944,
    "fastervit_4": 365_555_712,
    "fastervit_5": 957_520_552,
    "fastervit_6": 1_360_328_872,
    "fastervit_4_21k_224": 271_944_224,
    "fastervit_4_21k_384": 271_944_224,
    "fastervit_4_21k_512": 271_944_224,
    "fastervit_4_21k_768": 271_944_224,
}


def tiny(**kwargs) -> open_fastervit.FasterViT:
    return timm.create_model("fastervit_0", **{**TINY, **kwargs})


# ---- zoo ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(PARAMS))
def test_zoo_parameter_counts_on_meta_device(name: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    assert all(p.is_meta for p in model.parameters())


def test_pretrained_cfgs() -> None:
    cfg = timm.create_model("fastervit_0", pretrained=False).pretrained_cfg
    assert cfg["hf_hub_filename"] == "fastervit_0_224_1k.pth.tar"
    assert cfg["crop_pct"] == 0.875 and cfg["interpolation"] == "bicubic"
    assert cfg["license"] == "nvidia-source-code-license-nc"
    cfg = timm.models.get_pretrained_cfg("fastervit_4_21k_768")
    assert cfg.input_size == (3, 768, 768) and cfg.crop_mode == "squash" and cfg.crop_pct == 0.93
    assert cfg.hf_hub_filename == "fastervit_4_21k_768_w48.pth.tar"
    assert set(open_fastervit.MODEL_NAMES) <= set(timm.list_models("fastervit_*"))
    assert len(open_fastervit.MODEL_NAMES) == 11


def test_unknown_model_name_lists_close_names() -> None:
    with pytest.raises(ValueError, match="did you mean.*fastervit_0"):
        open_fastervit.create_model("fastervit0")
    with pytest.raises(ValueError, match="unknown FasterViT model"):
        open_fastervit.create_model("resnet50")
    # official names are accepted as aliases
    assert open_fastervit.create_model("faster_vit_1_224", **TINY).pretrained_cfg["architecture"] == "fastervit_1"


# ---- any input size ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (64, 64), (97, 130), (224, 160), (130, 33)])
def test_any_size_train_and_eval(size: tuple[int, int]) -> None:
    model = tiny()
    x = torch.randn(2, 3, *size)
    for mode in (True, False):
        model.train(mode)
        out = model(x)
        assert out.shape == (2, 10) and torch.isfinite(out).all()
    feats = model.forward_features(x)
    assert feats.shape == (2, 128, -(-size[0] // 32), -(-size[1] // 32))


def test_window_partition_roundtrip_and_order() -> None:
    x = torch.arange(2 * 3 * 6 * 9, dtype=torch.float32).view(2, 3, 6, 9)
    grid = WindowGrid(6, 9, 3)
    z = grid.partition(x)  # (2, 2 * 3, 9, 3)
    assert z.shape == (2, 6, 9, 3)
    # window (row 1, col 2) of image 1, token (row 0, col 1), channel 2
    assert z[1, 1 * 3 + 2, 0 * 3 + 1, 2] == x[1, 2, 3 + 0, 6 + 1]
    assert torch.equal(grid.reverse(z), x)
    padded = WindowGrid(5, 7, 3)  # 2 x 3 windows of a zero-padded 6 x 9 map, cropped back on reverse
    zp = padded.partition(x[..., :5, :7])
    assert zp.shape == (2, 6, 9, 3) and zp[1, 1 * 3 + 2, 2 * 3 + 1, 2] == 0  # padded row 5
    assert torch.equal(padded.reverse(zp), x[..., :5, :7])


def test_carrier_tokens_are_window_major_per_axis_non_square() -> None:
    """Carrier cells of window (r, c) come from that window, for a 2 x 3 window grid (non-square)."""
    ws, ct, nh, nw = 4, 2, 2, 3
    init = CarrierTokenInit(dim=1, carrier_size=ct)
    grid = WindowGrid(nh * ws, nw * ws, ws, ct)
    with torch.no_grad():
        init.pos_conv.weight.zero_()
        init.pos_conv.weight[:, :, 1, 1] = 1.0  # identity position conv
        init.pos_conv.bias.zero_()
    value = torch.tensor([[10.0 * r + c for c in range(nw)] for r in range(nh)])
    x = value.repeat_interleave(ws, 0).repeat_interleave(ws, 1)[None, None]  # (1, 1, 8, 12)
    t = init(x, grid)
    assert t.shape == (1, nh * nw * ct * ct, 1)
    expected = value.reshape(-1).repeat_interleave(ct * ct)
    assert torch.equal(t[0, :, 0], expected)
    raster = grid.carriers_to_raster(t)
    cells = raster[0, :, 0].view(nh * ct, nw * ct)
    assert torch.equal(cells, value.repeat_interleave(ct, 0).repeat_interleave(ct, 1))
    assert torch.equal(grid.raster_to_carriers(raster), t)


def test_padded_positions_take_no_part_in_attention() -> None:
    """Whatever the padded positions hold, the real positions' outputs do not change."""
    torch.manual_seed(1)
    stage = HatStage(16, 16, depth=2, num_heads=2, window_size=4, ct_size=2, hat=True, do_propagation=True,
                     drop_path=[0.0, 0.0], layer_scale=0.5, downsample=False).eval()
    h, w, ws = 6, 7, 4  # padded to 8 x 8: 2 x 2 windows
    x = torch.randn(2, 16, h, w)
    with torch.no_grad():
        ref = stage(x)
        assert ref.shape == x.shape
        grid = stage.grid(h, w)
        t = stage.carrier_init(x, grid)
        for fill in (0.0, 1e3, -7.5):
            xp = F.pad(x, (0, 8 - w, 0, 8 - h), value=fill)
            z, tt = WindowGrid(8, 8, ws, 2).partition(xp), t
            for blk in stage.blocks:
                z, tt = blk(z, tt, grid)
            out = WindowGrid(8, 8, ws, 2).reverse(z)[:, :, :h, :w]
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_key_mask_hides_only_padding() -> None:
    mask = WindowGrid(5, 3, 4).key_mask(4, torch.device("cpu"), torch.float32)
    assert mask.shape == (2, 1, 1, 4 + 16)
    assert (mask[:, 0, 0, :4] == 0).all()  # carriers always visible
    real = mask[0, 0, 0, 4:].view(4, 4) == 0
    assert real[:, :3].all() and not real[:, 3].any()
    assert not WindowGrid(8, 8, 4).needs_padding()
    assert (WindowGrid(8, 8, 4).key_mask(0, torch.device("cpu"), torch.float32) == 0).all()


def test_single_window_stage_runs_plain_attention() -> None:
    """At 224, stage 3 (7x7, window 7) holds one window: no carrier tokens, even when flagged for HAT."""
    model = tiny(window_size=(7, 7, 7, 7), hat=(False, False, True, True)).eval()
    seen = {}

    def hook(mod, args, out):
        seen[mod] = args[1] is None

    for blk in model.stages[3].blocks:
        blk.register_forward_hook(hook)
    for blk in model.stages[2].blocks:
        blk.register_forward_hook(hook)
    model(torch.randn(1, 3, 224, 224))
    assert all(seen[b] for b in model.stages[3].blocks)  # 7x7 map: one window -> plain attention
    assert not any(seen[b] for b in model.stages[2].blocks)  # 14x14 map: 4 windows -> HAT


# ---- timm contract ---------------------------------------------------------------------------------------------


def test_forward_features_head_and_classifier_reset() -> None:
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 2, 2)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(feats), model(x))
    assert model.get_classifier().out_features == 10
    model.reset_classifier(5)
    assert model(x).shape == (2, 5)
    model.reset_classifier(0)
    assert model(x).shape == (2, model.num_features)
    model.reset_classifier(0, "")
    assert model(x).shape == (2, model.num_features, 2, 2)


def test_features_only() -> None:
    model = timm.create_model("fastervit_0", features_only=True, **TINY).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [16, 32, 64, 128]
    feats = model(torch.randn(2, 3, 96, 160))
    assert [tuple(f.shape) for f in feats] == [(2, 16, 24, 40), (2, 32, 12, 20), (2, 64, 6, 10), (2, 128, 3, 5)]
    sub = timm.create_model("fastervit_0", features_only=True, out_indices=(1, 3), **TINY)
    assert [f.shape[1] for f in sub(torch.randn(1, 3, 64, 64))] == [32, 128]


def test_forward_intermediates_and_prune() -> None:
    model = tiny().eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert [i.shape[1] for i in inter] == [16, 32, 64, 128]
        only = model.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(only[0], inter[2])
        torch.testing.assert_close(only[1], inter[3])
        normed = model.forward_intermediates(x, indices=[-1], norm=True, intermediates_only=True)
        torch.testing.assert_close(normed[0], final)
        taken = model.prune_intermediate_layers(indices=[0, 1])
        assert taken == [0, 1] and len(model.stages) == 2
        again = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        torch.testing.assert_close(again[1], inter[1])
        assert model(x).shape == (2, 32, 8, 12)


def test_grad_checkpointing_same_outputs_and_grads() -> None:
    model = tiny().train()
    x = torch.randn(2, 3, 64, 64)
    out = model(x)
    out.sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    out2 = model(x)
    out2.sum().backward()
    torch.testing.assert_close(out2, out)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_group_matcher_covers_every_parameter() -> None:
    model = tiny()
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.8)
    names = {n for n, _ in model.named_parameters()}
    grouped = sum(len(g["params"]) for g in groups)
    assert grouped == len(names)
    scales = sorted({g["lr_scale"] for g in groups})
    assert len(scales) > 4  # stem, stage blocks and the head get distinct scales
    assert all(n.endswith(".gamma") for n in model.no_weight_decay()) and model.no_weight_decay()


def test_backward_reaches_every_parameter() -> None:
    model = tiny(layer_scale=0.5).train()
    model(torch.randn(2, 3, 64, 80)).logsumexp(-1).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_drop_path_is_per_image() -> None:
    """In training a dropped window branch is dropped for the whole image, not per window."""
    model = tiny(drop_path_rate=0.5).train()
    blk = model.stages[2].blocks[1]
    y = torch.ones(2, 4, 5, 16)  # window tokens: 2 images x 4 windows
    torch.manual_seed(3)
    kept = [blk.drop_path(y)[:, :, 0, 0] for _ in range(8)]
    for k in kept:  # each image: all four windows share the same fate
        assert (k == k[:, :1]).all()


def test_torch_compile_fullgraph() -> None:
    """No graph breaks; 70 px pads stage 2 (HAT + key mask) and leaves stage 3 unpadded."""
    model = tiny().eval()
    x = torch.randn(2, 3, 70, 70)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_torch_export_dynamic_batch() -> None:
    model = tiny().eval()
    x = torch.randn(2, 3, 70, 64)  # padded stage maps: mask path included
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(model, (x,), dynamic_shapes={"x": {0: batch}})
    for b in (1, 3, 5):
        xb = torch.randn(b, 3, 70, 64)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(xb), model(xb), rtol=1e-5, atol=1e-5)


def test_forward_writes_no_state() -> None:
    model = tiny().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attrs = {id(m): dict(vars(m)) for m in model.modules()}
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for m in model.modules():
        assert vars(m).keys() == attrs[id(m)].keys()


# ---- bad input -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x,error,match",
    [
        (torch.randn(1, 1, 64, 64), ValueError, "3 input channels got 1"),
        (torch.randn(3, 64, 64), ValueError, "4-D batch.*unsqueeze"),
        (torch.randn(1, 1, 3, 64, 64), ValueError, "4-D batch"),
        (torch.randn(1, 3, 31, 64), ValueError, "at least 32x32"),
        (torch.randint(0, 255, (1, 3, 64, 64), dtype=torch.uint8), TypeError, "floating-point"),
    ],
)
def test_bad_input_errors(x: torch.Tensor, error: type, match: str) -> None:
    model = tiny(num_classes=10)
    with pytest.raises(error, match=match):
        model(x)
    with pytest.raises(error, match=match):
        model.forward_intermediates(x)


def test_img_size_sets_the_data_config_size_only() -> None:
    """timm users pass ``img_size`` to ``create_model``; FasterViT runs at any size, so it only sets the input size
    the model's data config asks for (``resolve_data_config``), and a bad value is a clear error."""
    from timm.data import resolve_data_config

    model = tiny(img_size=384)
    assert resolve_data_config({}, model=model)["input_size"] == (3, 384, 384)
    assert model(torch.randn(1, 3, 96, 64)).shape == (1, 10)  # still any size
    assert tiny(img_size=(256, 320)).default_cfg["input_size"] == (3, 256, 320)
    assert tiny().pretrained_cfg["input_size"] == (3, 224, 224)
    import numpy as np

    assert tiny(img_size=np.int64(256)).default_cfg["input_size"] == (3, 256, 256)
    for bad in (16, (224,), "224", (224.0, 224), 384.0, 384.5, True, (0, 384), (224, 224, 224)):
        with pytest.raises(ValueError, match="img_size must be an integer >= 32"):
            tiny(img_size=bad)
