"""A model's fastest exact inference form (``inference_form``); the fused layers are in ``layers.fused``."""

from __future__ import annotations

import torch
from timm.utils.model import reparameterize_model
from torch import nn

__all__ = ["inference_form"]


def inference_form(model: nn.Module) -> nn.Module:
    """``model`` (in place) in its fastest exact inference form: eval mode, ``fuse()`` when it has one (else timm's
    ``reparameterize_model``), and channels_last for 4-D weights, the layout oneDNN and cuDNN convolutions prefer.

    For a FasterViT the result is an inference snapshot (see ``FasterViT.fuse``): later changes to the weights of
    the model it was made from do not reach it, and it has no parameters to train.
    """

    model.eval()
    if hasattr(model, "fuse"):
        model = model.fuse() or model
    else:
        model = reparameterize_model(model, inplace=True)
    return model.to(memory_format=torch.channels_last)
