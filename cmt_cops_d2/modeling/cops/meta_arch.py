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
   slot per GT segment (``panoptic_classes``); thing clusters under ``MODEL.COPS.MIN_THING_CLUSTER_SIZE``
   grid pixels get no slot (the public code's ``IGNORE_INSTANCE_SIZE_AMC // 4``, as at inference); images
   of equal grid size are solved in one call (one thread per image forward, ``B * N`` MWC problems
   backward);
3. :func:`.criterion.loss_slots`: the loss sees the predicted segments and, per class, only as many extra slots
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
5e-3, and PQ fell to 0). ``MODEL.COPS.SIGNED_NODE_COST_SCALE True`` uses ``w_s`` with its sign, as the
public code (needed only for a public checkpoint whose stored scale is negative). A warning is logged
when ``|w_s|`` falls below 0.01: the node costs have then almost vanished; lower the learning rate of
``costs.w_s``.

**All-void images** (``panoptic_weights`` all 0: nothing to match, every gradient would be masked) are
skipped: not solved, no contribution to the loss. If every image of the batch is void, ``loss_pq`` is
``0 * (sum of the costs)``: exactly zero, yet connected to every trainable parameter, so each gets a
(zero) gradient and DistributedDataParallel does not wait for missing ones.

**Inference.** Node costs ``|w_s| * (-s) + b_s`` and edge costs ``|w_d| * (-a) + b_d`` per distance (positive =
attractive) on the stride-4 grid of each image (``ceil(H / 4) x ceil(W / 4)`` cells of the padded grid),
``solve_amwc_maps`` (the solver entry the AMWC layer uses too) with ``partitionable`` = thing classes of the metadata, then (notes Sec. 1a): every
stuff class present gives one segment; every AMWC cluster of a thing class gives one segment, clusters
with fewer than ``MODEL.COPS.MIN_THING_CLUSTER_SIZE`` grid pixels become void. The grid map is upsampled
(nearest, x4) and cropped to the input size; with ``MODEL.COPS.INFERENCE_AREA_GATE`` (default) thing
segments under ``THING_AREA`` and stuff segments under ``STUFF_AREA`` pixels (the surrogate's size gates,
here at the input resolution) become void (:func:`.postprocess.void_small_segments`); then the map is resized
(nearest) to the requested ``height x width``.

Output per image (Detectron2 format), as the public code reports it:

* ``panoptic_seg = (ids int32 H x W, 0 = void, segments_info)`` with ``segments_info`` =
  ``[{"id", "category_id" (contiguous), "isthing"}]``;
* ``sem_seg``: K x H x W one-hot of the AMWC node labels (the solver's semantic labelling, so mIoU scores
  the same labelling as PQ; segments voided by the size gate keep their label here);
* ``instances`` (``MODEL.COPS.PREDICT_INSTANCES``): one per thing segment, ``pred_masks``,
  ``pred_boxes``, ``pred_classes`` and ``scores`` = the mean semantic logit of its class over the mask
  plus :func:`.postprocess.affinity_mask_score` (boundary-minus-interior "cut" logits), for instance AP.

