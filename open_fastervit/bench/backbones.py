"""The backbones of the dense benchmark: its configuration, building each candidate at a size, and the timed steps.

What is compared: FasterViT backbones (:func:`open_fastervit.create_backbone`, maps at strides 4, 8, 16, 32) in two
forms - the *plain eval path* (no fusion, eval mode, ``torch.inference_mode()``) and the *inference form*
(``backbone.fuse()``) - against timm peers built with ``features_only=True`` (``pretrained=False``). Peers with a
fixed input size (Swin) are built for each size with ``img_size=(H, W)``: timm 1.0.31 then keeps the 7x7 windows,
pads every stage map to a multiple of the window inside the attention and pads odd maps before patch merging, so
any H, W divisible by the patch size (4) run without padding the input, and the shifted-window masks are
precomputed for that size (``dynamic_img_size=True`` would accept any size but rebuild the masks on every call).
ConvNeXt and FasterViT take any size (FasterViT pads and masks its windows itself; >= 32 px).

Work: a forward pass at ``batch`` (inference), and a forward + backward pass in train mode with the sum of the means
of all maps as the loss (``train_batch`` at ``train_sizes``; no optimizer step).
"""

from __future__ import annotations

import contextlib
import copy
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn

from open_fastervit import create_backbone
from open_fastervit.bench.candidates import source_of
from open_fastervit.bench.timing import BenchError, Step, autocast
from open_fastervit.runtime import PRECISIONS

__all__ = [
    "CHECK_TOLERANCE",
    "DEFAULT_BASELINE",
    "DEFAULT_DENSE_MODELS",
    "DEFAULT_DENSE_SIZES",
    "DEFAULT_TRAIN_SIZES",
    "FORMS",
    "OUT_REDUCTIONS",
    "Builder",
    "Candidate",
    "DenseConfig",
    "DenseGroup",
    "Size",
    "build_dense_model",
    "dense_inputs",
    "exact_fp32",
    "fused_copy",
    "make_dense_infer_step",
    "make_dense_train_step",
    "map_rel_errors",
    "output_maps",
    "parse_sizes",
    "plan_dense_groups",
    "size_label",
]

DEFAULT_DENSE_MODELS = (
    "fastervit_0", "fastervit_1", "fastervit_2", "fastervit_3", "fastervit_4",
    "swin_tiny_patch4_window7_224", "swin_small_patch4_window7_224", "convnext_tiny", "convnext_small",
)
DEFAULT_DENSE_SIZES = ((800, 1216), (1024, 1024), (512, 2048))
DEFAULT_TRAIN_SIZES = ((512, 768),)
DEFAULT_BASELINE = "swin_tiny_patch4_window7_224"
CHECK_TOLERANCE = 1e-5
FORMS = ("plain", "fused")
OUT_REDUCTIONS = (4, 8, 16, 32)

Size = tuple[int, int]


# --------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------


def parse_sizes(text: str) -> list[Size]:
    """``"800x1216,1024"`` -> ``[(800, 1216), (1024, 1024)]`` (height x width; one number: square).

    Raises:
        BenchError: a size that is not ``H``, ``HxW`` with positive integers.
    """
    sizes = []
    for item in (v.strip().lower() for v in text.split(",")):
        if not item:
            continue
        match = re.fullmatch(r"(\d+)(?:x(\d+))?", item)
        if not match or int(match.group(1)) <= 0 or (match.group(2) and int(match.group(2)) <= 0):
            raise BenchError(f"size {item!r}: expected HxW with positive integers, e.g. 800x1216")
        h = int(match.group(1))
        sizes.append((h, int(match.group(2) or h)))
    return sizes


def size_label(size: Size) -> str:
    """``(800, 1216)`` -> ``"800x1216"``."""
    return f"{size[0]}x{size[1]}"


