"""CMT-DeepLab's transformer decoders: dual-path axial-transformer blocks with CMT layers.

:class:`CMTTransformerDecoder` is the paper's "stronger decoder" (Sec. 3.4, Table 1). Sec. 3.4: on top of the Axial-ResNet backbone, six dual-path axial-transformer blocks -- three at
stage 5 (2048 channels, stride 32) and three at stage 4 (1024 channels, stride 16). As in MaX-DeepLab
(DeepLab2's extra decoder stages), each block is an axial residual block (the pixels' self-attention,
the same block as the backbone's) followed by a dual-path transformer layer, here the
:class:`~.cmt_layer.CMTLayer`; between the two stages the stride-32 features are projected (1x1 conv +
norm), upsampled and added to the backbone's ``res4`` (DeepLab2's ``ResizedFuse``).

:class:`MaXSTransformerDecoder` is MaX-DeepLab-S's layout, the baseline of Table 2c (61.9M): the
backbone's stage 5 runs at stride 16 (dilated) with a dual-path transformer layer after each of its
axial blocks, followed by one extra dual-path block, all at 2048 channels.

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
           "MaXSTransformerDecoder", "build_transformer_decoder", "cmt_switches"]

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


def drop_path_rates(rate: float, schedule: str, total: int) -> List[float]:
    """Per-block drop-path rates: ``rate`` for every block ("constant") or 0 -> ``rate`` ("linear")."""
    if schedule == "constant":
        return [rate] * total
    if schedule == "linear":
        return [rate * i / max(total - 1, 1) for i in range(total)]
    raise ValueError(f"MODEL.CMT.DROP_PATH_SCHEDULE={schedule!r}: use 'constant' or 'linear'")


def run_dual_path_blocks(blocks, x: torch.Tensor, C: torch.Tensor, S, e, layers: List[Dict]):
    """Run ``blocks`` in order; append each CMT layer's input centers and clustering result (and its
    reference points) to ``layers``. Returns the pixels and the last centers, logits S and reference
    embedding."""
    for block in blocks:
        C_in = C
        x, out = block(x, C, S, e)
        C, S, e = out["centers"], out["logits"], out.get("ref_embed")
        layer = {"centers_in": C_in, "logits": S}
        if "ref_points" in out:
            layer["ref_points"] = out["ref_points"]
        layers.append(layer)
    return x, C, S, e


def _decoder_config(cfg, input_shape) -> Dict:
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


def _learned_centers(num_clusters: int, center_dim: int) -> nn.Embedding:
    centers = nn.Embedding(num_clusters, center_dim)
    nn.init.trunc_normal_(centers.weight, std=1.0)
    return centers


class DualPathBlock(nn.Module):
    """MaX-DeepLab's dual-path block: an axial residual block on the pixels, then a CMT layer between
    the pixels and the cluster centers. Reads and returns activated pixel features. With
    ``in_channels`` other than ``channels`` (the first block of a stage) the axial block's shortcut is
    a 1x1 conv + norm."""

    def __init__(self, channels: int, *, layer_kwargs: Dict, num_heads: int, max_span: int, norm: str,
                 activation: str, drop_path: float, first_layer: bool, in_channels: int = 0):
        super().__init__()
        f = channels // 4
        self.axial = AxialBlock(in_channels or channels, channels, bottleneck_channels=2 * f, key_channels=f,
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
    masks), for deep supervision. ``STAGE_BLOCKS`` = (blocks at stride 32, blocks at stride 16).
    """

    in_features = ("res4", "res5")

    @configurable
    def __init__(self, *, in_channels: Dict[str, int], num_clusters: int, center_dim: int,
                 stage_blocks, layer_kwargs: Dict, num_heads: int, max_span: int, norm: str,
                 activation: str, drop_path: float, drop_path_schedule: str = "constant"):
        super().__init__()
        self.centers = _learned_centers(num_clusters, center_dim)
        c5, c4 = in_channels["res5"], in_channels["res4"]
        rates = drop_path_rates(drop_path, drop_path_schedule, sum(stage_blocks))
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
        return _decoder_config(cfg, input_shape)

    def fuse_res4(self, x: torch.Tensor, res4: torch.Tensor) -> torch.Tensor:
        """DeepLab2's ResizedFuse: project the stride-32 path, upsample, add ``res4``, activate."""
        x = F.interpolate(self.fuse4(x), size=res4.shape[-2:], mode="bilinear", align_corners=False)
        return self.act(add_(x, res4))

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict:
        B = features["res5"].shape[0]
        C = self.centers.weight.unsqueeze(0).expand(B, -1, -1)
        layers: List[Dict] = []
        x, C, S, e = run_dual_path_blocks(self.stage5, features["res5"], C, None, None, layers)
        x = self.fuse_res4(x, features["res4"])     # the pixel decoder starts at stride 16
        x, C, S, e = run_dual_path_blocks(self.stage4, x, C, S, e, layers)
        return {"pixels": x, "centers": C, "assignment": S, "layers": layers}


