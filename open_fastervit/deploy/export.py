"""Export a FasterViT to ONNX or to a ``torch.export`` program (``.pt2``), and check the file against the model.

One exported file serves a range of input sizes:

- **batch** is always dynamic (``B >= 1``);
- with ``dynamic_size=False`` height and width are fixed to the example size;
- with ``dynamic_size=True`` height and width are dynamic from a lower bound up: every transformer stage must hold
  at least two windows per axis, because a stage of one window is another graph (no carrier tokens, and torch's
  shape reasoning specialises sizes of 1). Stage ``i`` sees ``ceil(H / r_i)`` rows (``r_i`` its reduction,
  16 and 32 for FasterViT's transformer stages) cut into ``ws_i`` windows, so the bound is
  ``max_i(r_i * ws_i) + 1`` (FasterViT-0: 225 px). Sizes below it need a fixed-size export (``dynamic_size=False``,
  ``example_size=(H, W)``).

The range travels with the file: ONNX ``metadata_props`` (key :data:`RANGE_KEY`, JSON), and the ``.pt2`` extra
file :data:`RANGE_KEY`. :func:`load_exported` reads either kind and checks every input against it, with a message
that states the range (instead of the exported program's guard error or onnxruntime's shape error).

ONNX files use only the standard domain (``''`` / ``ai.onnx``), so TensorRT and other runtimes take them.
"""

from __future__ import annotations

import copy
import io
import json
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from ..inference import data_config_for
from ..layers import FusedConv2d, FusedLinear, HierarchicalAttention
from ..model import MIN_INPUT_SIZE
from ..serialization import atomic_write

__all__ = [
    "EXPORTERS",
    "FORMATS",
    "ONNX_SINGLE_FILE_LIMIT",
    "RANGE_KEY",
    "ExportError",
    "ExportReport",
    "ExportedModel",
    "check_sizes",
    "default_check_shapes",
    "describe_range",
    "export_model",
    "load_exported",
    "register_export_format",
    "remove_written",
    "written_files",
    "min_dynamic_size",
    "onnx_domains",
    "verify_export",
]

#: ``format`` words and the file suffix each writes (more with :func:`register_export_format`: ``openvino`` ->
#: ``.xml``, registered by :mod:`open_fastervit.deploy.openvino`).
FORMATS = {"onnx": ".onnx", "torch": ".pt2"}
#: Name of the metadata entry (ONNX ``metadata_props`` key, ``.pt2`` extra file) holding the input range (JSON).
RANGE_KEY = "open_fastervit.input_range"
#: Largest relative error (``max|out - ref| / max|ref|``, fp32) :func:`verify_export` accepts by default.
TOLERANCE = 1e-5
_STANDARD_DOMAINS = ("", "ai.onnx")
#: Bytes of weights above which an ONNX file keeps them as external data (protobuf's 2 GB limit).
ONNX_SINGLE_FILE_LIMIT = 1.8e9


class ExportError(ValueError):
    """An export that cannot be made, a file that is not an export we wrote, or an input outside its range."""


@dataclass
class Exporter:
    """A registered export format: ``write(model, example, size_range, path, meta)`` writes ``path`` (and its
    companions) from the eval-mode ``model``, the example batch ``(2, C, H, W)``, ``size_range``
    (``((h_min, h_max), (w_min, w_max))``, ``None`` max: unbounded) and the metadata strings to store;
    ``open(path)`` returns ``(metadata, run)`` where ``run(x)`` maps a ``(B, C, H, W)`` tensor to logits;
    ``companions(path)`` lists the other files a write makes (an IR's ``.bin``)."""

    suffix: str
    write: Callable[[nn.Module, Tensor, Any, Path, dict[str, str]], None]
    open: Callable[[Path], tuple[dict[str, str], Callable[[Any], Any]]]
    companions: Callable[[Path], list[Path]] = field(default=lambda path: [])


#: Formats registered by other modules (``format word -> Exporter``); ``onnx`` and ``torch`` are built in.
EXPORTERS: dict[str, Exporter] = {}


def register_export_format(name: str, exporter: Exporter) -> None:
    """Make ``export_model(..., format=name)`` / a file ending in ``exporter.suffix`` write and check that format."""
    FORMATS[name] = exporter.suffix
    EXPORTERS[name] = exporter