@dataclass
class DenseConfig:
    """Everything one dense benchmark run measures.

    ``forms`` are the FasterViT forms timed at inference (``plain``, ``fused``); peers always run as built.
    ``train_batch`` 0 or empty ``train_sizes`` skip the training step. ``iters`` 0 picks enough calls per turn for
    ``min_block_s`` seconds. ``model_kwargs`` maps a name (or ``"*"``) to architecture overrides (FasterViT:
    ``create_backbone(model_kwargs=...)``; timm: ``create_model`` arguments).
    """

    models: list[str] = field(default_factory=lambda: list(DEFAULT_DENSE_MODELS))
    sizes: list[Size] = field(default_factory=lambda: list(DEFAULT_DENSE_SIZES))
    batch: int = 1
    train_sizes: list[Size] = field(default_factory=lambda: list(DEFAULT_TRAIN_SIZES))
    train_batch: int = 2
    precisions: list[str] = field(default_factory=lambda: ["fp32"])
    forms: list[str] = field(default_factory=lambda: list(FORMS))
    baseline: str = ""
    device: str = "auto"
    channels_last: bool = False
    compile_mode: str | None = None
    compile_backend: str = "inductor"
    threads: int | None = None
    warmup: int = 1
    rounds: int = 5
    iters: int = 1
    min_block_s: float = 0.2
    model_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    imports: list[str] = field(default_factory=list)
    check: bool = True
    check_tol: float = CHECK_TOLERANCE
    macs: bool = True
    memory: bool = True
    seed: int = 0
    command: str = ""

    def validate(self) -> None:
        """Raise :class:`BenchError` on arguments that cannot describe a run."""
        if not self.models:
            raise BenchError("no models given; pass --models NAME[,NAME...]")
        if len(set(self.models)) != len(self.models):
            raise BenchError(f"models are listed more than once: {self.models}")
        official = [m for m in self.models if source_of(m) == "official"]
        if official:
            raise BenchError(f"--dense measures backbones (ours and timm features_only); not supported: {official}")
        if not self.sizes and not (self.train_batch > 0 and self.train_sizes):
            raise BenchError("nothing to measure: no --dense-sizes and no training step")
        for h, w in [*self.sizes, *self.train_sizes]:
            if h < 32 or w < 32:
                raise BenchError(f"dense sizes must be at least 32x32 px, got {h}x{w}")
        if self.batch < 1 or self.train_batch < 0:
            raise BenchError("need --dense-batch >= 1 and --dense-train-batch >= 0")
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown or not self.precisions:
            raise BenchError(f"precisions must be among {sorted(PRECISIONS)}, got {self.precisions}")
        if not self.forms or any(f not in FORMS for f in self.forms):
            raise BenchError(f"forms must be among {FORMS}, got {self.forms}")
        if self.rounds < 1 or self.warmup < 0 or self.iters < 0:
            raise BenchError("need rounds >= 1, warmup >= 0 and iters >= 0")
        if self.threads is not None and self.threads < 1:
            raise BenchError(f"threads must be >= 1, got {self.threads}")
        if self.baseline and self.baseline not in self.models:
            raise BenchError(f"baseline {self.baseline!r} is not among the models {self.models}")

    def baseline_name(self) -> str:
        """The baseline: as given, else Swin-T when measured, else the first model."""
        if self.baseline:
            return self.baseline
        return DEFAULT_BASELINE if DEFAULT_BASELINE in self.models else self.models[0]

    def kwargs_for(self, name: str) -> dict[str, Any]:
        """The architecture overrides of one candidate (``"*"`` first, then its own)."""
        merged = {**self.model_kwargs.get("*", {}), **self.model_kwargs.get(name, {})}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in merged.items()}

    def forms_for(self, name: str) -> list[str]:
        """Inference forms of one candidate: FasterViT as configured, peers ``plain`` only."""
        return list(self.forms) if source_of(name) == "open_fastervit" else ["plain"]


@dataclass(frozen=True)
class DenseGroup:
    """One workload: every (candidate, form, precision) runs it, interleaved."""

    kind: str  # "infer" or "train"
    batch: int
    size: Size


def plan_dense_groups(config: DenseConfig) -> list[DenseGroup]:
    """Inference at every size, then the training step at every training size."""
    groups = [DenseGroup("infer", config.batch, s) for s in dict.fromkeys(config.sizes)]
    if config.train_batch > 0:
        groups += [DenseGroup("train", config.train_batch, s) for s in dict.fromkeys(config.train_sizes)]
    return groups


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def build_dense_model(name: str, size: Size, config: DenseConfig, device: torch.device) -> tuple[nn.Module, bool]:
    """One backbone on ``device`` in eval mode returning the maps at strides 4, 8, 16, 32.

    Returns (model, whether it was built for ``size``: only then must it be rebuilt for another size).
    """
    kwargs = config.kwargs_for(name)
    torch.manual_seed(config.seed)
    if source_of(name) == "open_fastervit":
        return create_backbone(name, out_indices=(0, 1, 2, 3), model_kwargs=kwargs).to(device).eval(), False
    base = {"features_only": True, "pretrained": False, **kwargs}
    try:
        model, sized = timm.create_model(name, img_size=size, **base), True
    except TypeError as exc:  # no img_size argument: the model takes any size
        if "img_size" not in str(exc):
            raise
        torch.manual_seed(config.seed)
        model, sized = timm.create_model(name, **base), False
    reductions = [int(r) for r in model.feature_info.reduction()]
    if reductions != list(OUT_REDUCTIONS):
        every = [int(info["reduction"]) for info in model.feature_info.info]
        indices = tuple(max(i for i, r in enumerate(every) if r == want) for want in OUT_REDUCTIONS
                        if want in every)
        if len(indices) != len(OUT_REDUCTIONS):
            raise BenchError(f"{name}: no feature maps at strides {OUT_REDUCTIONS} (has {every})")
        torch.manual_seed(config.seed)
        extra = {"img_size": size} if sized else {}
        model = timm.create_model(name, out_indices=indices, **base, **extra)
    return model.to(device).eval(), sized


