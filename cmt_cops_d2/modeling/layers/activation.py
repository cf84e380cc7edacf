"""Activations that work in place at inference, and the residual add that goes with them.

At 1281 x 1281 every activation of a stride-2 or stride-4 feature map is a fresh tensor of 100-200 MB,
which the allocator maps and zeroes on every forward pass. ``get_activation(name, inplace=True)``
returns an activation that overwrites its input once the inference shortcuts are on
(:func:`~.inference.set_inference_shortcuts`) and autograd is off (GeLU cannot be in place under
autograd, which needs its input for the backward pass; training is unchanged), so it must only be
applied to temporaries that nothing else holds. ``add_`` writes a sum into its first operand whenever
autograd is off (only ever called on temporaries; no shortcut to switch on).
"""
import torch
import torch.nn.functional as F
from torch import nn

from .inference import InferenceShortcuts

__all__ = ["GELU", "ReLU", "get_activation", "add_"]


class GELU(nn.GELU, InferenceShortcuts):
    """``nn.GELU`` (exact, erf-based) that overwrites its input when ``inplace`` and the inference
    shortcuts apply."""

    def __init__(self, inplace: bool = False):
        super().__init__()
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace and self.shortcuts_apply():
            return torch.ops.aten.gelu_(x)
        return F.gelu(x)

    def extra_repr(self) -> str:
        return "inplace=True" if self.inplace else ""


class ReLU(nn.ReLU, InferenceShortcuts):
    """``nn.ReLU`` that overwrites its input only when ``inplace`` and the inference shortcuts apply
    (training keeps the out-of-place graph, like :class:`GELU`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace and self.shortcuts_apply():
            return x.relu_()
        return F.relu(x)


def get_activation(name: str, inplace: bool = False) -> nn.Module:
    """``"gelu"`` (exact, erf-based; CMT-DeepLab) or ``"relu"`` (original MaX-S).

    ``inplace=True``: the module may overwrite its input (see the module docstring)."""
    name = name.lower()
    if name == "gelu":
        return GELU(inplace)
    if name == "relu":
        return ReLU(inplace)
    raise ValueError(f"Unknown activation {name!r}; expected 'gelu' or 'relu'")


def add_(temporary: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``temporary + other``, written into ``temporary`` when autograd is off (``temporary`` must be a
    tensor nothing else holds, of the broadcast shape)."""
    if torch.is_grad_enabled():
        return temporary + other
    return temporary.add_(other)
