"""Reusable FasterViT layers, one concept per file; they know nothing of the model zoo.

* ``windows``: :class:`WindowGrid`, the window / carrier geometry of a map (padding, layouts, masks, pooling);
* ``pos_embed``: continuous token position embeddings and relative position bias;
* ``attention``: multi-head self-attention with that bias;
* ``drop_path``: stochastic depth that runs a residual branch on the kept samples only;
* ``hat``: :class:`HierarchicalAttention` (the plug-in module), its :class:`HatBlock` and carrier initializer;
* ``conv``: stem, downsampler and residual conv block;
* ``fused``: the inference forms (folded, fused, pre-packed conv and linear layers).
"""

from .attention import Attention
from .conv import ConvBlock, Downsample, Stem, fuse_conv_bn
from .drop_path import keep_mask, residual_drop_path
from .fused import FusedConv2d, FusedLinear, FusedMlp, freeze
from .hat import CarrierTokenInit, HatBlock, HierarchicalAttention
from .pos_embed import ContinuousRelPosBias, TokenPosEmbed
from .windows import WindowGrid

__all__ = [
    "Attention",
    "CarrierTokenInit",
    "ContinuousRelPosBias",
    "ConvBlock",
    "Downsample",
    "FusedConv2d",
    "FusedLinear",
    "FusedMlp",
    "HatBlock",
    "HierarchicalAttention",
    "Stem",
    "TokenPosEmbed",
    "WindowGrid",
    "freeze",
    "fuse_conv_bn",
    "keep_mask",
    "residual_drop_path",
]
