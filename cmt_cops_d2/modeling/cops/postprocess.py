"""COPS post-processing: an AMWC solution on the stride-4 grid -> Detectron2's outputs.

* ``panoptic_seg``: one segment per stuff class present and per AMWC cluster of a thing class
  (:func:`panoptic_from_solution`), upsampled to the input resolution, segments below the size gates
  voided (:func:`void_small_segments`), resized to the requested output size;
* ``sem_seg``: one-hot of the AMWC node labels (:func:`semantic_from_labels`);
* ``instances``: the thing segments with the public code's mask score (:func:`instances_from_panoptic`,
  :func:`affinity_mask_score`).
"""
from typing import List, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from detectron2.structures import BitMasks, Instances

__all__ = ["panoptic_from_solution", "void_small_segments", "affinity_mask_score", "grid_to_image",
           "semantic_from_labels", "instances_from_panoptic"]


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


def grid_to_image(grid: torch.Tensor, stride: int, image_size: Tuple[int, int],
                  output_size: Tuple[int, int]) -> torch.Tensor:
    """A map on the stride-``stride`` grid -> the input resolution (nearest, cropped to ``image_size``)
    -> ``output_size`` (nearest)."""
    H, W = image_size
    full = grid.repeat_interleave(stride, 0).repeat_interleave(stride, 1)[:H, :W]
    if tuple(output_size) != (H, W):
        full = F.interpolate(full[None, None].float(), size=tuple(output_size), mode="nearest")[0, 0]
    return full


def semantic_from_labels(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``K x H x W`` one-hot (float) of an ``H x W`` label map: the ``sem_seg`` output."""
    return F.one_hot(labels.long(), num_classes).permute(2, 0, 1).float()


def instances_from_panoptic(pan: torch.Tensor, infos: List[dict], grid_pan: torch.Tensor,
                            sem_logits: torch.Tensor, aff_logits: torch.Tensor,
                            distances: Sequence[int]) -> Instances:
    """Thing segments as ``Instances`` (instance AP), scored as the public code: the mean semantic logit
    of the segment's class over its pixels plus :func:`affinity_mask_score` on the grid.

    Args:
        pan, infos: the panoptic output (``H x W`` ids at the output size, ``segments_info``).
        grid_pan: the same ids on the solver's grid (before the size gate).
        sem_logits: ``K x H x W`` semantic logits at the output size.
        aff_logits: ``D x 2 x h x w`` affinity logits of the padded grid.
    """
    things = [seg for seg in infos if seg["isthing"]]
    out = Instances(tuple(pan.shape))
    masks = torch.stack([pan == seg["id"] for seg in things]) if things else \
        torch.zeros((0, *pan.shape), dtype=torch.bool, device=pan.device)
    h, w = aff_logits.shape[-2:]
    scores = []
    for seg, mask in zip(things, masks):
        grid_mask = F.pad(grid_pan == seg["id"], (0, w - grid_pan.shape[1], 0, h - grid_pan.shape[0]))
        scores.append(sem_logits[seg["category_id"]][mask].mean()
                      + affinity_mask_score(grid_mask, aff_logits, distances))
    out.pred_masks = masks
    out.pred_boxes = BitMasks(masks).get_bounding_boxes()
    out.pred_classes = torch.tensor([seg["category_id"] for seg in things], dtype=torch.int64,
                                    device=pan.device)
    out.scores = torch.stack(scores) if scores else torch.zeros(0, device=pan.device)
    return out
