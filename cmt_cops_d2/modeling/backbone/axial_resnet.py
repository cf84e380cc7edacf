"""Axial-ResNet backbone (Axial-DeepLab [83]): MaX-S without its transformer blocks, with GeLU.

CMT-DeepLab Sec. 3.4: MaX-S with GeLU instead of ReLU and all transformer blocks removed, which is
Axial-ResNet-50 with blocks ``[3, 4, 6, 3]`` in stages 2..5; Axial-ResNet-104 scales stage 4 to 24
blocks. Layout (full width, ``base_width = 64``, ``f = 64 * 2^(s-2)`` for stage ``s``):

* **Inception stem** ("ResNet-beta"): 3x3 convs to 64 (stride 2), 64, 128, each norm + act.
  No max-pool: its stride moves into the first block of res2.
* **Bottleneck blocks** (res2, res3, and the first block of res4): 1x1 conv to ``f``, 3x3 conv to
  ``f`` (carrying the stage's stride), 1x1 conv to ``4f``.
* **Axial blocks** (res4, res5 by default): 1x1 conv to ``2f``, height-axis then width-axis
  position-sensitive attention (key ``f``, value ``2f``, 8 heads; :class:`AxialAttention2D`),
  act, 1x1 conv to ``4f``.
* Every block: shortcut = 1x1 conv + norm when channels change (carrying the stride), identity
  otherwise; ``out = act(shortcut + drop_path(branch))``; the branch's last norm has gamma = 0, so
  at initialisation each block computes ``act(shortcut(x))``.

Which blocks are axial: a block of a stage listed in ``axial_stages`` is axial unless it is the
first block of a stage whose previous stage is not axial; that first block (the 8 -> 16 stride
transition into res4 by default) stays a strided bottleneck. This is DeepLab2's
``use_axial_beyond_stride=16`` rule for MaX-S (attention only on inputs already at stride >= 16),
and gives exactly its parameter count (41,343,424 for Axial-ResNet-50, see the tests).

Outputs ``res2..res5`` at strides 4, 8, 16, 32 with ``4f`` = 256, 512, 1024, 2048 channels.
``res5_dilation = 2`` keeps res5 at stride 16 (MaX-S's output stride 16): its first block is not
strided and later bottleneck blocks use dilation 2 (axial blocks are unaffected).

Strided convs pad symmetrically (``k // 2`` on every side), as DeepLab2's ``Conv2DSame`` does (not
TF's "SAME"); DeepLab2's weights reproduce its outputs (``cmt_cops_d2.checkpoint.deeplab2``). The one
difference from DeepLab2 worth knowing is the drop-path schedule (see ``drop_path_rate``).
"""
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn
from detectron2.config import configurable
from detectron2.layers import CNNBlockBase, FrozenBatchNorm2d, ShapeSpec
from detectron2.modeling.backbone import BACKBONE_REGISTRY, Backbone

from ..layers import AxialAttention2D, DropPath, add_, conv_norm, get_activation

__all__ = [
    "InceptionStem",
    "BottleneckBlock",
    "AxialBlock",
    "AxialResNet",
    "build_axial_resnet_backbone",
    "axial_block_layout",
]

STAGE_NAMES = ("res2", "res3", "res4", "res5")


class InceptionStem(CNNBlockBase):
    """3x3 conv (stride 2) -> 3x3 conv -> 3x3 conv, to ``width, width, 2 * width`` channels.

    ``[N, in_channels, H, W]`` -> ``[N, 2 * width, ceil(H / 2), ceil(W / 2)]``.
    """

    def __init__(self, in_channels: int = 3, width: int = 64, *, norm="BN", activation="gelu"):
        super().__init__(in_channels, 2 * width, 2)
        self.conv1 = conv_norm(in_channels, width, 3, stride=2, norm=norm)
        self.conv2 = conv_norm(width, width, 3, norm=norm)
        self.conv3 = conv_norm(width, 2 * width, 3, norm=norm)
        self.act = get_activation(activation, inplace=True)  # only applied to conv outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.act(self.conv3(x))


