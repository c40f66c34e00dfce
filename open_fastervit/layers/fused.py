"""Inference form of FasterViT's layers (fused conv / linear), built by ``FasterViT.fuse()``.

Three exact rewrites (same function up to fp32 rounding), each a standard deployment step:

* BatchNorm folded into the conv before it; LayerScale ``gamma`` folded into the linear before it;
* the activation (GELU, ReLU) and the residual add carried out by the conv / linear that produces the branch;
* on CPU, the weights pre-packed once into oneDNN's blocked layout and the layer run as one oneDNN primitive
  with the activation / add as post-ops (``torch.ops.mkldnn._linear_pointwise`` and
  ``_convolution_pointwise``, the kernels behind torch.compile's CPU backend), in fp32 or bf16. Under bf16
  autocast the packed bf16 weights replace the per-call weight casts.

The packed kernels run only where they are valid: CPU tensors, no autograd, no tracing, compiling or export
(those see the plain ``F.linear`` / ``F.conv2d`` path, which inductor fuses on its own), fp32 or bf16, and, for
convolutions, channels_last inputs. Everywhere else (CUDA, fp16, gradients) the same module computes the same
function with plain ops. They cost one copy of the weights per dtype used; ``FasterViT.fuse(pack=False)`` keeps
the folding and fusion without them.

The inference form is a *snapshot* of the weights it was built from (:func:`freeze`): it holds no parameters, only
buffers, so nothing that updates parameters (optimizers, EMA or teacher updates, weight averaging, ``.data`` edits
over ``parameters()``) can reach it. Packed copies are rebuilt when a buffer is replaced or changed through
PyTorch's in-place ops (``load_state_dict``, ``copy_`` on ``state_dict()`` tensors), and dropped by ``.to()``.
A snapshot built under ``torch.inference_mode`` holds inference tensors, which have no version counter: there
``load_state_dict`` still rebuilds the packed copies, other in-place edits made inside inference mode are not seen.
To change the weights, change the trainable model and build its inference form again.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "FusedConv2d", "FusedLinear", "FusedMlp", "freeze", "kernel_dtype", "onednn_available", "onednn_bf16",
    "packed_linear_max_rows",
]

_ACTS = ("none", "gelu", "relu")


def _version(t: Tensor) -> int:
    """The in-place version counter of ``t``; inference tensors (made under ``torch.inference_mode``) have none and
    cannot be modified outside it, so they count as version 0."""
    return 0 if t.is_inference() else t._version


@functools.cache
def onednn_available() -> bool:
    """True when this torch build has the oneDNN pointwise-fusion kernels and they compute correctly.

    Probed once, in plain fp32 whatever the caller's autocast / grad state."""
    with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False), torch.no_grad():
        return _probe_onednn()


def _probe_onednn() -> bool:
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        ops = torch.ops.mkldnn
        g = torch.Generator().manual_seed(0)  # private generator: the probe leaves the global RNG alone
        x, w, b = torch.randn(5, 8, generator=g), torch.randn(4, 8, generator=g), torch.randn(4, generator=g)
        pw = ops._reorder_linear_weight(w, 5)
        ref = F.linear(x, w, b)
        y = ops._linear_pointwise(x, pw, b, "gelu", [], "none")
        y_add = ops._linear_pointwise.binary(x, ref, pw, b, "add")
        xc = torch.randn(1, 8, 6, 6, generator=g).to(memory_format=torch.channels_last)
        wc = torch.randn(4, 8, 3, 3, generator=g)
        pc = ops._reorder_convolution_weight(wc, [1, 1], [1, 1], [1, 1], 1, list(xc.shape))
        ref_c = F.conv2d(xc, wc, b, padding=1)
        geometry = ([1, 1], [1, 1], [1, 1], 1)  # padding, stride, dilation, groups
        yc = ops._convolution_pointwise(xc, pc, b, *geometry, "relu", [], "")
        yc_add = ops._convolution_pointwise.binary(xc, ref_c, pc, b, *geometry, "add", None, None, [], None)
        pairs = ((y, F.gelu(ref)), (y_add, 2 * ref), (yc, F.relu(ref_c)), (yc_add, 2 * ref_c))
        return all(bool(torch.allclose(a, e, rtol=1e-4, atol=1e-4)) for a, e in pairs)
    except Exception:  # ops missing or failing in this build: the plain path is used
        return False


