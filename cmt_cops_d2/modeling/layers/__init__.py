"""Layers shared by backbone and decoder: position-sensitive axial attention, drop path."""
from .axial_attention import (
    AxialAttention,
    AxialAttention2D,
    attention_norm,
    relative_distance_index,
)
from .drop_path import DropPath, drop_path

__all__ = [
    "AxialAttention",
    "AxialAttention2D",
    "attention_norm",
    "relative_distance_index",
    "DropPath",
    "drop_path",
]
