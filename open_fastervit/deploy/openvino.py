"""OpenVINO as a CPU runtime: IR export (fp32), NNCF int8 quantization, and an IR as an ``nn.Module``.

- ``fastervit export SOURCE -o model.xml`` (:func:`open_fastervit.deploy.export.export_model` with a ``.xml``
  name, registered here): ``openvino.convert_model`` of the torch model (dynamic batch; height and width fixed or
  dynamic over the same range as the ONNX export), the metadata of every export (input range, architecture,
  class count, data config, class names) in the IR's ``rt_info`` under ``open_fastervit``, weights kept in fp32
  (``compress_to_fp16=False``), then checked against the eager model like every export (a failing file is
  removed, ``.xml`` and ``.bin``).
- :func:`quantize_openvino` (``fastervit quantize SOURCE --calib DIR -o model.int8.xml``): ``nncf.quantize`` of
  that IR on real calibration images read and preprocessed as the onnxruntime route does
  (:func:`open_fastervit.deploy.quantize.calibration_images` and the model's evaluation transform), with NNCF's
  default scheme (not ``ModelType.TRANSFORMER``: on a tiny FasterViT trained for 100 steps, 64 calibration images,
  that scheme agreed with fp32 on 41% of tiny-imagenet-10 val and took top-1 from 45.4% to 28.8%; the default scheme
  agreed on 96.8% at 46.2% top-1), then the quick check (top-1 agreement and relative logit error
  against the fp32 inference form) stored in the file.
- :func:`load_openvino` opens either as an :class:`OpenVINOModel` (``load_model("model.xml")`` does, registered
  by :mod:`open_fastervit.deploy.runtimes`) compiled for the CPU at a precision: ``"fp32"``, ``"bf16"``,
  ``"fp16"`` or ``"auto"`` (OpenVINO's ``INFERENCE_PRECISION_HINT``; int8 layers of a quantized IR run in int8
  whatever the hint). bf16 / fp16 are refused on a CPU whose ``OPTIMIZATION_CAPABILITIES`` lack them; ``"auto"``
  takes bf16 where the CPU has it, else fp32 with a note.

**Conversion route**: FasterViT refuses ``torch.jit.trace`` (its window geometry depends on the input size), so
the torch model goes to ``openvino.convert_model`` as a ``torch.export`` program (dynamic batch and, for a
dynamic-size file, height / width as ``torch.export.Dim``). Converting our ONNX file instead
(``openvino.convert_model("model.onnx")``) gives an IR too; on the tiny test model (64 px, 2 busy AVX2 cores) the
torch route took 13 s to export and 31 s to convert, the ONNX route 26 s to export and 3 s to convert, both within
noise of each other, and the torch route needs neither onnx nor onnxscript.

openvino and nncf are optional dependencies (``pip install 'open-fastervit[openvino]'``), imported only here and
only when used.
"""

from __future__ import annotations

import copy
import importlib
import json
import os
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..fused import inference_form
from ..inference import Predictor, data_config_for
from .export import (
    RANGE_KEY,
    Exporter,
    ExportError,
    check_sizes,
    describe_range,
    export_model,
    min_dynamic_size,
    register_export_format,
)
from .quantize import (
    CHECK_IMAGES,
    CLASS_NAMES_KEY,
    DATA_CONFIG_KEY,
    MODEL_KWARGS_KEY,
    QUANT_KEY,
    SOURCE_KEY,
    QuantizeError,
    calibration_images,
)

__all__ = [
    "OV_PRECISIONS",
    "OpenVINOError",
    "OpenVINOModel",
    "cpu_capabilities",
    "load_openvino",
    "openvino_available",
    "quantize_openvino",
    "resolve_ov_precision",
    "torch_to_openvino",
]

#: Our precision word -> OpenVINO ``INFERENCE_PRECISION_HINT``.
OV_PRECISIONS: dict[str, str] = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
#: The ``rt_info`` section holding our metadata (``rt_info[RT_SECTION][key]`` for ``open_fastervit.key``).
RT_SECTION = "open_fastervit"
_PREFIX = "open_fastervit."


