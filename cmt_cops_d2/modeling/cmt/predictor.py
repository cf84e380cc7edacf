"""CMT-DeepLab's prediction heads: MaX-DeepLab's head (DeepLab2's ``MaXDeepLab`` decoder head).

The paper does not describe its heads; these are MaX-DeepLab's, which it builds on:

* the final centers go through a class and a mask feature projection (1x1 conv + norm + act each);
* **class logits**: a linear layer to K+1 classes (weights truncated-normal, std 0.01) plus a constant
  void prior ``log(K * 0.9 / 0.1)`` on the void logit, so that a fresh model gives every cluster
  void probability 0.9;
* **pixel features**: DeepLab2's depthwise-separable prediction head on the stride-4 features, a
  norm, then L2 normalisation -- the features the instance discrimination loss reads;
  at inference the norm is folded into the head's last conv and the mask-logit norm into the
  kernels (the same result without their passes over the stride-4 maps);
* **mask logits** (eq. 4 with eq. 6's residual): ``BN(f . k) + S``, ``k`` the mask kernels (1x1 conv +
  norm of the mask features), the BN a single-channel norm shared by all clusters with its scale
  initialised to 0.1, ``S`` the last CMT layer's assignment logits upsampled;
* **semantic logits** (training only, the auxiliary semantic loss): the separable head to K classes.

The class path is also applied to every CMT layer's input centers, which gives each layer's
clustering result its class prediction for deep supervision (as kMaX-DeepLab's per-layer
predictions). Registered in :data:`CMT_PREDICTOR_REGISTRY` (``MODEL.CMT.PREDICTOR_NAME``).
"""
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils.registry import Registry
from torch import nn

from ..layers import (ConvNorm, InferenceShortcuts, attention_norm, batch_norm_affine, conv_norm,
                      get_activation)
from .cmt_layer import resize_assignment_logits

__all__ = ["CMT_PREDICTOR_REGISTRY", "MaXPredictor", "separable_head", "build_predictor",
           "VOID_PRIOR_PROB"]

CMT_PREDICTOR_REGISTRY = Registry("CMT_PREDICTOR")
CMT_PREDICTOR_REGISTRY.__doc__ = """
Prediction heads of CMT-DeepLab: cluster centers + stride-4 features -> class logits, mask logits,
pixel features. Built by name from ``MODEL.CMT.PREDICTOR_NAME``.
"""

# MaX-DeepLab initialises every cluster towards the void class with this probability.
VOID_PRIOR_PROB = 0.9


def separable_head(channels: int, out_channels: int, *, norm: str, activation: str,
                   kernel_size: int = 5, output_norm: bool = False) -> nn.Sequential:
    """DeepLab2's prediction head (MaX-DeepLab's pixel-space and semantic heads): depthwise
    ``k x k`` conv, norm, act -> 1x1 conv (``channels``), norm, act -> 1x1 conv (with bias) to
    ``out_channels``, followed by a norm when ``output_norm`` (the pixel-space head's feature norm,
    folded into that conv at inference)."""
    last = ConvNorm(channels, out_channels, 1, bias=True,
                    norm=attention_norm(norm, out_channels) if output_norm else None)
    nn.init.kaiming_uniform_(last.weight, a=math.sqrt(5))          # nn.Conv2d's initialisation
    bound = 1 / math.sqrt(channels)
    nn.init.uniform_(last.bias, -bound, bound)
    return nn.Sequential(
        conv_norm(channels, channels, kernel_size, groups=channels, norm=norm),
        get_activation(activation, inplace=True),
        conv_norm(channels, channels, 1, norm=norm),
        get_activation(activation, inplace=True),
        last,
    )


