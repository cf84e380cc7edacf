"""Backbones. Importing this package registers ``build_axial_resnet_backbone``."""
from .axial_resnet import (
    AxialBlock,
    AxialResNet,
    BottleneckBlock,
    InceptionStem,
    axial_block_layout,
    build_axial_resnet_backbone,
)

__all__ = [
    "AxialBlock",
    "AxialResNet",
    "BottleneckBlock",
    "InceptionStem",
    "axial_block_layout",
    "build_axial_resnet_backbone",
]
