"""COPS meta-architecture (paper Sec. 3-4): R-50 DeepLab backbone, semantic + affinity branches, AMWC.

**Training (pretraining stage, paper Sec. 4 "Baseline pre-training").** Inputs come from
``COPSPanopticMapper`` (``INPUT.DATASET_MAPPER_NAME: cops_panoptic``). Losses:

* ``loss_sem_seg``: DeepLab top-k cross-entropy (``DeepLabCE``, top ``MODEL.COPS.SEMANTIC_TOP_K`` of the
  pixels) of the x4-upsampled semantic logits, weighted by ``sem_seg_weights``, times
  ``MODEL.SEM_SEG_HEAD.LOSS_WEIGHT``;
* ``loss_affinity_d{d}`` per distance: for each direction, BCE-with-logits of the "cut" logits against
  ``affinities``, times ``affinity_weights``, top ``MODEL.COPS.AFFINITY_TOP_K`` of the batch-flattened
  map, mean; summed over the two directions, times ``MODEL.COPS.AFFINITY_LOSS_WEIGHT``.

Targets are zero-padded (weight 0) to the padded input's grid. The cost affines
(``costs.{w_s,b_s,w_d,b_d}``) get no gradient from these losses; only the full training stage trains
them, so they are frozen (``requires_grad=False``): every trainable parameter then receives a gradient
(DDP-safe).

**Training (full stage, ``MODEL.COPS.STAGE: full``, paper Sec. 3.3 and 4.2 "Full training").** Only
``loss_pq``, the PQ surrogate (eq. 6) of the AMWC solution, differentiated with Algorithm 1 and the
robust average of eq. (4):

1. node costs ``|w_s| * (-s) + b_s`` and edge costs ``|w_d| * (-a) + b_d``, per distance (``self.costs``); during
   training each pixel's node costs (all classes) and each edge cost are zeroed with probability
   ``MODEL.COPS.COST_DROPOUT`` (no rescaling, as the public code);
2. per image, on the mapper's stride-4 target grid (``panoptic``, the top-left cells of the padded
   grid): ``amwc_layer`` with ``pixel_weights = panoptic_weights`` (0 at void / crowd, so those pixels
   and their edges get no gradient), ``partitionable`` = thing classes and one extra (false-negative)
   slot per GT segment (``panoptic_classes``); images of equal grid size are solved in one call
   (one thread per image forward, ``B * N`` MWC problems backward);
3. :func:`loss_slots`: the loss sees the predicted segments and, per class, only as many extra slots
   as the class has GT segments without a prediction (``max(0, G_c - P_c)``); an empty slot is no false
   positive (:mod:`.pq_surrogate`, choice 8); the dropped ones get no gradient and do not enter the
   lifted MWC label space;
4. :func:`~.pq_surrogate.pq_sums_single_image` against the GT segments (one mask per ``panoptic``
   index, weights ``panoptic_weights``, thresholds ``MODEL.COPS.{THING,STUFF}_AREA / stride**2``),
   pooled over the batch, ``loss_pq = PQ_LOSS_WEIGHT * (1 - mean_l PQ_l)``.

Frozen (paper Sec. 4.2): everything except the parameters matched by ``MODEL.COPS.FULL_TRAINABLE``
(default: semantic head + predictor, affinity head + per-distance classifiers, cost affines), and every
batch norm, also inside those modules: its parameters have ``requires_grad=False`` and the module stays
in eval mode (running statistics fixed) even after ``model.train()``. :meth:`COPS.param_lr_multipliers`
gives the per-stage learning-rate factors ``MODEL.COPS.FULL_LR_MULTIPLIERS`` to the optimizer.

**Cost scale.** The AMWC solution does not change when all costs are scaled by ``a > 0``, and eq. (3)
gives ``dL/d|w_s| = <x_p - x, theta - b_s> / (lambda |w_s|)``, mostly ``>= 0`` because ``x`` minimises
the energy: descent shrinks ``|w_s|`` (and ``|w_d|``), which widens the interpolation. Both scales enter
through their absolute value, so a step through 0 cannot turn the node costs around (with a signed
``w_s``, as in the public code, the costs then prefer the least likely class: on the synthetic tiny run
``w_s`` went 1 -> 0.68 in 1000 iterations at ``SOLVER.BASE_LR`` 1e-3, but below 0 after about 200 at
5e-3, and PQ fell to 0). A warning is logged when ``|w_s|`` falls below 0.01: the node costs have
then almost vanished; lower the learning rate of ``costs.w_s``.

**All-void images** (``panoptic_weights`` all 0: nothing to match, every gradient would be masked) are
skipped: not solved, no contribution to the loss. If every image of the batch is void, ``loss_pq`` is
``0 * (sum of the costs)``: exactly zero, yet connected to every trainable parameter, so each gets a
(zero) gradient and DistributedDataParallel does not wait for missing ones.

**Inference.** Node costs ``|w_s| * (-s) + b_s`` and edge costs ``|w_d| * (-a) + b_d`` per distance (positive =
attractive) on the stride-4 grid of each image (``ceil(H / 4) x ceil(W / 4)`` cells of the padded grid),
``solve_amwc_batch`` with ``partitionable`` = thing classes of the metadata, then (notes Sec. 1a): every
stuff class present gives one segment; every AMWC cluster of a thing class gives one segment, clusters
with fewer than ``MODEL.COPS.MIN_THING_CLUSTER_SIZE`` grid pixels become void. The grid map is upsampled
(nearest, x4) and cropped to the input size; with ``MODEL.COPS.INFERENCE_AREA_GATE`` (default) thing
segments under ``THING_AREA`` and stuff segments under ``STUFF_AREA`` pixels (the surrogate's size gates,
here at the input resolution) become void (:func:`void_small_segments`); then the map is resized
(nearest) to the requested ``height x width``.

Output per image (Detectron2 format), as the public code reports it:

* ``panoptic_seg = (ids int32 H x W, 0 = void, segments_info)`` with ``segments_info`` =
  ``[{"id", "category_id" (contiguous), "isthing"}]``;
* ``sem_seg``: K x H x W one-hot of the AMWC node labels (the solver's semantic labelling, so mIoU scores
  the same labelling as PQ; segments voided by the size gate keep their label here);
* ``instances`` (``MODEL.COPS.PREDICT_INSTANCES``): one per thing segment, ``pred_masks``,
  ``pred_boxes``, ``pred_classes`` and ``scores`` = the mean semantic logit of its class over the mask
  plus :func:`affinity_mask_score` (boundary-minus-interior "cut" logits), for instance AP.
"""
import fnmatch
import logging
import os
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import BitMasks, ImageList, Instances
from detectron2.utils.events import get_event_storage
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ...solvers import edge_maps_to_flat, grid_edges, solve_amwc_batch
from .amwc_layer import AMWCSettings, amwc_layer
from .heads import COPSAffinityHead, COPSCosts, COPSSemSegHead
from .pq_surrogate import area_thresholds_from_isthing, pool_pq_sums, pq_sums_single_image, pq_surrogate_loss

