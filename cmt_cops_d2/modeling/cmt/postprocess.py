"""From cluster predictions to Detectron2's panoptic and semantic outputs.

Two strategies (``MODEL.CMT.TEST.MERGE``):

* ``"mask"``, mask-wise merging (MaskFormer; the paper's default, Tab. 2d): a cluster's mask is where
  its probability (softmax over clusters) exceeds ``pixel_threshold``; clusters are ranked by
  ``class score * mask score`` and pasted onto an empty canvas; a cluster is kept if its score passes the
  thing / stuff threshold and more than ``overlap_threshold`` of its mask is still free; stuff clusters
  of the same class become one segment.
* ``"pixel"``, per-pixel argmax (MaX-DeepLab): only clusters whose class confidence passes the
  thing / stuff threshold compete; each pixel takes its most likely cluster if that probability exceeds
  ``pixel_threshold``.

Both return ``(panoptic_seg, segments_info)`` with segment ids >= 1 and 0 for void, the format
``COCOPanopticEvaluator`` and ``Visualizer.draw_panoptic_seg`` accept.
"""
from typing import Dict, List, Sequence, Tuple

import torch

__all__ = ["semantic_inference", "mask_wise_merge", "pixel_wise_merge", "panoptic_inference"]


def semantic_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Per-class scores sum_n p_n(c) m_n: (N x K+1, N x H x W) -> K x H x W (void dropped)."""
    class_prob = class_logits.float().softmax(-1)[:, :-1]
    mask_prob = mask_logits.float().softmax(0)
    return torch.einsum("nk,nhw->khw", class_prob, mask_prob)


def _empty(h, w, device):
    return torch.zeros((h, w), dtype=torch.int32, device=device), []


def _paste(pan, segments, stuff_segment, region, label: int, isthing: bool, score: float) -> None:
    """Write ``region`` into ``pan`` as a new segment, or into the existing segment of its stuff class."""
    if not isthing and label in stuff_segment:
        pan[region] = stuff_segment[label]
        return
    sid = len(segments) + 1
    pan[region] = sid
    if not isthing:
        stuff_segment[label] = sid
    segments.append({"id": sid, "category_id": label, "isthing": isthing, "score": score})


def mask_wise_merge(class_logits: torch.Tensor, mask_logits: torch.Tensor, thing_ids: Sequence[int],
                    thing_threshold: float = 0.7, stuff_threshold: float = 0.5,
                    pixel_threshold: float = 0.4, overlap_threshold: float = 0.8
                    ) -> Tuple[torch.Tensor, List[Dict]]:
    """Mask-wise merging.

    Args:
        class_logits: N x K+1 (last = void); mask_logits: N x H x W (softmax over N).
        thing_ids: contiguous ids of thing classes.
    """
    N, H, W = mask_logits.shape
    class_prob = class_logits.float().softmax(-1)
    scores, labels = class_prob[:, :-1].max(-1)
    mask_prob = mask_logits.float().softmax(0)
    binary = mask_prob > pixel_threshold        # may overlap when pixel_threshold < 0.5
    area = binary.flatten(1).sum(1)
    mask_score = (mask_prob * binary).flatten(1).sum(1) / area.clamp(min=1)
    order = torch.argsort(scores * mask_score, descending=True)
    pan, segments = _empty(H, W, mask_logits.device)
    things = set(int(t) for t in thing_ids)
    stuff_segment = {}
    for n in order.tolist():
        label = int(labels[n])
        isthing = label in things
        if area[n] == 0 or scores[n] < (thing_threshold if isthing else stuff_threshold):
            continue
        free = binary[n] & (pan == 0)
        if free.sum() <= overlap_threshold * area[n]:
            continue
        _paste(pan, segments, stuff_segment, free, label, isthing, float(scores[n] * mask_score[n]))
    return pan, segments


def pixel_wise_merge(class_logits: torch.Tensor, mask_logits: torch.Tensor, thing_ids: Sequence[int],
                     thing_threshold: float = 0.7, stuff_threshold: float = 0.5,
                     pixel_threshold: float = 0.4) -> Tuple[torch.Tensor, List[Dict]]:
    """Per-pixel argmax over the confident clusters (MaX-DeepLab)."""
    N, H, W = mask_logits.shape
    class_prob = class_logits.float().softmax(-1)
    scores, labels = class_prob[:, :-1].max(-1)
    things = torch.tensor(sorted(set(int(t) for t in thing_ids)), dtype=torch.long,
                          device=labels.device)
    isthing = torch.isin(labels, things)
    keep = scores >= torch.where(isthing, torch.full_like(scores, thing_threshold),
                                 torch.full_like(scores, stuff_threshold))
    pan, segments = _empty(H, W, mask_logits.device)
    if not keep.any():
        return pan, segments
    logits = mask_logits.float().masked_fill(~keep[:, None, None], float("-inf"))
    prob = logits.softmax(0)
    best_p, best = prob.max(0)
    assigned = best_p > pixel_threshold
    stuff_segment = {}
    for n in torch.unique(best[assigned]).tolist():
        _paste(pan, segments, stuff_segment, assigned & (best == n), int(labels[n]), bool(isthing[n]),
               float(scores[n]))
    return pan, segments


def panoptic_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor, thing_ids: Sequence[int],
                       merge: str = "mask", **thresholds) -> Tuple[torch.Tensor, List[Dict]]:
    """Dispatch to :func:`mask_wise_merge` (``merge="mask"``) or :func:`pixel_wise_merge` (``"pixel"``)."""
    if merge == "mask":
        return mask_wise_merge(class_logits, mask_logits, thing_ids, **thresholds)
    if merge == "pixel":
        thresholds.pop("overlap_threshold", None)
        return pixel_wise_merge(class_logits, mask_logits, thing_ids, **thresholds)
    raise ValueError(f"MODEL.CMT.TEST.MERGE={merge!r}: use 'mask' or 'pixel'")
