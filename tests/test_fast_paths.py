"""Every optimised inference path gives the plain path's outputs (fp32 rounding), and caches never go stale."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from conftest import TINY, randomise
from timm.utils import reparameterize_model

from open_fastervit.layers import Attention, ContinuousRelPosBias, TokenPosEmbed

SIZES = [(64, 64), (70, 90)]  # (64, 64): padded stage maps; (70, 90): non-square, HAT + padding


def tiny(**kwargs):
    return randomise(timm.create_model("fastervit_0", **{**TINY, **kwargs}), spread=0.2).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def caches(model: torch.nn.Module) -> int:
    return sum(len(m._cache) for m in model.modules() if isinstance(m, (ContinuousRelPosBias, TokenPosEmbed)))


@pytest.mark.parametrize("size", SIZES)
def test_fuse_and_reparameterize_match(size) -> None:
    model = tiny()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = model(x)
        fused = copy.deepcopy(model).fuse()
        assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.stages.modules())
        assert rel_err(fused(x), ref) < 1e-5
        timm_fused = reparameterize_model(model)
        assert rel_err(timm_fused(x), ref) < 1e-5


@pytest.mark.parametrize("size", SIZES)
def test_channels_last_matches(size) -> None:
    model = tiny()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = model(x)
        cl = copy.deepcopy(model).fuse().to(memory_format=torch.channels_last)
        assert rel_err(cl(x.contiguous(memory_format=torch.channels_last)), ref) < 1e-5


@pytest.mark.parametrize("size", SIZES)
def test_sdpa_and_explicit_attention_match(size) -> None:
    model = tiny()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Attention):
                m.fused_attn = True
        fused = model(x)
        for m in model.modules():
            if isinstance(m, Attention):
                m.fused_attn = False
        assert rel_err(model(x), fused) < 1e-5


def test_position_cache_used_only_in_inference_and_exact() -> None:
    model = tiny()
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        first = model(x)
        filled = caches(model)
        assert filled > 0
        second = model(x)
        assert caches(model) == filled
        torch.testing.assert_close(first, second, rtol=0, atol=0)
    # grad enabled (e.g. fine-tuning with frozen BN): no cache, gradients reach the position MLPs
    model.zero_grad()
    model(x).sum().backward()
    pos = model.stages[2].blocks[0].attn.rel_pos.mlp[0].weight
    assert pos.grad is not None and pos.grad.abs().sum() > 0
    model.train()
    with torch.no_grad():
        model(x)
    assert caches(model) == filled  # training mode computes the terms afresh and caches nothing


def test_cache_invalidated_by_load_to_and_inplace_updates() -> None:
    model, other = tiny(), tiny()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        model(x)
        token_caches = [m._cache for m in model.modules() if isinstance(m, TokenPosEmbed)]
        assert token_caches and all(len(c) == 1 for c in token_caches)  # token position embeddings cached too
        model.load_state_dict(other.state_dict())  # new weights: the cache must not survive
        torch.testing.assert_close(model(x), other(x))
        # in-place update of a position MLP (what an EMA update does) is seen at once
        for m in (model, other):
            m.stages[2].blocks[0].pos_embed.mlp[2].weight.mul_(3.0)
            m.stages[2].blocks[0].attn.rel_pos.mlp[0].bias.add_(0.5)
        fresh = copy.deepcopy(other)
        assert caches(fresh) == 0  # deepcopy / pickle carry no cache
        torch.testing.assert_close(model(x), fresh(x))
        double = model.to(torch.float64)
        assert caches(double) == 0
        assert double(x.double()).dtype == torch.float64


def test_bf16_autocast_runs_and_stays_close() -> None:
    model = tiny()
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            out_again = model(x)  # cached terms keyed by autocast state
        fp32_again = model(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out_again, out)
    torch.testing.assert_close(fp32_again, ref)
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), ref.flatten(), dim=0)
    assert cos > 0.99


def test_compiled_inference_matches_eager() -> None:
    model = tiny().fuse()
    x = torch.randn(2, 3, 64, 64)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