def written_files(path: str | Path) -> list[Path]:
    """The files an export to ``path`` writes: the file, an ONNX file's external data, an IR's ``.bin``."""
    path = Path(path)
    files = [path, path.with_name(path.name + ".data")]
    for exporter in EXPORTERS.values():
        if path.name.endswith(exporter.suffix):
            files += exporter.companions(path)
    return files


def remove_written(path: str | Path) -> None:
    """Delete every file of an export to ``path`` (see :func:`written_files`) that exists."""
    for file in written_files(path):
        file.unlink(missing_ok=True)


@dataclass
class ExportReport:
    """What :func:`export_model` wrote and how it checked.

    Attributes:
        path: the file written.
        format: ``"onnx"`` or ``"torch"``.
        dynamic_size: whether height and width are dynamic.
        example_size: ``(H, W)`` the model was exported with.
        size_range: ``((h_min, h_max), (w_min, w_max))`` accepted; ``None`` as max means unbounded.
        fused: whether the inference form (``model.fuse()``) was exported.
        errors: ``{(B, H, W): largest relative error}`` of the file against the eager model (empty when unchecked).
        tolerance: the relative error accepted.
        seconds: time spent exporting (not checking).
    """

    path: Path
    format: str
    dynamic_size: bool
    example_size: tuple[int, int]
    size_range: tuple[tuple[int, int | None], tuple[int, int | None]]
    fused: bool
    errors: dict[tuple[int, int, int], float] = field(default_factory=dict)
    tolerance: float = TOLERANCE
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        """All checked sizes within ``tolerance``."""
        return all(e <= self.tolerance for e in self.errors.values())

    @property
    def max_error(self) -> float:
        return max(self.errors.values(), default=0.0)

    def describe_range(self) -> str:
        return describe_range(_range_dict(self.size_range))

    def table(self) -> str:
        """The check as text: one line per input shape with its largest relative error."""
        lines = [f"{'input (B, C, H, W)':<24} rel. error"]
        for (b, h, w), err in self.errors.items():
            flag = "" if err <= self.tolerance else f"  > {self.tolerance:g} FAIL"
            lines.append(f"{str((b, 3, h, w)):<24} {err:.2e}{flag}")
        return "\n".join(lines)


# ---- the size range ----------------------------------------------------------------------------------------------


def _attention_stages(model: nn.Module) -> list[tuple[int, int]]:
    """``(reduction, window_size)`` of every transformer (windowed attention) stage of a FasterViT."""
    stages = getattr(model, "stages", None)
    info = getattr(model, "feature_info", None)
    if stages is None or info is None:
        raise ExportError(f"expected a FasterViT (with .stages and .feature_info), got {type(model).__name__}")
    return [
        (int(info[i]["reduction"]), int(stage.window_size))
        for i, stage in enumerate(stages)
        if isinstance(stage, HierarchicalAttention)
    ]


def min_dynamic_size(model: nn.Module) -> int:
    """Smallest height / width of a dynamic-size export: every transformer stage holds >= 2 windows per axis.

    Stage ``i`` (reduction ``r``, window ``ws``) has ``ceil(H / r)`` rows and ``ceil(ceil(H / r) / ws)`` windows, which
    is >= 2 exactly when ``H >= r * ws + 1``. FasterViT-0 (window 7 at reductions 16 and 32): 225.

    Raises:
        ExportError: not a FasterViT.
    """
    return max([MIN_INPUT_SIZE, *(r * ws + 1 for r, ws in _attention_stages(model))])


def _unpadded_size(model: nn.Module, at_least: int) -> int:
    """A size >= ``at_least`` at which no transformer stage pads (a multiple of every ``r * ws``)."""
    step = math.lcm(*(r * ws for r, ws in _attention_stages(model)), 32)
    return step * max(1, math.ceil(at_least / step))


def _range_dict(size_range: tuple[tuple[int, int | None], tuple[int, int | None]]) -> dict[str, Any]:
    return {"batch": [1, None], "height": list(size_range[0]), "width": list(size_range[1])}