__all__ = ["COPS", "STAGES", "affinity_losses", "loss_slots", "panoptic_from_solution", "void_small_segments",
           "affinity_mask_score"]

STAGES = ("pretrain", "full")


def affinity_losses(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                    distances: Sequence[int], top_k: float, loss_weight: float) -> Dict[str, torch.Tensor]:
    """Weighted top-k BCE per distance (sum over the two directions), ``B x D x 2 x h x w`` inputs."""
    losses = {}
    for k, d in enumerate(distances):
        total = logits.new_zeros(())
        for ch in range(2):
            pix = F.binary_cross_entropy_with_logits(logits[:, k, ch], targets[:, k, ch], reduction="none")
            pix = (pix * weights[:, k, ch]).reshape(-1)
            if top_k < 1.0:
                pix, _ = torch.topk(pix, max(int(top_k * pix.numel()), 1))
            total = total + pix.mean()
        losses[f"loss_affinity_d{d}"] = total * loss_weight
    return losses


def panoptic_from_solution(labels: np.ndarray, clusters: np.ndarray, is_thing: np.ndarray,
                           min_thing_size: int) -> Tuple[np.ndarray, List[dict]]:
    """Segments of an AMWC solution on a grid (notes Sec. 1a).

    Args:
        labels: ``h x w`` class per grid pixel; clusters: ``h x w`` AMWC cluster id per grid pixel.
        is_thing: ``(K,)`` bool; min_thing_size: thing clusters with fewer pixels become void.
    Returns:
        ``h x w`` int32 segment ids (0 = void, 1.. in order of class, then of the cluster's first pixel)
        and the Detectron2 ``segments_info``.
    """
    pan = np.zeros(labels.shape, np.int32)
    infos: List[dict] = []
    flat_l, flat_c = labels.reshape(-1), clusters.reshape(-1)
    for cls in np.unique(flat_l):
        in_cls = flat_l == cls
        if not is_thing[cls]:
            infos.append({"id": len(infos) + 1, "category_id": int(cls), "isthing": False})
            pan.reshape(-1)[in_cls] = len(infos)
            continue
        ids, first, counts = np.unique(flat_c[in_cls], return_index=True, return_counts=True)
        for cid in ids[np.argsort(first, kind="stable")]:
            if counts[np.searchsorted(ids, cid)] < min_thing_size:
                continue
            infos.append({"id": len(infos) + 1, "category_id": int(cls), "isthing": True})
            pan.reshape(-1)[in_cls & (flat_c == cid)] = len(infos)
    return pan, infos


