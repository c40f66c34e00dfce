"""``layers.HierarchicalAttention``: the plug-in module, its shapes, its window-attention special case, reach."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from open_fastervit.layers import HierarchicalAttention


def hat(**kwargs) -> HierarchicalAttention:
    args = dict(dim=16, num_heads=2, window_size=4, carrier_size=2, depth=2, layer_scale=0.5, propagate=True)
    return HierarchicalAttention(**{**args, **kwargs}).eval()


@pytest.mark.parametrize("size", [(1, 1), (1, 5), (4, 4), (7, 13), (9, 9), (16, 12)])
def test_any_size_keeps_the_shape_and_differentiates(size) -> None:
    module = hat().train()
    x = torch.randn(2, 16, *size, requires_grad=True)
    y = module(x)
    assert y.shape == x.shape
    y.square().mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_bad_input_and_arguments_are_reported() -> None:
    with pytest.raises(ValueError, match=r"expects \(B, 16, H, W\)"):
        hat()(torch.randn(2, 8, 5, 5))
    with pytest.raises(ValueError, match="carrier_size >= 0"):
        HierarchicalAttention(16, 2, window_size=4, carrier_size=-1)
    with pytest.raises(ValueError, match="drop_path has 1 rates for depth 2"):
        HierarchicalAttention(16, 2, depth=2, drop_path=[0.1])
    with pytest.raises(ValueError, match="not divisible"):
        HierarchicalAttention(15, 2)


def reference_window_attention(module: HierarchicalAttention, x: torch.Tensor) -> torch.Tensor:
    """Plain window attention written out window by window: pad, add the window position embedding, attend with
    the continuous bias over the real keys only, MLP, crop. Uses the module's weights; no shared code paths."""
    ws = module.window_size
    b, c, h, w = x.shape
    hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
    real = torch.zeros(hp, wp, dtype=torch.bool)
    real[:h, :w] = True
    out = F.pad(x, (0, wp - w, 0, hp - h)).clone()
    for blk in module.blocks:
        attn = blk.attn
        heads, d = attn.num_heads, attn.head_dim
        bias = attn.rel_pos.compute(ws, ws)[0]  # (heads, ws*ws, ws*ws)
        new = out.clone()
        for i in range(0, hp, ws):
            for j in range(0, wp, ws):
                tokens = out[:, :, i : i + ws, j : j + ws].flatten(2).transpose(1, 2)  # (B, ws*ws, C)
                keep = real[i : i + ws, j : j + ws].flatten()
                tokens = tokens + blk.pos_embed(ws, ws)
                q, k, v = attn.qkv(blk.norm1(tokens)).view(b, -1, 3, heads, d).permute(2, 0, 3, 1, 4)
                logits = (q @ k.transpose(-2, -1)) * d**-0.5 + bias
                logits = logits.masked_fill(~keep, float("-inf"))
                mixed = (logits.softmax(-1) @ v).transpose(1, 2).reshape(b, -1, c)
                tokens = tokens + blk.ls_attn(attn.proj(mixed))
                tokens = tokens + blk.ls_mlp(blk.mlp(blk.norm2(tokens)))
                new[:, :, i : i + ws, j : j + ws] = tokens.transpose(1, 2).reshape(b, c, ws, ws)
        out = new
    return out[:, :, :h, :w]


@pytest.mark.parametrize("size", [(8, 8), (7, 10), (3, 3)])
def test_carrier_size_zero_is_plain_window_attention(size) -> None:
    module = hat(carrier_size=0)
    assert module.carrier_init is None and not any(".ct_" in n for n, _ in module.named_parameters())
    x = torch.randn(2, 16, *size)
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference_window_attention(module, x), rtol=1e-5, atol=1e-5)


def test_single_window_maps_use_no_carriers() -> None:
    """With one window, attention is already global: HAT runs as window attention with the same weights."""
    with_ct, without = hat(), hat(carrier_size=0)
    without.load_state_dict(with_ct.state_dict(), strict=False)
    x = torch.randn(2, 16, 4, 3)
    assert not with_ct.uses_carriers(4, 3) and with_ct.uses_carriers(4, 5)
    with torch.no_grad():
        torch.testing.assert_close(with_ct(x), without(x))


def test_carriers_carry_information_across_windows() -> None:
    """Paper's claim in miniature: with carrier tokens the top-left window sees the bottom-right one after one
    block; plain window attention cannot (its gradient is exactly zero)."""
    for ct, connected in ((2, True), (0, False)):
        module = hat(carrier_size=ct, depth=1, propagate=False)
        x = torch.randn(1, 16, 12, 12, requires_grad=True)
        module(x)[:, :, :4, :4].sum().backward()
        far = x.grad[:, :, 8:, 8:].abs().sum().item()
        assert (far > 0) == connected, (ct, far)
