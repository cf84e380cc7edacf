"""From cluster predictions to Detectron2's panoptic and semantic outputs.

Two strategies (``MODEL.CMT.TEST.MERGE``):

* ``"mask"``, mask-wise merging (MaskFormer; the paper's default, Tab. 2d): a cluster's mask is where
  its probability (softmax over clusters) exceeds ``pixel_threshold``; clusters are ranked by
  ``class score * mask score`` and pasted onto an empty canvas; a cluster is kept if its score passes the
  thing / stuff threshold and more than ``overlap_threshold`` of its mask is still free; stuff clusters
  of the same class become one segment. The masks are kept sparse (:func:`cluster_candidates`): at most
  two clusters can pass the default threshold 0.4 at a pixel, so the merge never builds ``N`` dense
  ``H x W`` masks (at 1281 x 1281 that is 128 x 1.6M pixels).
* ``"pixel"``, per-pixel argmax (MaX-DeepLab, as DeepLab2's ``pixelwise`` post-processor): clusters
  whose class confidence reaches ``class_threshold`` (one threshold for things and stuff) are kept;
  a pixel takes its most likely kept cluster if that cluster is also its most likely cluster among
  *all* clusters (a pixel won by a dropped cluster stays void) and its probability among the kept
  clusters exceeds ``pixel_threshold``; stuff clusters of the same class become one segment.

After either merge, :func:`filter_small_segments` voids thing segments smaller than
``thing_area_limit`` pixels and stuff segments smaller than ``stuff_area_limit`` (DeepLab2's area
limits; 0 keeps every segment).

Both read the mask logits band by band (:func:`mask_bands`), so at inference the full-resolution
``N x H x W`` logits are never formed (:class:`~.output_resize.ResizedMaps`). Both return
``(panoptic_seg, segments_info)`` with segment ids >= 1 and 0 for void, the format
``COCOPanopticEvaluator`` and ``Visualizer.draw_panoptic_seg`` accept.
"""
import math
from typing import Dict, Iterator, List, Sequence, Tuple

import torch

__all__ = ["semantic_inference", "mask_bands", "top_probabilities", "cluster_candidates", "max_clusters_per_pixel",
           "mask_wise_merge", "pixel_wise_merge", "filter_small_segments", "panoptic_inference"]


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


def max_clusters_per_pixel(pixel_threshold: float, num_clusters: int) -> int:
    """How many clusters can have probability ``> t`` at one pixel: ``k`` of them need ``k t < 1``
    (probabilities sum to 1), so ``k <= ceil(1/t) - 1`` (1 for ``t >= 0.5``, 2 for the default 0.4)."""
    if pixel_threshold <= 0:
        return num_clusters
    return max(1, min(num_clusters, math.ceil(1.0 / pixel_threshold) - 1))