class OpenVINOError(ExportError):
    """openvino / nncf missing, an IR that is not ours or cannot be read, or a precision the CPU lacks."""


def openvino_available() -> bool:
    """Whether the ``openvino`` package imports."""
    try:
        import openvino  # noqa: F401  optional dependency, probed only
    except ImportError:
        return False
    return True


def _optional(module: str, error: type[Exception], what: str) -> Any:
    """The optional package ``module`` (the ``[openvino]`` extra), or ``error`` saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise error(f"{what} need the {module} package ({e}); pip install 'open-fastervit[openvino]' "
                    "(or: pip install openvino nncf)") from None


def _ov() -> Any:
    return _optional("openvino", OpenVINOError, "OpenVINO files")


def _core() -> Any:
    return _ov().Core()


def cpu_capabilities() -> set[str]:
    """OpenVINO's ``OPTIMIZATION_CAPABILITIES`` of the CPU device (e.g. ``{"FP32", "INT8", "BF16"}``).

    Raises:
        OpenVINOError: openvino is not installed.
    """
    return {str(c).upper() for c in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")}


def resolve_ov_precision(precision: str, capabilities: set[str] | None = None) -> str:
    """``"fp32"`` / ``"bf16"`` / ``"fp16"`` this CPU runs for the asked ``precision`` (``"auto"``: bf16 where
    the CPU has it natively, else fp32, with a note on stderr).

    Raises:
        OpenVINOError: an unknown word, or bf16 / fp16 on a CPU without it (the message names the capabilities).
    """
    word = str(precision).strip().lower()
    if word not in (*OV_PRECISIONS, "auto"):
        raise OpenVINOError(f"precision must be one of {', '.join([*OV_PRECISIONS, 'auto'])}, got {precision!r}")
    caps = cpu_capabilities() if capabilities is None and word != "fp32" else (capabilities or set())
    if word == "auto":
        if "BF16" in caps:
            return "bf16"
        print("open_fastervit: note: this CPU has no native bf16 (OpenVINO capabilities "
              f"{', '.join(sorted(caps))}); OpenVINO runs fp32", file=sys.stderr)
        return "fp32"
    if word != "fp32" and word.upper() not in caps:
        raise OpenVINOError(f"this CPU has no native {word} for OpenVINO (capabilities: {', '.join(sorted(caps))}); "
                            "use precision fp32 or auto")
    return word


# ---- writing an IR ----------------------------------------------------------------------------------------------


def torch_to_openvino(model: nn.Module, example: Tensor, size_range: Any, meta: Mapping[str, str] | None = None) -> Any:
    """``openvino.convert_model`` of the eval-mode ``model`` traced with ``example`` ``(B, C, H, W)``: dynamic
    batch, height / width over ``size_range`` (``((h_min, h_max), (w_min, w_max))``, ``None`` max: unbounded),
    ``meta`` stored in ``rt_info``. Returns the ``openvino.Model``.

    Raises:
        OpenVINOError: openvino missing or the conversion failing.
    """
    ov = _ov()

    def dim(lo: int, hi: int | None) -> Any:
        return ov.Dimension(int(lo)) if hi == lo else ov.Dimension(int(lo), -1 if hi is None else int(hi))

    (h0, h1), (w0, w1) = size_range
    shape = ov.PartialShape([ov.Dimension(1, -1), ov.Dimension(int(example.shape[1])), dim(h0, h1), dim(w0, w1)])
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1)}
    if (h0, w0) != (h1, w1):  # FasterViT refuses torch.jit.trace: the converter gets a torch.export program
        dims[2] = torch.export.Dim("height", min=int(h0), **({} if h1 is None else {"max": int(h1)}))
        dims[3] = torch.export.Dim("width", min=int(w0), **({} if w1 is None else {"max": int(w1)}))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(model.eval(), (example,), dynamic_shapes={"x": dims})
            converted = ov.convert_model(program, input=[shape])
    except Exception as e:  # the converter raises its own types (OpConversionFailure, RuntimeError, ...)
        raise OpenVINOError(f"OpenVINO could not convert the model: {str(e).splitlines()[0] if str(e) else e!r}") from e
    for key, value in (meta or {}).items():
        converted.set_rt_info(str(value), [RT_SECTION, key.removeprefix(_PREFIX)])
    return converted


def _save_ir(ov_model: Any, path: Path) -> None:
    """Write ``path`` (``.xml``) and its ``.bin`` (fp32 weights) through temporary names, then rename both."""
    ov = _ov()
    with tempfile.TemporaryDirectory(prefix=".fastervit_ir_", dir=path.parent) as tmp:
        xml = Path(tmp) / "model.xml"
        ov.save_model(ov_model, str(xml), compress_to_fp16=False)
        os.replace(xml.with_suffix(".bin"), path.with_suffix(".bin"))
        os.replace(xml, path)


def _write(model: nn.Module, example: Tensor, size_range: Any, path: Path, meta: dict[str, str]) -> None:
    _save_ir(torch_to_openvino(model, example, size_range, meta), path)


def _metadata(ov_model: Any) -> dict[str, str]:
    if not ov_model.has_rt_info([RT_SECTION]):
        return {}
    section = ov_model.get_rt_info([RT_SECTION])
    keys = list(section.astype(dict).keys()) if hasattr(section, "astype") else list(section.keys())
    return {_PREFIX + key: str(ov_model.get_rt_info([RT_SECTION, key]).astype(str)) for key in keys}


def read_ir(path: str | Path) -> tuple[Any, dict[str, str]]:
    """Read an IR written by open_fastervit: ``(openvino.Model, {"open_fastervit.*": value})``.

    Raises:
        OpenVINOError: openvino missing, a missing ``.xml`` or ``.bin``, a file OpenVINO cannot read, or an IR
            without our metadata (not written by ``fastervit export`` / ``fastervit quantize``).
    """
    path = Path(path)
    if not path.is_file():
        raise OpenVINOError(f"OpenVINO file {path} does not exist")
    if not path.with_suffix(".bin").is_file():
        raise OpenVINOError(f"{path} has no weights file {path.with_suffix('.bin').name} beside it (an IR is the "
                            ".xml and its .bin; copy both)")
    with open(path, "rb") as f:
        head = f.read(4096)
    if b"<net" not in head:  # an IR's .xml is XML whose root element is <net ...>; anything else would reach
        # OpenVINO's other front ends (TensorFlow text graphs...), which print their own parse errors
        raise OpenVINOError(f"{path} is not an OpenVINO IR (its .xml has no <net> element); write one with "
                            "fastervit export --output model.xml")
    try:
        ov_model = _core().read_model(str(path))
    except OpenVINOError:
        raise
    except Exception as e:  # OpenVINO raises RuntimeError / its own types for a file that is not an IR
        lines = [line for line in str(e).splitlines() if line.strip() and "Exception from" not in line]
        first = lines[0] if lines else type(e).__name__
        raise OpenVINOError(f"{path} is not an OpenVINO IR OpenVINO can read ({first})") from None
    meta = _metadata(ov_model)
    if RANGE_KEY not in meta:
        raise OpenVINOError(f"{path} is an OpenVINO IR not written by open_fastervit (no {RT_SECTION} metadata); "
                            "export it with `fastervit export SOURCE -o model.xml`")
    return ov_model, meta


def _compile(ov_model: Any, precision: str, threads: int | None) -> Any:
    config = {"INFERENCE_PRECISION_HINT": OV_PRECISIONS[precision], "PERFORMANCE_HINT": "LATENCY",
              "INFERENCE_NUM_THREADS": int(threads or torch.get_num_threads())}
    try:
        return _core().compile_model(ov_model, "CPU", config)
    except Exception as e:  # OpenVINO's own error types
        raise OpenVINOError(f"OpenVINO could not compile the model for the CPU: {str(e).splitlines()[0]}") from e


def _runner(compiled: Any) -> Callable[[Any], Any]:
    request = compiled.create_infer_request()
    lock = threading.Lock()  # one infer request: one call at a time (serve's batcher and tests call from threads)

    def run(x: Tensor | np.ndarray) -> Tensor | np.ndarray:
        array = np.ascontiguousarray((x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x))
                                     .astype(np.float32, copy=False))
        with lock:
            out = np.array(request.infer({0: array})[0], copy=True)
        return torch.from_numpy(out) if isinstance(x, Tensor) else out

    return run


def _open(path: Path) -> tuple[dict[str, str], Callable[[Any], Any]]:
    ov_model, meta = read_ir(path)
    return meta, _runner(_compile(ov_model, "fp32", None))


register_export_format("openvino", Exporter(".xml", _write, _open, lambda path: [path.with_suffix(".bin")]))


# ---- an IR as a module -----------------------------------------------------------------------------------------


class OpenVINOModel(nn.Module):
    """An OpenVINO model (an IR file, or a torch model converted in memory) compiled for the CPU:
    ``model(x) -> logits``.

    ``x`` is a ``(B, C, H, W)`` float tensor on any device inside the stored input range (else
    :class:`OpenVINOError` naming it); the ``(B, classes)`` fp32 logits come back on ``x``'s device. No parameters,
    eval mode only (training mode or a torch dispatch mode, which cannot see OpenVINO's work, raise). A deep copy
    shares the compiled model.

    Attributes:
        path (``None`` for an in-memory conversion), precision (``"fp32"``, ``"bf16"``, ``"fp16"``: what the CPU
        runs), int8 (a quantized IR), metadata, input_range, data_config, num_classes, class_names, pretrained_cfg,
        weights_info.
    """

    def __init__(self, ov_model: Any, meta: dict[str, str], *, precision: str = "fp32", threads: int | None = None,
                 path: Path | None = None) -> None:
        super().__init__()
        self.path, self.metadata, self.ov_model = path, dict(meta), ov_model
        self.precision = resolve_ov_precision(precision)
        self.threads = threads
        self.input_range: dict[str, Any] = json.loads(meta[RANGE_KEY])
        self.quantization: dict[str, Any] | None = json.loads(meta[QUANT_KEY]) if QUANT_KEY in meta else None
        self.int8 = self.quantization is not None
        classes = str(meta.get("open_fastervit.num_classes", ""))
        if not classes.isdigit():
            raise OpenVINOError(f"{path or 'the model'} does not state its class count (not written by open_fastervit)")
        self.num_classes = int(classes)
        self.in_chans = int(self.input_range.get("in_chans", 3))
        self.data_config: dict[str, Any] = json.loads(meta.get(DATA_CONFIG_KEY, "{}") or "{}")
        if "input_size" in self.data_config:
            self.data_config["input_size"] = tuple(self.data_config["input_size"])
        self.class_names: list[str] | None = json.loads(meta.get(CLASS_NAMES_KEY, "null") or "null")
        arch = meta.get("open_fastervit.architecture", "")
        self.pretrained_cfg: dict[str, Any] = {**self.data_config, "architecture": arch,
                                               "num_classes": self.num_classes}
        kind = "int8" if self.int8 else self.precision
        self.weights_info: dict[str, Any] = {
            "weights": f"openvino {kind}", "file": str(path) if path else "", "architecture": arch,
            "class_names": self.class_names, "num_classes": self.num_classes,
            "model_kwargs": json.loads(meta.get(MODEL_KWARGS_KEY, "{}") or "{}"),
            "source": meta.get(SOURCE_KEY, str(path or "")),
        }
        if self.data_config:
            self.weights_info["data_config"] = dict(self.data_config)
        self._run = _runner(_compile(ov_model, self.precision, threads))
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` float images -> ``(B, classes)`` fp32 logits on ``x``'s device.

        Raises:
            OpenVINOError: a shape outside the stored range, training mode, or an active torch dispatch mode.
        """
        name = self.path.name if self.path else "the OpenVINO model"
        if self.training:
            raise OpenVINOError(f"{name} is an inference model; it cannot be trained")
        if _get_current_dispatch_mode() is not None:
            raise OpenVINOError(f"{name} runs in OpenVINO, outside torch: torch's FLOP counters and memory "
                                "trackers cannot measure it")
        try:
            check_sizes(x.shape, self.input_range, what=name)
        except ExportError as e:
            raise OpenVINOError(str(e)) from None
        return self._run(x.detach().to("cpu", torch.float32)).to(x.device)

    def __deepcopy__(self, memo: dict[int, Any]) -> OpenVINOModel:
        clone = copy.copy(self)
        clone.__dict__ = dict(self.__dict__)
        for key in ("_parameters", "_buffers", "_modules"):
            clone.__dict__[key] = dict(self.__dict__[key])
        return clone

    def extra_repr(self) -> str:
        kind = "int8" if self.int8 else self.precision
        return f"{self.path.name if self.path else 'in memory'}, OpenVINO {kind}, inputs {self.describe_range()}"

    def describe_range(self) -> str:
        """The stored input range in words."""
        return describe_range(self.input_range)


def load_openvino(path: str | Path, *, precision: str = "fp32", threads: int | None = None) -> OpenVINOModel:
    """Open an IR of ``fastervit export`` / ``fastervit quantize`` as an :class:`OpenVINOModel`.

    Args:
        path: the ``.xml`` (its ``.bin`` beside it).
        precision: ``"fp32"`` (default, exact), ``"bf16"``, ``"fp16"`` or ``"auto"`` (see :func:`resolve_ov_precision`).
        threads: OpenVINO inference threads (default: ``torch.get_num_threads()`` now).

    Raises:
        OpenVINOError: as :func:`read_ir`, or a precision the CPU lacks.
    """
    ov_model, meta = read_ir(path)
    return OpenVINOModel(ov_model, meta, precision=precision, threads=threads, path=Path(path))


def from_torch(model: nn.Module, *, precision: str = "fp32", threads: int | None = None,
               size: tuple[int, int] | None = None) -> OpenVINOModel:
    """A torch FasterViT converted to OpenVINO in memory (no file), fixed at ``size`` ``(H, W)`` (default: its
    data config's), dynamic batch, compiled at ``precision``.

    Raises:
        OpenVINOError: openvino missing, conversion failing, or a precision the CPU lacks.
    """
    model = model.eval()
    info = dict(getattr(model, "weights_info", None) or {})
    if size is None:
        size = tuple(data_config_for(model, info)["input_size"][1:])
    h, w = int(size[0]), int(size[1])
    size_range = ((h, h), (w, w))
    in_chans = int(getattr(model, "in_chans", 3))
    meta = _meta_of(model, size_range, in_chans)
    example = torch.randn(2, in_chans, h, w)
    converted = OpenVINOModel(torch_to_openvino(model, example, size_range), meta, precision=precision,
                              threads=threads)
    if info.get("weights"):  # what was loaded stays named (e.g. "pretrained"); the runtime is added to it
        converted.weights_info["weights"] = f"{info['weights']} (openvino {converted.precision})"
    return converted


def _meta_of(model: nn.Module, size_range: Any, in_chans: int) -> dict[str, str]:
    """The metadata :func:`~open_fastervit.deploy.export.export_model` stores, for an in-memory conversion."""
    info = dict(getattr(model, "weights_info", None) or {})
    (h0, _), (w0, _) = size_range
    rng = {"batch": [1, None], "height": list(size_range[0]), "width": list(size_range[1]), "dynamic_size": False,
           "in_chans": in_chans}
    config = dict(data_config_for(model, info))
    config["input_size"] = [in_chans, int(h0), int(w0)]
    return {
        RANGE_KEY: json.dumps(rng),
        "open_fastervit.architecture": str((getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")),
        "open_fastervit.num_classes": str(int(model.num_classes)),
        DATA_CONFIG_KEY: json.dumps(config, default=str),
        CLASS_NAMES_KEY: json.dumps(list(info["class_names"]) if info.get("class_names") else None),
        MODEL_KWARGS_KEY: json.dumps(info.get("model_kwargs") or {}, default=str),
        SOURCE_KEY: str(info.get("file") or info.get("source") or ""),
    }


# ---- int8 through NNCF -----------------------------------------------------------------------------------------


def _nncf() -> Any:
    return _optional("nncf", QuantizeError, "int8 OpenVINO files")


def _check_output(output: Path) -> None:
    if not output.name.endswith(".xml"):
        raise QuantizeError(f"output {output} must be a .xml file (OpenVINO IR, e.g. model.int8.xml)")
    if output.is_dir():
        raise QuantizeError(f"output {output} is a folder; name a .xml file")
    if not output.parent.is_dir():
        raise QuantizeError(f"cannot write {output}: folder {output.parent} does not exist")
    if not os.access(output.parent, os.W_OK):
        raise QuantizeError(f"cannot write {output}: no write permission")


def quantize_openvino(
    source: str | Path | nn.Module,
    calib_dir: str | Path,
    output: str | Path,
    *,
    num_calib: int = 128,
    img_size: int | None = None,
    dynamic_size: bool = False,
    reduce_range: bool = True,
    seed: int = 0,
    architecture: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    use_ema: bool | None = None,
) -> Path:
    """Quantize a FasterViT to an int8 OpenVINO IR with NNCF (static, calibrated on real images).

    The fused inference form is converted to OpenVINO (as ``fastervit export -o model.xml``), ``nncf.quantize``
    calibrates it on ``num_calib`` images of ``calib_dir`` (read and preprocessed as the onnxruntime route reads
    them: :func:`~open_fastervit.deploy.quantize.calibration_images` and the evaluation transform) with its
    default scheme, and the first :data:`~open_fastervit.deploy.quantize.CHECK_IMAGES` images check the int8
    model against fp32 (top-1 agreement, largest relative logit error), stored in the file.

    Args:
        source: a model name, weights file or folder (as ``load_model`` takes), or a module (not changed).
        calib_dir: folder of real images (any depth; non-images skipped).
        output: the ``.xml`` to write (its ``.bin`` goes beside it).
        num_calib: calibration images.
        img_size: evaluation / calibration side in px (default: the checkpoint's or the model cfg's).
        dynamic_size: dynamic height and width from ``min_dynamic_size(model)`` up (needs ``img_size`` at least
            that); else fixed at ``img_size``. Batch is always dynamic.
        reduce_range: 7-bit weights in every layer (NNCF ``OverflowFix.ENABLE``): without VNNI the CPU's u8 x s8
            kernels add pairs of products in int16, which saturates with full 8-bit weights (as in the onnxruntime
            route); ``False`` keeps NNCF's default (only the first layer reduced), for CPUs with VNNI or AMX.
        seed: order in which calibration files are picked.
        architecture, model_kwargs, use_ema: passed to ``load_model`` for a name or file ``source``.

    Returns:
        The written ``.xml``; ``load_openvino(path).quantization["check"]`` holds the quick check.

    Raises:
        QuantizeError: bad numbers or output, calibration folder missing / empty / without images, a size the
            export cannot cover, openvino / nncf missing or failing.
        CheckpointError, ValueError: the source cannot be loaded.
    """
    if num_calib < 1:
        raise QuantizeError(f"num_calib must be >= 1, got {num_calib}")
    output = Path(output)
    _check_output(output)
    nncf = _nncf()
    if not openvino_available():
        _ov()
    calib = calibration_images(calib_dir, num_calib, seed=seed)
    given = source if isinstance(source, nn.Module) else None
    predictor = Predictor(copy.deepcopy(given) if given is not None else source, architecture=architecture,
                          model_kwargs=model_kwargs, use_ema=use_ema, fuse=False, device="cpu", img_size=img_size)
    model, info, config = predictor.model, predictor.info, predictor.data_config
    size = (int(config["input_size"][1]), int(config["input_size"][2]))
    try:
        bound = min_dynamic_size(model)
    except ExportError as e:
        raise QuantizeError(f"cannot quantize {source}: {e}") from None
    if dynamic_size and min(size) < bound:
        raise QuantizeError(f"a dynamic-size file covers H, W >= {bound} for this model; its evaluation size "
                            f"{size[0]}x{size[1]} is below it. Quantize without --dynamic-size, or give --img-size "
                            f"of at least {bound}")
    images = predictor.preprocess(calib.pictures)
    start = time.perf_counter()
    fused = inference_form(copy.deepcopy(model).float())
    fused.weights_info = info
    with tempfile.TemporaryDirectory(prefix="fastervit_ov_") as tmp:
        fp32 = Path(tmp) / "fp32.xml"
        try:
            export_model(fused, fp32, format="openvino", dynamic_size=dynamic_size,
                         example_size=None if dynamic_size else size, check=False)
            ov_model, meta = read_ir(fp32)
        except ExportError as e:
            raise QuantizeError(f"cannot convert the fp32 model to OpenVINO: {e}") from None
        batches = [images[i:i + 1].numpy() for i in range(len(images))]
        overflow = "ENABLE" if reduce_range else "FIRST_LAYER"
        try:
            from nncf.quantization.advanced_parameters import (  # optional dependency (nncf, checked above)
                AdvancedQuantizationParameters,
                OverflowFix,
            )

            quantized = nncf.quantize(
                ov_model, nncf.Dataset(batches), subset_size=len(batches),
                advanced_parameters=AdvancedQuantizationParameters(overflow_fix=getattr(OverflowFix, overflow)))
        except Exception as e:  # NNCF raises many types (its own, RuntimeError, ValueError)
            first = str(e).splitlines()[0] if str(e) else ""
            raise QuantizeError(f"NNCF could not quantize the model: {type(e).__name__}: {first}") from e
    seconds = time.perf_counter() - start
    check = _quick_check(quantized, fused, images[:CHECK_IMAGES])
    meta.update({
        QUANT_KEY: json.dumps({
            "format": "OpenVINO IR (NNCF FakeQuantize)", "scheme": "NNCF default (preset performance)",
            "method": "nncf", "num_calib": len(calib.files), "calib_dir": str(calib_dir),
            "skipped_files": len(calib.skipped), "seconds": round(seconds, 1), "check": check,
            "nncf": str(nncf.__version__), "openvino": str(_ov().__version__),
            "activations": "int8 per tensor", "reduce_range": reduce_range, "overflow_fix": overflow,
            "weights": f"int8 per output channel{' (7-bit range)' if reduce_range else ''}",
        }),
        MODEL_KWARGS_KEY: json.dumps(info.get("model_kwargs") or {}, default=str),
        SOURCE_KEY: str(source) if given is None else str(info.get("file") or type(given).__name__),
    })
    for key, value in meta.items():
        quantized.set_rt_info(str(value), [RT_SECTION, key.removeprefix(_PREFIX)])
    _save_ir(quantized, output)
    return output


def _quick_check(quantized: Any, fused: nn.Module, images: Tensor) -> dict[str, Any]:
    """Top-1 agreement and ``max|int8 - fp32| / max|fp32|`` of the int8 model against the fp32 torch model."""
    run = _runner(_compile(quantized, "fp32", None))
    with torch.no_grad():
        ref = torch.cat([fused(images[i:i + 16]) for i in range(0, len(images), 16)]).float()
    out = torch.cat([run(images[i:i + 16]) for i in range(0, len(images), 16)]).float()
    return {"images": len(images), "top1_agreement": float((out.argmax(1) == ref.argmax(1)).float().mean()),
            "max_rel_error": float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))}
