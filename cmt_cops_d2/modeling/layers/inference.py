"""Inference shortcuts as an explicit step: :func:`set_inference_shortcuts`.

Layers that derive from :class:`InferenceShortcuts` (``ConvNorm``, ``AxialAttention``, the in-place
``GELU`` / ``ReLU``, the CMT predictor) can compute their eval-mode output faster: batch norms folded into
the convolution or attention before them, activations written into their input, CPU convolutions
channels-last. Each shortcut gives the ordinary result (tested against it). A layer takes them only
after :func:`set_inference_shortcuts` switched them on *and* while autograd is off, its norms use
running statistics and (for in-place activations) the layer was built ``inplace``; otherwise it runs
the ordinary computation. ``CMTDeepLab`` switches them on in ``eval()`` and off in ``train()``, as
timm's ``reparameterize_model`` is a step taken once for inference -- but without changing parameters
or state dicts, so a model can go back to training (Detectron2's periodic evaluation does).
"""
import torch
from torch import nn

__all__ = ["InferenceShortcuts", "set_inference_shortcuts"]


class InferenceShortcuts:
    """Mixin: ``inference_shortcuts`` (off by default) and the test whether they apply now."""

    inference_shortcuts: bool = False

    def shortcuts_apply(self) -> bool:
        """Switched on and autograd off."""
        return self.inference_shortcuts and not torch.is_grad_enabled()


def set_inference_shortcuts(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch the inference shortcuts of every layer of ``model`` on (or off); returns ``model``."""
    for module in model.modules():
        if isinstance(module, InferenceShortcuts):
            module.inference_shortcuts = enabled
    return model
