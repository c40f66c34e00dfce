"""Parity with the official implementation (the oracle): random weights, converted state dict, fp32."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import randomise

import open_fastervit
from open_fastervit import official_to_ours

TOL = 1e-5


def _pair(official_name: str, resolution: int, **kwargs):
    official = timm.create_model(official_name, resolution=resolution, **kwargs)
    randomise(official)
    ours = open_fastervit.create_model(official_name, **kwargs)
    ours.load_state_dict(official_to_ours(official.state_dict()), strict=True)
    return official, ours


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


# (official name, resolution): native sizes, plus sizes the official model runs when built for them
FAST = [
    ("faster_vit_0_224", 224),
    ("faster_vit_1_224", 224),
    ("faster_vit_3_224", 224),
    ("faster_vit_4_21k_224", 224),
    ("faster_vit_0_224", 448),  # stage 2: 4x4 windows (16 carriers per axis pair), stage 3: 2x2 plain windows
]
FULL = [
    ("faster_vit_2_224", 224),
    ("faster_vit_4_224", 224),
    ("faster_vit_5_224", 224),
    ("faster_vit_6_224", 224),
    ("faster_vit_4_21k_384", 384),
    ("faster_vit_4_21k_512", 512),
    ("faster_vit_4_21k_768", 768),
    ("faster_vit_3_224", 448),  # propagation with 4x4 windows
    ("faster_vit_1_224", 672),
]


def _check_eval(official_name: str, resolution: int) -> None:
    official, ours = _pair(official_name, resolution)
    official.eval()
    ours.eval()
    x = torch.randn(2, 3, resolution, resolution)
    with torch.no_grad():
        err = rel_err(official(x), ours(x))
        err_feat = rel_err(official.forward_features(x), ours.forward_features(x))
    print(f"parity {official_name}@{resolution}: logits {err:.2e}, features {err_feat:.2e}")
    assert err <= TOL and err_feat <= TOL


@pytest.mark.parametrize("official_name,resolution", FAST)
def test_parity_eval(oracle, official_name: str, resolution: int) -> None:
    _check_eval(official_name, resolution)


@pytest.mark.full
@pytest.mark.parametrize("official_name,resolution", FULL)
def test_parity_eval_full(oracle, official_name: str, resolution: int) -> None:
    _check_eval(official_name, resolution)


@pytest.mark.parametrize("official_name", ["faster_vit_0_224", "faster_vit_3_224"])
def test_parity_train_mode(oracle, official_name: str) -> None:
    """Train mode (batch statistics in BN), drop path off: outputs and gradients agree."""
    official, ours = _pair(official_name, 224, drop_path_rate=0.0)
    official.train()
    ours.train()
    x = torch.randn(4, 3, 224, 224)
    a, b = official(x), ours(x)
    assert rel_err(a, b) <= TOL
    a.square().mean().backward()
    b.square().mean().backward()
    ga = official.patch_embed.conv_down[0].weight.grad
    gb = ours.stem.conv1.weight.grad
    assert rel_err(ga, gb) <= 1e-4


def test_parity_tiny_hat_propagation_layer_scale(oracle) -> None:
    """A small config through the official large-model path (layer scale, propagation, 3x3 windows at 224)."""
    kwargs = dict(dim=32, in_dim=16, depths=(1, 1, 3, 2), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)
    official = timm.create_model("faster_vit_3_224", resolution=224, **kwargs)
    randomise(official)
    ours = open_fastervit.create_model("fastervit_3", **kwargs)
    ours.load_state_dict(official_to_ours(official.state_dict()), strict=True)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert rel_err(official.eval()(x), ours.eval()(x)) <= TOL