@functools.cache
def onednn_bf16() -> bool:
    """True when the packed kernels also run in bf16 on this CPU (oneDNN needs AVX-512 BW/VL/DQ or AVX-NE-CONVERT
    for them; e.g. AMD Zen 2/3 lack both). Probed once; without it bf16 calls take the plain path."""
    if not onednn_available():
        return False
    with torch.autocast("cpu", enabled=False), torch.no_grad():
        try:
            ops = torch.ops.mkldnn
            g = torch.Generator().manual_seed(0)
            x, w = torch.randn(5, 8, generator=g).bfloat16(), torch.randn(4, 8, generator=g).bfloat16()
            y = ops._linear_pointwise(x, ops._reorder_linear_weight(w, 5), None, "none", [], "")
            xc = torch.randn(1, 8, 6, 6, generator=g).bfloat16().to(memory_format=torch.channels_last)
            wc = torch.randn(4, 8, 3, 3, generator=g).bfloat16()
            pc = ops._reorder_convolution_weight(wc, [1, 1], [1, 1], [1, 1], 1, list(xc.shape))
            yc = ops._convolution_pointwise(xc, pc, None, [1, 1], [1, 1], [1, 1], 1, "none", [], "")
            ok_linear = torch.allclose(y.float(), F.linear(x.float(), w.float()), rtol=2e-2, atol=2e-2)
            ok_conv = torch.allclose(yc.float(), F.conv2d(xc.float(), wc.float(), padding=1), rtol=2e-2, atol=5e-2)
            return bool(ok_linear and ok_conv)
        except Exception:  # no bf16 kernels on this CPU / build: plain path
            return False


def kernel_dtype(x: Tensor, weight: Tensor) -> torch.dtype | None:
    """The dtype a packed oneDNN kernel would run this call in, or None for the plain path.

    None on other devices, with autograd recording, while tracing/compiling/exporting (tensor subclasses such as
    FakeTensor included), and for dtypes other than fp32/bf16. Under CPU autocast: bf16 when that is its dtype.
    """
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return None
    if x.device.type != "cpu" or type(x) is not Tensor or not onednn_available():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
    else:
        dtype = x.dtype
    if dtype == torch.bfloat16:
        return dtype if onednn_bf16() else None
    return dtype if dtype == torch.float32 else None


#: Largest number of rows (tokens in the call) for which a packed fp32 linear runs on CPUs without AVX-512. There,
#: oneDNN's packed fp32 kernels with fused GELU / add lose to MKL's GEMM plus a separate op from about 64 rows on
#: (AMD EPYC Zen 3, FasterViT's linear shapes: MKL faster in 14 of 18 shape/row pairs at 212-3392 rows, packed faster
#: in 5 of 6 at 16 rows; experiments/cpu_kernels.py), while on AVX-512 CPUs they won at every size. None: no limit.
AVX2_PACKED_LINEAR_MAX_ROWS = 64


@functools.cache
def packed_linear_max_rows() -> int | None:
    """Rows up to which fp32 linears take the packed kernels on this CPU (None: all), from its vector ISA."""
    capability = torch.backends.cpu.get_cpu_capability()
    return None if capability.startswith(("AVX512", "AMX")) else AVX2_PACKED_LINEAR_MAX_ROWS


def _activate(y: Tensor, act: str) -> Tensor:
    if act == "gelu":
        return F.gelu(y)
    if act == "relu":
        return F.relu(y)
    return y


class _Packed(nn.Module):
    """Weight + bias (Parameters, so ``.to()``/state_dict/parameter counts behave) and the packed-weight cache."""

    def __init__(self, weight: Tensor, bias: Tensor | None, act: str) -> None:
        super().__init__()
        if act not in _ACTS:
            raise ValueError(f"act must be one of {_ACTS}, got {act!r}")
        self.weight = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)
        self.act = act
        self.use_packed = True  # False: never pack (saves the packed copy of the weights), plain ops only
        # (dtype, layout key) -> (source, w, b), oldest first
        self._packed: dict[tuple, tuple[tuple, Tensor, Tensor | None]] = {}

    max_packed = 4  # packed copies kept per layer (dtypes x input layouts); the oldest goes first

    def _pack(self, weight: Tensor, hint: Tensor) -> Tensor:
        raise NotImplementedError

    def _layout_key(self, hint: Tensor) -> tuple:
        """What of the input the packed layout depends on (one packed copy per distinct key)."""
        return ()

    def packed(self, dtype: torch.dtype, hint: Tensor) -> tuple[Tensor, Tensor | None]:
        """Packed weight and bias in ``dtype`` for inputs like ``hint``: built on first use, rebuilt when the weight
        or bias tensor is replaced or modified in place (identity, held by reference, and version counter)."""
        w, b = self.weight, self.bias
        versions = (_version(w), None if b is None else _version(b))
        key = (dtype, *self._layout_key(hint))
        hit = self._packed.get(key)
        if hit is None or hit[0][0] is not w or hit[0][1] is not b or hit[0][2] != versions:
            with torch.no_grad():
                packed_bias = None if b is None else b.detach().to(dtype)
                hit = ((w, b, versions), self._pack(w.detach().to(dtype), hint), packed_bias)
            self._packed.pop(key, None)
            while len(self._packed) >= self.max_packed:
                self._packed.pop(next(iter(self._packed)))
            self._packed[key] = hit
        return hit[1], hit[2]

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half() ...: drop packed copies
        self._packed.clear()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # also seen for inference tensors (no versions)
        self._packed.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self) -> dict:  # deepcopy / pickle: packed (opaque) tensors are a cache, not state
        return {**self.__dict__, "_packed": {}}

    def extra_repr(self) -> str:
        return f"act={self.act}"


