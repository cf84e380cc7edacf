"""CMT-DeepLab's transformer decoder: dual-path axial-transformer blocks with CMT layers.

Sec. 3.4: on top of the Axial-ResNet backbone, six dual-path axial-transformer blocks -- three at
stage 5 (2048 channels, stride 32) and three at stage 4 (1024 channels, stride 16). As in MaX-DeepLab
(DeepLab2's extra decoder stages), each block is an axial residual block (the pixels' self-attention,
the same block as the backbone's) followed by a dual-path transformer layer, here the
:class:`~.cmt_layer.CMTLayer`; between the two stages the stride-32 features are projected (1x1 conv +
norm), upsampled and added to the backbone's ``res4`` (DeepLab2's ``ResizedFuse``).

Registered in :data:`CMT_TRANSFORMER_DECODER_REGISTRY` (``MODEL.CMT.TRANSFORMER_DECODER_NAME``).
"""
from typing import Dict, List

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.utils.registry import Registry
from torch import nn

from ..backbone.axial_resnet import AxialBlock
from ..layers import add_, conv_norm, get_activation
from .cmt_layer import CMTLayer

__all__ = ["CMT_TRANSFORMER_DECODER_REGISTRY", "DualPathBlock", "CMTTransformerDecoder",
           "build_transformer_decoder", "cmt_switches"]

CMT_TRANSFORMER_DECODER_REGISTRY = Registry("CMT_TRANSFORMER_DECODER")
CMT_TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Transformer decoders of CMT-DeepLab: backbone features -> updated pixels, cluster centers and every
layer's clustering result. Built by name from ``MODEL.CMT.TRANSFORMER_DECODER_NAME``.
"""


def cmt_switches(cfg) -> Dict[str, bool]:
    """The CMT layer's component switches (Tab. 2) from ``MODEL.CMT``."""
    c = cfg.MODEL.CMT
    return dict(use_cluster_update=c.USE_CLUSTER_UPDATE, use_assignment_residual=c.USE_ASSIGNMENT_RESIDUAL,
                use_pixel_update=c.USE_PIXEL_UPDATE, use_reference_mask=c.USE_REFERENCE_MASK,
                use_coord_conv=c.USE_COORD_CONV)


class DualPathBlock(nn.Module):
    """MaX-DeepLab's dual-path block: an axial residual block on the pixels, then a CMT layer between
    the pixels and the cluster centers. Reads and returns activated pixel features."""

    def __init__(self, channels: int, *, layer_kwargs: Dict, num_heads: int, max_span: int, norm: str,
                 activation: str, drop_path: float, first_layer: bool):
        super().__init__()
        f = channels // 4
        self.axial = AxialBlock(channels, channels, bottleneck_channels=2 * f, key_channels=f,
                                value_channels=2 * f, num_heads=num_heads, max_span=max_span,
                                norm=norm, activation=activation, drop_path=drop_path)
        self.axial.zero_init_last_norm()
        self.cmt = CMTLayer(channels, first_layer=first_layer, norm=norm, activation=activation,
                            drop_path=drop_path, **layer_kwargs)
        self.act = get_activation(activation, inplace=True)   # only applied to temporaries

    def forward(self, x, C, S=None, e=None):
        # DeepLab2 hands the transformer layer the block's residual sum before its activation.
        s = add_(self.axial.drop_path(self.axial.residual(x)), self.axial.forward_shortcut(x))
        out = self.cmt(s, C, S, e)
        return self.act(out.pop("pixels")), out