class _ResidualBlock(CNNBlockBase):
    """Shortcut, drop path and the final activation shared by both block types.

    Subclasses define ``residual(x)`` (the branch) and ``last_conv`` (its norm is zero-initialised).
    """

    def __init__(self, in_channels, out_channels, stride, *, norm, activation, drop_path):
        super().__init__(in_channels, out_channels, stride)
        if in_channels != out_channels:
            self.shortcut = conv_norm(in_channels, out_channels, 1, stride=stride, norm=norm)
        else:
            self.shortcut = None  # identity, subsampled if strided
        self.drop_path = DropPath(drop_path)
        # Only ever applied to temporaries (conv / attention outputs, the residual sum), so it may
        # work in place at inference.
        self.act = get_activation(activation, inplace=True)

    def forward_shortcut(self, x: torch.Tensor) -> torch.Tensor:
        """The shortcut path alone: ``[N, in, H, W]`` -> ``[N, out, ceil(H/s), ceil(W/s)]``."""
        if self.shortcut is not None:
            return self.shortcut(x)
        if self.stride > 1:
            return x[:, :, :: self.stride, :: self.stride]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The branch ends in a conv, so its output is a temporary the sum may overwrite.
        return self.act(add_(self.drop_path(self.residual(x)), self.forward_shortcut(x)))

    def zero_init_last_norm(self):
        """Start the branch at zero: gamma = 0 in its last norm (a zero conv if it has no norm)."""
        norm = self.last_conv.norm
        if norm is not None and getattr(norm, "weight", None) is not None:
            with torch.no_grad():
                norm.weight.zero_()
        else:
            nn.init.zeros_(self.last_conv.weight)


class BottleneckBlock(_ResidualBlock):
    """1x1 conv -> 3x3 conv (stride, dilation) -> 1x1 conv, each with a norm; act after two."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        bottleneck_channels: int,
        stride: int = 1,
        dilation: int = 1,
        norm="BN",
        activation: str = "gelu",
        drop_path: float = 0.0,
    ):
        super().__init__(
            in_channels, out_channels, stride, norm=norm, activation=activation, drop_path=drop_path
        )
        self.conv1 = conv_norm(in_channels, bottleneck_channels, 1, norm=norm)
        self.conv2 = conv_norm(
            bottleneck_channels, bottleneck_channels, 3, stride=stride, dilation=dilation, norm=norm
        )
        self.conv3 = conv_norm(bottleneck_channels, out_channels, 1, norm=norm)

    @property
    def last_conv(self):
        return self.conv3

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        return self.conv3(x)


class AxialBlock(_ResidualBlock):
    """1x1 conv -> height attention -> width attention -> act -> 1x1 conv (Axial-DeepLab block).

    Args:
        bottleneck_channels: output of the first 1x1 conv, input of the attention (MaX-S: ``2f``).
        key_channels, value_channels: per attention layer (MaX-S: ``f`` and ``2f``).
        stride: applied after each axis' attention.
        num_heads, max_span, rpe_init_std: see :class:`AxialAttention`.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        bottleneck_channels: int,
        key_channels: int,
        value_channels: int,
        stride: int = 1,
        num_heads: int = 8,
        max_span: int = 255,
        rpe_init_std: float = 1.0,
        norm="BN",
        activation: str = "gelu",
        drop_path: float = 0.0,
    ):
        super().__init__(
            in_channels, out_channels, stride, norm=norm, activation=activation, drop_path=drop_path
        )
        self.conv1 = conv_norm(in_channels, bottleneck_channels, 1, norm=norm)
        self.attention = AxialAttention2D(
            bottleneck_channels,
            key_channels,
            value_channels,
            stride=stride,
            num_heads=num_heads,
            max_span=max_span,
            norm=norm,
            rpe_init_std=rpe_init_std,
        )
        self.conv3 = conv_norm(value_channels, out_channels, 1, norm=norm)

    @property
    def last_conv(self):
        return self.conv3

    def residual(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.attention(x))
        return self.conv3(x)


def axial_block_layout(depths: Sequence[int], axial_stages: Sequence[str]) -> List[List[bool]]:
    """Whether each block of res2..res5 is axial (True) or a bottleneck (False).

    A block of a stage in ``axial_stages`` is axial unless it is the first block of a stage whose
    previous stage is not axial (see the module docstring).
    """
    layout = []
    for s, (name, depth) in enumerate(zip(STAGE_NAMES, depths)):
        prev_axial = s > 0 and STAGE_NAMES[s - 1] in axial_stages
        layout.append([name in axial_stages and (i > 0 or prev_axial) for i in range(depth)])
    return layout


