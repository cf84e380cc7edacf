"""CMT-DeepLab's decoder: dual-path axial-transformer blocks with CMT layers, then a pixel decoder.

Sec. 3.4: on top of the Axial-ResNet backbone, six dual-path axial-transformer blocks -- three at
stage 5 (2048 channels) and three at stage 4 (1024 channels) -- each with an axial self-attention on
the pixel path, a CMT cross-attention module between pixels and cluster centers, center
self-attention and an FFN; then a pixel decoder up to stride 4, where the final clustering gives N mask
logits per pixel.

Layout of one :class:`DualPathBlock` (MaX-DeepLab's dual-path block, pixel path = Axial-ResNet block):
``1x1 conv (C -> 2f) -> height/width axial attention (P2P) -> CMT layer (pixels <-> centers)
-> 1x1 conv (2f -> C)`` with a residual connection, ``f = C / 4``; the CMT layer works on the block's
``2f``-channel bottleneck features. Center path: ``C + MHSA(C)``, then ``C + FFN(C)``, each followed by
LayerNorm. The pixel decoder upsamples by 2 twice, adding 1x1 projections of res3 / res2 and running one
bottleneck block per stride. The pixel and semantic heads are DeepLab2's depthwise-separable heads
(:func:`separable_head`). The final assignment (eq. 6 at stride 4) adds the last CMT layer's logits
(upsampled) to ``K~p Q~c^T`` computed from the stride-4 features.
"""
import math
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone.axial_resnet import BottleneckBlock
from ..layers import AxialAttention2D, DropPath, add_, conv_norm, get_activation
from .cmt_layer import CMTLayer, resize_assignment_logits

__all__ = ["DualPathBlock", "CMTDecoder", "separable_head"]


def separable_head(channels: int, out_channels: int, *, norm: str, activation: str,
                   kernel_size: int = 5) -> nn.Sequential:
    """DeepLab2's prediction head (MaX-DeepLab's pixel-space and semantic heads): depthwise
    ``k x k`` conv, norm, act -> 1x1 conv (``channels``), norm, act -> 1x1 conv to ``out_channels``.

    The paper does not describe its heads; with these two heads the model sizes match Table 1 to within
    0.1% (a dense 3x3 conv in their place adds 1.03M parameters, and 55 fvcore GFLOPs at 1281 x 1281)."""
    return nn.Sequential(
        conv_norm(channels, channels, kernel_size, groups=channels, norm=norm),
        get_activation(activation, inplace=True),
        conv_norm(channels, channels, 1, norm=norm),
        get_activation(activation, inplace=True),
        nn.Conv2d(channels, out_channels, 1),
    )


class DualPathBlock(nn.Module):
    """Pixel path: axial bottleneck block with the CMT layer inside; center path: MHSA + FFN."""

    def __init__(self, channels: int, *, center_dim: int, num_heads: int, cmt_key_dim: int,
                 num_points: int, ffn_dim: int, norm: str, activation: str, drop_path: float,
                 max_span: int, switches: Dict[str, bool], first_layer: bool = False):
        super().__init__()
        f = channels // 4
        self.conv1 = conv_norm(channels, 2 * f, 1, norm=norm)
        self.axial = AxialAttention2D(2 * f, f, 2 * f, num_heads=num_heads, max_span=max_span, norm=norm)
        self.cmt = CMTLayer(2 * f, center_dim, key_dim=cmt_key_dim, num_heads=num_heads,
                            num_points=num_points, first_layer=first_layer, **switches)
        self.conv3 = conv_norm(2 * f, channels, 1, norm=norm)
        with torch.no_grad():
            self.conv3.norm.weight.zero_()          # the block starts as the identity
        self.act = get_activation(activation, inplace=True)  # only applied to temporaries
        self.drop_path = DropPath(drop_path)
        self.center_attn = nn.MultiheadAttention(center_dim, num_heads, batch_first=True)
        self.center_norm1 = nn.LayerNorm(center_dim)
        self.ffn = nn.Sequential(nn.Linear(center_dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, center_dim))
        self.center_norm2 = nn.LayerNorm(center_dim)

    def forward(self, x, C, S=None, e=None):
        y = self.act(self.axial(self.act(self.conv1(x))))
        out = self.cmt(y, C, S, e)
        pixels = out.pop("pixels")  # activated in place at inference: not returned
        x = self.act(add_(self.drop_path(self.conv3(self.act(pixels))), x))
        C = out["centers"]
        C = self.center_norm1(C + self.drop_path(self.center_attn(C, C, C, need_weights=False)[0]))
        C = self.center_norm2(C + self.drop_path(self.ffn(C)))
        return x, C, out


