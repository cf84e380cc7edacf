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
(``costs.{w_s,b_s,w_d,b_d}``) get no gradient from these losses; only the full training stage (PQ
surrogate through the AMWC layer, not implemented here) trains them, so they are frozen
(``requires_grad=False``): every trainable parameter then receives a gradient (DDP-safe).

**Inference.** Node costs ``w_s * (-s) + b_s`` and edge costs ``|w_d| * (-a) + b_d`` (positive =
attractive) on the stride-4 grid of each image (``ceil(H / 4) x ceil(W / 4)`` cells of the padded grid),
``solve_amwc_batch`` with ``partitionable`` = thing classes of the metadata, then (notes Sec. 1a): every
stuff class present gives one segment; every AMWC cluster of a thing class gives one segment, clusters
with fewer than ``MODEL.COPS.MIN_THING_CLUSTER_SIZE`` grid pixels become void. The grid map is upsampled
(nearest, x4), cropped to the input size and resized (nearest) to the requested ``height x width``.

Output per image (Detectron2 format): ``panoptic_seg = (ids int32 H x W, 0 = void, segments_info)``
with ``segments_info`` = ``[{"id", "category_id" (contiguous), "isthing"}]``, and ``sem_seg`` (K x H x W
semantic logits, bilinear).
"""
import os
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.projects.panoptic_deeplab.panoptic_seg import PanopticDeepLabSemSegHead
from detectron2.structures import ImageList
from torch import nn
from torch.nn import functional as F

from ...solvers import edge_maps_to_flat, grid_edges, solve_amwc_batch
from .heads import COPSAffinityHead, COPSCosts

__all__ = ["COPS", "affinity_losses", "panoptic_from_solution"]


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
                 solver_threads: int):
        super().__init__()
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.affinity_head = affinity_head
        self.costs = COPSCosts()
        # Pretraining stage: the affines are trained only through the AMWC layer (full stage).
        self.costs.requires_grad_(False)
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

    @classmethod
    def from_config(cls, cfg):
        c = cfg.MODEL.COPS
        backbone = build_backbone(cfg)
        shapes = backbone.output_shape()
        sem_args = PanopticDeepLabSemSegHead.from_config(cfg, shapes)
        sem_args.update(loss_type="hard_pixel_mining", loss_top_k=c.SEMANTIC_TOP_K)
        sem_seg_head = PanopticDeepLabSemSegHead(**sem_args)
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
        }

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
            pan, infos = panoptic_from_solution(labels, clusters, self.is_thing, self.min_thing_cluster_size)
            pan = torch.from_numpy(pan).to(self.device)
            pan = pan.repeat_interleave(s, 0).repeat_interleave(s, 1)[:H, :W]
            if (out_h, out_w) != (H, W):
                pan = F.interpolate(pan[None, None].float(), size=(out_h, out_w), mode="nearest")[0, 0]
            results.append({"panoptic_seg": (pan.to(torch.int32), infos),
                            "sem_seg": sem_seg_postprocess(sem_up[b], (H, W), out_h, out_w)})
        return results
