"""COPS heads: the semantic branch, the affinity branch and the cost module (paper Sec. 3.1).

Semantic branch (:class:`COPSSemSegHead`)
-----------------------------------------
Panoptic-DeepLab's: a DeepLabV3+ decoder (depthwise-separable ASPP branches and fuse convs with
``MODEL.SEM_SEG_HEAD.USE_DEPTHWISE_SEPARABLE_CONV``, as the public COPS configs), then two dense 3x3
conv + norm + ReLU and a 1x1 predictor to K logits. Detectron2's ``PanopticDeepLabSemSegHead`` swaps the
two dense convs for one 5x5 separable conv when the flag is set; the public COPS head keeps them dense.

Affinity branch (:class:`COPSAffinityHead`)
------------------------------------------
* Its own DeepLabV3+ decoder (Detectron2's ``DeepLabV3PlusHead`` in decoder-only mode) on the backbone
  features, giving ``C_dec`` channels at stride 4.
* ``cat(decoder features, semantic logits.detach())`` (stop-gradient: the affinity branch must not
  influence the semantic branch), then two 3x3 conv + norm + ReLU, to ``C_dec`` and then ``C``
  channels (public code): the affinity features ``F`` (``B x C x h x w``).
* One predictor per distance ``d``: 3x3 conv to ``in/4`` and 3x3 conv to ``in/8`` (norm + ReLU;
  grouped by direction, 2 groups, for ``d > 1``), then a 1x1 conv to 2 logits (channel 0 vertical,
  1 horizontal), not grouped, so it mixes a vertical and a horizontal edge. Its input:

  - ``d = 1``: ``F`` itself (the 3x3 convs of the predictor see both endpoints);
  - ``d > 1``, ``MODEL.COPS.AFFINITY_HEAD.EDGE_ALIGNMENT "center"`` (the public code; ``d`` even, ``h = d / 2``):
    ``cat(F[r + h, c] - F[r - h, c], F[r, c + h] - F[r, c - h])``, the vertical and the horizontal edge
    *centred* at ``(r, c)`` (a "+"; :func:`centered_edge_features`); the logits are then moved to the
    anchor slots below;
  - ``d > 1``, ``"anchor"``: ``cat(F[r + d, c] - F[r, c], F[r, c + d] - F[r, c])``, the two edges
    *starting* at ``(r, c)`` (an "L"; :func:`edge_features`).

  Differences are zero where an edge leaves the grid. Output slots follow the **anchor convention** of
  ``cmt_cops_d2.solvers.graph`` (slot ``(r, c)`` holds the edge that starts at ``(r, c)``) in both
  modes; logits of slots whose edge leaves the grid are set to 0 (no edge there; the loss gives them
  weight 0, the solver ignores them).

  Output: affinity logits ``B x D x 2 x h x w``; a logit is the score of "cut" (endpoints in different
  segments), trained with BCE towards the mapper's ``affinities`` (1 = cut).

Costs (:class:`COPSCosts`)
--------------------------
``node = |w_s| * (-semantic logit) + b_s`` (``B x K x h x w``, lower = preferred; ``w_s`` with its sign,
as the public code, under ``MODEL.COPS.SIGNED_NODE_COST_SCALE``) and
``edge = |w_d| * (-affinity logit) + b_d`` (``B x D x 2 x h x w``, paid when the edge is cut, positive =
attractive), with one ``w_d, b_d`` per distance (``MODEL.COPS.PER_DISTANCE_EDGE_AFFINE``, public code). ``w_s, w_d`` start at 1 and ``b_s, b_d`` at 0 (public code). They receive gradients only
through the AMWC layer (full training stage); in pretraining they are frozen by the meta-architecture.
"""
from typing import Dict, List, Sequence

import fvcore.nn.weight_init as weight_init
import torch
from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.utils.registry import Registry
from detectron2.projects.deeplab import DeepLabV3PlusHead
from detectron2.projects.panoptic_deeplab import PanopticDeepLabSemSegHead
from torch import nn
from torch.nn import functional as F

__all__ = ["COPS_AFFINITY_HEAD_REGISTRY", "build_affinity_head", "COPSSemSegHead", "COPSAffinityHead", "COPSCosts", "edge_features", "centered_edge_features",
           "edge_valid_mask", "EDGE_ALIGNMENTS"]

EDGE_ALIGNMENTS = ("center", "anchor")
PREDICTOR_INITS = ("xavier", "normal")

