"""Post-training static int8 quantization for CPU inference, through onnxruntime (QDQ format).

:func:`quantize_model` turns a FasterViT (any ``load_model`` source, or a module) into one ``.onnx`` file:

1. the model's inference form (``fused.inference_form``) is exported to fp32 ONNX by
   :func:`open_fastervit.deploy.export.export_model` (dynamic batch; fixed or dynamic height/width);
2. onnxruntime's ``quant_pre_process`` (shape inference, basic graph optimisation) prepares it;
3. ``quantize_static`` calibrates activation ranges on real images (read with ``open_fastervit.data.read_image``
   and the model's evaluation transform, timm's ``resolve_data_config`` / ``create_transform``) and inserts
   QuantizeLinear/DequantizeLinear pairs: unsigned 8-bit asymmetric activations, signed 8-bit per-output-channel
   weights, on every ``Conv``, ``MatMul`` (linear layers and the two attention products) and ``Gemm``. LayerNorm,
   softmax, GELU and the residual additions stay fp32; onnxruntime fuses each QDQ group into ``QLinearConv`` /
   ``QLinearMatMul`` at session start;
4. the file gets metadata for every command that runs it: class names, the evaluation data config, the
   architecture and its overrides, the fp32 source, the calibration settings and a quick check (top-1 agreement
   and largest relative logit error against the fp32 inference form on the calibration images).

:func:`load_quantized` opens such a file as a :class:`QuantizedModel`, an ``nn.Module`` taking a ``(B, 3, H, W)``
float tensor and returning ``(B, classes)`` fp32 logits, with ``pretrained_cfg`` / ``weights_info`` as a model
loaded by ``load_model`` has them, so ``validate``, ``predict`` and ``bench`` take it as they take a model.

**Why onnxruntime and not PT2E** (measured on the AMD EPYC Zen 3 machine of this project, AVX2 + FMA, no AVX-512
and no VNNI, batch 16, 1 thread, under contention; ratios to our fused fp32 model, eager): FasterViT-0 at 224 px,
onnxruntime int8 1.8x (2.0x at 2 threads), PT2E (``torchao`` ``X86InductorQuantizer`` + ``torch.compile``) 1.14x,
with ``torch.compile`` of the fp32 model alone at 1.09x; the demo model at 64 px, onnxruntime int8 1.6-1.8x, PT2E
1.2x (slower than compiled fp32, 1.3x). PT2E also needs ``torchao`` (not a dependency) and a long compile at every
start (2-3 min here). Top-1 on tiny-imagenet-10 val of the demo model: 76.0% fp32; int8 75.8% (128 train photos
for calibration) to 76.0% (200); PT2E int8 75.4%.

**Why reduced-range weights** (7-bit, ``reduce_range=True``, the default): without VNNI, onnxruntime's u8 x s8
kernels add pairs of products in int16 (``vpmaddubsw``), which saturates when activations and weights both use
the full 8 bits. Measured on the demo model: quantizing only the stem convolution took top-1 agreement with fp32
to 88% (top-1 76.0% -> 73.2%), while the same file with onnxruntime's graph optimisations off (QDQ simulated in
fp32, no int8 kernels) agreed 100%; with 7-bit weights the whole model agrees 99.4% (top-1 76.0%). On CPUs with VNNI
(AVX512-VNNI, AVX-VNNI, AMX) ``reduce_range=False`` is safe and keeps one more bit. Source: onnxruntime's
quantization documentation (``reduce_range``; "When and why do I need to try U8U8?").

**Memory**: onnxruntime's calibration keeps every intermediate tensor of every calibration image until the end
(about 30 MB per image for FasterViT-0 at 224 px: 128 images peaked at 3.9 GB). Its ``CalibMaxIntermediateOutputs``,
meant to bound this, discards the collected batches in onnxruntime 1.32 instead of reducing them, so it is not used;
lower ``num_calib`` for large models or sizes.

Input sizes: batch is always dynamic. Height and width are fixed at the evaluation size (``img_size``, default the
model's) unless ``dynamic_size=True``, which needs an evaluation size of at least
:func:`~open_fastervit.deploy.export.min_dynamic_size` (FasterViT-0: 225; the demo model, 64 px, cannot). The
stored range is enforced with a message naming it (``export.check_sizes``).
"""