def fused_copy(model: nn.Module) -> nn.Module:
    """The inference form of a FasterViT backbone (a copy; ``fuse()`` works in place)."""
    return copy.deepcopy(model).fuse()


def output_maps(out: Any) -> list[torch.Tensor]:
    """A model's output as a list of tensors (from a tensor, a list/tuple or a dict of tensors)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return list(out.values())
    return list(out)


def map_rel_errors(reference: Sequence[torch.Tensor], other: Sequence[torch.Tensor]) -> list[float]:
    """Per map: ``max|other - reference| / max|reference|`` (fp32; inf for a shape mismatch)."""
    errors = []
    for ref, out in zip(reference, other, strict=True):
        if ref.shape != out.shape:
            errors.append(math.inf)
            continue
        ref, out = ref.float(), out.float()
        scale = float(ref.abs().max()) or 1.0
        errors.append(float((out - ref).abs().max()) / scale)
    return errors


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off for matmuls and convolutions (CUDA) while comparing fp32 outputs; restored afterwards."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@dataclass
class Candidate:
    """One backbone at one size: its eager model, the fused copy (FasterViT) and the callables timed."""

    name: str
    model: nn.Module
    fused: nn.Module | None
    run: dict[str, Callable[..., Any]]  # form ("plain", "fused", "train") -> callable
    compiled: bool


class Builder:
    """Builds candidates per size; size-independent models (FasterViT, ConvNeXt) and fused copies are kept."""

    def __init__(self, config: DenseConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.kept: dict[str, tuple[nn.Module, nn.Module | None]] = {}

    def get(self, name: str, size: Size, kind: str) -> Candidate:
        """The candidate ready at ``size`` (memory format, fused copy, compile as configured)."""
        cfg = self.config
        model, fused = self.kept.get(name, (None, None))
        sized = False
        if model is None:
            model, sized = build_dense_model(name, size, cfg, self.device)
            if cfg.channels_last:
                model = model.to(memory_format=torch.channels_last)
        if kind == "infer" and fused is None and "fused" in cfg.forms_for(name):
            fused = fused_copy(model)
        if not sized:  # size-independent: kept for the next sizes, with its fused copy
            self.kept[name] = (model, fused)
        run: dict[str, Callable[..., Any]] = {}
        if kind == "infer":
            forms = cfg.forms_for(name)
            if "plain" in forms:
                run["plain"] = model
            if fused is not None and "fused" in forms:
                run["fused"] = fused
        else:
            run["train"] = model
        if cfg.compile_mode:
            mode = None if cfg.compile_mode == "default" else cfg.compile_mode
            run = {form: torch.compile(m, mode=mode, backend=cfg.compile_backend) for form, m in run.items()}
        return Candidate(name, model, fused, run, bool(cfg.compile_mode))


def make_dense_infer_step(model: Callable[..., Any], x: torch.Tensor, precision: str) -> Step:
    """One forward pass under ``torch.inference_mode()`` and the chosen autocast."""

    def step() -> Any:
        with torch.inference_mode(), autocast(x.device, precision):
            return model(x)

    return step


def make_dense_train_step(model: Callable[..., Any], params: Sequence[nn.Parameter], x: torch.Tensor,
                          precision: str) -> Step:
    """Forward in train mode, loss = sum over maps of the map's mean, backward; gradients cleared each call.

    fp16 scales the loss by 1024 (as a GradScaler would at its start) so that no gradient underflows.
    """
    scale = 1024.0 if precision == "fp16" else 1.0

    def step() -> None:
        with autocast(x.device, precision):
            loss = sum(m.float().mean() for m in output_maps(model(x)))
        (loss * scale).backward()
        for p in params:
            p.grad = None

    return step


def dense_inputs(batch: int, size: Size, device: torch.device, channels_last: bool) -> torch.Tensor:
    """Fixed random images of one workload, shared by all candidates."""
    gen = torch.Generator().manual_seed(batch * 10007 + size[0] * 31 + size[1])
    x = torch.randn(batch, 3, *size, generator=gen).to(device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


# --------------------------------------------------------------------------------------------------
# Running