def describe_range(rng: dict[str, Any]) -> str:
    """A stored input range in words, e.g. ``B >= 1, H = 224, W = 224``."""

    def axis(name: str, lo: int, hi: int | None) -> str:
        return f"{name} = {lo}" if hi == lo else (f"{name} >= {lo}" if hi is None else f"{lo} <= {name} <= {hi}")

    return ", ".join([axis("B", *rng["batch"]), axis("H", *rng["height"]), axis("W", *rng["width"])])


def check_sizes(shape: Sequence[int], rng: dict[str, Any], in_chans: int | None = None, what: str = "export") -> None:
    """Raise :class:`ExportError` unless ``shape`` ``(B, C, H, W)`` lies in ``rng`` (the stored input range).

    Raises:
        ExportError: wrong rank, channel count, or a batch / height / width outside the range; the message states
            the range and how to get a file for other sizes.
    """
    shape = tuple(int(s) for s in shape)
    chans = in_chans if in_chans is not None else rng.get("in_chans")
    if len(shape) != 4 or (chans is not None and shape[1] != chans):
        raise ExportError(f"{what} takes (B, {chans or 'C'}, H, W) images, got shape {shape}")
    bad = [
        f"{name}={value}"
        for name, value, key in (("B", shape[0], "batch"), ("H", shape[2], "height"), ("W", shape[3], "width"))
        if value < rng[key][0] or (rng[key][1] is not None and value > rng[key][1])
    ]
    if bad:
        hint = (
            "it was exported for a fixed size; export again with --img-size H W (Python: example_size=(H, W)) or "
            "--dynamic-size" if not rng.get("dynamic_size") else
            "smaller sizes put a transformer stage at one window per axis, which is another graph; export a fixed "
            "size for them (--img-size H W without --dynamic-size; Python: dynamic_size=False)"
        )
        raise ExportError(f"{what} runs inputs with {describe_range(rng)}; got {shape} ({', '.join(bad)}): {hint}")


# ---- exporting ---------------------------------------------------------------------------------------------------


def _is_fused(model: nn.Module) -> bool:
    return any(isinstance(m, (FusedConv2d, FusedLinear)) for m in model.modules())


def _default_size(model: nn.Module) -> tuple[int, int]:
    """The evaluation size the weights were saved with (``weights_info``), else the model cfg's."""
    info = getattr(model, "weights_info", None) or {}
    if (info.get("data_config") or {}).get("input_size"):
        size = info["data_config"]["input_size"]
        return int(size[-2]), int(size[-1])
    if info.get("img_size"):
        return int(info["img_size"]), int(info["img_size"])
    size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (3, 224, 224))
    return int(size[-2]), int(size[-1])


