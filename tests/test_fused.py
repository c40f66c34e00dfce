"""The inference form (``model.fuse()``, ``open_fastervit.fused``): packed oneDNN kernels give the plain outputs.

Every check runs the same fused model on the fast path (CPU, no autograd, fp32/bf16) and compares it with the
unfused model; the packed kernels are required to have actually run (spied), so a silent fallback fails.
"""

from __future__ import annotations

import copy
import io

import pytest
import timm
import torch
from conftest import TINY, randomise
from timm.utils import reparameterize_model

from open_fastervit.layers import ConvBlock, HatBlock
from open_fastervit.layers import fused as fused_mod
from open_fastervit.layers.fused import (
    FusedConv2d,
    FusedLinear,
    FusedMlp,
    kernel_dtype,
    onednn_available,
    onednn_bf16,
)

needs_onednn = pytest.mark.skipif(not onednn_available(), reason="this torch build has no oneDNN fusion kernels")
# bf16 packed kernels need AVX-512 BW/VL/DQ or AVX-NE-CONVERT (absent on e.g. AMD Zen 2/3); the plain path is tested
# on such CPUs by test_bf16_without_packed_kernels_takes_the_plain_path.
needs_onednn_bf16 = pytest.mark.skipif(not onednn_bf16(), reason="this CPU has no oneDNN bf16 kernels")


def tiny(**kwargs) -> torch.nn.Module:
    return randomise(timm.create_model("fastervit_0", **{**TINY, **kwargs}), spread=0.2).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture
def kernel_calls(monkeypatch) -> dict[str, int]:
    """Counts the packed-kernel calls of FusedLinear / FusedConv2d (through ``packed``)."""
    calls = {"FusedLinear": 0, "FusedConv2d": 0}
    for cls in (FusedLinear, FusedConv2d):
        original = cls.packed

        def spy(self, dtype, hint, _original=original, _name=cls.__name__):
            calls[_name] += 1
            return _original(self, dtype, hint)

        monkeypatch.setattr(cls, "packed", spy)
    return calls


@needs_onednn
@pytest.mark.parametrize("size", [(64, 64), (70, 90)])
@pytest.mark.parametrize("channels_last", [True, False])
def test_fused_matches_plain_fp32(size, channels_last, kernel_calls) -> None:
    model = tiny()
    fused = copy.deepcopy(model).fuse()
    x = torch.randn(3, 3, *size)
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        out = fused(x)
        feats = fused.forward_intermediates(x, intermediates_only=True)
        ref_feats = model.forward_intermediates(x, intermediates_only=True)
    assert rel_err(out, ref) < 1e-5
    for a, b in zip(feats, ref_feats):
        assert rel_err(a, b) < 1e-5
    assert kernel_calls["FusedLinear"] > 0
    if channels_last:  # packed convs take channels_last inputs (NCHW models still reach them after LayerNorm2d)
        assert kernel_calls["FusedConv2d"] >= 2 + 2 * 2  # stem, both conv blocks, ...


def test_fuse_rewrites_every_layer_once() -> None:
    model = tiny()
    fused = copy.deepcopy(model).fuse()
    assert all(b.fused for b in fused.modules() if isinstance(b, (HatBlock, ConvBlock)))
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, timm.layers.Mlp)) for m in fused.stages.modules())
    assert isinstance(fused.stem.conv1, FusedConv2d) and fused.stem.conv1.act == "relu"
    blk = fused.stages[2].blocks[0]
    assert isinstance(blk.mlp, FusedMlp) and blk.mlp.fc1.act == "gelu" and isinstance(blk.attn.proj, FusedLinear)
    # LayerScale folded: proj weight = gamma * W
    plain = model.stages[2].blocks[0]
    torch.testing.assert_close(blk.attn.proj.weight, plain.attn.proj.weight * plain.ls_attn.gamma[:, None])
    # fuse() is idempotent, timm's reparameterize_model reaches the same form (no double wrapping)
    again = copy.deepcopy(fused).fuse()
    timm_fused = reparameterize_model(copy.deepcopy(model))
    sd, sd_again, sd_timm = fused.state_dict(), again.state_dict(), timm_fused.state_dict()
    assert sd.keys() == sd_again.keys() == sd_timm.keys()
    for k in sd:
        torch.testing.assert_close(sd[k], sd_timm[k])
        torch.testing.assert_close(sd[k], sd_again[k])


@needs_onednn_bf16
def test_fused_bf16_autocast_uses_packed_bf16_and_stays_close(kernel_calls) -> None:
    model = tiny()
    fused = copy.deepcopy(model).fuse().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 70, 90).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            plain_bf16 = model(x)
            out = fused(x)
        fp32_again = fused(x)  # the fp32 packed weights live beside the bf16 ones
    assert out.dtype == torch.bfloat16
    assert kernel_calls["FusedLinear"] > 0 and kernel_calls["FusedConv2d"] > 0
    assert rel_err(out, ref) < max(3 * rel_err(plain_bf16, ref), 2e-2)
    assert rel_err(fp32_again, ref) < 1e-5
    dtypes = {key[0] for m in fused.modules() if isinstance(m, FusedLinear) for key in m._packed}
    assert dtypes == {torch.float32, torch.bfloat16}