The losses of both stages live in :mod:`.criterion`, the post-processing in :mod:`.postprocess`.
"""
import fnmatch
import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList
from detectron2.utils.events import get_event_storage
from torch import nn
from torch.nn import functional as F
from torch.nn.modules.batchnorm import _BatchNorm

from ..inputs import check_input_images
from .amwc_layer import AMWCSettings, solve_amwc_maps
from .criterion import COPSCriterion
from .heads import COPSCosts, COPSSemSegHead, build_affinity_head
from .postprocess import (grid_to_image, instances_from_panoptic, panoptic_from_solution, semantic_from_labels,
                          void_small_segments)

__all__ = ["COPS", "STAGES"]

STAGES = ("pretrain", "full")


def _put_scalars(**kv):
    """Log to the current EventStorage, if any (training under a Detectron2 trainer)."""
    try:
        storage = get_event_storage()
    except AssertionError:
        return
    storage.put_scalars(**kv, smoothing_hint=False)


@META_ARCH_REGISTRY.register()
class COPS(nn.Module):
    """COPS: semantic + affinity CNN and the asymmetric multiway cut (see the module doc)."""

    @configurable
    def __init__(self, *, backbone: nn.Module, sem_seg_head: nn.Module, affinity_head: nn.Module,
                 pixel_mean, pixel_std, size_divisibility: int, target_stride: int,
                 edge_distances: Sequence[int], thing_ids: Sequence[int], num_classes: int,
                 affinity_loss_weight: float, affinity_top_k: float, min_thing_cluster_size: int,
                 solver_threads: int, stage: str, amwc_settings: Optional[AMWCSettings],
                 pq_loss_weight: float, thing_area: float, stuff_area: float, inference_area_gate: bool,
                 predict_instances: bool, per_distance_edge_affine: bool, cost_dropout: float,
                 signed_node_cost_scale: bool,
                 full_trainable: Sequence[str], full_lr_multipliers: Sequence[float]):
        """
        Every setting comes from ``MODEL.COPS`` (:meth:`from_config`); the defaults live in
        ``modeling/cops/config.py`` only.

        Args (besides the modules and the pretraining / inference settings):
            stage: ``MODEL.COPS.STAGE``, "pretrain" or "full" (module doc).
            amwc_settings: the AMWC layer's backward settings (lambda interval, N, threads).
            pq_loss_weight: factor of the PQ surrogate loss.
            thing_area, stuff_area: size-gate thresholds at full resolution (divided by stride**2).
            inference_area_gate: void smaller segments at inference too (``postprocess.void_small_segments``).
            predict_instances: add the ``instances`` output (thing segments with the public mask score).
            per_distance_edge_affine: one edge-cost scale and offset per distance (else one shared).
            signed_node_cost_scale: node costs with ``w_s`` (public code) instead of ``|w_s|``.
            cost_dropout: probability of zeroing a pixel's node costs / an edge cost (full stage).
            full_trainable: parameter-name patterns trained in the full stage.
            full_lr_multipliers: learning-rate factor of each pattern (same length).
        """
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.affinity_head = affinity_head
        self.costs = COPSCosts(len(edge_distances) if per_distance_edge_affine else 0, signed_node_cost_scale)
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
        self.min_thing_cluster_size = int(min_thing_cluster_size)
        self.solver_threads = int(solver_threads) or (os.cpu_count() or 1)
        if self.size_divisibility % self.target_stride:
            raise ValueError(f"size divisibility {self.size_divisibility} must be a multiple of "
                             f"MODEL.COPS.TARGET_STRIDE {self.target_stride}")
        self.criterion = COPSCriterion(
            edge_distances=self.edge_distances, is_thing=self.is_thing,
            affinity_loss_weight=affinity_loss_weight, affinity_top_k=affinity_top_k,
            amwc_settings=amwc_settings if amwc_settings is not None else AMWCSettings(
                num_threads=self.solver_threads, seed=torch.initial_seed(),
                min_thing_size=self.min_thing_cluster_size),
            pq_loss_weight=pq_loss_weight, thing_area=thing_area, stuff_area=stuff_area,
            target_stride=self.target_stride, cost_dropout=cost_dropout)
        self.thing_area, self.stuff_area = float(thing_area), float(stuff_area)
        self.inference_area_gate = bool(inference_area_gate)
        self.predict_instances = bool(predict_instances)
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
            "affinity_head": build_affinity_head(cfg, shapes),
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
            "signed_node_cost_scale": c.SIGNED_NODE_COST_SCALE,
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
                                seed=torch.initial_seed(), backward_solver=c.BACKWARD_SOLVER,
                                warm_rounds=c.BACKWARD_WARM_ROUNDS, min_thing_size=c.MIN_THING_CLUSTER_SIZE)
        except ValueError as e:
            raise ValueError(f"MODEL.COPS.LAMBDA_MIN / LAMBDA_MAX / NUM_LAMBDA_SAMPLES / BACKWARD_SOLVER / "
                             f"BACKWARD_WARM_ROUNDS / MIN_THING_CLUSTER_SIZE: {e}") from None

    @property
    def device(self):
        return self.pixel_mean.device

    def predict_logits(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Stride-4 semantic logits ``B x K x h x w`` and affinity logits ``B x D x 2 x h x w``."""
        features = self.backbone(images)
        sem_logits = self.sem_seg_head.layers(features)
        return sem_logits, self.affinity_head(features, sem_logits)

    def forward(self, batched_inputs: List[dict]):
        check_input_images(batched_inputs, self.pixel_mean.shape[0])  # shape 3 x H x W, finite values
        images = [(x["image"].to(self.device) - self.pixel_mean) / self.pixel_std for x in batched_inputs]
        images = ImageList.from_tensors(images, self.size_divisibility)
        sem_logits, aff_logits = self.predict_logits(images.tensor)
        if self.training:
            if self.stage == "full":
                return self.full_stage_losses(sem_logits, aff_logits, batched_inputs)
            return self.criterion.pretrain_losses(self.sem_seg_head, sem_logits, aff_logits, batched_inputs,
                                                  self.size_divisibility)
        return self.inference(sem_logits, aff_logits, batched_inputs, images)

    def full_stage_losses(self, sem_logits, aff_logits, batched_inputs) -> Dict[str, torch.Tensor]:
        """``{"loss_pq": ...}`` (:meth:`.criterion.COPSCriterion.full_stage_losses`); logs the cost affines."""
        node_costs, edge_costs = self.costs(sem_logits, aff_logits)
        losses = self.criterion.full_stage_losses(node_costs, edge_costs, batched_inputs)
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
        return losses

    def solve(self, node_costs: torch.Tensor, edge_costs: torch.Tensor, grid_sizes: Sequence[Tuple[int, int]]):
        """AMWC per image on the top-left ``grid_sizes[b]`` cells, through the solver entry that training
        uses too (``amwc_layer.solve_amwc_maps``: inputs checked there); images of equal grid size are
        solved in one call. Returns ``[(labels h x w, clusters h x w)]``."""
        groups: Dict[Tuple[int, int], List[int]] = {}
        for b, hw in enumerate(grid_sizes):
            groups.setdefault(tuple(hw), []).append(b)
        out: List[Optional[Tuple[np.ndarray, np.ndarray]]] = [None] * len(grid_sizes)
        for (h, w), idx in groups.items():
            *_, results = solve_amwc_maps(node_costs[idx, :, :h, :w], edge_costs[idx, :, :, :h, :w],
                                          self.edge_distances, self.is_thing, self.solver_threads)
            for b, (labels, clusters, _) in zip(idx, results):
                out[b] = (labels.reshape(h, w), clusters.reshape(h, w))
        return out

    @torch.no_grad()
    def inference(self, sem_logits, aff_logits, batched_inputs, images: ImageList) -> List[dict]:
        s = self.target_stride
        node_costs, edge_costs = self.costs(sem_logits, aff_logits)
        grid_sizes = [(-(-H // s), -(-W // s)) for H, W in images.image_sizes]
        solutions = self.solve(node_costs, edge_costs, grid_sizes)
        results = []
        for b, (x, (H, W), (labels, clusters)) in enumerate(zip(batched_inputs, images.image_sizes, solutions)):
            out_size = (x.get("height", H), x.get("width", W))
            pan, infos = panoptic_from_solution(labels, clusters, self.is_thing, self.min_thing_cluster_size)
            grid_pan = torch.from_numpy(pan).to(self.device)
            pan = grid_to_image(grid_pan, s, (H, W), (H, W))
            if self.inference_area_gate:
                pan, infos = void_small_segments(pan, infos, self.thing_area, self.stuff_area)
            pan = grid_to_image(pan, 1, (H, W), out_size).to(torch.int32)
            node_labels = grid_to_image(torch.from_numpy(labels).to(self.device), s, (H, W), out_size)
            result = {"panoptic_seg": (pan, infos),
                      "sem_seg": semantic_from_labels(node_labels, len(self.is_thing))}
            if self.predict_instances:   # the logits at the output size only where the scores need them
                sem_up = F.interpolate(sem_logits[b:b + 1], scale_factor=s, mode="bilinear", align_corners=False)
                result["instances"] = instances_from_panoptic(
                    pan, infos, grid_pan, sem_seg_postprocess(sem_up[0], (H, W), *out_size), aff_logits[b],
                    self.edge_distances)
            results.append(result)
        return results
