"""Convolutional parts of FasterViT (paper Sec. 3.1): the stem, the downsampler and the residual conv block.

Each BatchNorm-carrying layer can fold its BatchNorms into the convs before it (``fuse()``, the inference form).
"""

from __future__ import annotations

import torch
from timm.layers import DropPath, LayerNorm2d
from torch import Tensor, nn

from .fused import FusedConv2d

__all__ = ["ConvBlock", "Downsample", "Stem", "TwoConvBN", "fuse_conv_bn"]


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.Module) -> None:
    """Fold an inference BatchNorm into the conv before it (in place): ``bn(conv(x)) == conv'(x)``."""
    if not isinstance(bn, nn.BatchNorm2d):
        return  # already fused
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    new_bias = (bias - bn.running_mean) * scale + bn.bias
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


class TwoConvBN(nn.Module):
    """Mixin for layers built as ``conv1 -> norm1 -> act1 -> conv2 -> norm2 (-> act2)`` with foldable BatchNorms."""

    fused = False
    fused_acts = ("none", "none")  # the activations after norm1 and norm2, taken over by the fused convs

    def fuse(self) -> nn.Module:
        """Inference form (timm ``reparameterize_model`` calls this): BatchNorms folded into the convs, the
        activations fused into them (``FusedConv2d``)."""
        if self.fused:
            return self
        fuse_conv_bn(self.conv1, self.norm1)
        fuse_conv_bn(self.conv2, self.norm2)
        self.norm1, self.norm2 = nn.Identity(), nn.Identity()
        self.conv1 = FusedConv2d(self.conv1, self.fused_acts[0])
        self.conv2 = FusedConv2d(self.conv2, self.fused_acts[1])
        self.act1 = nn.Identity()
        if hasattr(self, "act2"):
            self.act2 = nn.Identity()
        self.fused = True
        return self


class Stem(TwoConvBN):
    """Stem: two strided 3x3 conv + BatchNorm + ReLU layers, stride 4 (paper Sec. 3.1).

    ``(B, in_chans, H, W) -> (B, dim, ceil(H/4), ceil(W/4))``.
    """

    fused_acts = ("relu", "relu")

    def __init__(self, in_chans: int, stem_dim: int, dim: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, stem_dim, 3, stride=2, padding=1, bias=False)
        self.norm1 = nn.BatchNorm2d(stem_dim, eps=1e-4)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(stem_dim, dim, 3, stride=2, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-4)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act1(self.norm1(self.conv1(x)))
        return self.act2(self.norm2(self.conv2(x)))


class Downsample(nn.Module):
    """Between stages (paper Sec. 3.1): LayerNorm over channels, then a strided 3x3 conv.

    ``(B, in_dim, H, W) -> (B, out_dim, ceil(H/2), ceil(W/2))``.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.norm = LayerNorm2d(in_dim, eps=1e-6)
        self.conv = nn.Conv2d(in_dim, out_dim, 3, stride=2, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.norm(x))

    def fuse(self) -> Downsample:
        """Inference form: the conv pre-packed (``FusedConv2d``)."""
        if not isinstance(self.conv, FusedConv2d):
            self.conv = FusedConv2d(self.conv)
        return self


class ConvBlock(TwoConvBN):
    """Residual conv block of the high-resolution stages (paper Eq. 1):
    ``x + DropPath(BN(Conv3x3(GELU(BN(Conv3x3(x))))))``, shape-preserving ``(B, C, H, W)``."""

    fused_acts = ("gelu", "none")

    def __init__(self, dim: int, drop_path: float = 0.0) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm1 = nn.BatchNorm2d(dim, eps=1e-5)
        self.act1 = nn.GELU()
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.norm2 = nn.BatchNorm2d(dim, eps=1e-5)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        if self.fused:  # inference form: BN folded, GELU and the residual add done inside the convs
            return self.conv2(self.conv1(x), residual=x)
        y = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x)))))
        return self.drop_path(y).add_(x)  # in place on the fresh branch output (nothing saved it)