@CMT_PREDICTOR_REGISTRY.register()
class MaXPredictor(nn.Module, InferenceShortcuts):
    """MaX-DeepLab's head (see the module docstring)."""

    @configurable
    def __init__(self, *, num_classes: int, center_dim: int, pixel_channels: int, mask_dim: int,
                 norm: str, activation: str, use_assignment_residual: bool):
        super().__init__()
        self.num_classes, self.mask_dim = num_classes, mask_dim
        self.use_assignment_residual = use_assignment_residual
        self.act = get_activation(activation)
        self.class_feature = conv_norm(center_dim, center_dim, 1, norm=norm)
        self.mask_feature = conv_norm(center_dim, center_dim, 1, norm=norm)
        self.class_head = nn.Conv2d(center_dim, num_classes + 1, 1)
        nn.init.trunc_normal_(self.class_head.weight, std=0.01)
        nn.init.zeros_(self.class_head.bias)
        void_prior = torch.zeros(num_classes + 1)
        void_prior[-1] = math.log(num_classes * VOID_PRIOR_PROB / (1 - VOID_PRIOR_PROB))
        self.register_buffer("void_prior", void_prior, persistent=False)
        self.mask_head = conv_norm(center_dim, mask_dim, 1, norm=norm)
        nn.init.kaiming_normal_(self.mask_head.weight)
        self.pixel_head = separable_head(pixel_channels, mask_dim, norm=norm, activation=activation,
                                         output_norm=True)
        self.mask_norm = attention_norm(norm, 1)
        if getattr(self.mask_norm, "weight", None) is not None:
            nn.init.constant_(self.mask_norm.weight, 0.1)
        self.semantic_head = separable_head(pixel_channels, num_classes, norm=norm, activation=activation)

    @classmethod
    def from_config(cls, cfg, pixel_channels: int):
        c = cfg.MODEL.CMT
        return {"num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, "center_dim": c.CENTER_DIM,
                "pixel_channels": pixel_channels, "mask_dim": c.MASK_DIM, "norm": c.NORM,
                "activation": c.ACTIVATION, "use_assignment_residual": c.USE_ASSIGNMENT_RESIDUAL}

    @staticmethod
    def _centers_map(C: torch.Tensor) -> torch.Tensor:
        return C.transpose(1, 2).unsqueeze(-1)                        # B x N x D -> B x D x N x 1

    def class_logits(self, C: torch.Tensor) -> torch.Tensor:
        """B x N x D centers -> B x N x K+1 class logits (void prior included)."""
        logits = self.class_head(self.act(self.class_feature(self._centers_map(C))))
        return logits[..., 0].transpose(1, 2) + self.void_prior

    def pixel_features(self, x: torch.Tensor) -> torch.Tensor:
        """B x C4 x H x W -> B x d x H x W L2-normalised pixel features."""
        return F.normalize(self.pixel_head(x), dim=1)

    def mask_logits(self, features: torch.Tensor, C: torch.Tensor,
                    S: Optional[torch.Tensor]) -> torch.Tensor:
        """Eq. (4)/(6) at stride 4: ``BN(f . k) (+ S)``, B x N x H x W."""
        kernels = self.mask_head(self.act(self.mask_feature(self._centers_map(C))))[..., 0]  # B x d x N
        affine = batch_norm_affine(self.mask_norm) if self.shortcuts_apply() else None
        if affine is not None:
            # Inference: the single-channel norm is a scalar affine map, folded into the kernels.
            scale, shift = affine
            logits = torch.einsum("bdhw,bdn->bnhw", features, kernels * scale).add_(shift)
        else:
            logits = torch.einsum("bdhw,bdn->bnhw", features, kernels)
            B, N, H, W = logits.shape
            logits = self.mask_norm(logits.reshape(B, 1, N, H * W)).reshape(B, N, H, W)
        H, W = logits.shape[-2:]
        if S is not None and self.use_assignment_residual:
            logits = logits + resize_assignment_logits(S, (H, W))
        return logits

    def forward(self, x: torch.Tensor, C: torch.Tensor, S: Optional[torch.Tensor] = None) -> Dict:
        """Stride-4 features ``x`` and final centers ``C`` (with the last assignment ``S``) ->
        ``pred_logits``, ``pred_masks``; in training also ``pixel_features`` and ``sem_logits``."""
        features = self.pixel_features(x)
        out = {"pred_logits": self.class_logits(C), "pred_masks": self.mask_logits(features, C, S)}
        if self.training:
            out["pixel_features"] = features
            out["sem_logits"] = self.semantic_head(x)
        return out


def build_predictor(cfg, pixel_channels: int) -> nn.Module:
    name = cfg.MODEL.CMT.PREDICTOR_NAME
    return CMT_PREDICTOR_REGISTRY.get(name)(cfg, pixel_channels)