def void_small_segments(pan: torch.Tensor, infos: List[dict], thing_area: float,
                        stuff_area: float) -> Tuple[torch.Tensor, List[dict]]:
    """The size gate at inference (paper Sec. 4.1, public code): a thing segment with fewer than
    ``thing_area`` pixels, a stuff segment with fewer than ``stuff_area``, becomes void (id 0).

    Args:
        pan: ``H x W`` segment ids at the network's input resolution; infos: its ``segments_info``.
    Returns:
        the map with the rejected segments set to 0 and the ``segments_info`` of the kept ones (ids
        unchanged).
    """
    if not infos:
        return pan, infos
    areas = torch.bincount(pan.reshape(-1).long(), minlength=max(s["id"] for s in infos) + 1).tolist()
    kept, dropped = [], []
    for s in infos:
        (kept if areas[s["id"]] >= (thing_area if s["isthing"] else stuff_area) else dropped).append(s)
    if dropped:
        pan = pan.clone()
        pan[torch.isin(pan, torch.tensor([s["id"] for s in dropped], device=pan.device))] = 0
    return pan, kept


def affinity_mask_score(mask: torch.Tensor, aff_logits: torch.Tensor, distances: Sequence[int]) -> torch.Tensor:
    """The affinity part of the public COPS mask score: per distance, the mean over all ``2 h w`` slots of
    the "cut" logits on the mask's boundary edges (one endpoint inside) minus the mean on its inner
    edges (both inside), summed over the distances. Higher = a more confident segment.

    Args:
        mask: ``h x w`` bool, the segment on the grid of ``aff_logits``.
        aff_logits: ``D x 2 x h x w`` (anchor convention: slot (r, c) holds the edges starting there).
    """
    m = mask.to(aff_logits.dtype)
    h, w = m.shape
    score = aff_logits.new_zeros(())
    for k, d in enumerate(distances):
        cut = torch.zeros_like(aff_logits[k])
        inner = torch.zeros_like(aff_logits[k])
        if d < h:
            cut[0, : h - d] = (m[d:] - m[: h - d]).abs()
            inner[0, : h - d] = m[d:] * m[: h - d]
        if d < w:
            cut[1, :, : w - d] = (m[:, d:] - m[:, : w - d]).abs()
            inner[1, :, : w - d] = m[:, d:] * m[:, : w - d]
        score = score + (aff_logits[k] * cut).mean() - (aff_logits[k] * inner).mean()
    return score


def loss_slots(segment_classes: np.ndarray, segment_is_pred: np.ndarray, gt_classes: np.ndarray) -> np.ndarray:
    """Slots of one image that enter the PQ surrogate: every predicted slot, and per class ``c`` the
    first ``max(0, G_c - P_c)`` extra (empty) slots of class ``c`` (``G_c`` GT segments, ``P_c``
    predicted slots of class ``c``), enough for every GT segment of ``c`` to be matched.

    Args:
        segment_classes: ``(S,)`` class of each slot, -1 on padding (``AMWCOutput.segment_classes[b]``).
        segment_is_pred: ``(S,)`` bool, True for predicted slots.
        gt_classes: ``(G,)`` class of each GT segment of the image.
    Returns:
        sorted slot indices (int64).
    """
    segment_classes = np.asarray(segment_classes)
    segment_is_pred = np.asarray(segment_is_pred, bool)
    keep = np.flatnonzero(segment_is_pred).tolist()
    need = Counter(np.asarray(gt_classes).tolist())
    need.subtract(Counter(segment_classes[segment_is_pred].tolist()))
    for s in np.flatnonzero((segment_classes >= 0) & ~segment_is_pred).tolist():
        c = int(segment_classes[s])
        if need[c] > 0:
            keep.append(s)
            need[c] -= 1
    return np.asarray(sorted(keep), np.int64)


