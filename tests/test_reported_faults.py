"""Reported faults of the model's timm interface (issue 12, items 3, 4, 6 and 10), each with its stated answer."""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import TINY

from open_fastervit.tasks.classification.task import probe_unused_parameters as _unused_parameters


def test_forward_intermediates_stop_early_skips_the_final_norm() -> None:
    """Item 3: ``indices=[1], stop_early=True`` raised "running_mean should contain 128 elements not 512". timm's
    convention: the final norm only when the last stage ran; here the final map is stage 1's raw output."""
    model = timm.create_model("fastervit_0").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        final, feats = model.forward_intermediates(x, indices=[1], stop_early=True)
        assert [f.shape for f in feats] == [(1, 128, 28, 28)]
        assert final.shape == (1, 128, 28, 28) and torch.equal(final, feats[0])
        # when the last stage runs, the final map is normed as before
        final, feats = model.forward_intermediates(x, indices=[1, 3], stop_early=True)
        torch.testing.assert_close(final, model.forward_features(x))


def test_features_only_outputs_follow_out_indices_order() -> None:
    """Item 4: ``out_indices=(3, 1)`` listed channels [512, 128] but returned maps [128, 512]; now the maps come
    in the order of ``feature_info``: [512, 128]."""
    model = timm.create_model("fastervit_0", features_only=True, out_indices=(3, 1)).eval()
    assert model.feature_info.channels() == [512, 128]
    assert model.feature_info.reduction() == [32, 8]
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 224, 224))
    assert [m.shape[1] for m in maps] == [512, 128]
    assert [224 // m.shape[-1] for m in maps] == [32, 8]


def test_repeated_indices_are_rejected_clearly() -> None:
    model = timm.create_model("fastervit_0", **TINY).eval()
    with pytest.raises(ValueError, match="name a stage twice"):
        model.forward_intermediates(torch.randn(1, 3, 64, 64), indices=[1, -3])


def test_channels_last_image_tensor_gets_the_permute_hint() -> None:
    """Item 6: ``model(torch.randn(1, 64, 64, 3))`` suggested ``in_chans=64``; it must suggest the permute."""
    model = timm.create_model("fastervit_0", **TINY).eval()
    with pytest.raises(ValueError, match=r"x\.permute\(0, 3, 1, 2\)") as err:
        model(torch.randn(1, 64, 64, 3))
    assert "in_chans=64" not in str(err.value)
    with pytest.raises(ValueError, match="in_chans=5"):  # a genuinely different channel count keeps its hint
        model(torch.randn(1, 5, 64, 64))


@pytest.mark.parametrize(
    "size, expected",
    [((64, 64), 110), ((112, 112), 110), ((113, 113), 0), ((96, 224), 0), ((224, 224), 0)],
)
def test_unused_parameters_helper(size, expected) -> None:
    """Item 10: at small inputs stage 2 of FasterViT-0 holds one window and its 110 carrier-token tensors get no
    gradient (DDP's unused-parameter error). ``model.unused_parameters(size)`` names them without a forward pass,
    and agrees with a backward pass."""
    model = timm.create_model("fastervit_0").eval()
    unused = model.unused_parameters(size)
    assert len(unused) == expected
    assert all(".ct_" in n or "carrier_init" in n for n in unused)
    if size[0] <= 113:  # the backward-pass check is slow at larger sizes on 2 cores
        assert sorted(unused) == sorted(_unused_parameters(model, (3, *size), torch.device("cpu")))


def test_input_dtype_mismatch_is_reported_clearly() -> None:
    """A float64 input to a float32 model gave torch's "expected scalar type Double but found Float"."""
    model = timm.create_model("fastervit_0", **TINY).eval()
    with pytest.raises(TypeError, match=r"input is torch.float64 but the model's weights are torch.float32"):
        model(torch.randn(1, 3, 64, 64, dtype=torch.float64))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtypes itself
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 10)