def test_bf16_without_packed_kernels_takes_the_plain_path(monkeypatch, kernel_calls) -> None:
    """Where oneDNN cannot run bf16 (the probe says so) bf16 calls run plain ops instead of crashing in packing."""
    monkeypatch.setattr(fused_mod, "onednn_bf16", lambda: False)
    model = tiny()
    fused = copy.deepcopy(model).fuse().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fused(x)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) < 5e-2
    assert all(key[0] != torch.bfloat16 for m in fused.modules() if isinstance(m, (FusedLinear, FusedConv2d))
               for key in m._packed)


@needs_onednn_bf16
def test_pure_bf16_model_runs_packed(kernel_calls) -> None:
    model = tiny()
    fused = copy.deepcopy(model).fuse().to(torch.bfloat16, memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = fused(x.to(torch.bfloat16, memory_format=torch.channels_last))
        ref = model(x)
    assert out.dtype == torch.bfloat16 and kernel_calls["FusedLinear"] > 0
    assert rel_err(out, ref) < 5e-2


def test_fused_model_with_autograd_takes_plain_path_and_differentiates(kernel_calls) -> None:
    fused = tiny().fuse()
    x = torch.randn(2, 3, 64, 64, requires_grad=True)
    with torch.no_grad():
        ref = fused(x)
    calls_no_grad = dict(kernel_calls)
    out = fused(x)
    assert kernel_calls == calls_no_grad  # no packed kernel under autograd
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert rel_err(out.detach(), ref) < 1e-5


@needs_onednn
def test_packed_weights_never_stale() -> None:
    fused = tiny().fuse().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).to(memory_format=torch.channels_last)
    with torch.no_grad():
        fused(x)  # packs
        lin = fused.stages[2].blocks[0].mlp.fc2
        conv = fused.stages[0].blocks[0].conv1
        lin.weight.mul_(1.5)
        conv.weight.mul_(0.5)
        fresh = copy.deepcopy(fused)  # deepcopy drops packed copies
        assert all(not m._packed for m in fresh.modules() if isinstance(m, (FusedLinear, FusedConv2d)))
        torch.testing.assert_close(fused(x), fresh(x))
        other = tiny().fuse()
        fused.load_state_dict(other.state_dict())
        assert rel_err(fused(x), other(x)) < 1e-5
        double = fused.to(torch.float64)  # plain path in fp64
        assert all(not m._packed for m in double.modules() if isinstance(m, (FusedLinear, FusedConv2d)))
        assert double(x.double()).dtype == torch.float64
    buffer = io.BytesIO()  # a used fused model pickles (packed copies are not state)
    torch.save(fused, buffer)
    assert buffer.tell() > 0


def test_kernel_dtype_rules() -> None:
    x, w = torch.randn(4, 8), torch.randn(8, 8)
    available = onednn_available()
    with torch.no_grad():
        assert kernel_dtype(x, w) == (torch.float32 if available else None)
        assert kernel_dtype(x.double(), w) is None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert kernel_dtype(x, w) == (torch.bfloat16 if onednn_bf16() else None)
        with torch.autocast("cpu", dtype=torch.float16):
            assert kernel_dtype(x, w) is None
    assert kernel_dtype(x, w.requires_grad_()) is None  # autograd recording
    assert kernel_dtype(x.requires_grad_(), torch.randn(8, 8)) is None


def test_fused_model_exports_and_compiles_on_plain_ops() -> None:
    fused = tiny().fuse()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = fused(x)
    exported = torch.export.export(fused, (x,))
    assert not any("mkldnn" in str(n.target) for n in exported.graph.nodes)
    torch.testing.assert_close(exported.module()(x), ref, rtol=1e-5, atol=1e-5)
    compiled = torch.compile(fused, fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), ref, rtol=1e-5, atol=1e-5)


def test_without_onednn_the_fused_model_runs_plain_ops(monkeypatch, kernel_calls) -> None:
    fused_mod.onednn_available.cache_clear()
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    try:
        assert fused_mod.onednn_available() is False
        model = tiny()
        fused = copy.deepcopy(model).fuse().to(memory_format=torch.channels_last)
        x = torch.randn(2, 3, 64, 64)
        with torch.no_grad():
            assert rel_err(fused(x.to(memory_format=torch.channels_last)), model(x)) < 1e-5
        assert kernel_calls == {"FusedLinear": 0, "FusedConv2d": 0}
    finally:
        fused_mod.onednn_available.cache_clear()


