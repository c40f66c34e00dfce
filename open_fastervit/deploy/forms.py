"""The fastest form of a model that answers as fp32, chosen by measurement and cached per machine.

:func:`choose_form` takes a loaded model (e.g. ``Predictor(...).model``) and returns the module to run instead
(a :class:`ChosenForm`: the module, its name, one line saying why). The candidates:

- ``torch fp32``: the model as given (its inference form when loaded by a ``Predictor``);
- ``torch bf16``: the same under bf16 autocast, only where the hardware computes bf16 natively (a CUDA GPU that
  supports it; a CPU with ``avx512_bf16`` / ``amx_bf16``: elsewhere torch emulates it, slower than fp32);
- ``openvino fp32`` / ``openvino bf16``: the model converted to OpenVINO in memory
  (:func:`open_fastervit.deploy.openvino.from_torch`) when openvino is installed, on CPU; bf16 only where
  OpenVINO lists ``BF16`` among the CPU's capabilities;
- ``onnxruntime fp32``: only when asked for (``runtime="onnxruntime"``), through a temporary ONNX export;
- a file's own runtime (an int8 ``.onnx`` / ``.xml``, an export): kept as it is.

A reduced-precision candidate (bf16, fp16) is kept only when its top-1 class agrees with fp32 on every
``check_images`` (real images through the model's own preprocessing, e.g. those being predicted); without check
images it is left out. The candidates then run a few timed batches each (interleaved, median), the fastest wins.
The choice is cached in ``$XDG_CACHE_HOME/open_fastervit/forms.json`` (default ``~/.cache``), keyed by the CPU
model and flags, threads, device, the model's identity (architecture, overrides, parameter count, file), batch
size, input size, runtime and precision; an unreadable or stale cache is ignored and rewritten.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..inference import Predictor, data_config_for
from ..runtime import PRECISION_CHOICES, PRECISIONS, RUNTIMES, cpu_info, native_cpu_precisions, resolve_device
from .export import export_model, load_exported
from .openvino import OpenVINOModel, cpu_capabilities, from_torch, load_openvino, openvino_available
from .runtimes import ExportedClassifier

__all__ = ["AGREEMENT", "AutocastModule", "ChosenForm", "cache_path", "choose_form", "load_chosen", "weights_file"]

#: Top-1 agreement with fp32 a reduced-precision form needs on the check images.
AGREEMENT = 1.0
_CACHE_VERSION = 1


class AutocastModule(nn.Module):
    """``module`` run under autocast at ``dtype`` (fp32 logits out), with the module's ``num_classes``,
    ``pretrained_cfg`` and ``weights_info``."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.module, self.dtype = module, dtype
        for name in ("num_classes", "pretrained_cfg", "weights_info", "in_chans"):
            if hasattr(module, name):
                setattr(self, name, getattr(module, name))

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` -> ``(B, classes)`` float32 logits computed in ``dtype``."""
        with torch.autocast(x.device.type, dtype=self.dtype):
            return self.module(x).float()


@dataclass
class ChosenForm:
    """The form :func:`choose_form` picked.

    Attributes:
        module: what to run (``module(x) -> logits``, x ``(B, C, H, W)`` float).
        name: e.g. ``"openvino fp32"``.
        reason: one line: what was measured (ms per image of each candidate) or why there was no choice.
        timings: candidate -> median ms per image (empty when nothing was measured).
        cached: the choice came from the cache.
    """

    module: nn.Module
    name: str
    reason: str
    timings: dict[str, float] = field(default_factory=dict)
    cached: bool = False


def cache_path() -> Path:
    """``$FASTERVIT_FORMS_CACHE`` when set, else ``$XDG_CACHE_HOME/open_fastervit/forms.json`` (``XDG_CACHE_HOME``
    default: ``~/.cache``)."""
    if os.environ.get("FASTERVIT_FORMS_CACHE"):
        return Path(os.environ["FASTERVIT_FORMS_CACHE"])
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "open_fastervit" / "forms.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != _CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _write_cache(path: Path, key: str, entry: dict[str, Any]) -> None:
    entries = _read_cache(path)
    entries[key] = entry
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({"version": _CACHE_VERSION, "entries": entries}, indent=1))
        os.replace(tmp, path)
    except OSError as e:  # a read-only home: the choice is still made, only not remembered
        print(f"open_fastervit: note: cannot write the form cache {path} ({e})", file=sys.stderr)


def _identity(model: nn.Module) -> dict[str, Any]:
    info = dict(getattr(model, "weights_info", None) or {})
    cfg = getattr(model, "pretrained_cfg", None) or {}
    file = info.get("file") or getattr(model, "path", None)
    ident: dict[str, Any] = {"architecture": str(cfg.get("architecture") or info.get("architecture") or
                                                 type(model).__name__),
                             "model_kwargs": json.dumps(info.get("model_kwargs") or {}, sort_keys=True, default=str),
                             "parameters": sum(p.numel() for p in model.parameters()),
                             "buffers": sum(b.numel() for b in model.buffers()),
                             "weights": str(info.get("weights", ""))}
    if file and Path(str(file)).is_file():
        stat = Path(str(file)).stat()
        ident["file"] = [str(Path(str(file)).resolve()), stat.st_size, stat.st_mtime_ns]
    return ident


def _agreement(module: nn.Module, reference: Tensor, images: Tensor, batch: int) -> float:
    with torch.inference_mode():
        out = torch.cat([module(images[i:i + batch]).float().cpu() for i in range(0, len(images), batch)])
    return float((out.argmax(1) == reference.argmax(1)).float().mean())


def _time(candidates: dict[str, nn.Module], x: Tensor, rounds: int) -> dict[str, float]:
    """Median ms per image of each candidate over ``rounds`` interleaved rounds (one warm-up call each)."""
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    with torch.inference_mode():
        for module in candidates.values():
            module(x)
        for _ in range(rounds):
            for name, module in candidates.items():
                start = time.perf_counter()
                module(x)
                if x.device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(s) / len(x) for name, s in seconds.items()}


def choose_form(
    model: nn.Module,
    *,
    runtime: str = "auto",
    precision: str = "auto",
    batch_size: int = 16,
    size: tuple[int, int] | None = None,
    check_images: Tensor | None = None,
    device: str | torch.device | None = "cpu",
    threads: int | None = None,
    rounds: int = 3,
    cache: bool | str | Path = True,
    measure: bool = True,
) -> ChosenForm:
    """The fastest available form of ``model`` that answers as fp32 (see the module docstring).

    Args:
        model: an eval-mode classifier (a FasterViT, its inference form, or a runtime file's module).
        runtime: ``"auto"`` (measure), ``"torch"``, ``"openvino"`` or ``"onnxruntime"``.
        precision: ``"auto"`` (measure), ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        batch_size: images per timed batch (the batch the caller runs).
        size: ``(H, W)`` input (default: the model's data config size).
        check_images: ``(N, C, H, W)`` preprocessed real images for the top-1 agreement check of bf16 / fp16.
        device: where torch runs (OpenVINO and onnxruntime run on CPU; on CUDA only torch forms are candidates).
        threads: CPU threads (default ``torch.get_num_threads()``).
        rounds: timed batches per candidate.
        cache: ``True`` (default file), ``False`` (no cache) or a path.
        measure: ``False``: no conversion or timing now (a job too small to repay them): a cached choice when
            there is one, else the first fp32 candidate (torch fp32 unless ``runtime`` names another).

    Returns:
        :class:`ChosenForm`.

    Raises:
        ValueError: unknown runtime / precision, or a combination nothing here can run (the message says why:
            openvino missing, a precision the hardware lacks, a runtime file asked to run elsewhere).
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if precision not in PRECISION_CHOICES:
        raise ValueError(f"precision must be one of {', '.join(PRECISION_CHOICES)}, got {precision!r}")
    dev = resolve_device(device)
    threads = int(threads or torch.get_num_threads())
    model = model.eval()
    file_form = _file_form(model, runtime, precision, threads)
    if file_form is not None:
        return file_form
    config = data_config_for(model, getattr(model, "weights_info", None))
    h, w = size or (int(config["input_size"][1]), int(config["input_size"][2]))
    makers, skipped = _candidates(model, runtime, precision, dev, threads, (h, w))
    if not makers:
        raise ValueError(f"no form of the model runs with runtime={runtime}, precision={precision}: "
                         + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    cpu, flags = cpu_info()
    key = json.dumps({"cpu": cpu, "flags": flags, "threads": threads, "device": str(dev), "model": _identity(model),
                      "batch": batch_size, "size": [h, w], "runtime": runtime, "precision": precision,
                      "candidates": sorted(makers)}, sort_keys=True)
    path = None if cache is False else (cache_path() if cache is True else Path(cache))
    entry = _read_cache(path).get(key) if path else None
    if isinstance(entry, dict) and entry.get("form") in makers:
        name = entry["form"]
        timings = {str(k): float(v) for k, v in (entry.get("timings") or {}).items()}
        return ChosenForm(makers[name](), name, f"{name} (cached choice of {_describe(timings)}; {path})", timings,
                          cached=True)
    if len(makers) == 1:  # the runtime and precision asked for leave one form: nothing to measure or cache
        name = next(iter(makers))
        return ChosenForm(makers[name](), name, f"{name} (only candidate for runtime {runtime}, precision {precision})")
    if not measure:
        name = next((n for n in makers if n.endswith("fp32")), next(iter(makers)))
        return ChosenForm(makers[name](), name, f"{name} (too few images to repay measuring the other forms; a "
                          "larger job measures them once and caches the choice)")
    built = {name: make() for name, make in makers.items()}
    x = (check_images[:batch_size] if check_images is not None and len(check_images) >= batch_size
         else torch.randn(batch_size, int(getattr(model, "in_chans", 3)), h, w)).to(dev)
    reduced = [n for n in built if not n.endswith("fp32")]
    if reduced:
        if check_images is None:
            for name in reduced:
                skipped[name] = "no check images to compare with fp32"
                built.pop(name)
        else:
            images = check_images.to(dev)
            fp32 = next((n for n in built if n.endswith("fp32")), None)
            reference_module = built[fp32] if fp32 else model
            with torch.inference_mode():
                reference = torch.cat([reference_module(images[i:i + batch_size]).float().cpu()
                                       for i in range(0, len(images), batch_size)])
            for name in reduced:
                agree = _agreement(built[name], reference, images, batch_size)
                if agree < AGREEMENT:
                    skipped[name] = f"top-1 agreement with fp32 {100 * agree:.0f}% on {len(images)} images"
                    built.pop(name)
    if not built:
        raise ValueError("no form answers as fp32: " + "; ".join(f"{k}: {v}" for k, v in skipped.items()))
    timings = _time(built, x, rounds) if len(built) > 1 else {}
    name = min(timings, key=timings.__getitem__) if timings else next(iter(built))
    left_out = f"; left out: {', '.join(f'{k} ({v})' for k, v in skipped.items())}" if skipped else ""
    reason = f"{name} (fastest of {_describe(timings)}{left_out})" if timings else f"{name} (only candidate{left_out})"
    if path and timings:
        _write_cache(path, key, {"form": name, "timings": timings, "skipped": skipped, "when": time.time()})
    return ChosenForm(built[name], name, reason, timings)


def _describe(timings: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f} ms/img" for k, v in sorted(timings.items(), key=lambda kv: kv[1]))


def _file_form(model: nn.Module, runtime: str, precision: str, threads: int) -> ChosenForm | None:
    """A runtime file's module (int8 / export) as it is, or reopened at another OpenVINO precision."""
    if isinstance(model, OpenVINOModel):
        if runtime not in ("auto", "openvino"):
            raise ValueError(f"{model.path} is an OpenVINO file; it runs with runtime openvino (or auto)")
        if precision in ("auto", "fp32") or model.int8:
            kind = "int8" if model.int8 else model.precision
            return ChosenForm(model, f"openvino {kind}", f"openvino {kind} (the file's own form)")
        reopened = load_openvino(model.path, precision=precision, threads=threads) if model.path else model
        return ChosenForm(reopened, f"openvino {reopened.precision}", f"openvino {reopened.precision} (asked for)")
    weights = str((getattr(model, "weights_info", None) or {}).get("weights", ""))
    if isinstance(model, ExportedClassifier) or weights == "int8":
        kind = "onnxruntime int8" if weights == "int8" else f"{model.exported.format} export fp32"
        if runtime not in ("auto", "onnxruntime" if "onnx" in kind else "torch") or precision not in ("auto", "fp32"):
            raise ValueError(f"{weights_file(model)} runs as {kind}; --runtime / --precision cannot change that "
                             "(use runtime auto, precision auto)")
        return ChosenForm(model, kind, f"{kind} (the file's own form)")
    return None


def weights_file(model: nn.Module) -> str:
    """The file a module was read from (its ``weights_info['file']``), or its class name."""
    return str((getattr(model, "weights_info", None) or {}).get("file") or type(model).__name__)


def _candidates(model: nn.Module, runtime: str, precision: str, dev: torch.device, threads: int,
                size: tuple[int, int]) -> tuple[dict[str, Callable[[], nn.Module]], dict[str, str]]:
    makers: dict[str, Callable[[], nn.Module]] = {}
    skipped: dict[str, str] = {}
    wanted = tuple(PRECISIONS) if precision == "auto" else (precision,)
    if dev.type == "cuda":
        native = {"fp32", "fp16"} | ({"bf16"} if torch.cuda.is_bf16_supported() else set())
    else:
        native = set(native_cpu_precisions())
    if runtime in ("auto", "torch"):
        for p in wanted:
            if p == "fp16" and precision == "auto":
                continue  # fp16 only when asked for (range: overflows where bf16 does not)
            if p not in native:
                skipped[f"torch {p}"] = f"no native {p} on {'this GPU' if dev.type == 'cuda' else 'this CPU'}"
            elif p == "fp32":
                makers["torch fp32"] = lambda: model.to(dev)
            else:
                makers[f"torch {p}"] = lambda p=p: AutocastModule(model.to(dev), PRECISIONS[p])  # type: ignore[misc]
    if runtime in ("auto", "openvino"):
        if dev.type != "cpu":
            skipped["openvino"] = "runs on CPU only"
        elif not openvino_available():
            skipped["openvino"] = "openvino is not installed (pip install 'open-fastervit[openvino]')"
        else:
            caps = cpu_capabilities()
            for p in wanted:
                if p == "fp16" and precision == "auto":
                    continue
                if p != "fp32" and p.upper() not in caps:
                    skipped[f"openvino {p}"] = f"OpenVINO lists no {p.upper()} for this CPU"
                else:
                    makers[f"openvino {p}"] = lambda p=p: from_torch(model, precision=p, threads=threads,
                                                                     size=size)
    if runtime == "onnxruntime":
        if precision not in ("auto", "fp32"):
            skipped[f"onnxruntime {precision}"] = "onnxruntime runs the fp32 export (int8: fastervit quantize)"
        else:
            makers["onnxruntime fp32"] = lambda: _onnx_form(model, size)
    return makers, skipped


def _onnx_form(model: nn.Module, size: tuple[int, int]) -> nn.Module:
    """``model`` exported to a temporary ONNX file and opened in onnxruntime (the session keeps the graph)."""
    with tempfile.TemporaryDirectory(prefix="fastervit_form_") as tmp:
        path = Path(tmp) / "model.onnx"
        export_model(model, path, example_size=size, check=False)
        module = ExportedClassifier(load_exported(path))
    for name in ("pretrained_cfg", "weights_info"):
        if hasattr(model, name):
            setattr(module, name, getattr(model, name))
    return module


def load_chosen(
    source: str | Path | nn.Module | None,
    *,
    runtime: str = "auto",
    precision: str = "auto",
    check_images: list[Any] | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    cache: bool | str | Path = True,
    measure: bool = True,
    **predictor_args: Any,
) -> ChosenForm:
    """Load ``source`` as :class:`~open_fastervit.inference.Predictor` does, then :func:`choose_form` on it.

    Args:
        source: as ``Predictor`` takes (a model name, file, folder or module).
        runtime, precision, batch_size, cache, measure: as :func:`choose_form`.
        check_images: PIL images or image paths for the agreement check (e.g. the first images to predict; at
            most 32 are used), read through the model's own preprocessing.
        device: where torch runs (default: CUDA when visible).
        predictor_args: other ``Predictor`` arguments (``architecture``, ``model_kwargs``, ``use_ema``,
            ``pretrained``, ``fuse``, ``img_size``, ...).

    Raises:
        ValueError, CheckpointError: as ``Predictor`` and :func:`choose_form`.
    """
    predictor = Predictor(source, device=device, batch_size=batch_size, **predictor_args)
    checks = predictor.preprocess(list(check_images)[:32]) if check_images else None
    size = (int(predictor.data_config["input_size"][1]), int(predictor.data_config["input_size"][2]))
    return choose_form(predictor.model, runtime=runtime, precision=precision, batch_size=batch_size, size=size,
                       check_images=checks, device=predictor.device, cache=cache, measure=measure)