COPS_AFFINITY_HEAD_REGISTRY = Registry("COPS_AFFINITY_HEAD")
COPS_AFFINITY_HEAD_REGISTRY.__doc__ = """
Affinity branches of COPS: backbone features + stride-4 semantic logits -> "cut" logits
``B x D x 2 x h x w``. Built by name from ``MODEL.COPS.AFFINITY_HEAD.NAME``.
"""


def build_affinity_head(cfg, input_shape) -> nn.Module:
    return COPS_AFFINITY_HEAD_REGISTRY.get(cfg.MODEL.COPS.AFFINITY_HEAD.NAME)(cfg, input_shape)


def edge_features(feat: torch.Tensor, d: int) -> torch.Tensor:
    """Endpoint differences of the edges of distance ``d``, anchor convention.

    Args:
        feat: ``B x C x h x w``.
    Returns:
        ``B x 2C x h x w``: channels ``[:C]`` = ``feat[r + d, c] - feat[r, c]`` (vertical edges),
        ``[C:]`` = ``feat[r, c + d] - feat[r, c]`` (horizontal edges); 0 where ``r + d >= h`` (resp.
        ``c + d >= w``).
    """
    vert = torch.zeros_like(feat)
    hor = torch.zeros_like(feat)
    h, w = feat.shape[-2:]
    if d < h:
        vert[..., : h - d, :] = feat[..., d:, :] - feat[..., : h - d, :]
    if d < w:
        hor[..., :, : w - d] = feat[..., :, d:] - feat[..., :, : w - d]
    return torch.cat([vert, hor], dim=1)


def centered_edge_features(feat: torch.Tensor, d: int) -> torch.Tensor:
    """Endpoint differences of the edges of even distance ``d`` centred at each slot (public COPS).

    Args:
        feat: ``B x C x h x w``.
    Returns:
        ``B x 2C x h x w``: with ``k = d // 2``, channels ``[:C]`` = ``feat[r + k, c] - feat[r - k, c]``
        (vertical edges), ``[C:]`` = ``feat[r, c + k] - feat[r, c - k]`` (horizontal edges); 0 where an
        endpoint leaves the grid.
    """
    if d % 2:
        raise ValueError(f"centred edge features need an even distance, got {d}")
    k = d // 2
    vert = torch.zeros_like(feat)
    hor = torch.zeros_like(feat)
    h, w = feat.shape[-2:]
    if d < h:
        vert[..., k: h - k, :] = feat[..., d:, :] - feat[..., : h - d, :]
    if d < w:
        hor[..., :, k: w - k] = feat[..., :, d:] - feat[..., :, : w - d]
    return torch.cat([vert, hor], dim=1)


def centered_to_anchor_slots(logits: torch.Tensor, d: int) -> torch.Tensor:
    """Move ``B x 2 x h x w`` logits of centred edges (slot = the edge's centre) to anchor slots (slot =
    the edge's first endpoint): vertical ``[r, c] <- [r + d/2, c]``, horizontal ``[r, c] <- [r, c + d/2]``;
    slots without an edge get 0."""
    k = d // 2
    out = torch.zeros_like(logits)
    h, w = logits.shape[-2:]
    if k < h:
        out[:, 0, : h - k, :] = logits[:, 0, k:, :]
    if k < w:
        out[:, 1, :, : w - k] = logits[:, 1, :, k:]
    return out


def edge_valid_mask(h: int, w: int, distances: Sequence[int], device=None) -> torch.Tensor:
    """Bool ``D x 2 x h x w``, True at slots holding an edge (torch twin of ``grid_edge_valid_mask``)."""
    m = torch.zeros((len(distances), 2, h, w), dtype=torch.bool, device=device)
    for i, d in enumerate(distances):
        m[i, 0, : max(h - d, 0), :] = True
        m[i, 1, :, : max(w - d, 0)] = True
    return m


def _conv(cin, cout, k, norm, groups=1):
    conv = Conv2d(cin, cout, kernel_size=k, padding=k // 2, groups=groups, bias=norm == "",
                  norm=get_norm(norm, cout), activation=F.relu)
    weight_init.c2_xavier_fill(conv)
    return conv