def test_onednn_kernels_found_on_x86() -> None:
    """On x86 builds with oneDNN (CI) the fast path must be active, not silently skipped."""
    import platform

    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available():
        fused_mod.onednn_available.cache_clear()
        for seed in range(20):  # the probe must not depend on the caller's RNG state ...
            torch.manual_seed(seed)
            fused_mod.onednn_available.cache_clear()
            assert onednn_available()
        for dtype in (torch.bfloat16, torch.float16):  # ... nor on its autocast state when first called
            fused_mod.onednn_available.cache_clear()
            with torch.autocast("cpu", dtype=dtype), torch.no_grad():
                assert onednn_available()
    else:
        pytest.skip("not an x86 oneDNN build")


def test_fuse_without_packing_keeps_no_packed_copies(kernel_calls) -> None:
    model = tiny()
    fused = copy.deepcopy(model).fuse(pack=False).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert rel_err(fused(x.to(memory_format=torch.channels_last)), model(x)) < 1e-5
    assert kernel_calls == {"FusedLinear": 0, "FusedConv2d": 0}
    assert all(not m._packed for m in fused.modules() if isinstance(m, (FusedLinear, FusedConv2d)))


def test_fuse_inside_inference_mode_runs_and_never_goes_stale() -> None:
    """``fuse()`` called under ``torch.inference_mode`` makes inference tensors, which carry no version counter:
    it used to stop with "Inference tensors do not track version counter" on the first forward. The cached
    position biases now compare values for such tensors, so a weight change inside inference mode is seen."""
    model = tiny()
    x = torch.randn(2, 3, 64, 64)
    other = tiny()
    with torch.no_grad():
        ref, ref_other = model(x), other(x)
    with torch.inference_mode():
        fused = copy.deepcopy(model).fuse()
        assert rel_err(fused(x), ref) < 1e-5
        assert rel_err(fused(x), ref) < 1e-5  # cached biases reused
        fused.load_state_dict(copy.deepcopy(other).fuse().state_dict())  # in place, inside inference mode
        assert rel_err(fused(x), ref_other) < 1e-5


@needs_onednn
def test_convolutions_keep_one_packed_copy_per_input_shape(kernel_calls) -> None:
    """oneDNN lays a packed conv weight out for the input shape it is told (weights packed for batch 16 ran batch 1
    3.6x slower on AVX2): each conv keeps one packed copy per input shape, at most ``max_packed``, oldest dropped;
    linears keep one per dtype. Outputs match the plain model at every batch size."""
    model = tiny()
    fused = copy.deepcopy(model).fuse().to(memory_format=torch.channels_last)
    stem_conv = next(m for m in fused.modules() if isinstance(m, FusedConv2d))
    linear = next(m for m in fused.modules() if isinstance(m, FusedLinear))
    with torch.no_grad():
        for batch in (1, 4, 1, 2, 3, 5, 6):
            x = torch.randn(batch, 3, 64, 64).to(memory_format=torch.channels_last)
            assert rel_err(fused(x), model(x)) < 1e-5
            if batch == 4:
                assert [key[1] for key in stem_conv._packed] == [1, 4]  # batch 1 and batch 4 layouts
    assert len(stem_conv._packed) == FusedConv2d.max_packed
    assert [key[1] for key in stem_conv._packed] == [2, 3, 5, 6]
    assert list(linear._packed) == [(torch.float32,)]


@needs_onednn
def test_packed_linears_only_up_to_the_row_limit_of_this_cpu(monkeypatch, kernel_calls) -> None:
    """Without AVX-512, oneDNN's packed fp32 linears lose to MKL's GEMM beyond ~64 rows, so the fused linear takes
    the packed kernel only up to ``packed_linear_max_rows()`` rows (None: always); the result is the same."""
    from torch import nn

    linear = FusedLinear(nn.Linear(8, 5), act="gelu")
    policy = fused_mod.packed_linear_max_rows
    monkeypatch.setattr(fused_mod, "packed_linear_max_rows", lambda: 64)
    with torch.no_grad():
        for rows, packed in ((64, 1), (65, 0), (3, 1)):
            kernel_calls["FusedLinear"] = 0
            x = torch.randn(rows, 8)
            expected = nn.functional.gelu(nn.functional.linear(x, linear.weight, linear.bias))
            assert rel_err(linear(x), expected) < 1e-5
            assert kernel_calls["FusedLinear"] == packed, rows
        monkeypatch.setattr(fused_mod, "packed_linear_max_rows", lambda: None)
        kernel_calls["FusedLinear"] = 0
        linear(torch.randn(4096, 8))
        assert kernel_calls["FusedLinear"] == 1
    capability = torch.backends.cpu.get_cpu_capability()
    expected_limit = None if capability.startswith(("AVX512", "AMX")) else fused_mod.AVX2_PACKED_LINEAR_MAX_ROWS
    assert policy.__wrapped__() == expected_limit