from __future__ import annotations

import copy
import json
import os
import random
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ..data import DECODE_ERRORS, read_image
from ..fused import inference_form
from ..inference import Predictor
from ..serialization import atomic_write
from .export import (
    ONNX_SINGLE_FILE_LIMIT,
    RANGE_KEY,
    ExportError,
    check_sizes,
    describe_range,
    export_model,
    min_dynamic_size,
)

__all__ = [
    "METHODS",
    "OP_TYPES",
    "QUANT_KEY",
    "NotQuantizedError",
    "QuantizeError",
    "QuantizedModel",
    "Calibration",
    "calibration_images",
    "load_quantized",
    "quantize_model",
]

#: Calibration methods: our word -> onnxruntime ``CalibrationMethod`` name. ``minmax`` (default) takes the
#: observed range; ``percentile`` clips at the 99.999th percentile of |x|; ``entropy`` minimises the KL divergence
#: of the quantized histogram. On the demo model all three gave top-1 within one image (0.2 point) of each other.
METHODS: dict[str, str] = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
#: ONNX operators that get int8 inputs (weights per output channel).
OP_TYPES = ("Conv", "MatMul", "Gemm")
#: Metadata entries written by :func:`quantize_model` (ONNX ``metadata_props``, JSON values).
QUANT_KEY = "open_fastervit.quantization"
DATA_CONFIG_KEY = "open_fastervit.data_config"
CLASS_NAMES_KEY = "open_fastervit.class_names"
MODEL_KWARGS_KEY = "open_fastervit.model_kwargs"
SOURCE_KEY = "open_fastervit.source"
#: Calibration images the quick check compares int8 and fp32 on (the first ones of the calibration set).
CHECK_IMAGES = 64


class QuantizeError(ValueError):
    """A quantization that cannot be made (arguments, calibration data, output), or a file that is not ours."""


class NotQuantizedError(QuantizeError):
    """An ONNX file of ``fastervit export`` (fp32, with its input range) given where an int8 file was expected."""


@dataclass
class Calibration:
    """Calibration pictures (8-bit RGB, as read), the files they came from and those skipped as unreadable."""

    pictures: list[Any]
    files: list[Path]
    skipped: list[tuple[Path, str]]

    def tensors(self, transform: Any) -> Tensor:
        """``(N, 3, H, W)`` float batch through ``transform`` (the model's evaluation transform)."""
        return torch.stack([transform(p) for p in self.pictures])


# ---- calibration data ----------------------------------------------------------------------------------------