def mask_bands(mask_logits, max_elements: int = 1 << 22) -> Iterator[Tuple[int, torch.Tensor]]:
    """Pixel-major ``(start_row, rows x W x N)`` bands of ``mask_logits``: an ``N x H x W`` tensor, or
    an object with ``.shape`` and ``.bands()`` such as :class:`~.output_resize.ResizedMaps` (the
    upsampled logits, produced band by band at inference)."""
    if not isinstance(mask_logits, torch.Tensor):
        yield from mask_logits.bands()
        return
    N, H, W = mask_logits.shape
    step = max(1, max_elements // max(1, N * W))
    for start in range(0, H, step):
        yield start, mask_logits[:, start : start + step].permute(1, 2, 0)


def top_probabilities(logits: torch.Tensor, k: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest ``softmax(logits, dim=1)`` values of each row and their columns, descending
    (``P x N`` -> two ``P x k``). For ``k <= 2`` this reuses the softmax's own maximum and
    exponentials instead of a general top-k (several times faster on CPU)."""
    if k > 2:
        top, idx = logits.topk(k, dim=1)
        return (top - torch.logsumexp(logits, 1, keepdim=True)).exp_(), idx
    top1, idx1 = logits.max(1, keepdim=True)
    e = (logits - top1).exp_()                   # exp(l - max): 1 at the maximum
    total = e.sum(1, keepdim=True)
    if k == 1:
        return total.reciprocal_(), idx1
    e.scatter_(1, idx1, -1.0)                    # remove the maximum, keep the rest
    e2, idx2 = e.max(1, keepdim=True)
    return torch.cat([torch.ones_like(e2), e2], 1).div_(total), torch.cat([idx1, idx2], 1)


def cluster_candidates(mask_logits, pixel_threshold: float
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sparse form of ``softmax_N(mask_logits) > pixel_threshold``.

    Returns ``(cluster, pixel, prob)`` for every (cluster, flattened pixel) pair above the threshold,
    sorted by cluster. Only the top ``max_clusters_per_pixel`` clusters of each pixel can pass, so this
    costs one logsumexp and one top-k over ``N x H x W`` instead of ``N`` dense masks, and the result
    is exactly the dense thresholding. Works band by band (:func:`mask_bands`).
    """
    N, _, W = mask_logits.shape
    k = max_clusters_per_pixel(pixel_threshold, N)
    found = []
    for start, band in mask_bands(mask_logits):
        prob, idx = top_probabilities(band.float().reshape(-1, N), k)
        passed = prob > pixel_threshold
        pixel = torch.arange(start * W, start * W + prob.shape[0], device=prob.device)
        found.append((idx[passed], pixel[:, None].expand(-1, k)[passed], prob[passed]))
    cluster, pixel, prob = (torch.cat(t) for t in zip(*found))
    order = torch.argsort(cluster, stable=True)
    return cluster[order], pixel[order], prob[order]


def mask_wise_merge(class_logits: torch.Tensor, mask_logits: torch.Tensor, thing_ids: Sequence[int],
                    thing_threshold: float = 0.7, stuff_threshold: float = 0.5,
                    pixel_threshold: float = 0.4, overlap_threshold: float = 0.8
                    ) -> Tuple[torch.Tensor, List[Dict]]:
    """Mask-wise merging.

    Args:
        class_logits: N x K+1 (last = void); mask_logits: N x H x W (softmax over N), a tensor or
            band by band (:func:`mask_bands`).
        thing_ids: contiguous ids of thing classes.
    """
    N, H, W = mask_logits.shape
    class_prob = class_logits.float().softmax(-1)
    scores, labels = class_prob[:, :-1].max(-1)
    cluster, pixel, prob = cluster_candidates(mask_logits, pixel_threshold)
    # masks may overlap when pixel_threshold < 0.5
    area = torch.bincount(cluster, minlength=N)
    mask_score = torch.bincount(cluster, weights=prob, minlength=N) / area.clamp(min=1)
    rank = scores * mask_score
    masks = torch.split(pixel, area.tolist())      # flattened pixels of each cluster's mask
    scores, labels, area, rank = scores.tolist(), labels.tolist(), area.tolist(), rank.tolist()
    pan, segments = _empty(H, W, mask_logits.device)
    flat_pan = pan.view(-1)
    things = set(int(t) for t in thing_ids)
    stuff_segment = {}
    for n in sorted(range(N), key=lambda i: -rank[i]):
        isthing = labels[n] in things
        if area[n] == 0 or scores[n] < (thing_threshold if isthing else stuff_threshold):
            continue
        free = masks[n][flat_pan[masks[n]] == 0]
        if free.numel() <= overlap_threshold * area[n]:
            continue
        _paste(flat_pan, segments, stuff_segment, free, labels[n], isthing, rank[n])
    return pan, segments


def pixel_wise_merge(class_logits: torch.Tensor, mask_logits: torch.Tensor, thing_ids: Sequence[int],
                     class_threshold: float = 0.7, pixel_threshold: float = 0.4
                     ) -> Tuple[torch.Tensor, List[Dict]]:
    """Per-pixel argmax over the confident clusters (MaX-DeepLab; DeepLab2's ``pixelwise``).

    A cluster is kept when its class confidence (max over the non-void classes of the softmax over
    all K+1) is ``>= class_threshold``. A pixel is assigned to ``argmax`` over the kept clusters' logits
    when (1) that cluster also has the largest logit over all clusters and (2) its softmax
    probability among the kept clusters is ``> pixel_threshold``; otherwise it is void.
    """
    N, H, W = mask_logits.shape
    class_prob = class_logits.float().softmax(-1)
    scores, labels = class_prob[:, :-1].max(-1)
    things = torch.tensor(sorted(set(int(t) for t in thing_ids)), dtype=torch.long,
                          device=labels.device)
    isthing = torch.isin(labels, things)
    keep = scores >= class_threshold
    pan, segments = _empty(H, W, mask_logits.device)
    if not keep.any():
        return pan, segments
    kept = keep.nonzero()[:, 0]
    best = torch.full((H * W,), -1, dtype=torch.long, device=mask_logits.device)  # -1: void
    for start, band in mask_bands(mask_logits):
        logits = band.float().reshape(-1, N)
        kept_logits = logits[:, kept]                                  # softmax over the kept clusters
        best_logit, best_band = kept_logits.max(1)
        best_p = (best_logit - torch.logsumexp(kept_logits, 1)).exp_()
        won = (best_p > pixel_threshold) & (best_logit == logits.max(1).values)
        best[start * W : start * W + logits.shape[0]] = torch.where(won, kept[best_band], -1)
    flat_pan = pan.view(-1)
    stuff_segment = {}
    for n in torch.unique(best[best >= 0]).tolist():
        _paste(flat_pan, segments, stuff_segment, best == n, int(labels[n]), bool(isthing[n]),
               float(scores[n]))
    return pan, segments


def filter_small_segments(pan: torch.Tensor, segments: List[Dict], thing_area_limit: float = 0,
                          stuff_area_limit: float = 0) -> Tuple[torch.Tensor, List[Dict]]:
    """Void every thing segment with fewer than ``thing_area_limit`` pixels and every stuff segment
    (all pixels of its class) with fewer than ``stuff_area_limit`` (DeepLab2's ``_filter_by_count``:
    a segment of exactly the limit is kept). ``pan`` is changed in place."""
    if not segments or (thing_area_limit <= 0 and stuff_area_limit <= 0):
        return pan, segments
    area = torch.bincount(pan.view(-1).long(), minlength=len(segments) + 1)
    kept = []
    for seg in segments:
        limit = thing_area_limit if seg["isthing"] else stuff_area_limit
        if area[seg["id"]] < limit:
            pan[pan == seg["id"]] = 0
        else:
            kept.append(seg)
    return pan, kept


def panoptic_inference(class_logits: torch.Tensor, mask_logits: torch.Tensor, thing_ids: Sequence[int],
                       merge: str = "mask", thing_threshold: float = 0.7, stuff_threshold: float = 0.5,
                       class_threshold: float = 0.7, pixel_threshold: float = 0.4,
                       overlap_threshold: float = 0.8, thing_area_limit: float = 0,
                       stuff_area_limit: float = 0) -> Tuple[torch.Tensor, List[Dict]]:
    """:func:`mask_wise_merge` (``merge="mask"``) or :func:`pixel_wise_merge` (``"pixel"``), then
    :func:`filter_small_segments`."""
    if merge == "mask":
        pan, segments = mask_wise_merge(class_logits, mask_logits, thing_ids, thing_threshold,
                                        stuff_threshold, pixel_threshold, overlap_threshold)
    elif merge == "pixel":
        pan, segments = pixel_wise_merge(class_logits, mask_logits, thing_ids, class_threshold,
                                         pixel_threshold)
    else:
        raise ValueError(f"MODEL.CMT.TEST.MERGE={merge!r}: use 'mask' or 'pixel'")
    return filter_small_segments(pan, segments, thing_area_limit, stuff_area_limit)