class _DistancePredictor(nn.Module):
    """Edge features of one distance -> 2 logits (vertical, horizontal)."""

    def __init__(self, in_channels: int, norm: str, groups: int, predictor_init: str):
        super().__init__()
        c1, c2 = max(in_channels // 4, groups), max(in_channels // 8, groups)
        c1, c2 = c1 - c1 % groups, c2 - c2 % groups
        self.convs = nn.Sequential(_conv(in_channels, c1, 3, norm, groups), _conv(c1, c2, 3, norm, groups))
        self.predictor = Conv2d(c2, 2, kernel_size=1)  # not grouped
        if predictor_init == "xavier":  # public code
            weight_init.c2_xavier_fill(self.predictor)
        else:  # "normal": Panoptic-DeepLab's predictors in Detectron2
            nn.init.normal_(self.predictor.weight, 0, 0.001)
            nn.init.constant_(self.predictor.bias, 0)

    def forward(self, x):
        return self.predictor(self.convs(x))


@SEM_SEG_HEADS_REGISTRY.register()
class COPSSemSegHead(PanopticDeepLabSemSegHead):
    """Panoptic-DeepLab's semantic head with the public COPS head convs: two dense 3x3 conv + norm +
    ReLU after the decoder whether or not the decoder is depthwise separable. Its loss is the DeepLab
    top-k cross-entropy over ``MODEL.COPS.SEMANTIC_TOP_K`` of the pixels."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, decoder_channels: List[int], norm: str,
                 head_channels: int, **kwargs):
        super().__init__(input_shape, decoder_channels=decoder_channels, norm=norm,
                         head_channels=head_channels, **kwargs)
        if self.use_depthwise_separable_conv:   # Detectron2 built one 5x5 separable conv instead
            c = decoder_channels[0]
            self.head = nn.Sequential(_conv(c, c, 3, norm), _conv(c, head_channels, 3, norm))

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.update(loss_type="hard_pixel_mining", loss_top_k=cfg.MODEL.COPS.SEMANTIC_TOP_K)
        return ret


@COPS_AFFINITY_HEAD_REGISTRY.register()
class COPSAffinityHead(DeepLabV3PlusHead):
    """Affinity branch: own DeepLabV3+ decoder, detached semantic logits, per-distance predictors."""

    @configurable
    def __init__(self, input_shape: Dict[str, ShapeSpec], *, decoder_channels: List[int], norm: str,
                 num_classes_semantic: int, head_channels: int, edge_distances: Sequence[int],
                 edge_alignment: str, predictor_init: str, **kwargs):
        """
        Args:
            input_shape, decoder_channels, norm, kwargs: of ``DeepLabV3PlusHead`` (decoder-only).
            num_classes_semantic: K, channels of the semantic logits concatenated to the decoder output.
            head_channels: C, channels of the affinity features (the second conv after the concat; the
                first keeps the decoder's ``decoder_channels[0]``, as the public code).
            edge_distances: the distances d (one predictor each).
            edge_alignment: which two edges a predictor's last 1x1 conv sees at one slot: "center" (the
                vertical and horizontal edge with the same centre, public code; even d > 1) or "anchor"
                (the two edges starting at the same pixel).
            predictor_init: init of each predictor's last 1x1 conv: "xavier" (public code) or "normal"
                (N(0, 0.001) weights, zero bias).
        """
        super().__init__(input_shape, decoder_channels=decoder_channels, norm=norm, num_classes=None, **kwargs)
        assert self.decoder_only
        self.edge_distances = [int(d) for d in edge_distances]
        if edge_alignment not in EDGE_ALIGNMENTS:
            raise ValueError(f"MODEL.COPS.AFFINITY_HEAD.EDGE_ALIGNMENT={edge_alignment!r}: use one of {EDGE_ALIGNMENTS}")
        odd = [d for d in self.edge_distances if d > 1 and d % 2]
        if edge_alignment == "center" and odd:
            raise ValueError(f"MODEL.COPS.EDGE_DISTANCES {self.edge_distances}: {odd} are odd, and an edge of "
                             "odd length has no centre pixel; use even distances (besides 1) or "
                             "MODEL.COPS.AFFINITY_HEAD.EDGE_ALIGNMENT anchor")
        self.edge_alignment = edge_alignment
        if predictor_init not in PREDICTOR_INITS:
            raise ValueError(f"MODEL.COPS.AFFINITY_HEAD.PREDICTOR_INIT={predictor_init!r}: use one of {PREDICTOR_INITS}")
        # As the public code: the first conv keeps the decoder's width (CONVS_DIM), the second gives C.
        c_dec = decoder_channels[0]
        self.head = nn.Sequential(_conv(c_dec + int(num_classes_semantic), c_dec, 3, norm),
                                  _conv(c_dec, head_channels, 3, norm))
        self.predictors = nn.ModuleList(
            [_DistancePredictor(head_channels if d == 1 else 2 * head_channels, norm, 1 if d == 1 else 2,
                                predictor_init) for d in self.edge_distances])

    @classmethod
    def from_config(cls, cfg, input_shape):
        h = cfg.MODEL.COPS.AFFINITY_HEAD
        train_size = cfg.INPUT.CROP.SIZE if cfg.INPUT.CROP.ENABLED else None
        if train_size is not None:
            assert cfg.INPUT.CROP.TYPE == "absolute"
        return dict(
            input_shape={k: v for k, v in input_shape.items() if k in h.IN_FEATURES},
            project_channels=h.PROJECT_CHANNELS,
            aspp_dilations=h.ASPP_DILATIONS,
            aspp_dropout=h.ASPP_DROPOUT,
            decoder_channels=[h.CONVS_DIM] * (len(h.IN_FEATURES) - 1) + [h.ASPP_CHANNELS],
            common_stride=cfg.MODEL.COPS.TARGET_STRIDE,
            norm=h.NORM,
            train_size=train_size,
            use_depthwise_separable_conv=cfg.MODEL.SEM_SEG_HEAD.USE_DEPTHWISE_SEPARABLE_CONV,
            num_classes_semantic=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            head_channels=h.HEAD_CHANNELS,
            edge_distances=cfg.MODEL.COPS.EDGE_DISTANCES,
            edge_alignment=h.EDGE_ALIGNMENT,
            predictor_init=h.PREDICTOR_INIT,
        )

    def affinity_features(self, features: Dict[str, torch.Tensor], sem_logits: torch.Tensor) -> torch.Tensor:
        """``F`` (``B x C x h x w``) from the backbone features and the stride-4 semantic logits."""
        y = super().layers(features)
        if y.shape[-2:] != sem_logits.shape[-2:]:
            raise ValueError(f"affinity decoder output {tuple(y.shape[-2:])} and semantic logits "
                             f"{tuple(sem_logits.shape[-2:])} differ in size")
        return self.head(torch.cat([y, sem_logits.detach()], dim=1))

    def forward(self, features: Dict[str, torch.Tensor], sem_logits: torch.Tensor) -> torch.Tensor:
        """Affinity ("cut") logits ``B x D x 2 x h x w`` at the stride of ``sem_logits``."""
        feat = self.affinity_features(features, sem_logits)
        h, w = feat.shape[-2:]
        outs = []
        for d, pred in zip(self.edge_distances, self.predictors):
            if d == 1:
                outs.append(pred(feat))
            elif self.edge_alignment == "center":
                outs.append(centered_to_anchor_slots(pred(centered_edge_features(feat, d)), d))
            else:
                outs.append(pred(edge_features(feat, d)))
        logits = torch.stack(outs, dim=1)
        return logits * edge_valid_mask(h, w, self.edge_distances, feat.device).to(logits.dtype)


class COPSCosts(nn.Module):
    """Learnable affine maps from logits to AMWC costs: one (scale, offset) pair for the node costs and,
    for the edge costs, one pair per edge distance (``num_distances``, public code) or one shared
    (``num_distances=0``)."""

    def __init__(self, num_distances: int = 0, signed_node_scale: bool = False):
        """
        Args:
            num_distances: one edge affine per distance (> 0), or one shared (0).
            signed_node_scale: node costs ``w_s * (-s) + b_s`` with the scale's sign, as the public code
                (``MODEL.COPS.SIGNED_NODE_COST_SCALE``); default ``|w_s| * (-s) + b_s``.
        """
        super().__init__()
        self.signed_node_scale = bool(signed_node_scale)
        shape = (int(num_distances),) if num_distances else ()
        self.w_s = nn.Parameter(torch.ones(()))
        self.b_s = nn.Parameter(torch.zeros(()))
        self.w_d = nn.Parameter(torch.ones(shape))
        self.b_d = nn.Parameter(torch.zeros(shape))

    def node_costs(self, sem_logits: torch.Tensor) -> torch.Tensor:
        """``B x K x h x w`` class costs (lower = preferred)."""
        scale = self.w_s if self.signed_node_scale else self.w_s.abs()
        return scale * (-sem_logits) + self.b_s

    def edge_costs(self, aff_logits: torch.Tensor) -> torch.Tensor:
        """``B x D x 2 x h x w`` edge costs (paid when cut; positive = attractive)."""
        if self.w_d.dim():
            if self.w_d.numel() != aff_logits.shape[1]:
                raise ValueError(f"{self.w_d.numel()} edge-cost affines for {aff_logits.shape[1]} distances")
            return self.w_d.abs().view(1, -1, 1, 1, 1) * (-aff_logits) + self.b_d.view(1, -1, 1, 1, 1)
        return self.w_d.abs() * (-aff_logits) + self.b_d

    def forward(self, sem_logits: torch.Tensor, aff_logits: torch.Tensor):
        return self.node_costs(sem_logits), self.edge_costs(aff_logits)