class FusedLinear(_Packed):
    """``act(x W^T + b) (+ residual)``: a linear layer with its activation or residual add fused.

    Built from an ``nn.Linear``; ``scale`` (a LayerScale gamma applied after the layer) is folded into W and b.
    """

    def __init__(self, linear: nn.Linear, act: str = "none", scale: Tensor | None = None) -> None:
        weight, bias = linear.weight.detach(), None if linear.bias is None else linear.bias.detach()
        if scale is not None:
            weight = weight * scale.detach()[:, None]
            bias = None if bias is None else bias * scale.detach()
        super().__init__(weight, bias, act)
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def _pack(self, weight: Tensor, hint: Tensor) -> Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight, max(1, hint.numel() // self.in_features))

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        dtype = kernel_dtype(x, self.weight) if self.use_packed else None
        if dtype == torch.float32:
            limit = packed_linear_max_rows()
            if limit is not None and x.numel() // self.in_features > limit:
                dtype = None  # MKL's GEMM is faster here
        if dtype is None or (residual is not None and self.act != "none"):
            y = _activate(F.linear(x, self.weight, self.bias), self.act)
            return y if residual is None else residual + y
        w, b = self.packed(dtype, x)
        x2 = x.reshape(-1, self.in_features).to(dtype)
        if residual is None:
            y = torch.ops.mkldnn._linear_pointwise(x2, w, b, self.act, [], "none" if self.act == "gelu" else "")
        else:
            r = residual.reshape(-1, self.out_features).to(dtype)
            y = torch.ops.mkldnn._linear_pointwise.binary(x2, r, w, b, "add")
        return y.view(*x.shape[:-1], self.out_features)


class FusedConv2d(_Packed):
    """``act(conv(x)) (+ residual)``: a conv (BatchNorm already folded) with its activation or residual add fused."""

    def __init__(self, conv: nn.Conv2d, act: str = "none") -> None:
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError("FusedConv2d needs numeric zero padding")
        super().__init__(conv.weight.detach(), None if conv.bias is None else conv.bias.detach(), act)
        self.stride, self.padding, self.dilation, self.groups = (
            list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups)

    def _pack(self, weight: Tensor, hint: Tensor) -> Tensor:
        return torch.ops.mkldnn._reorder_convolution_weight(
            weight, self.padding, self.stride, self.dilation, self.groups, list(hint.shape))

    def _layout_key(self, hint: Tensor) -> tuple:
        # oneDNN picks the convolution's weight layout for the input shape it is told: weights packed for batch 16
        # ran batch 1 3.6x slower (128 channels, 28x28, AVX2), and the reverse 1.33x (experiments/cpu_kernels.py).
        # One copy per input shape.
        return tuple(hint.shape)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        dtype = kernel_dtype(x, self.weight) if self.use_packed else None
        if (dtype is None or self.groups != 1 or not x.is_contiguous(memory_format=torch.channels_last)
                or (residual is not None and self.act != "none")):
            y = _activate(F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups),
                          self.act)
            return y if residual is None else y + residual
        w, b = self.packed(dtype, x)
        args = (self.padding, self.stride, self.dilation, self.groups)
        if residual is None:
            return torch.ops.mkldnn._convolution_pointwise(
                x.to(dtype), w, b, *args, self.act, [], "none" if self.act == "gelu" else "")
        r = residual.to(dtype).contiguous(memory_format=torch.channels_last)
        return torch.ops.mkldnn._convolution_pointwise.binary(x.to(dtype), r, w, b, *args, "add", None, None, [], None)


class FusedMlp(nn.Module):
    """Transformer MLP in inference form: ``fc2(GELU(fc1(x))) * gamma + residual`` as two fused linears."""

    def __init__(self, fc1: nn.Linear, fc2: nn.Linear, scale: Tensor | None = None) -> None:
        super().__init__()
        self.fc1 = FusedLinear(fc1, act="gelu")
        self.fc2 = FusedLinear(fc2, scale=scale)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        return self.fc2(self.fc1(x), residual=residual)


def freeze(module: nn.Module) -> nn.Module:
    """Turn every parameter of ``module`` into a buffer of the same name (in place): an inference snapshot.

    State-dict keys, ``.to()`` and export are unchanged; ``parameters()`` becomes empty, so optimizers, EMA and
    averaging code, which update parameters, cannot change the snapshot behind its caches' back.
    """
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                del m._parameters[name]
                m.register_buffer(name, p.detach().requires_grad_(False))
    return module
