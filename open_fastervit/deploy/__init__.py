"""Deployment: export, serving and hub publishing of trained models."""

from .export import ExportError, ExportReport, export_model, load_exported, min_dynamic_size, verify_export
from .hub import push_to_hub, save_pretrained, weights_license
from .runtimes import ExportedClassifier  # importing runtimes registers .onnx and .pt2 with load_model

__all__ = [
    "ExportError",
    "ExportedClassifier",
    "ExportReport",
    "export_model",
    "load_exported",
    "min_dynamic_size",
    "push_to_hub",
    "save_pretrained",
    "verify_export",
    "weights_license",
]
