"""CMT-DeepLab's pixel decoder: the transformer decoder's stride-16 features up to stride 4.

As MaX-DeepLab's decoder stages (DeepLab2's extra decoder at strides 8 and 4): at each stride the
coarser features are projected to that stride's width (1x1 conv + norm), upsampled and added to the
backbone feature of that stride (``res3``, ``res2``; projected too when its width differs), then one
bottleneck residual block runs. The stride-4 output (activated) is what the heads read.

Registered in :data:`CMT_PIXEL_DECODER_REGISTRY` (``MODEL.CMT.PIXEL_DECODER_NAME``).
"""
from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils.registry import Registry
from torch import nn

from ..backbone.axial_resnet import BottleneckBlock
from ..layers import add_, conv_norm, get_activation

__all__ = ["CMT_PIXEL_DECODER_REGISTRY", "CMTPixelDecoder", "build_pixel_decoder"]

CMT_PIXEL_DECODER_REGISTRY = Registry("CMT_PIXEL_DECODER")
CMT_PIXEL_DECODER_REGISTRY.__doc__ = """
Pixel decoders of CMT-DeepLab: stride-16 features + backbone features -> stride-4 features. Built by
name from ``MODEL.CMT.PIXEL_DECODER_NAME``.
"""


class ResizedFuse(nn.Module):
    """``up(conv_norm(x)) + skip`` (the skip projected only when its width differs), activated."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, *, norm: str,
                 activation: str):
        super().__init__()
        self.project = conv_norm(in_channels, out_channels, 1, norm=norm)
        self.project_skip = (conv_norm(skip_channels, out_channels, 1, norm=norm)
                             if skip_channels != out_channels else None)
        self.act = get_activation(activation, inplace=True)   # only applied to the sum

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.project(x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.act(add_(x, skip if self.project_skip is None else self.project_skip(skip)))


@CMT_PIXEL_DECODER_REGISTRY.register()
class CMTPixelDecoder(nn.Module):
    """Stride 16 -> 8 -> 4 with ``res3`` / ``res2``; ``forward(x16, features)`` -> B x C4 x H/4 x W/4."""

    @configurable
    def __init__(self, *, in_channels: int, skip_channels: Dict[str, int], channels: Sequence[int],
                 norm: str, activation: str):
        super().__init__()
        d8, d4 = channels
        self.fuse8 = ResizedFuse(in_channels, skip_channels["res3"], d8, norm=norm, activation=activation)
        self.block8 = BottleneckBlock(d8, d8, bottleneck_channels=d8 // 4, norm=norm, activation=activation)
        self.fuse4 = ResizedFuse(d8, skip_channels["res2"], d4, norm=norm, activation=activation)
        self.block4 = BottleneckBlock(d4, d4, bottleneck_channels=d4 // 4, norm=norm, activation=activation)
        for block in (self.block8, self.block4):
            block.zero_init_last_norm()
        self.out_channels = d4

    @classmethod
    def from_config(cls, cfg, in_channels: int, input_shape):
        c = cfg.MODEL.CMT
        return {"in_channels": in_channels, "channels": tuple(c.DECODER_CHANNELS), "norm": c.NORM,
                "activation": c.ACTIVATION,
                "skip_channels": {k: v.channels for k, v in input_shape.items()}}

    def forward(self, x: torch.Tensor, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        x = self.block8(self.fuse8(x, features["res3"]))
        return self.block4(self.fuse4(x, features["res2"]))


def build_pixel_decoder(cfg, in_channels: int, input_shape) -> nn.Module:
    name = cfg.MODEL.CMT.PIXEL_DECODER_NAME
    return CMT_PIXEL_DECODER_REGISTRY.get(name)(cfg, in_channels, input_shape)