class CMTDecoder(nn.Module):
    """Backbone features -> cluster centers, class logits, mask logits at stride 4 (and deep
    supervision of every CMT layer).

    Args:
        in_channels: channels of ``res2..res5``.
        num_clusters: N cluster centers (paper: 128).
        stage_blocks: dual-path blocks at stride 32 (res5) and 16 (res4) (paper: 3, 3).
        decoder_channels: pixel decoder width at stride 8 and 4.
        mask_dim: depth of the final assignment's keys / queries (and of the pixel features used by
            the instance discrimination loss).
        switches: the CMT layer's component switches (see :class:`CMTLayer`).
    """

    def __init__(self, in_channels: Dict[str, int], *, num_classes: int, num_clusters: int = 128,
                 center_dim: int = 256, num_heads: int = 8, cmt_key_dim: int = 128, num_points: int = 8,
                 ffn_dim: int = 2048, stage_blocks=(3, 3), decoder_channels=(512, 256),
                 mask_dim: int = 128, norm: str = "BN", activation: str = "gelu",
                 drop_path: float = 0.0, max_span: int = 255, switches: Dict[str, bool] = None):
        super().__init__()
        switches = dict(switches or {})
        self.num_classes = num_classes
        self.use_assignment_residual = switches.get("use_assignment_residual", True)
        self.centers = nn.Embedding(num_clusters, center_dim)
        nn.init.trunc_normal_(self.centers.weight, std=1.0)
        c5, c4, c3, c2 = (in_channels[k] for k in ("res5", "res4", "res3", "res2"))
        total = sum(stage_blocks)
        rates = [drop_path * i / max(total - 1, 1) for i in range(total)]
        kw = dict(center_dim=center_dim, num_heads=num_heads, cmt_key_dim=cmt_key_dim,
                  num_points=num_points, ffn_dim=ffn_dim, norm=norm, activation=activation,
                  max_span=max_span, switches=switches)
        self.stage5 = nn.ModuleList(DualPathBlock(c5, drop_path=rates[i], first_layer=i == 0, **kw)
                                    for i in range(stage_blocks[0]))
        self.fuse4 = conv_norm(c5, c4, 1, norm=norm)
        self.stage4 = nn.ModuleList(DualPathBlock(c4, drop_path=rates[stage_blocks[0] + i], **kw)
                                    for i in range(stage_blocks[1]))
        d8, d4 = decoder_channels
        self.up8, self.skip8 = conv_norm(c4, d8, 1, norm=norm), conv_norm(c3, d8, 1, norm=norm)
        self.block8 = BottleneckBlock(d8, d8, bottleneck_channels=d8 // 4, norm=norm, activation=activation)
        self.up4, self.skip4 = conv_norm(d8, d4, 1, norm=norm), conv_norm(c2, d4, 1, norm=norm)
        self.block4 = BottleneckBlock(d4, d4, bottleneck_channels=d4 // 4, norm=norm, activation=activation)
        self.act = get_activation(activation, inplace=True)  # only applied to temporaries
        # Final assignment at stride 4 (eq. 6) and the heads.
        self.pixel_head = separable_head(d4, mask_dim, norm=norm, activation=activation)
        self.center_head = nn.Linear(center_dim, mask_dim)
        self.mask_dim = mask_dim
        self.class_head = nn.Linear(center_dim, num_classes + 1)
        self.semantic_head = separable_head(d4, num_classes, norm=norm, activation=activation)

    def _upsample_add(self, x, up_conv, skip, skip_conv):
        x = F.interpolate(up_conv(x), size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.act(add_(x, skip_conv(skip)))

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict:
        B = features["res5"].shape[0]
        C = self.centers.weight.unsqueeze(0).expand(B, -1, -1)
        S = e = None
        layers: List[Dict] = []
        x = features["res5"]
        for i, block in enumerate(list(self.stage5) + list(self.stage4)):
            if i == len(self.stage5):
                x = F.interpolate(self.fuse4(x), size=features["res4"].shape[-2:], mode="bilinear",
                                  align_corners=False)
                x = self.act(add_(x, features["res4"]))
            x, C, out = block(x, C, S, e)
            S, e = out["logits"], out.get("ref_embed")
            layers.append({"pred_logits": self.class_head(C), "pred_masks": out["logits"],
                           **({"ref_points": out["ref_points"]} if "ref_points" in out else {})})
        x = self.block8(self._upsample_add(x, self.up8, features["res3"], self.skip8))
        x = self.block4(self._upsample_add(x, self.up4, features["res2"], self.skip4))
        keys = self.pixel_head(x)
        queries = self.center_head(C)
        logits = torch.einsum("bdhw,bnd->bnhw", keys, queries) / math.sqrt(self.mask_dim)
        if S is not None and self.use_assignment_residual:
            logits = logits + resize_assignment_logits(S, logits.shape[-2:])
        # The final clustering uses the last layer's centers; every CMT layer's own clustering result
        # is an auxiliary output (deep supervision).
        last = layers[-1]
        out = {"pred_logits": last["pred_logits"], "pred_masks": logits, "aux_outputs": layers,
               "stride4_features": x}
        if self.training:  # only the losses read these
            out["pixel_features"] = F.normalize(keys, dim=1)
            out["sem_logits"] = self.semantic_head(x)
        if "ref_points" in last:
            out["ref_points"] = last["ref_points"]
        return out