@CMT_TRANSFORMER_DECODER_REGISTRY.register()
class CMTTransformerDecoder(nn.Module):
    """Learned cluster centers, then dual-path blocks on ``res5`` and (after the fuse) on ``res4``.

    ``forward(features)`` returns a dict with ``pixels`` (the stride-16 features, activated),
    ``centers`` (B x N x D, the last layer's output), ``assignment`` (the last layer's assignment
    logits S, the residual input of the final assignment) and ``layers``: per CMT layer its input
    centers ``centers_in`` and its clustering result ``logits`` (plus ``ref_points`` with reference
    masks), for deep supervision.
    """

    @configurable
    def __init__(self, *, in_channels: Dict[str, int], num_clusters: int, center_dim: int,
                 stage_blocks, layer_kwargs: Dict, num_heads: int, max_span: int, norm: str,
                 activation: str, drop_path: float, drop_path_schedule: str = "constant"):
        super().__init__()
        self.centers = nn.Embedding(num_clusters, center_dim)
        nn.init.trunc_normal_(self.centers.weight, std=1.0)
        c5, c4 = in_channels["res5"], in_channels["res4"]
        total = sum(stage_blocks)
        if drop_path_schedule == "constant":
            rates = [drop_path] * total
        elif drop_path_schedule == "linear":
            rates = [drop_path * i / max(total - 1, 1) for i in range(total)]
        else:
            raise ValueError(f"MODEL.CMT.DROP_PATH_SCHEDULE={drop_path_schedule!r}: use 'constant' or "
                             "'linear'")
        kw = dict(layer_kwargs=layer_kwargs, num_heads=num_heads, max_span=max_span, norm=norm,
                  activation=activation)
        self.stage5 = nn.ModuleList(DualPathBlock(c5, drop_path=rates[i], first_layer=i == 0, **kw)
                                    for i in range(stage_blocks[0]))
        self.fuse4 = conv_norm(c5, c4, 1, norm=norm)
        self.stage4 = nn.ModuleList(
            DualPathBlock(c4, drop_path=rates[stage_blocks[0] + i], first_layer=stage_blocks[0] == 0 and i == 0,
                          **kw)
            for i in range(stage_blocks[1]))
        self.act = get_activation(activation, inplace=True)   # only applied to temporaries
        self.out_channels = c4

    @classmethod
    def from_config(cls, cfg, input_shape):
        c = cfg.MODEL.CMT
        return {
            "in_channels": {k: v.channels for k, v in input_shape.items()},
            "num_clusters": c.NUM_CLUSTERS, "center_dim": c.CENTER_DIM,
            "stage_blocks": tuple(c.STAGE_BLOCKS), "num_heads": c.NUM_HEADS,
            "max_span": cfg.MODEL.AXIAL_RESNET.MAX_SPAN, "norm": c.NORM, "activation": c.ACTIVATION,
            "drop_path": c.DROP_PATH_RATE, "drop_path_schedule": c.DROP_PATH_SCHEDULE,
            "layer_kwargs": dict(center_dim=c.CENTER_DIM, bottleneck_dim=c.BOTTLENECK_DIM,
                                 key_dim=c.KEY_DIM, value_dim=c.VALUE_DIM, num_heads=c.NUM_HEADS,
                                 ffn_dim=c.FFN_DIM, num_points=c.NUM_POINTS, ref_mlp_dim=c.REF_MLP_DIM,
                                 **cmt_switches(cfg)),
        }

    def fuse_res4(self, x: torch.Tensor, res4: torch.Tensor) -> torch.Tensor:
        """DeepLab2's ResizedFuse: project the stride-32 path, upsample, add ``res4``, activate."""
        x = F.interpolate(self.fuse4(x), size=res4.shape[-2:], mode="bilinear", align_corners=False)
        return self.act(add_(x, res4))

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict:
        B = features["res5"].shape[0]
        C = self.centers.weight.unsqueeze(0).expand(B, -1, -1)
        S = e = None
        layers: List[Dict] = []
        x = features["res5"]
        for i, block in enumerate(list(self.stage5) + list(self.stage4)):
            if i == len(self.stage5):
                x = self.fuse_res4(x, features["res4"])
            C_in = C
            x, out = block(x, C, S, e)
            C, S, e = out["centers"], out["logits"], out.get("ref_embed")
            layer = {"centers_in": C_in, "logits": S}
            if "ref_points" in out:
                layer["ref_points"] = out["ref_points"]
            layers.append(layer)
        if not self.stage4:
            # No stride-16 blocks: the pixel decoder still starts at stride 16.
            x = self.fuse_res4(x, features["res4"])
        return {"pixels": x, "centers": C, "assignment": S, "layers": layers}


def build_transformer_decoder(cfg, input_shape) -> nn.Module:
    name = cfg.MODEL.CMT.TRANSFORMER_DECODER_NAME
    return CMT_TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, input_shape)