def _candidate_files(root: Path) -> list[Path]:
    """Every non-hidden file under ``root`` (any depth), sorted; errors for a missing or empty folder."""
    if not root.is_dir():
        raise QuantizeError(f"calibration folder {root} does not exist" if not root.exists() else
                            f"calibration folder {root} is not a folder")
    files = sorted(p for p in root.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if not files:
        raise QuantizeError(f"calibration folder {root} holds no files; give a folder of real images (for "
                            "example the train split of your dataset)")
    return files


def calibration_images(calib_dir: str | Path, num: int, *, seed: int = 0) -> Calibration:
    """Up to ``num`` readable images of ``calib_dir`` (any depth, e.g. an ImageFolder split).

    Files are taken in a seeded random order (so the classes of an ImageFolder mix) and decoded with
    :func:`open_fastervit.data.read_image`; files that are not readable images (labels.csv, a README, corrupt
    pictures) are skipped and listed.

    Raises:
        QuantizeError: the folder does not exist, holds no files, or none of them is a readable image.
    """
    root = Path(calib_dir)
    files = _candidate_files(root)
    random.Random(seed).shuffle(files)
    pictures, used, skipped = [], [], []
    for path in files:
        if len(pictures) >= num:
            break
        try:
            pictures.append(read_image(path))
        except DECODE_ERRORS as e:
            skipped.append((path, str(e).splitlines()[0] if str(e) else type(e).__name__))
            continue
        used.append(path)
    if not pictures:
        example = f" (e.g. {skipped[0][0].name}: {skipped[0][1]})" if skipped else ""
        raise QuantizeError(f"none of the {len(files)} files under {root} is a readable image{example}")
    return Calibration(pictures, used, skipped)


def _reader(images: Tensor, batch_size: int, input_name: str) -> Any:
    """An onnxruntime ``CalibrationDataReader`` over ``images`` in batches of ``batch_size``."""
    from onnxruntime.quantization import CalibrationDataReader  # optional dependency (pip install onnxruntime)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = [images[i:i + batch_size].numpy() for i in range(0, len(images), batch_size)]
            self.index = 0

        def get_next(self) -> dict[str, np.ndarray] | None:
            if self.index >= len(self.batches):
                return None
            self.index += 1
            return {input_name: self.batches[self.index - 1]}

        def rewind(self) -> None:
            self.index = 0

    return Reader()


# ---- quantizing ----------------------------------------------------------------------------------------------


def _require_onnxruntime() -> None:
    try:  # optional dependencies: imported only when quantizing or opening an int8 file
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise QuantizeError(f"int8 quantization needs onnx and onnxruntime ({e}); pip install onnx onnxruntime "
                            "onnxscript") from None


def _check_output(output: Path) -> None:
    if not output.name.endswith(".onnx"):
        raise QuantizeError(f"output {output} must be a .onnx file (e.g. model.int8.onnx)")
    if output.is_dir():
        raise QuantizeError(f"output {output} is a folder; name a .onnx file")
    folder = output.parent
    if not folder.is_dir():
        raise QuantizeError(f"cannot write {output}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (output.exists() and not os.access(output, os.W_OK)):
        raise QuantizeError(f"cannot write {output}: no write permission")


def _json_ready(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: list(v) if isinstance(v, tuple) else str(v)))


def quantize_model(
    source: str | Path | nn.Module,
    calib_dir: str | Path,
    output: str | Path,
    *,
    num_calib: int = 128,
    img_size: int | None = None,
    method: str = "minmax",
    dynamic_size: bool = False,
    reduce_range: bool = True,
    batch_size: int = 16,
    seed: int = 0,
    architecture: str | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    use_ema: bool | None = None,
) -> Path:
    """Quantize a FasterViT to an int8 ONNX file (static, calibrated on real images) and return its path.

    Args:
        source: a model name, weights file or folder (as ``open_fastervit.load_model`` takes), or a module
            (a trainable model or its fused form; it is not changed).
        calib_dir: folder of real images for calibration (any depth; non-images are skipped).
        output: the ``.onnx`` file to write (``.int8.onnx`` suggested); its folder must exist.
        num_calib: calibration images (the first :data:`CHECK_IMAGES` of them also serve the quick check).
        img_size: evaluation (and calibration) side in px; default the checkpoint's or the model cfg's size.
        method: calibration, one of :data:`METHODS`.
        dynamic_size: dynamic height and width from ``min_dynamic_size(model)`` up (``img_size`` must be at least
            that); else fixed at ``img_size``. Batch is always dynamic.
        reduce_range: 7-bit weights (see the module notes: needed for accuracy on x86 without VNNI).
        batch_size: calibration batch (the histogram methods run one image at a time: onnxruntime stacks their
            per-batch statistics, which needs equal shapes).
        seed: order in which calibration files are picked.
        architecture, model_kwargs, use_ema: passed to ``load_model`` for a name or file ``source``.

    Returns:
        The written file. Its metadata holds the quick check (``load_quantized(path).quantization["check"]``).

    Raises:
        QuantizeError: unknown method, bad numbers, output not writable, calibration folder missing / empty /
            without readable images, a size the export cannot cover, onnxruntime missing or failing.
        CheckpointError, ValueError: the source cannot be loaded (from ``load_model``).
    """
    if method not in METHODS:
        raise QuantizeError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}")
    if num_calib < 1 or batch_size < 1:
        raise QuantizeError(f"num_calib and batch_size must be >= 1, got {num_calib} and {batch_size}")
    output = Path(output)
    _check_output(output)
    _require_onnxruntime()
    calib = calibration_images(calib_dir, num_calib, seed=seed)  # data errors before the model is loaded
    # optional dependency (checked by _require_onnxruntime above)
    # here: onnxruntime is an optional dependency, loaded only to quantize
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    # the fp32 model on CPU and its evaluation preprocessing; a module given is copied, so it is not changed
    given = source if isinstance(source, nn.Module) else None
    predictor = Predictor(copy.deepcopy(given) if given is not None else source, architecture=architecture,
                          model_kwargs=model_kwargs, use_ema=use_ema, fuse=False, device="cpu", img_size=img_size)
    model, info, config = predictor.model, predictor.info, predictor.data_config
    if given is not None:
        source_name = str(info.get("file") or info.get("source") or type(given).__name__)
    else:
        source_name = str(source)
    size = (int(config["input_size"][1]), int(config["input_size"][2]))
    try:
        bound = min_dynamic_size(model)
    except ExportError as e:  # not a FasterViT
        raise QuantizeError(f"cannot quantize {source_name}: {e}") from None
    if dynamic_size and min(size) < bound:
        raise QuantizeError(
            f"a dynamic-size file covers H, W >= {bound} for this model (two windows per axis in every transformer "
            f"stage); its evaluation size {size[0]}x{size[1]} is below it. Quantize without --dynamic-size "
            f"(Python: dynamic_size=False) for a fixed-size file, or give --img-size of at least {bound}"
        )
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if weights > ONNX_SINGLE_FILE_LIMIT:
        raise QuantizeError(f"the fp32 model has {weights / 1e9:.1f} GB of weights; quantizing models above "
                            f"{ONNX_SINGLE_FILE_LIMIT / 1e9:.1f} GB (ONNX external data) is not supported")
    images = predictor.preprocess(calib.pictures)
    start = time.perf_counter()
    fused = inference_form(copy.deepcopy(model).float())
    with tempfile.TemporaryDirectory(prefix="fastervit_int8_") as tmp:
        fp32, pre, int8 = (Path(tmp) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        try:
            export_model(fused, fp32, format="onnx", dynamic_size=dynamic_size,
                         example_size=None if dynamic_size else size, check=False)
        except ExportError as e:
            raise QuantizeError(f"cannot export the fp32 model to ONNX: {e}") from None
        import onnx  # optional dependency (checked by _require_onnxruntime above)

        meta = {p.key: p.value for p in onnx.load(str(fp32), load_external_data=False).metadata_props}
        # onnxruntime's symbolic shape inference gives up on a dynamic H, W (and then dumps its partial result into
        # the working directory): ONNX's own shape inference, which quant_pre_process also runs, suffices there
        histogram = method != "minmax"
        try:
            quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=dynamic_size)
            quantize_static(
                str(pre), str(int8), _reader(images, 1 if histogram else batch_size, "x"),
                quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                per_channel=True, reduce_range=reduce_range, op_types_to_quantize=list(OP_TYPES),
                calibrate_method=getattr(CalibrationMethod, METHODS[method]),
            )
        except Exception as e:  # onnxruntime raises many types (its own, ValueError, RuntimeError, MemoryError)
            first = str(e).splitlines()[0] if str(e) else ""
            raise QuantizeError(f"onnxruntime could not quantize the model: {type(e).__name__}: {first}") from e
        seconds = time.perf_counter() - start
        proto = onnx.load(str(int8))
        check = _quick_check(proto, fused, images[:CHECK_IMAGES])
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or info.get("architecture", "")
    class_names = info.get("class_names")
    meta.update({
        QUANT_KEY: json.dumps({
            "format": "QDQ", "activations": "uint8 asymmetric, per tensor", "weights":
            f"int8 symmetric, per output channel{' (7-bit range)' if reduce_range else ''}",
            "op_types": list(OP_TYPES), "method": method, "reduce_range": reduce_range,
            "num_calib": len(calib.files), "calib_dir": str(calib_dir), "skipped_files": len(calib.skipped),
            "seconds": round(seconds, 1), "check": check, "onnxruntime": _ort_version(),
        }),
        DATA_CONFIG_KEY: json.dumps(_json_ready(config)),
        CLASS_NAMES_KEY: json.dumps(list(class_names) if class_names else None),
        MODEL_KWARGS_KEY: json.dumps(_json_ready(info.get("model_kwargs") or {})),
        SOURCE_KEY: source_name,
        "open_fastervit.architecture": str(arch),
    })
    del proto.metadata_props[:]
    proto.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v) for k, v in meta.items())
    atomic_write(output, lambda tmp_path: onnx.save(proto, tmp_path))
    return output


