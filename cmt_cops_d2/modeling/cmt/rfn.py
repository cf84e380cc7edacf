"""Recursive Feature Network (RFN, CMT-DeepLab Sec. 3.4): the whole model stacked twice.

The second copy (backbone + decoder) sees the first copy's stride-4 decoder features, added to its own
stride-4 backbone features (``res2``) through a 1x1 conv + norm -- CMT-DeepLab has no FPN, so the two
networks are connected at stride 4, the stride of the segmentation output. The two networks' outputs
(class logits, mask logits; in training also the semantic logits and the normalised pixel features) are
averaged (no fusion module). The connection's norm starts at zero, so
a fresh RFN is two independent copies whose outputs are averaged. Every clustering result of both copies
(and the first copy's final output) is supervised.
"""
from typing import Dict

import torch
import torch.nn.functional as F
from torch import nn

from ..layers import conv_norm

__all__ = ["RecursiveFeatureNetwork", "run_backbone_with_injection"]


def run_backbone_with_injection(backbone: nn.Module, x: torch.Tensor, inject: torch.Tensor = None
                                ) -> Dict[str, torch.Tensor]:
    """Run an :class:`AxialResNet` stage by stage, adding ``inject`` to its ``res2`` output."""
    if not (hasattr(backbone, "stem") and hasattr(backbone, "stage_names")):
        raise ValueError(f"MODEL.CMT.RFN needs an Axial-ResNet-style backbone (stem + stages), got "
                         f"{type(backbone).__name__}")
    out = {}
    x = backbone.stem(x)
    for name in backbone.stage_names:
        x = getattr(backbone, name)(x)
        if name == "res2" and inject is not None:
            x = x + inject
        out[name] = x
    return out


class RecursiveFeatureNetwork(nn.Module):
    """The first copy's head and the whole second copy, called like a single network's head:
    ``forward(features, images)`` takes the first backbone's features (the meta-architecture owns that
    backbone) and the images (for the second backbone) and returns the averaged output dict."""

    def __init__(self, head1, backbone2, head2, stride4_channels: int, res2_channels: int,
                 norm: str = "BN"):
        super().__init__()
        self.head1, self.backbone2, self.head2 = head1, backbone2, head2
        self.connect = conv_norm(stride4_channels, res2_channels, 1, norm=norm)
        with torch.no_grad():
            self.connect.norm.weight.zero_()

    def forward(self, features: Dict[str, torch.Tensor], images: torch.Tensor) -> Dict:
        out1 = self.head1(features)
        link = self.connect(out1["stride4_features"])
        out2 = self.head2(run_backbone_with_injection(self.backbone2, images, link), images)
        out = {"pred_logits": (out1["pred_logits"] + out2["pred_logits"]) / 2,
               "pred_masks": (out1["pred_masks"] + out2["pred_masks"]) / 2,
               "stride4_features": (out1["stride4_features"] + out2["stride4_features"]) / 2}
        first_final = {k: out1[k] for k in ("pred_logits", "pred_masks")}
        out["aux_outputs"] = out1["aux_outputs"] + [first_final] + out2["aux_outputs"]
        if "sem_logits" in out2:  # training only
            out["sem_logits"] = (out1["sem_logits"] + out2["sem_logits"]) / 2
            out["pixel_features"] = F.normalize(out1["pixel_features"] + out2["pixel_features"], dim=1)
        return out