@CMT_TRANSFORMER_DECODER_REGISTRY.register()
class MaXSTransformerDecoder(nn.Module):
    """MaX-DeepLab-S's layout (Table 2c's 61.9M baseline and the rows built on it).

    MaX-S attaches a dual-path transformer layer to each axial block of the backbone's stage 5, which
    runs at stride 16 (output stride 16, dilated), and adds one more dual-path block after it
    (DeepLab2's ``MaXDeepLabS``: transformers beyond stride 32, one extra decoder block). Here those
    stage-5 blocks live in this module, so the backbone stops at ``res4``
    (``MODEL.AXIAL_RESNET.OUT_FEATURES: [res2, res3, res4]``). ``STAGE_BLOCKS`` = (stage-5 blocks, the
    first reading ``res4``; extra blocks), MaX-S: (3, 1). Same outputs as
    :class:`CMTTransformerDecoder`; ``pixels`` has twice ``res4``'s channels (2048) at stride 16.
    """

    in_features = ("res4",)

    @configurable
    def __init__(self, *, in_channels: Dict[str, int], num_clusters: int, center_dim: int,
                 stage_blocks, layer_kwargs: Dict, num_heads: int, max_span: int, norm: str,
                 activation: str, drop_path: float, drop_path_schedule: str = "constant",
                 backbone_bn_eps: float = 1e-5):
        """``backbone_bn_eps``: epsilon of the batch norms of stage 5's axial blocks, which are the
        backbone's stage 5 (``MODEL.AXIAL_RESNET.BN_EPS``, so that converted DeepLab2 backbone weights
        compute what they computed there); the rest of the decoder keeps PyTorch's default."""
        super().__init__()
        if "res5" in in_channels:
            raise ValueError("MaXSTransformerDecoder builds stage 5 itself (with its transformer layers); "
                             "the backbone must stop at res4: set MODEL.AXIAL_RESNET.OUT_FEATURES to "
                             "['res2', 'res3', 'res4']")
        if len(stage_blocks) != 2 or stage_blocks[0] < 1:
            raise ValueError(f"MODEL.CMT.STAGE_BLOCKS={list(stage_blocks)}: MaXSTransformerDecoder needs "
                             "[stage-5 blocks >= 1, extra blocks], e.g. MaX-S's [3, 1]")
        self.centers = _learned_centers(num_clusters, center_dim)
        rates = drop_path_rates(drop_path, drop_path_schedule, sum(stage_blocks))
        kw = dict(layer_kwargs=layer_kwargs, num_heads=num_heads, max_span=max_span, norm=norm,
                  activation=activation)
        channels = 2 * in_channels["res4"]          # the backbone's res5 width
        self.stage5 = nn.ModuleList(
            DualPathBlock(channels, in_channels=in_channels["res4"] if i == 0 else 0, drop_path=rates[i],
                          first_layer=i == 0, **kw)
            for i in range(stage_blocks[0]))
        for block in self.stage5:
            for m in block.axial.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eps = backbone_bn_eps
        self.extra = nn.ModuleList(DualPathBlock(channels, drop_path=rates[stage_blocks[0] + i],
                                                 first_layer=False, **kw)
                                   for i in range(stage_blocks[1]))
        self.out_channels = channels

    @classmethod
    def from_config(cls, cfg, input_shape):
        return dict(_decoder_config(cfg, input_shape), backbone_bn_eps=cfg.MODEL.AXIAL_RESNET.BN_EPS)

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict:
        res4 = features["res4"]
        C = self.centers.weight.unsqueeze(0).expand(res4.shape[0], -1, -1)
        layers: List[Dict] = []
        x, C, S, e = run_dual_path_blocks(list(self.stage5) + list(self.extra), res4, C, None, None, layers)
        return {"pixels": x, "centers": C, "assignment": S, "layers": layers}


def build_transformer_decoder(cfg, input_shape) -> nn.Module:
    name = cfg.MODEL.CMT.TRANSFORMER_DECODER_NAME
    return CMT_TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, input_shape)