def _ort_version() -> str:
    import onnxruntime  # optional dependency


    return onnxruntime.__version__


def _quick_check(proto: Any, fused: nn.Module, images: Tensor) -> dict[str, Any]:
    """Top-1 agreement and ``max|int8 - fp32| / max|fp32|`` of the quantized graph against the fp32 model."""
    session = _session(proto.SerializeToString(), threads=None)
    with torch.no_grad():
        ref = torch.cat([fused(images[i:i + 16]) for i in range(0, len(images), 16)]).float()
    out = torch.cat([torch.from_numpy(session.run(None, {"x": images[i:i + 16].numpy()})[0])
                     for i in range(0, len(images), 16)])
    return {
        "images": len(images),
        "top1_agreement": float((out.argmax(1) == ref.argmax(1)).float().mean()),
        "max_rel_error": float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)),
    }


def _session(model: str | bytes, threads: int | None, providers: Sequence[str] | None = None) -> Any:
    """An onnxruntime CPU session; ``threads`` intra-op threads (default: torch's current number)."""
    import onnxruntime as ort  # optional dependency

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or torch.get_num_threads())
    options.inter_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=list(providers or ["CPUExecutionProvider"]))


# ---- loading and running -------------------------------------------------------------------------------------


class QuantizedModel(nn.Module):
    """An int8 file written by :func:`quantize_model`, run by onnxruntime on CPU: ``model(x) -> logits``.

    ``x`` is a ``(B, 3, H, W)`` float tensor on any device (the logits come back on it, fp32, ``(B, classes)``);
    its shape is checked against the stored range first (:class:`QuantizeError` naming the range). The module has
    no parameters, starts in eval mode and runs inference only: in training mode, or under a torch dispatch mode
    (FLOP counters, memory trackers, which cannot see onnxruntime's work), it raises :class:`QuantizeError`. A deep
    copy shares the (read-only) session.

    Attributes:
        path, metadata (all ``open_fastervit.*`` entries), input_range, quantization (settings and quick check),
        data_config, num_classes, class_names, pretrained_cfg (data config, architecture, num_classes: what timm's
        ``resolve_data_config`` reads), weights_info (``weights='int8'``, file, class_names, data_config, ...).
    """

    def __init__(self, path: Path, session: Any, metadata: dict[str, str]) -> None:
        super().__init__()
        self.path, self.session, self.metadata = path, session, metadata
        self.input_range: dict[str, Any] = json.loads(metadata[RANGE_KEY])
        self.quantization: dict[str, Any] = json.loads(metadata[QUANT_KEY])
        self.data_config: dict[str, Any] = json.loads(metadata[DATA_CONFIG_KEY])
        self.data_config["input_size"] = tuple(self.data_config["input_size"])
        self.class_names: list[str] | None = json.loads(metadata.get(CLASS_NAMES_KEY, "null"))
        self.num_classes = int(session.get_outputs()[0].shape[-1])
        self.in_chans = int(self.input_range.get("in_chans", 3))
        arch = metadata.get("open_fastervit.architecture", "")
        self.pretrained_cfg: dict[str, Any] = {**self.data_config, "architecture": arch,
                                               "num_classes": self.num_classes}
        self.weights_info: dict[str, Any] = {
            "weights": "int8", "file": str(path), "architecture": arch, "class_names": self.class_names,
            "data_config": dict(self.data_config), "img_size": int(self.data_config["input_size"][-1]),
            "model_kwargs": json.loads(metadata.get(MODEL_KWARGS_KEY, "{}")),
            "source": metadata.get(SOURCE_KEY, ""), "num_classes": self.num_classes,
        }
        self._input = session.get_inputs()[0].name
        self.eval()  # an inference model from the start (nn.Module starts in training mode)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` float images -> ``(B, classes)`` fp32 logits on ``x``'s device.

        Raises:
            QuantizeError: a shape outside the stored range (the message states it), training mode, or a torch
                dispatch mode is active.
        """
        if self.training:
            raise QuantizeError(f"{self.path.name} is an int8 inference model; it cannot be trained")
        if _get_current_dispatch_mode() is not None:
            raise QuantizeError(f"{self.path.name} runs in onnxruntime, outside torch: torch's FLOP counters and "
                                "memory trackers cannot measure it")
        try:
            check_sizes(x.shape, self.input_range, what=self.path.name)
        except ExportError:
            fixed = not self.input_range.get("dynamic_size")
            hint = ("quantize again with --img-size S (Python: img_size=S) for another size" if fixed else
                    "smaller sizes need a fixed-size file: quantize without --dynamic-size")
            raise QuantizeError(f"{self.path.name} runs inputs with {self.describe_range()}; got {tuple(x.shape)}: "
                                f"{hint}") from None
        array = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run(None, {self._input: array})[0]).to(x.device)

    def __deepcopy__(self, memo: dict[int, Any]) -> QuantizedModel:
        clone = type(self)(self.path, self.session, dict(self.metadata))
        clone.train(self.training)
        return clone

    def extra_repr(self) -> str:
        q = self.quantization
        return f"{self.path.name}, int8 {q.get('format')} ({q.get('method')}), inputs {self.describe_range()}"

    def describe_range(self) -> str:
        """The stored input range in words (``B >= 1, H = 64, W = 64``)."""
        return describe_range(self.input_range)


def load_quantized(path: str | Path, *, threads: int | None = None,
                   providers: Sequence[str] | None = None) -> QuantizedModel:
    """Open an int8 file written by :func:`quantize_model`.

    Args:
        path: the ``.onnx`` file.
        threads: onnxruntime intra-op threads (default: ``torch.get_num_threads()`` now, so ``--threads`` and
            ``OMP_NUM_THREADS`` settings apply alike to torch and onnxruntime).
        providers: onnxruntime execution providers (default CPU; the QDQ graph is standard ONNX, other providers
            may take it).

    Raises:
        QuantizeError: missing file, not an ONNX file, or not written by :func:`quantize_model`
            (:class:`NotQuantizedError` for an fp32 export: open that with ``open_fastervit.deploy.load_exported``).
    """
    path = Path(path)
    if not path.is_file():
        raise QuantizeError(f"int8 model file {path} does not exist")
    _require_onnxruntime()
    try:
        session = _session(str(path), threads, providers)
    except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, ...) for a bad file
        raise QuantizeError(f"onnxruntime cannot open {path}: {str(e).splitlines()[0] if str(e) else e!r}") from None
    meta = {k: v for k, v in session.get_modelmeta().custom_metadata_map.items() if k.startswith("open_fastervit.")}
    missing = [k for k in (RANGE_KEY, QUANT_KEY, DATA_CONFIG_KEY) if k not in meta]
    if missing:
        what = "an fp32 export (open it with load_exported)" if RANGE_KEY in meta else "not written by open_fastervit"
        error = NotQuantizedError if RANGE_KEY in meta else QuantizeError
        raise error(f"{path} is not an int8 file from `fastervit quantize` ({what}; it lacks {', '.join(missing)})")
    return QuantizedModel(path, session, meta)
