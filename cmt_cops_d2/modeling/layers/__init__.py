"""Layers shared by backbone and decoder: position-sensitive axial attention, drop path, conv + norm
(folded at inference) and activations that work in place at inference, with the step that switches
those inference shortcuts on (:func:`set_inference_shortcuts`)."""
from .activation import GELU, ReLU, add_, get_activation
from .axial_attention import (
    AxialAttention,
    AxialAttention2D,
    attention_norm,
    relative_distance_index,
)
from .conv_norm import ConvNorm, batch_norm_affine, conv_norm, conv_then_norm, folded_conv_weights
from .drop_path import DropPath, drop_path
from .inference import InferenceShortcuts, set_inference_shortcuts

__all__ = [
    "GELU",
    "ReLU",
    "add_",
    "get_activation",
    "ConvNorm",
    "conv_norm",
    "batch_norm_affine",
    "conv_then_norm",
    "folded_conv_weights",
    "AxialAttention",
    "AxialAttention2D",
    "attention_norm",
    "relative_distance_index",
    "DropPath",
    "drop_path",
    "InferenceShortcuts",
    "set_inference_shortcuts",
]
