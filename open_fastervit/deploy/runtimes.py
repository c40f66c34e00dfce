"""The runtime files ``open_fastervit.load_model`` opens: exported programs and ONNX files.

Importing this module (``import open_fastervit`` does) registers two suffixes with the loader
(:func:`open_fastervit.loading.register_file_type`):

- ``.onnx``: an int8 file of ``fastervit quantize`` (:func:`~open_fastervit.deploy.quantize.load_quantized`,
  onnxruntime) or an fp32 export of ``fastervit export`` (:func:`~open_fastervit.deploy.export.load_exported`);
- ``.pt2``: a ``torch.export`` program of ``fastervit export``;
- ``.xml``: an OpenVINO IR of ``fastervit export`` (fp32) or ``fastervit quantize`` (int8, NNCF), run by OpenVINO
  on the CPU (:func:`~open_fastervit.deploy.openvino.load_openvino`, fp32 precision hint; needs openvino).

Each opens as an ``nn.Module`` with ``num_classes``, ``pretrained_cfg`` (what timm's ``resolve_data_config``
reads) and ``weights_info``, so prediction, validation, serving and benchmarks take it as they take a model.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from ..loading import register_file_type
from .export import ExportedModel, load_exported
from .openvino import load_openvino
from .quantize import NotQuantizedError, load_quantized

__all__ = ["ExportedClassifier", "open_exported", "open_onnx", "open_openvino"]


class ExportedClassifier(nn.Module):
    """A file of ``fastervit export`` as a module: ``model(x) -> logits``.

    ``x`` is a ``(B, C, H, W)`` float tensor inside the file's stored input range (else :class:`ExportError`
    naming the range); the program runs on CPU and the ``(B, classes)`` logits come back on ``x``'s device. The
    preprocessing (``pretrained_cfg``) is the data config stored in the file (else the architecture's), at the
    file's size when that is fixed; ``class_names`` (also in ``weights_info``) are the stored names, if any.

    Raises:
        ValueError: a file that does not state its class count (not written by ``fastervit export``).
    """

    def __init__(self, exported: ExportedModel) -> None:
        super().__init__()
        self.exported = exported
        meta = exported.metadata
        classes = str(meta.get("open_fastervit.num_classes", ""))
        if not classes.isdigit():
            raise ValueError(f"{exported.path} does not state its class count (not written by fastervit export)")
        self.num_classes = int(classes)
        rng = exported.input_range
        self.in_chans = int(rng.get("in_chans", 3))
        arch = str(meta.get("open_fastervit.architecture", ""))
        known = timm.models.get_pretrained_cfg(arch) if arch and timm.is_model(arch) else None
        cfg = known.to_dict() if known is not None else {}
        stored = json.loads(meta.get("open_fastervit.data_config") or "null") or {}
        cfg.update({k: tuple(v) if isinstance(v, list) else v for k, v in stored.items()})
        (h0, h1), (w0, w1) = rng["height"], rng["width"]
        if h0 == h1 and w0 == w1:
            cfg["input_size"] = (self.in_chans, int(h0), int(w0))
        self.class_names: list[str] | None = json.loads(meta.get("open_fastervit.class_names") or "null")
        self.pretrained_cfg = {**cfg, "architecture": arch, "num_classes": self.num_classes}
        self.weights_info = {"weights": f"exported {exported.format}", "file": str(exported.path),
                             "architecture": arch, "num_classes": self.num_classes, "class_names": self.class_names}
        if stored:
            self.weights_info["data_config"] = dict(stored)
        self.eval()

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, H, W)`` float images -> ``(B, classes)`` logits on ``x``'s device.

        Raises:
            ExportError: a shape outside the stored range (the message states it).
        """
        with torch.no_grad():
            out = self.exported(x.detach().to("cpu", torch.float32))
        return out.to(x.device)


def open_exported(path: str | Path) -> ExportedClassifier:
    """A ``.pt2`` / fp32 ``.onnx`` file of ``fastervit export`` as an :class:`ExportedClassifier`.

    Raises:
        ExportError: missing or unreadable file, or one without the stored input range.
    """
    return ExportedClassifier(load_exported(path))


def open_onnx(path: str | Path) -> nn.Module:
    """An ``.onnx`` file: int8 (``fastervit quantize``) as a ``QuantizedModel``, an fp32 export as an
    :class:`ExportedClassifier`.

    Raises:
        QuantizeError: a file onnxruntime cannot open, or one not written by open_fastervit.
    """
    try:
        return load_quantized(path)
    except NotQuantizedError:
        return open_exported(path)


def open_openvino(path: str | Path) -> nn.Module:
    """An OpenVINO ``.xml`` of ``fastervit export`` / ``fastervit quantize`` as an
    :class:`~open_fastervit.deploy.openvino.OpenVINOModel` (fp32 hint; int8 layers run in int8).

    Raises:
        OpenVINOError: openvino missing, a missing ``.bin``, a file that is not an IR, or an IR not written by us.
    """
    return load_openvino(path)


register_file_type(".onnx", open_onnx, "ONNX file of fastervit quantize (int8) or fastervit export (onnxruntime)")
register_file_type(".pt2", open_exported, "torch.export program of fastervit export")
register_file_type(".xml", open_openvino, "OpenVINO IR of fastervit export (fp32) or fastervit quantize (int8)")