def export_model(
    model: nn.Module,
    path: str | Path,
    *,
    format: str | None = None,
    dynamic_size: bool = False,
    example_size: tuple[int, int] | None = None,
    fuse: bool = False,
    opset: int | None = None,
    check: bool = True,
    shapes: Sequence[tuple[int, int, int]] | None = None,
    tolerance: float = TOLERANCE,
) -> ExportReport:
    """Export ``model`` (eval mode, fp32, its device) to ``path`` and, with ``check``, verify the file.

    Args:
        model: a FasterViT (trainable or already fused).
        path: output file; ``.onnx``, ``.pt2`` or ``.xml`` (``format`` defaults from the suffix).
        format: ``"onnx"`` (torch's dynamo exporter, standard ONNX domain), ``"torch"`` (``torch.export``, saved
            with ``torch.export.save``) or ``"openvino"`` (an OpenVINO IR, ``.xml`` + ``.bin``, needs openvino).
        dynamic_size: dynamic height and width from :func:`min_dynamic_size` up (else fixed at ``example_size``).
            Batch is always dynamic.
        example_size: ``(H, W)`` to trace with. Default: the size stored with the weights (``weights_info``
            ``data_config`` / ``img_size``), else the model's cfg size, raised to the dynamic bound when
            ``dynamic_size`` (and one side made 32 px longer, so the example is not square).
        fuse: export the inference form (``model.fuse(pack=False)`` on a copy; the model is left as it is).
        opset: ONNX opset (default: the exporter's).
        check: run :func:`verify_export` on the written file (raises when an error exceeds ``tolerance``).
        shapes: ``(B, H, W)`` shapes to check (default: see :func:`default_check_shapes`).
        tolerance: largest accepted relative error (``max|out - ref| / max|ref|``).

    Returns:
        :class:`ExportReport` (with the measured errors when ``check``).

    Raises:
        ExportError: unknown format, an example size outside the range, a non-standard ONNX node, a file the
            check cannot run, or an error above ``tolerance`` (the report is in the exception's ``report``
            attribute). A file that fails its check is deleted (with its ``.bin`` / external data): no file on
            disk disagrees with its model.
    """
    path = Path(path)
    fmt = format or next((f for f, suffix in FORMATS.items() if path.name.endswith(suffix)), None)
    if fmt not in FORMATS:
        raise ExportError(
            f"unknown export format {format!r}; use one of {', '.join(FORMATS)}"
            if format else f"cannot tell the format from {path.name}: name a .onnx or .pt2 file or pass format="
        )
    if opset is not None and fmt != "onnx":
        raise ExportError("opset applies to ONNX exports only (format='onnx')")
    reference = model.eval()
    bound = min_dynamic_size(model)
    if example_size is None:
        h, w = _default_size(model)
        if dynamic_size:
            h, w = max(h, bound), max(w, bound) + 32
        example_size = (h, w)
    example_size = (int(example_size[0]), int(example_size[1]))
    if dynamic_size:
        size_range = ((bound, None), (bound, None))
    else:
        size_range = ((example_size[0],) * 2, (example_size[1],) * 2)
    rng = {**_range_dict(size_range), "dynamic_size": dynamic_size, "in_chans": int(getattr(model, "in_chans", 3))}
    if min(example_size) < (bound if dynamic_size else MIN_INPUT_SIZE):
        if dynamic_size:
            raise ExportError(
                f"a dynamic-size export of this model covers H, W >= {bound} (every transformer stage needs two "
                f"windows per axis); example size {example_size} is below it. Export without --dynamic-size "
                f"(Python: dynamic_size=False) for a fixed {example_size[0]}x{example_size[1]} program"
            )
        raise ExportError(f"FasterViT needs inputs of at least {MIN_INPUT_SIZE} px, got example size {example_size}")
    exported = copy.deepcopy(model).fuse(pack=False) if fuse and not _is_fused(model) else model
    exported.eval()
    device = next(iter(model.state_dict().values())).device
    x = torch.randn(2, rng["in_chans"], *example_size, device=device)
    dims: dict[int, Any] = {0: torch.export.Dim("batch", min=1)}
    if dynamic_size:
        dims[2] = torch.export.Dim("height", min=bound)
        dims[3] = torch.export.Dim("width", min=bound)
    meta = {
        RANGE_KEY: json.dumps(rng),
        "open_fastervit.architecture": str((getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")),
        "open_fastervit.num_classes": str(getattr(model, "num_classes", "")),
        "open_fastervit.fused": json.dumps(bool(fuse or _is_fused(model))),
        **_preprocessing_meta(model, size_range),
    }
    start = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if fmt == "onnx":
            _export_onnx(exported, x, dims, path, meta, opset)
        elif fmt in EXPORTERS:
            EXPORTERS[fmt].write(exported, x, size_range, path, meta)
        else:
            program = torch.export.export(exported, (x,), dynamic_shapes={"x": dims})
            buffer = io.BytesIO()  # torch.export.save wants a .pt2 name or a buffer; the buffer goes in atomically
            torch.export.save(program, buffer, extra_files=meta)
            atomic_write(path, lambda tmp: Path(tmp).write_bytes(buffer.getvalue()))
    report = ExportReport(path, fmt, dynamic_size, example_size, size_range, bool(fuse or _is_fused(model)),
                          tolerance=tolerance, seconds=time.perf_counter() - start)
    if check:
        try:
            report.errors = verify_export(path, reference, shapes=shapes, tolerance=None)
        except Exception as e:  # a file that cannot be run is as wrong as one that disagrees: not left on disk
            remove_written(path)
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ExportError(f"{path}: the written file could not be checked ({first}); it was removed") from e
        if not report.ok:
            remove_written(path)
            error = ExportError(
                f"{path}: the exported model disagrees with the eager model (largest relative error "
                f"{report.max_error:.2e} > {tolerance:g}; the file was removed):\n{report.table()}"
            )
            error.report = report  # type: ignore[attr-defined]
            raise error
    return report


def _preprocessing_meta(model: nn.Module, size_range: Any) -> dict[str, str]:
    """The evaluation data config (at a fixed export's size) and the class names of ``model`` as metadata."""
    info = dict(getattr(model, "weights_info", None) or {})
    config = dict(data_config_for(model, info))
    (h0, h1), (w0, w1) = size_range
    if h0 == h1 and w0 == w1:
        config["input_size"] = (int(config["input_size"][0]), int(h0), int(w0))
    names = info.get("class_names")
    return {"open_fastervit.data_config": json.dumps(config, default=lambda v: list(v) if isinstance(v, tuple)
                                                     else str(v)),
            "open_fastervit.class_names": json.dumps(list(names) if names else None)}


def _export_onnx(model: nn.Module, x: Tensor, dims: dict[int, Any], path: Path, meta: dict[str, str],
                 opset: int | None) -> None:
    program = torch.onnx.export(model, (x,), dynamic_shapes={"x": dims}, input_names=["x"],
                                output_names=["logits"], opset_version=opset, dynamo=True, verbose=False)
    program.model.metadata_props.update(meta)
    bad = _nonstandard(program.model_proto)
    if bad:
        raise ExportError(f"the ONNX graph uses non-standard domains {sorted(bad)}; TensorRT would refuse it")
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    if weights > ONNX_SINGLE_FILE_LIMIT:  # too large for one protobuf: weights beside the file, written in place
        program.save(str(path), external_data=True)
    else:
        atomic_write(path, lambda tmp: program.save(tmp, external_data=False))


def _domains(proto: Any) -> set[str]:
    """Operator domains of every node of an ONNX model (graph, sub-graphs, local functions)."""
    domains: set[str] = set()

    def walk(graph: Any) -> None:
        for node in graph.node:
            domains.add(node.domain)
            for attr in node.attribute:
                if attr.g is not None and len(attr.g.node):
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(proto.graph)
    for function in proto.functions:
        domains.add(function.domain)
        for node in function.node:
            domains.add(node.domain)
    return domains


def _nonstandard(proto: Any) -> set[str]:
    return {d for d in _domains(proto) if d not in _STANDARD_DOMAINS}


def onnx_domains(path: str | Path) -> set[str]:
    """Every operator domain used by the nodes of an ONNX file (graph, sub-graphs and functions)."""
    import onnx  # optional dependency (pip install onnx), needed for ONNX files only

    proto = onnx.load(str(path), load_external_data=False)
    return _domains(proto)


# ---- loading and checking ----------------------------------------------------------------------------------------


class ExportedModel:
    """An exported file, ready to run: ``model(x) -> logits`` with ``x`` checked against the stored range.

    ``x`` is a ``(B, C, H, W)`` float tensor (or numpy array for ONNX); the result has the input's type.

    Attributes:
        path, format, input_range (dict: ``batch``, ``height``, ``width`` as ``[min, max|None]``, ``dynamic_size``),
        metadata (all stored ``open_fastervit.*`` entries).
    """

    def __init__(self, path: Path, fmt: str, metadata: dict[str, str], run: Callable[[Any], Any]) -> None:
        self.path, self.format, self.metadata, self._run = path, fmt, metadata, run
        self.input_range: dict[str, Any] = json.loads(metadata[RANGE_KEY])

    def __call__(self, x: Tensor | np.ndarray) -> Tensor | np.ndarray:
        check_sizes(x.shape, self.input_range, what=str(self.path.name))
        return self._run(x)

    def describe_range(self) -> str:
        return describe_range(self.input_range)


def load_exported(path: str | Path, providers: Sequence[str] | None = None) -> ExportedModel:
    """Open a ``.pt2`` (``torch.export.load``), ``.onnx`` (onnxruntime) or registered (OpenVINO ``.xml``) file
    written by :func:`export_model`.

    Args:
        path: the file.
        providers: onnxruntime execution providers (default: CPU).

    Raises:
        ExportError: missing file, unknown suffix, or a file without the stored input range (not written by
            :func:`export_model`).
    """
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"exported file {path} does not exist")
    if path.suffix == ".pt2":
        extra = {RANGE_KEY: "", "open_fastervit.architecture": "", "open_fastervit.num_classes": "",
                 "open_fastervit.fused": ""}
        try:
            program = torch.export.load(str(path), extra_files=extra)
        except Exception as e:  # torch raises several types for a file that is not an exported program
            raise ExportError(f"{path} is not a readable torch.export program: {e}") from None
        if not extra[RANGE_KEY]:
            raise ExportError(f"{path} holds no {RANGE_KEY} (not written by open_fastervit's export)")
        module = program.module()

        def run_torch(x: Tensor) -> Tensor:
            with torch.no_grad():
                return module(x)

        return ExportedModel(path, "torch", extra, run_torch)
    if path.suffix == ".onnx":
        import onnx  # optional dependencies (pip install onnx onnxruntime)
        import onnxruntime as ort  # optional dependency, needed only to check an ONNX file

        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        if RANGE_KEY not in meta:
            raise ExportError(f"{path} holds no {RANGE_KEY} metadata (not written by open_fastervit's export)")
        session = ort.InferenceSession(str(path), providers=list(providers or ["CPUExecutionProvider"]))
        name = session.get_inputs()[0].name

        def run_onnx(x: Tensor | np.ndarray) -> Tensor | np.ndarray:
            array = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
            out = session.run(None, {name: array.astype(np.float32, copy=False)})[0]
            return torch.from_numpy(out) if isinstance(x, Tensor) else out

        return ExportedModel(path, "onnx", meta, run_onnx)
    for name, exporter in EXPORTERS.items():
        if path.name.endswith(exporter.suffix):
            meta, run = exporter.open(path)
            return ExportedModel(path, name, meta, run)
    raise ExportError(f"{path}: expected a {' or '.join(FORMATS.values())} file")


def default_check_shapes(rng: dict[str, Any], model: nn.Module) -> list[tuple[int, int, int]]:
    """``(B, H, W)`` shapes :func:`verify_export` runs: batch 1 and 3; for a dynamic range the bound (square,
    padded), a non-square padded size, and a size where no stage pads; for a fixed size that size."""
    (h0, h1), (w0, w1) = rng["height"], rng["width"]
    if h0 == h1 and w0 == w1:
        return [(1, h0, w0), (3, h0, w0)]
    lo = max(h0, w0)
    even = _unpadded_size(model, lo)
    return [(1, lo, lo), (3, lo + 19, lo + 58), (1, lo + 70, lo + 3), (3, even, even)]


def verify_export(
    path: str | Path,
    model: nn.Module,
    *,
    shapes: Sequence[tuple[int, int, int]] | None = None,
    tolerance: float | None = TOLERANCE,
) -> dict[tuple[int, int, int], float]:
    """Run the exported file and the eager ``model`` on random inputs; the largest relative error per shape.

    Args:
        path: a file written by :func:`export_model`.
        model: the eager model it was exported from (plain or fused).
        shapes: ``(B, H, W)`` inputs (default :func:`default_check_shapes`); each must lie in the stored range.
        tolerance: raise when an error exceeds it (None: only measure).

    Returns:
        ``{(B, H, W): max|out - ref| / max|ref|}``.

    Raises:
        ExportError: a shape outside the file's range, or an error above ``tolerance``.
    """
    exported = load_exported(path)
    model = model.eval()
    device = next(iter(model.state_dict().values())).device
    chans = exported.input_range.get("in_chans", 3)
    errors: dict[tuple[int, int, int], float] = {}
    generator = torch.Generator().manual_seed(0)
    for b, h, w in shapes or default_check_shapes(exported.input_range, model):
        x = torch.randn(b, chans, h, w, generator=generator)
        with torch.no_grad():
            ref = model(x.to(device)).float().cpu()
        out = exported(x.to(device) if exported.format == "torch" else x)
        out = torch.as_tensor(out).float().cpu()
        if out.shape != ref.shape:
            raise ExportError(f"{path}: output shape {tuple(out.shape)} at input {(b, chans, h, w)}, eager "
                              f"{tuple(ref.shape)}")
        errors[(b, h, w)] = ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()
    if tolerance is not None and max(errors.values(), default=0.0) > tolerance:
        worst = max(errors, key=errors.__getitem__)
        raise ExportError(f"{path}: relative error {errors[worst]:.2e} at {worst} exceeds {tolerance:g}")
    return errors
