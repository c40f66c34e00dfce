"""open_fastervit: FasterViT (Hatamizadeh et al., ICLR 2024, arXiv:2306.06189), exact, any-resolution, timm-native.

Importing the package registers the published models with timm (``timm.create_model('fastervit_0')``).
"""

from . import (
    compat,  # noqa: F401  (first: old module paths keep working, with a deprecation warning)
    plugins,  # noqa: F401  (registers the hat_swin_* models with timm)
)
from .backbone import FasterViTBackbone, create_backbone
from .convert import checkpoint_filter_fn, official_to_ours
from .deploy import runtimes  # noqa: F401  (registers the .onnx and .pt2 files with load_model)
from .deploy.export import export_model, load_exported
from .deploy.hub import push_to_hub, save_pretrained
from .fused import inference_form
from .inference import Predictor
from .loading import load_model, load_official, load_official_checkpoint
from .model import MIN_INPUT_SIZE, FasterViT
from .serialization import CheckpointError, save_weights
from .weights import load_weights
from .zoo import MODEL_NAMES, OFFICIAL_NAMES, PUBLISHED, create_model, list_models

__version__ = "0.1.0"

__all__ = [
    "FasterViT",
    "FasterViTBackbone",
    "MIN_INPUT_SIZE",
    "MODEL_NAMES",
    "OFFICIAL_NAMES",
    "PUBLISHED",
    "Predictor",
    "CheckpointError",
    "checkpoint_filter_fn",
    "create_backbone",
    "create_model",
    "export_model",
    "inference_form",
    "list_models",
    "load_exported",
    "load_model",
    "load_official",
    "load_official_checkpoint",
    "load_weights",
    "official_to_ours",
    "push_to_hub",
    "save_pretrained",
    "save_weights",
]
