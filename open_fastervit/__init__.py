"""open_fastervit: FasterViT (Hatamizadeh et al., ICLR 2024, arXiv:2306.06189), exact, any-resolution, timm-native.

Importing the package registers the published models with timm (``timm.create_model('fastervit_0')``).
"""

from .convert import CheckpointError, checkpoint_filter_fn, load_official_checkpoint, official_to_ours
from .fused import inference_form
from .model import MIN_INPUT_SIZE, FasterViT
from .weights import load_weights, save_weights
from .zoo import MODEL_NAMES, OFFICIAL_NAMES, PUBLISHED, create_model, list_models, load_official

__version__ = "0.1.0"

__all__ = [
    "FasterViT",
    "MIN_INPUT_SIZE",
    "MODEL_NAMES",
    "OFFICIAL_NAMES",
    "PUBLISHED",
    "CheckpointError",
    "checkpoint_filter_fn",
    "create_model",
    "inference_form",
    "list_models",
    "load_official",
    "load_official_checkpoint",
    "load_weights",
    "official_to_ours",
    "save_weights",
]