class AxialResNet(Backbone):
    """Axial-ResNet as a Detectron2 backbone; see the module docstring for the architecture.

    Args:
        in_channels: input image channels.
        depths: blocks in res2..res5 (Axial-ResNet-50: ``(3, 4, 6, 3)``; -104: ``(3, 4, 24, 3)``).
        stem_width: stem conv widths are ``(w, w, 2w)``.
        base_width: bottleneck width ``f`` of res2; doubles per stage; block outputs are ``4f``.
        axial_stages: stages built from axial blocks.
        attention_bottleneck_expansion: axial block's first 1x1 conv outputs this times ``f``.
        key_expansion, value_expansion: attention key / value channels are these times ``f``.
        num_heads, max_span, rpe_init_std: see :class:`AxialAttention`.
        drop_path_rate: drop-path probability of the last block.
        drop_path_schedule: ``"linear"``: block ``i`` of ``n`` (over res2..res5, in order) drops
            with ``drop_path_rate * i / (n - 1)`` (0 for the first block); ``"constant"``: every
            block uses ``drop_path_rate``. (DeepLab2's MaX-S instead applies a per-stage rate only
            at stride >= 16.)
        norm: Detectron2 norm name for every conv and attention (``"BN"``, ``"SyncBN"``, ``"GN"``,
            ``"FrozenBN"``, ``""``).
        activation: ``"gelu"`` or ``"relu"``.
        bn_eps: epsilon of every batch norm (BN, SyncBN, FrozenBN); 1e-5 is PyTorch's default,
            DeepLab2's checkpoints use 1e-3 (see :mod:`cmt_cops_d2.checkpoint.deeplab2`).
        res5_dilation: 1 (res5 at stride 32) or 2 (res5 at stride 16).
        out_features: subset of ``stem, res2..res5``; stages after the last requested one are not
            built.
        zero_init_residual: gamma = 0 in each residual branch's last norm.
        freeze_at: 0 trains all; 1 freezes the stem; ``k >= 2`` also freezes res2..res``k``
            (parameters fixed, BN -> FrozenBN), as Detectron2's ResNet.
    """

    @configurable
    def __init__(
        self,
        *,
        in_channels: int = 3,
        depths: Sequence[int] = (3, 4, 6, 3),
        stem_width: int = 64,
        base_width: int = 64,
        axial_stages: Sequence[str] = ("res4", "res5"),
        attention_bottleneck_expansion: float = 2.0,
        key_expansion: float = 1.0,
        value_expansion: float = 2.0,
        num_heads: int = 8,
        max_span: int = 255,
        rpe_init_std: float = 1.0,
        drop_path_rate: float = 0.2,
        drop_path_schedule: str = "linear",
        norm="SyncBN",
        activation: str = "gelu",
        bn_eps: float = 1e-5,
        res5_dilation: int = 1,
        out_features: Sequence[str] = STAGE_NAMES,
        zero_init_residual: bool = True,
        freeze_at: int = 0,
    ):
        super().__init__()
        depths = [int(d) for d in depths]
        if len(depths) != 4 or min(depths) < 1:
            raise ValueError(f"depths must be 4 positive block counts (res2..res5), got {depths}")
        unknown = set(axial_stages) - set(STAGE_NAMES)
        if unknown:
            raise ValueError(
                f"axial_stages has unknown stages {sorted(unknown)}; use {STAGE_NAMES}"
            )
        names = ("stem",) + STAGE_NAMES
        unknown = [f for f in out_features if f not in names]
        if not out_features or unknown:
            raise ValueError(
                f"out_features must be a non-empty subset of {names}, got {out_features}"
            )
        if res5_dilation not in (1, 2):
            raise ValueError(f"res5_dilation must be 1 or 2, got {res5_dilation}")
        if drop_path_schedule not in ("linear", "constant"):
            raise ValueError(
                f"drop_path_schedule must be 'linear' or 'constant', got {drop_path_schedule!r}"
            )
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")

        self._out_features = list(out_features)
        self.stem = InceptionStem(in_channels, stem_width, norm=norm, activation=activation)
        self._out_feature_strides = {"stem": 2}
        self._out_feature_channels = {"stem": self.stem.out_channels}

        total_blocks = sum(depths)
        if drop_path_schedule == "linear":
            rates = [drop_path_rate * i / max(total_blocks - 1, 1) for i in range(total_blocks)]
        else:
            rates = [drop_path_rate] * total_blocks
        layout = axial_block_layout(depths, axial_stages)
        last_stage = max(names.index(f) for f in out_features)  # 0 = stem, 1 = res2, ...

        self.stage_names: List[str] = []
        channels, stride, block_index = self.stem.out_channels, 2, 0
        for s, name in enumerate(STAGE_NAMES[:last_stage]):
            f = base_width * 2 ** s
            out_channels = 4 * f
            dilated = name == "res5" and res5_dilation > 1
            blocks = []
            for i in range(depths[s]):
                block_stride = 2 if i == 0 and not dilated else 1
                common = dict(norm=norm, activation=activation, drop_path=rates[block_index])
                if layout[s][i]:
                    block = AxialBlock(
                        channels,
                        out_channels,
                        bottleneck_channels=int(round(f * attention_bottleneck_expansion)),
                        key_channels=int(round(f * key_expansion)),
                        value_channels=int(round(f * value_expansion)),
                        stride=block_stride,
                        num_heads=num_heads,
                        max_span=max_span,
                        rpe_init_std=rpe_init_std,
                        **common,
                    )
                else:
                    block = BottleneckBlock(
                        channels,
                        out_channels,
                        bottleneck_channels=f,
                        stride=block_stride,
                        # DeepLab2's atrous consistency: the first block's 3x3 sees the input at
                        # the previous stride, so only the later blocks need the dilation.
                        dilation=res5_dilation if dilated and i > 0 else 1,
                        **common,
                    )
                if zero_init_residual:
                    block.zero_init_last_norm()
                blocks.append(block)
                channels = out_channels
                block_index += 1
            stride *= 1 if dilated else 2
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            self._out_feature_strides[name] = stride
            self._out_feature_channels[name] = out_channels
        self._size_divisibility = stride
        for m in self.modules():  # before freeze(): FrozenBatchNorm2d copies the eps it converts
            if isinstance(m, (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm2d)):
                m.eps = bn_eps
        self.freeze(freeze_at)

    @classmethod
    def from_config(cls, cfg, input_shape: Optional[ShapeSpec] = None):
        c = cfg.MODEL.AXIAL_RESNET
        return {
            "in_channels": input_shape.channels if input_shape is not None else 3,
            "depths": tuple(c.DEPTHS),
            "stem_width": c.STEM_WIDTH,
            "base_width": c.BASE_WIDTH,
            "axial_stages": tuple(c.AXIAL_STAGES),
            "attention_bottleneck_expansion": c.ATTENTION_BOTTLENECK_EXPANSION,
            "key_expansion": c.KEY_EXPANSION,
            "value_expansion": c.VALUE_EXPANSION,
            "num_heads": c.NUM_HEADS,
            "max_span": c.MAX_SPAN,
            "rpe_init_std": c.RPE_INIT_STD,
            "drop_path_rate": c.DROP_PATH_RATE,
            "drop_path_schedule": c.DROP_PATH_SCHEDULE,
            "norm": c.NORM,
            "activation": c.ACTIVATION,
            "bn_eps": c.BN_EPS,
            "res5_dilation": c.RES5_DILATION,
            "out_features": tuple(c.OUT_FEATURES),
            "zero_init_residual": c.ZERO_INIT_RESIDUAL,
            "freeze_at": c.FREEZE_AT,
        }

    @property
    def size_divisibility(self) -> int:
        """Total stride of the deepest built stage (32 by default): pad inputs to a multiple."""
        return self._size_divisibility

    def freeze(self, freeze_at: int = 0):
        """Freeze the stem (``freeze_at >= 1``) and res2..res``freeze_at``; returns ``self``."""
        if freeze_at >= 1:
            self.stem.freeze()
        for s, name in enumerate(self.stage_names, start=2):
            if freeze_at >= s:
                for block in getattr(self, name):
                    block.freeze()
        return self

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: ``[N, C, H, W]`` images (any H, W; pad to ``size_divisibility`` for exact strides).

        Returns:
            dict name -> ``[N, channels, ceil(H / stride), ceil(W / stride)]`` for ``out_features``.
        """
        if x.dim() != 4:
            raise ValueError(f"AxialResNet takes [N, C, H, W] inputs, got shape {tuple(x.shape)}")
        outputs = {}
        x = self.stem(x)
        if "stem" in self._out_features:
            outputs["stem"] = x
        for name in self.stage_names:
            x = getattr(self, name)(x)
            if name in self._out_features:
                outputs[name] = x
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(
                channels=self._out_feature_channels[name], stride=self._out_feature_strides[name]
            )
            for name in self._out_features
        }


@BACKBONE_REGISTRY.register()
def build_axial_resnet_backbone(cfg, input_shape: ShapeSpec) -> AxialResNet:
    """Detectron2 builder: ``MODEL.BACKBONE.NAME = "build_axial_resnet_backbone"``, keys in
    ``MODEL.AXIAL_RESNET`` (see :func:`cmt_cops_d2.config.add_axial_resnet_config`)."""
    return AxialResNet(cfg, input_shape)
