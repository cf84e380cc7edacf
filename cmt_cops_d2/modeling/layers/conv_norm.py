"""Convolution + batch norm, with the norm folded into the convolution at inference.

A batch norm in eval mode is an affine map per channel, so it folds into the convolution before it::

    BN(W * x + b) = gamma (W * x + b - mu) / sqrt(var + eps) + beta = (s W) * x + (s (b - mu) + beta),
    s = gamma / sqrt(var + eps)

(as ``torch.nn.utils.fusion.fuse_conv_bn_weights``, whose scale and shift the axial attention's norms
reuse). Folding skips the norm's pass over the output and
its output tensor: at 1281 x 1281 that is several GB of memory traffic per forward pass. It is one of
the inference shortcuts (:mod:`.inference`): done on the fly once they are switched on, only when
autograd is off and the norm uses running statistics (``model.eval()`` under ``torch.no_grad()``, as
Detectron2's evaluators and ``DefaultPredictor`` run), so parameters, state dicts, checkpoints and
training are untouched. Group norm, and batch norm in training mode, are run as
usual. On CPU the folded convolutions run channels-last (oneDNN is up to 2x faster on such inputs;
measured on 1x1 and depthwise 5x5 convolutions at stride 4), so inference outputs of these layers are
channels-last tensors.
"""
from typing import Optional, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from torch import nn
from detectron2.layers import Conv2d, FrozenBatchNorm2d, get_norm

from .inference import InferenceShortcuts

__all__ = ["ConvNorm", "conv_norm", "batch_norm_affine", "folded_conv_weights", "conv_then_norm"]


def batch_norm_affine(norm: Optional[nn.Module]) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(scale, shift)`` with ``norm(x) = scale * x + shift`` per channel, or None when autograd is on
    or ``norm`` is not a batch norm using running statistics (``scale = gamma / sqrt(var + eps)``,
    ``shift = beta - scale * mu``)."""
    if norm is None or torch.is_grad_enabled():
        return None
    if isinstance(norm, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        if norm.training or norm.running_mean is None:
            return None
    elif not isinstance(norm, FrozenBatchNorm2d):
        return None
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = -norm.running_mean * scale
    if norm.bias is not None:
        shift = shift + norm.bias
    return scale, shift


def folded_conv_weights(weight: torch.Tensor, bias: Optional[torch.Tensor], norm: Optional[nn.Module]
                        ) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(weight, bias)`` of the convolution with ``norm`` folded in (see the module docstring), or None
    when it cannot be folded here (see :func:`batch_norm_affine`)."""
    affine = batch_norm_affine(norm)
    if affine is None:
        return None
    scale, shift = affine
    weight = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
    return weight, shift if bias is None else bias * scale + shift


def conv_then_norm(x: torch.Tensor, conv: nn.Conv2d, norm: Optional[nn.Module]) -> torch.Tensor:
    """``norm(conv(x))`` (``conv``'s own norm / activation are not applied), folded when possible."""
    folded = folded_conv_weights(conv.weight, conv.bias, norm)
    if folded is None:
        x = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
        return x if norm is None else norm(x)
    return F.conv2d(x, folded[0], folded[1], conv.stride, conv.padding, conv.dilation, conv.groups)


class ConvNorm(Conv2d, InferenceShortcuts):
    """Detectron2's ``Conv2d`` (``conv.norm``, ``conv.activation``) that folds an eval-mode batch norm
    into the convolution when the inference shortcuts are on and autograd is off (see the module
    docstring). Same parameters and state dict as ``Conv2d``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        folded = folded_conv_weights(self.weight, self.bias, self.norm) if self.shortcuts_apply() else None
        if folded is None:
            return super().forward(x)
        weight = folded[0]
        if weight.device.type == "cpu":
            # oneDNN's convolutions are up to 2x faster channels-last; the output follows the weight.
            weight = weight.contiguous(memory_format=torch.channels_last)
        x = F.conv2d(x, weight, folded[1], self.stride, self.padding, self.dilation, self.groups)
        return x if self.activation is None else self.activation(x)


def conv_norm(in_channels, out_channels, kernel_size, *, stride=1, dilation=1, groups=1, norm="BN"):
    """Bias-free :class:`ConvNorm` with its norm attached (Detectron2 style: ``conv.norm``), MSRA
    initialised."""
    conv = ConvNorm(
        in_channels,
        out_channels,
        kernel_size,
        stride=stride,
        padding=dilation * (kernel_size - 1) // 2,
        dilation=dilation,
        groups=groups,
        bias=False,
        norm=get_norm(norm, out_channels),
    )
    weight_init.c2_msra_fill(conv)
    return conv