def _put_scalars(**kv):
    """Log to the current EventStorage, if any (training under a Detectron2 trainer)."""
    try:
        storage = get_event_storage()
    except AssertionError:
        return
    storage.put_scalars(**kv, smoothing_hint=False)


def _pad_grid(tensors: List[torch.Tensor], h: int, w: int) -> torch.Tensor:
    """Zero-pad ``(..., h_i, w_i)`` tensors to ``(..., h, w)`` and stack."""
    return torch.stack([F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2])) for t in tensors])


@META_ARCH_REGISTRY.register()
class COPS(nn.Module):
    """COPS: semantic + affinity CNN and the asymmetric multiway cut (see the module doc)."""

    @configurable
    def __init__(self, *, backbone: nn.Module, sem_seg_head: nn.Module, affinity_head: COPSAffinityHead,
                 pixel_mean, pixel_std, size_divisibility: int, target_stride: int,
                 edge_distances: Sequence[int], thing_ids: Sequence[int], num_classes: int,
                 affinity_loss_weight: float, affinity_top_k: float, min_thing_cluster_size: int,
                 solver_threads: int, stage: str = "pretrain", amwc_settings: Optional[AMWCSettings] = None,
                 pq_loss_weight: float = 10.0, thing_area: float = 200.0, stuff_area: float = 4096.0,
                 inference_area_gate: bool = True, predict_instances: bool = True,
                 per_distance_edge_affine: bool = True, cost_dropout: float = 0.1,
                 full_trainable: Sequence[str] = (), full_lr_multipliers: Sequence[float] = ()):
        """
        Args (besides the modules and the pretraining / inference settings):
            stage: ``MODEL.COPS.STAGE``, "pretrain" or "full" (module doc).
            amwc_settings: the AMWC layer's backward settings (lambda interval, N, threads).
            pq_loss_weight: factor of the PQ surrogate loss.
            thing_area, stuff_area: size-gate thresholds at full resolution (divided by stride**2).
            inference_area_gate: void smaller segments at inference too (:func:`void_small_segments`).
            predict_instances: add the ``instances`` output (thing segments with the public mask score).
            per_distance_edge_affine: one edge-cost scale and offset per distance (else one shared).
            cost_dropout: probability of zeroing a pixel's node costs / an edge cost (full stage).
            full_trainable: parameter-name patterns trained in the full stage.
            full_lr_multipliers: learning-rate factor of each pattern (same length).
        """
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.affinity_head = affinity_head
        self.costs = COPSCosts(len(edge_distances) if per_distance_edge_affine else 0)
        if stage not in STAGES:
            raise ValueError(f"MODEL.COPS.STAGE must be one of {STAGES}, got {stage!r}")
        self.stage = stage
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.size_divisibility = size_divisibility or getattr(backbone, "size_divisibility", 0)
        self.target_stride = int(target_stride)
        self.edge_distances = [int(d) for d in edge_distances]
        self.is_thing = np.zeros(num_classes, bool)
        self.is_thing[list(thing_ids)] = True
        self.affinity_loss_weight = affinity_loss_weight
        self.affinity_top_k = affinity_top_k
        self.min_thing_cluster_size = int(min_thing_cluster_size)
        self.solver_threads = int(solver_threads) or (os.cpu_count() or 1)
        if self.size_divisibility % self.target_stride:
            raise ValueError(f"size divisibility {self.size_divisibility} must be a multiple of "
                             f"MODEL.COPS.TARGET_STRIDE {self.target_stride}")
        self._edges_cache: Dict[Tuple[int, int], np.ndarray] = {}
        # ---- full stage ----
        self.amwc_settings = amwc_settings if amwc_settings is not None else AMWCSettings(
            num_threads=self.solver_threads, seed=torch.initial_seed())
        if not pq_loss_weight > 0:
            raise ValueError(f"MODEL.COPS.PQ_LOSS_WEIGHT must be > 0, got {pq_loss_weight}")
        if not 0.0 <= cost_dropout < 1.0:
            raise ValueError(f"MODEL.COPS.COST_DROPOUT must lie in [0, 1), got {cost_dropout}")
        if not (thing_area >= 0 and stuff_area >= 0):
            raise ValueError(f"MODEL.COPS.THING_AREA / STUFF_AREA must be >= 0, got {thing_area}, {stuff_area}")
        self.pq_loss_weight = float(pq_loss_weight)
        self.thing_area, self.stuff_area = float(thing_area), float(stuff_area)
        self.inference_area_gate = bool(inference_area_gate)
        self.predict_instances = bool(predict_instances)
        self.cost_dropout = float(cost_dropout)
        self.register_buffer("area_thresholds", area_thresholds_from_isthing(
            self.is_thing, thing_area, stuff_area, self.target_stride, dtype=torch.float32), False)
        self._lr_multipliers: Dict[str, float] = {}
        self._warned_w_s = False
        if self.stage == "pretrain":
            # The affines are trained only through the AMWC layer (full stage).
            self.costs.requires_grad_(False)
        else:
            self._freeze_for_full_stage(list(full_trainable), list(full_lr_multipliers))
        self.train(self.training)

    def _freeze_for_full_stage(self, patterns: List[str], multipliers: List[float]) -> None:
        """requires_grad only for parameters matched by ``patterns`` and not in a batch norm; records the
        learning-rate factor of each (first matching pattern)."""
        if not patterns:
            raise ValueError("MODEL.COPS.FULL_TRAINABLE is empty: the full stage would train nothing")
        if len(multipliers) != len(patterns):
            raise ValueError(f"MODEL.COPS.FULL_LR_MULTIPLIERS has {len(multipliers)} entries but "
                             f"MODEL.COPS.FULL_TRAINABLE has {len(patterns)}; give one factor per entry")
        if any(not m > 0 for m in multipliers):
            raise ValueError(f"MODEL.COPS.FULL_LR_MULTIPLIERS must be positive, got {multipliers}")
        bn_params = {id(p) for m in self.modules() if isinstance(m, _BatchNorm) for p in m.parameters()}
        matched = [0] * len(patterns)
        for name, p in self.named_parameters():
            p.requires_grad_(False)
            for i, pat in enumerate(patterns):
                if fnmatch.fnmatchcase(name, pat) or fnmatch.fnmatchcase(name, pat + ".*"):
                    matched[i] += 1
                    if id(p) not in bn_params:
                        p.requires_grad_(True)
                        self._lr_multipliers[name] = float(multipliers[i])
                    break
        missing = [pat for pat, n in zip(patterns, matched) if n == 0]
        if missing:
            raise ValueError(f"MODEL.COPS.FULL_TRAINABLE entries {missing} match no parameter of the model "
                             "(patterns are fnmatch patterns of parameter names, e.g. 'sem_seg_head.head')")
        if not self._lr_multipliers:
            raise ValueError("MODEL.COPS.FULL_TRAINABLE matches only batch-norm parameters, which the full "
                             "stage freezes: nothing to train")

    def param_lr_multipliers(self) -> Dict[str, float]:
        """Learning-rate factor per trainable parameter name (full stage; empty in pretraining), read by
        ``cmt_cops_d2.engine.optimizer``."""
        return dict(self._lr_multipliers)

    def train(self, mode: bool = True):
        """``nn.Module.train``; in the full stage every batch norm stays in eval mode (frozen statistics,
        paper Sec. 4.2)."""
        super().train(mode)
        if self.stage == "full":
            for m in self.modules():
                if isinstance(m, _BatchNorm):
                    m.eval()
        return self

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.COPS
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        if cfg.MODEL.SEM_SEG_HEAD.NAME != "COPSSemSegHead":
            raise ValueError(f"MODEL.SEM_SEG_HEAD.NAME={cfg.MODEL.SEM_SEG_HEAD.NAME!r}: COPS builds its "
                             "semantic branch as 'COPSSemSegHead' (the public COPS head, with the loss of "
                             "MODEL.COPS.SEMANTIC_TOP_K); set MODEL.SEM_SEG_HEAD.NAME COPSSemSegHead")
        sem_seg_head = COPSSemSegHead(cfg, shapes)
        if sem_seg_head.common_stride != c.TARGET_STRIDE:
            raise ValueError("MODEL.SEM_SEG_HEAD.COMMON_STRIDE must equal MODEL.COPS.TARGET_STRIDE")
        meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "affinity_head": COPSAffinityHead(cfg, shapes),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "size_divisibility": c.SIZE_DIVISIBILITY,
            "target_stride": c.TARGET_STRIDE,
            "edge_distances": c.EDGE_DISTANCES,
            "thing_ids": list(meta.thing_dataset_id_to_contiguous_id.values()),
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "affinity_loss_weight": c.AFFINITY_LOSS_WEIGHT,
            "affinity_top_k": c.AFFINITY_TOP_K,
            "min_thing_cluster_size": c.MIN_THING_CLUSTER_SIZE,
            "solver_threads": c.SOLVER_THREADS,
            "stage": c.STAGE,
            "amwc_settings": cls._amwc_settings_from_config(cfg),
            "pq_loss_weight": c.PQ_LOSS_WEIGHT,
            "thing_area": c.THING_AREA,
            "stuff_area": c.STUFF_AREA,
            "inference_area_gate": c.INFERENCE_AREA_GATE,
            "predict_instances": c.PREDICT_INSTANCES,
            "per_distance_edge_affine": c.PER_DISTANCE_EDGE_AFFINE,
            "cost_dropout": c.COST_DROPOUT,
            "full_trainable": list(c.FULL_TRAINABLE),
            "full_lr_multipliers": list(c.FULL_LR_MULTIPLIERS),
        }

    @staticmethod
    def _amwc_settings_from_config(cfg) -> AMWCSettings:
        c = cfg.MODEL.COPS
        try:
            # lambdas from a generator seeded by torch's seed (Detectron2 seeds it per process).
            return AMWCSettings(num_samples=int(c.NUM_LAMBDA_SAMPLES), lambda_min=c.LAMBDA_MIN,
                                lambda_max=c.LAMBDA_MAX, num_threads=int(c.SOLVER_THREADS) or None,
                                seed=torch.initial_seed())
        except ValueError as e:
            raise ValueError(f"MODEL.COPS.LAMBDA_MIN / LAMBDA_MAX / NUM_LAMBDA_SAMPLES: {e}") from None

    @property
    def device(self):
        return self.pixel_mean.device

    def predict_logits(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Stride-4 semantic logits ``B x K x h x w`` and affinity logits ``B x D x 2 x h x w``."""
        features = self.backbone(images)
        sem_logits = self.sem_seg_head.layers(features)
        return sem_logits, self.affinity_head(features, sem_logits)

    def forward(self, batched_inputs: List[dict]):
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.size_divisibility)
        sem_logits, aff_logits = self.predict_logits(images.tensor)
        if self.training:
            if self.stage == "full":
                return self.full_stage_losses(sem_logits, aff_logits, batched_inputs)
            return self.losses(sem_logits, aff_logits, batched_inputs, images)
        return self.inference(sem_logits, aff_logits, batched_inputs, images)

    def losses(self, sem_logits, aff_logits, batched_inputs, images: ImageList) -> Dict[str, torch.Tensor]:
        need = ("sem_seg", "sem_seg_weights", "affinities", "affinity_weights")
        if any(k not in batched_inputs[0] for k in need):
            raise ValueError(f"COPS training needs {need} in each input; use INPUT.DATASET_MAPPER_NAME "
                             "cops_panoptic")
        sd = self.size_divisibility
        ignore = self.sem_seg_head.ignore_value
        sem_t = ImageList.from_tensors([x["sem_seg"].to(self.device) for x in batched_inputs], sd, ignore).tensor
        sem_w = ImageList.from_tensors([x["sem_seg_weights"].to(self.device) for x in batched_inputs], sd).tensor
        losses = dict(self.sem_seg_head.losses(sem_logits, sem_t, sem_w))
        h, w = aff_logits.shape[-2:]
        aff_t = _pad_grid([x["affinities"].to(self.device).float() for x in batched_inputs], h, w)
        aff_w = _pad_grid([x["affinity_weights"].to(self.device).float() for x in batched_inputs], h, w)
        losses.update(affinity_losses(aff_logits, aff_t, aff_w, self.edge_distances, self.affinity_top_k,
                                      self.affinity_loss_weight))
        return losses

    def dropout_costs(self, node_costs: torch.Tensor, edge_costs: torch.Tensor):
        """Cost dropout (training, full stage): zero all class costs of a pixel / an edge cost with
        probability ``cost_dropout``, no rescaling (public code's ``DropoutPixels`` and edge dropout)."""
        p = self.cost_dropout
        if p <= 0:
            return node_costs, edge_costs
        B, _, h, w = node_costs.shape
        keep_px = (torch.rand((B, 1, h, w), device=node_costs.device) >= p).to(node_costs.dtype)
        keep_e = (torch.rand(edge_costs.shape, device=edge_costs.device) >= p).to(edge_costs.dtype)
        return node_costs * keep_px, edge_costs * keep_e

    def full_stage_losses(self, sem_logits, aff_logits, batched_inputs) -> Dict[str, torch.Tensor]:
        """``{"loss_pq": ...}``: PQ surrogate (eq. 6) of the AMWC solution on each image's target grid
        (see the module doc)."""
        need = ("panoptic", "panoptic_classes", "panoptic_weights")
        if any(k not in x for x in batched_inputs for k in need):
            raise ValueError(f"COPS full-stage training needs {need} in each input; use "
                             "INPUT.DATASET_MAPPER_NAME cops_panoptic")
        node_costs, edge_costs = self.costs(sem_logits, aff_logits)
        node_costs, edge_costs = self.dropout_costs(node_costs, edge_costs)
        hp, wp = node_costs.shape[-2:]
        groups: Dict[Tuple[int, int], List[int]] = {}
        for b, x in enumerate(batched_inputs):
            h, w = x["panoptic"].shape
            if h > hp or w > wp:
                raise ValueError(f"target grid {h}x{w} of image {b} exceeds the network output {hp}x{wp}")
            if bool((x["panoptic_weights"] > 0).any()):  # all-void images are skipped (module doc)
                groups.setdefault((h, w), []).append(b)
        sums = []
        for (h, w), idx in groups.items():
            gts = [batched_inputs[b] for b in idx]
            out = amwc_layer(
                node_costs[idx, :, :h, :w], edge_costs[idx, :, :, :h, :w], self.edge_distances, self.is_thing,
                pixel_weights=torch.stack([x["panoptic_weights"] for x in gts]).to(node_costs),
                extra_slot_classes=[x["panoptic_classes"] for x in gts], settings=self.amwc_settings)
            seg_cls = out.segment_classes.cpu().numpy()
            is_pred = out.segment_is_pred.cpu().numpy()
            for j, x in enumerate(gts):
                gt_cls = x["panoptic_classes"].to(self.device)
                keep = torch.from_numpy(loss_slots(seg_cls[j], is_pred[j], gt_cls.cpu().numpy())).to(self.device)
                pan = x["panoptic"].to(self.device)
                gt_masks = pan[None] == torch.arange(len(gt_cls), device=self.device)[:, None, None]
                sums.append(pq_sums_single_image(
                    out.segments[j, keep], out.segment_classes[j, keep], gt_masks, gt_cls,
                    x["panoptic_weights"].to(self.device), self.is_thing,
                    area_thresholds=self.area_thresholds))
        if not sums:  # every image void: zero loss, still connected to every trainable parameter
            loss = (node_costs.sum() + edge_costs.sum()) * 0.0
        else:
            loss = pq_surrogate_loss(pool_pq_sums(sums), weight=self.pq_loss_weight)
        w_s = self.costs.w_s.item()
        scalars = {"cops/w_s": w_s, "cops/b_s": self.costs.b_s.item()}
        if self.costs.w_d.dim():
            for d, wd, bd in zip(self.edge_distances, self.costs.w_d.tolist(), self.costs.b_d.tolist()):
                scalars.update({f"cops/w_d{d}": wd, f"cops/b_d{d}": bd})
        else:
            scalars.update({"cops/w_d": self.costs.w_d.item(), "cops/b_d": self.costs.b_d.item()})
        _put_scalars(**scalars)
        if abs(w_s) < 0.01 and not self._warned_w_s:
            # Module doc, "Cost scale": eq. (3) pushes |w_s| down; too large a learning rate drives it to 0.
            logging.getLogger(__name__).warning(
                f"costs.w_s = {w_s:.4g}: the node costs have almost vanished; lower SOLVER.BASE_LR or the "
                "costs.w_s entry of MODEL.COPS.FULL_LR_MULTIPLIERS")
            self._warned_w_s = True
        return {"loss_pq": loss}

    def _edges(self, h: int, w: int) -> np.ndarray:
        key = (h, w)
        if key not in self._edges_cache:
            self._edges_cache[key] = grid_edges(h, w, self.edge_distances)
        return self._edges_cache[key]

    def solve(self, node_costs: torch.Tensor, edge_costs: torch.Tensor, grid_sizes: Sequence[Tuple[int, int]]):
        """AMWC per image on the top-left ``grid_sizes[b]`` cells; returns ``[(labels h x w, clusters h x w)]``."""
        theta = node_costs.detach().double().cpu().numpy()
        cost = edge_costs.detach().double().cpu().numpy()
        problems = []
        for b, (h, w) in enumerate(grid_sizes):
            nodes = np.ascontiguousarray(theta[b, :, :h, :w].reshape(theta.shape[1], -1).T)
            edges = edge_maps_to_flat(np.ascontiguousarray(cost[b, :, :, :h, :w]), self.edge_distances)
            problems.append((nodes, self._edges(h, w), edges, self.is_thing))
        results = solve_amwc_batch(problems, num_threads=self.solver_threads)
        return [(lab.reshape(h, w), cid.reshape(h, w)) for (lab, cid, _), (h, w) in zip(results, grid_sizes)]

    @torch.no_grad()
    def inference(self, sem_logits, aff_logits, batched_inputs, images: ImageList) -> List[dict]:
        s = self.target_stride
        node_costs, edge_costs = self.costs(sem_logits, aff_logits)
        grid_sizes = [(-(-H // s), -(-W // s)) for H, W in images.image_sizes]
        solutions = self.solve(node_costs, edge_costs, grid_sizes)
        sem_up = F.interpolate(sem_logits, scale_factor=s, mode="bilinear", align_corners=False)
        results = []
        for b, (x, (H, W), (labels, clusters)) in enumerate(zip(batched_inputs, images.image_sizes, solutions)):
            out_h, out_w = x.get("height", H), x.get("width", W)

            def to_output(grid: torch.Tensor) -> torch.Tensor:
                """Grid map -> input resolution (nearest, x stride, cropped) -> requested size (nearest)."""
                full = grid.repeat_interleave(s, 0).repeat_interleave(s, 1)[:H, :W]
                if (out_h, out_w) != (H, W):
                    full = F.interpolate(full[None, None].float(), size=(out_h, out_w), mode="nearest")[0, 0]
                return full

            pan, infos = panoptic_from_solution(labels, clusters, self.is_thing, self.min_thing_cluster_size)
            grid_pan = torch.from_numpy(pan).to(self.device)
            pan = grid_pan.repeat_interleave(s, 0).repeat_interleave(s, 1)[:H, :W]
            if self.inference_area_gate:
                pan, infos = void_small_segments(pan, infos, self.thing_area, self.stuff_area)
            if (out_h, out_w) != (H, W):
                pan = F.interpolate(pan[None, None].float(), size=(out_h, out_w), mode="nearest")[0, 0]
            node_labels = to_output(torch.from_numpy(labels).to(self.device)).long()
            result = {"panoptic_seg": (pan.to(torch.int32), infos),
                      "sem_seg": F.one_hot(node_labels, len(self.is_thing)).permute(2, 0, 1).float()}
            if self.predict_instances:
                logits = sem_seg_postprocess(sem_up[b], (H, W), out_h, out_w)
                result["instances"] = self._instances(pan, infos, grid_pan, logits, aff_logits[b])
            results.append(result)
        return results

    def _instances(self, pan: torch.Tensor, infos: List[dict], grid_pan: torch.Tensor,
                   sem_logits: torch.Tensor, aff_logits: torch.Tensor) -> Instances:
        """Thing segments as ``Instances`` (instance AP), scored as the public code: the mean semantic
        logit of the segment's class over its pixels plus :func:`affinity_mask_score` on the grid."""
        things = [seg for seg in infos if seg["isthing"]]
        out = Instances(tuple(pan.shape))
        masks = torch.stack([pan == seg["id"] for seg in things]) if things else \
            torch.zeros((0, *pan.shape), dtype=torch.bool, device=pan.device)
        h, w = aff_logits.shape[-2:]
        scores = []
        for seg, mask in zip(things, masks):
            grid_mask = F.pad(grid_pan == seg["id"], (0, w - grid_pan.shape[1], 0, h - grid_pan.shape[0]))
            scores.append(sem_logits[seg["category_id"]][mask].mean()
                          + affinity_mask_score(grid_mask, aff_logits, self.edge_distances))
        out.pred_masks = masks
        out.pred_boxes = BitMasks(masks).get_bounding_boxes()
        out.pred_classes = torch.tensor([seg["category_id"] for seg in things], dtype=torch.int64,
                                        device=pan.device)
        out.scores = torch.stack(scores) if scores else torch.zeros(0, device=pan.device)
        return out
