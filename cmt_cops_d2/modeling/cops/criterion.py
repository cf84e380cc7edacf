"""COPS losses (paper Sec. 4.2): the pretraining stage's semantic and affinity losses, and the full
stage's PQ surrogate (eq. 6) of the AMWC solution, differentiated with Algorithm 1 (the AMWC layer).
The meta-architecture's module doc describes both stages step by step.
"""
from collections import Counter
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.structures import ImageList
from torch import nn

from .amwc_layer import AMWCSettings, amwc_layer
from .pq_surrogate import area_thresholds_from_isthing, pool_pq_sums, pq_sums_single_image, pq_surrogate_loss

__all__ = ["COPSCriterion", "affinity_losses", "loss_slots"]


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


def _pad_grid(tensors: List[torch.Tensor], h: int, w: int) -> torch.Tensor:
    """Zero-pad ``(..., h_i, w_i)`` tensors to ``(..., h, w)`` and stack."""
    return torch.stack([F.pad(t, (0, w - t.shape[-1], 0, h - t.shape[-2])) for t in tensors])


class COPSCriterion(nn.Module):
    """The losses of both training stages (settings from ``MODEL.COPS``, checked here)."""

    def __init__(self, *, edge_distances: Sequence[int], is_thing: np.ndarray, affinity_loss_weight: float,
                 affinity_top_k: float, amwc_settings: AMWCSettings, pq_loss_weight: float,
                 thing_area: float, stuff_area: float, target_stride: int, cost_dropout: float):
        super().__init__()
        if not pq_loss_weight > 0:
            raise ValueError(f"MODEL.COPS.PQ_LOSS_WEIGHT must be > 0, got {pq_loss_weight}")
        if not 0.0 <= cost_dropout < 1.0:
            raise ValueError(f"MODEL.COPS.COST_DROPOUT must lie in [0, 1), got {cost_dropout}")
        if not (thing_area >= 0 and stuff_area >= 0):
            raise ValueError(f"MODEL.COPS.THING_AREA / STUFF_AREA must be >= 0, got {thing_area}, {stuff_area}")
        self.edge_distances = [int(d) for d in edge_distances]
        self.is_thing = np.asarray(is_thing, bool)
        self.affinity_loss_weight = affinity_loss_weight
        self.affinity_top_k = affinity_top_k
        self.amwc_settings = amwc_settings
        self.pq_loss_weight = float(pq_loss_weight)
        self.cost_dropout = float(cost_dropout)
        self.register_buffer("area_thresholds", area_thresholds_from_isthing(
            self.is_thing, thing_area, stuff_area, target_stride, dtype=torch.float32), False)

    def pretrain_losses(self, sem_seg_head: nn.Module, sem_logits: torch.Tensor, aff_logits: torch.Tensor,
                        batched_inputs: List[dict], size_divisibility: int) -> Dict[str, torch.Tensor]:
        """``loss_sem_seg`` (the semantic head's top-k CE) and ``loss_affinity_d{d}`` per distance."""
        need = ("sem_seg", "sem_seg_weights", "affinities", "affinity_weights")
        if any(k not in batched_inputs[0] for k in need):
            raise ValueError(f"COPS training needs {need} in each input; use INPUT.DATASET_MAPPER_NAME "
                             "cops_panoptic")
        device = sem_logits.device
        sd = size_divisibility
        ignore = sem_seg_head.ignore_value
        sem_t = ImageList.from_tensors([x["sem_seg"].to(device) for x in batched_inputs], sd, ignore).tensor
        sem_w = ImageList.from_tensors([x["sem_seg_weights"].to(device) for x in batched_inputs], sd).tensor
        losses = dict(sem_seg_head.losses(sem_logits, sem_t, sem_w))
        h, w = aff_logits.shape[-2:]
        aff_t = _pad_grid([x["affinities"].to(device).float() for x in batched_inputs], h, w)
        aff_w = _pad_grid([x["affinity_weights"].to(device).float() for x in batched_inputs], h, w)
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

    def full_stage_losses(self, node_costs: torch.Tensor, edge_costs: torch.Tensor,
                          batched_inputs: List[dict]) -> Dict[str, torch.Tensor]:
        """``{"loss_pq": ...}``: PQ surrogate (eq. 6) of the AMWC solution of the (dropped-out) costs on
        each image's target grid (the meta-architecture's module doc, steps 1-4)."""
        need = ("panoptic", "panoptic_classes", "panoptic_weights")
        if any(k not in x for x in batched_inputs for k in need):
            raise ValueError(f"COPS full-stage training needs {need} in each input; use "
                             "INPUT.DATASET_MAPPER_NAME cops_panoptic")
        device = node_costs.device
        node_costs, edge_costs = self.dropout_costs(node_costs, edge_costs)
        hp, wp = node_costs.shape[-2:]
        groups: Dict[Tuple[int, int], List[int]] = {}
        for b, x in enumerate(batched_inputs):
            h, w = x["panoptic"].shape
            if h > hp or w > wp:
                raise ValueError(f"target grid {h}x{w} of image {b} exceeds the network output {hp}x{wp}")
            if bool((x["panoptic_weights"] > 0).any()):  # all-void images are skipped
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
                gt_cls = x["panoptic_classes"].to(device)
                keep = torch.from_numpy(loss_slots(seg_cls[j], is_pred[j], gt_cls.cpu().numpy())).to(device)
                pan = x["panoptic"].to(device)
                gt_masks = pan[None] == torch.arange(len(gt_cls), device=device)[:, None, None]
                sums.append(pq_sums_single_image(
                    out.segments[j, keep], out.segment_classes[j, keep], gt_masks, gt_cls,
                    x["panoptic_weights"].to(device), self.is_thing,
                    area_thresholds=self.area_thresholds))
        if not sums:  # every image void: zero loss, still connected to every trainable parameter
            loss = (node_costs.sum() + edge_costs.sum()) * 0.0
        else:
            loss = pq_surrogate_loss(pool_pq_sums(sums), weight=self.pq_loss_weight)
        return {"loss_pq": loss}
