"""Smooth panoptic-quality surrogate loss of COPS (Sec. 3.3.2, eq. 5-6).

PQ of class ``l`` (eq. 5)::

    PQ_l = sum_{(p,g) in TP_l} IoU(p, g) / (|TP_l| + 0.5 |FP_l| + 0.5 |FN_l|)

The surrogate (eq. 6) replaces

* the hard matching ``IoU > 1/2`` by a maximum-IoU bipartite matching between the predicted and the
  ground-truth segments of the same class (scipy ``linear_sum_assignment``, computed under ``no_grad``
  on the masks as given), giving the matched pairs ``TP_l`` and unmatched ``FP_l`` / ``FN_l``;
* the threshold ``[IoU > 1/2]`` by ``h(u) = u^4 / (u^4 + (1 - u)^4)`` (the probability that a matched
  pair is a true positive);
* the rejection of small predictions (area below ``t_l``) by ``sigma_l(p) = sigmoid(0.1 (1^T p - t_l))``.

Per image, :func:`pq_sums_single_image` returns per-class sums (:class:`PQSums`); sums of a batch are
pooled over images (``+`` / :func:`pool_pq_sums`) and :func:`pq_surrogate_loss` turns them into
``weight * (1 - mean_l PQ_l)`` over the classes that occur.

Counts used here, per matched pair ``k = (p, g)`` with ``h_k = h(IoU_k)``, ``sigma_k = sigma_l(p)`` and
``iota_p`` the probability that ``p`` is ignored (see below)::

    TP_k = h_k sigma_k               iou_sum += TP_k IoU_k
    FN_k = 1 - h_k sigma_k           (g is missed unless p survives the size gate and is a TP)
    FP_k = sigma_k (1 - h_k)(1 - iota_p)
    unmatched prediction p:   FP_p = sigma_p (1 - iota_p)
    unmatched ground truth g: FN_g = 1
    prediction without pixels: FP_p = 0

**Choices where the paper is silent or where it is not followed literally:**

1. *Failed matches.* Eq. 6 read literally gives a matched pair only ``h sigma`` in the denominator, so a
   matched pair with a low IoU would disappear from the class, and eq. 6 would not reduce to PQ in the
   hard limit. Following the paper's reading "h models the probability of p being a true positive", a
   matched pair is a TP with probability ``h sigma`` and otherwise its ground truth is a FN and its
   (surviving) prediction a FP, as above. Then a pair matched with IoU 0 counts exactly as two
   unmatched segments, and the hard limit is PQ. (The public code uses ``FN_k = 1 - h_k`` and no FP term
   for matched pairs; not followed.)
2. *PQ matches kept.* Pairs with ``IoU > 1/2`` are unique (PQ's matches); the matching keeps all of them
   and maximises the IoU sum over the rest (``force_pq_matches=True``). A plain maximum-IoU matching can
   trade one pair of IoU 0.53 for two crossing pairs of IoU 0.31 and then differs from PQ in the hard
   limit. ``force_pq_matches=False`` gives the paper's plain maximum-IoU matching.
3. *Smoothing constants.* The paper has none; the public code uses ``eps = 0.1`` in the IoU and in the
   PQ ratio. Both are arguments (``iou_eps``, ``pq_eps``) defaulting to 0 (the paper).
4. *Area thresholds* are in pixels of the mask resolution: the paper's 200 (things) and 4096 (stuff,
   COCO; 2048 Cityscapes) at image resolution divided by ``stride**2`` (12.5 and 256 on the stride-4
   grid; the public code uses 50 for things). The gate slope 0.1 is per pixel of the mask resolution
   (as in the public code). Areas ``1^T p`` are unweighted (void pixels count), as in eq. 6.
5. *Void and crowd* follow panopticapi. Pixels with ``weights == 0`` are void: they enter neither the
   intersection nor the union of the IoU (``I = sum w p g``, ``U = sum w (p + g - p g)``). Crowd regions
   can be given as ground-truth segments with ``gt_iscrowd``: they are never matched nor counted as FN,
   their pixels count in the union (give them weight 1 for panopticapi semantics), and a prediction of
   class ``l`` with more than half of its area on void or on crowd of class ``l`` is not a FP
   (``iota_p = h(nu_p)``, ``nu_p`` = that fraction; hard limit ``[nu_p > 1/2]``). The public code's
   training convention (crowd pixels get weight 0 and no crowd segments) is also accepted: then crowd
   is void.
6. *Stuff* classes have one segment per class on each side: predicted channels of one stuff class are
   summed (clipped at 1), ground-truth masks of one stuff class are merged.
7. *Classes that occur* (averaged over): a class occurs in an image if it has a non-crowd ground-truth
   segment, or a prediction that survives the hard gate (``area >= t_l`` and ``area > 0``) and is not
   ignored (``nu_p <= 1/2``). This is a ``no_grad`` decision; in the hard limit it is panopticapi's rule
   (classes with ``TP + FP + FN = 0`` are skipped).

8. *Empty predictions* (``1^T p = 0``; the AMWC layer's extra slots for classes with missed ground
   truth) are no false positives. Eq. 6 counts predicted segments and PQ has no empty ones, but
   ``sigma_l(0) = sigmoid(-0.1 t_l)`` is not 0 (0.22 at ``t_l = 12.5``), so each empty slot would count as
   a fraction of a FP, and its gradient would push the slot to stay empty.

**Hard limit** (``hard=True``): ``h(u) -> [u > 1/2]``, ``sigma_l(p) -> [1^T p >= t_l and 1^T p > 0]``,
``iota_p -> [nu_p > 1/2]``, ``iou_eps -> 0``. On binary masks the pooled PQ then equals panopticapi's PQ of
the same segmentation with predictions smaller than ``t_l`` removed (``area_thresholds = 0``: nothing
removed). No gradient flows in this limit.

The gradient w.r.t. ``Z`` is autograd's: through the IoU of matched pairs, the size gates and the
ignore fractions; the matching itself is piecewise constant.
"""
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

__all__ = [
    "PQSums",
    "smooth_threshold",
    "area_thresholds_from_isthing",
    "soft_iou_matrix",
    "match_segments",
    "pq_sums_single_image",
    "pool_pq_sums",
    "pq_from_sums",
    "pq_surrogate_loss",
]

# Paper Sec. 4.1: small-segment rejection thresholds at image resolution.
THING_AREA = 200.0
STUFF_AREA_COCO = 4096.0
STUFF_AREA_CITYSCAPES = 2048.0
GATE_SLOPE = 0.1


@dataclass
class PQSums:
    """Per-class sums of one image or pooled over a batch; all K-vectors.

    Attributes:
        iou_sum: sum over matched pairs of ``TP_k * IoU_k`` (numerator of eq. 6).
        tp: soft true positives ``sum TP_k``.
        fp: soft false positives.
        fn: soft false negatives.
        present: bool, the class occurs (non-crowd ground truth, or a surviving non-ignored prediction).
    """

    iou_sum: torch.Tensor
    tp: torch.Tensor
    fp: torch.Tensor
    fn: torch.Tensor
    present: torch.Tensor

    def __add__(self, other: "PQSums") -> "PQSums":
        return PQSums(self.iou_sum + other.iou_sum, self.tp + other.tp, self.fp + other.fp,
                      self.fn + other.fn, self.present | other.present)

    @staticmethod
    def zeros(num_classes: int, dtype=torch.float32, device=None) -> "PQSums":
        z = torch.zeros(num_classes, dtype=dtype, device=device)
        return PQSums(z, z.clone(), z.clone(), z.clone(),
                      torch.zeros(num_classes, dtype=torch.bool, device=device))


def smooth_threshold(u: torch.Tensor) -> torch.Tensor:
    """``h(u) = u^4 / (u^4 + (1 - u)^4)`` (eq. 6): a smooth ``[u > 1/2]`` on [0, 1]."""
    a = u ** 4
    return a / (a + (1 - u) ** 4)


def area_thresholds_from_isthing(is_thing, thing_area: float = THING_AREA,
                                 stuff_area: float = STUFF_AREA_COCO, stride: int = 4,
                                 dtype=torch.float64) -> torch.Tensor:
    """Per-class area thresholds ``t_l`` in pixels of the stride-``stride`` mask grid.

    Paper Sec. 4.1: 200 for things, 4096 (COCO) or 2048 (Cityscapes) for stuff, at image resolution;
    divided by ``stride**2`` (COCO, stride 4: 12.5 and 256).

    Args:
        is_thing: K bools.
    Returns:
        K-vector.
    """
    is_thing = torch.as_tensor(is_thing, dtype=torch.bool)
    t = torch.where(is_thing, torch.tensor(float(thing_area)), torch.tensor(float(stuff_area)))
    return (t / float(stride) ** 2).to(dtype)


def soft_iou_matrix(P: torch.Tensor, G: torch.Tensor, weights: torch.Tensor,
                    eps: float = 0.0) -> torch.Tensor:
    """Weighted soft IoU of all pairs: ``(I + eps) / (U + eps)`` with ``I = sum w p g``,
    ``U = sum w (p + g - p g)``; a pair with ``U + eps = 0`` gets 0.

    Args:
        P: S x h x w predicted soft masks in [0, 1].
        G: G x h x w ground-truth masks in [0, 1] (binary in practice).
        weights: h x w pixel weights, 0 = void.
    Returns:
        S x G, differentiable w.r.t. ``P``.
    """
    Pw = P * weights
    inter = torch.einsum("shw,ghw->sg", Pw, G)
    union = Pw.sum((1, 2))[:, None] + (G * weights).sum((1, 2))[None, :] - inter
    tiny = torch.finfo(P.dtype).tiny
    return (inter + eps) / (union + eps).clamp_min(tiny)


def match_segments(iou: np.ndarray, force_pq_matches: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Maximum-IoU bipartite matching of one class (``linear_sum_assignment``, maximise).

    Args:
        iou: S x G IoU matrix (predictions x ground truth of one class).
        force_pq_matches: keep every pair with ``IoU > 1/2`` (PQ's matches; they form a matching) and
            maximise the IoU sum over the rest. Implemented by adding ``min(S, G) + 1`` to those entries,
            which makes any maximum matching contain all of them.
    Returns:
        (rows, cols): ``min(S, G)`` matched pairs (some may have IoU 0: they count as unmatched).
    """
    iou = np.asarray(iou, dtype=np.float64)
    if iou.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    w = iou
    if force_pq_matches:
        w = iou + (iou > 0.5) * (min(iou.shape) + 1.0)
    rows, cols = linear_sum_assignment(w, maximize=True)
    return rows.astype(np.int64), cols.astype(np.int64)


def _check(cond: bool, name: str, msg: str):
    if not cond:
        raise ValueError(f"{name}: {msg}")


def _check_finite(t: torch.Tensor, name: str):
    _check(bool(torch.isfinite(t).all()), name, "contains NaN or Inf")


def pq_sums_single_image(
    Z: torch.Tensor,
    pred_classes: torch.Tensor,
    gt_masks: torch.Tensor,
    gt_classes: torch.Tensor,
    weights: torch.Tensor,
    is_thing: Union[torch.Tensor, Sequence[bool]],
    gt_iscrowd: Optional[torch.Tensor] = None,
    area_thresholds: Optional[torch.Tensor] = None,
    stride: int = 4,
    gate_slope: float = GATE_SLOPE,
    iou_eps: float = 0.0,
    hard: bool = False,
    force_pq_matches: bool = True,
) -> PQSums:
    """Per-class PQ sums of one image (eq. 6 terms), differentiable w.r.t. ``Z``.

    Args:
        Z: S x h x w predicted soft panoptic masks in [0, 1], one channel per predicted segment (a soft
            partition: channels sum to at most 1 per pixel). S may be 0.
        pred_classes: S class ids in [0, K).
        gt_masks: G x h x w ground-truth segment masks (binary; bool or float). Empty masks are dropped.
        gt_classes: G class ids in [0, K).
        weights: h x w pixel weights; 0 = void (unlabelled, padding, and crowd in the training
            convention). Not differentiated.
        is_thing: K bools (defines K, the number of classes).
        gt_iscrowd: G bools or None; crowd segments are never matched nor FN (panopticapi), see the
            module docstring (point 5).
        area_thresholds: K thresholds ``t_l`` in pixels of the mask grid; None: the paper's COCO values
            ``area_thresholds_from_isthing(is_thing, 200, 4096, stride)``.
        stride: only used when ``area_thresholds`` is None.
        gate_slope: 0.1 in ``sigma_l(p) = sigmoid(gate_slope (1^T p - t_l))``.
        iou_eps: smoothing of the soft IoU (paper: 0; public code: 0.1). Ignored when ``hard``.
        hard: the hard limit (module docstring); equals panopticapi's counts on binary masks.
        force_pq_matches: see :func:`match_segments`.
    Returns:
        :class:`PQSums` with K-vectors in ``Z``'s dtype.
    """
    # ---- validation ------------------------------------------------------------------------------
    _check(isinstance(Z, torch.Tensor) and Z.dim() == 3, "Z", f"expected an S x h x w tensor, got "
           f"{tuple(Z.shape) if isinstance(Z, torch.Tensor) else type(Z)}")
    _check(Z.is_floating_point(), "Z", f"expected a floating dtype, got {Z.dtype}")
    _check_finite(Z, "Z")
    if Z.numel():
        _check(bool((Z >= 0).all() and (Z <= 1).all()), "Z", "values must lie in [0, 1]")
    S, H, W = Z.shape
    dtype, device = Z.dtype, Z.device
    is_thing = torch.as_tensor(is_thing, dtype=torch.bool, device=device)
    _check(is_thing.dim() == 1 and is_thing.numel() > 0, "is_thing", "expected a non-empty K-vector")
    K = is_thing.numel()
    pred_classes = torch.as_tensor(pred_classes, device=device)
    _check(tuple(pred_classes.shape) == (S,), "pred_classes",
           f"expected shape ({S},), got {tuple(pred_classes.shape)}")
    _check(not pred_classes.is_floating_point(), "pred_classes", "expected integer class ids")
    if S:
        _check(bool((pred_classes >= 0).all() and (pred_classes < K).all()), "pred_classes",
               f"class ids must lie in [0, {K})")
    _check(isinstance(gt_masks, torch.Tensor), "gt_masks", f"expected a tensor, got {type(gt_masks)}")
    _check(gt_masks.dim() == 3 and tuple(gt_masks.shape[1:]) == (H, W), "gt_masks",
           f"expected G x {H} x {W}, got {tuple(gt_masks.shape)}")
    gt = gt_masks.to(device=device, dtype=dtype)
    _check_finite(gt, "gt_masks")
    _check(bool(((gt == 0) | (gt == 1)).all()), "gt_masks", "expected binary masks")
    Gn = gt.shape[0]
    gt_classes = torch.as_tensor(gt_classes, device=device)
    _check(tuple(gt_classes.shape) == (Gn,), "gt_classes",
           f"expected shape ({Gn},), got {tuple(gt_classes.shape)}")
    _check(not gt_classes.is_floating_point(), "gt_classes", "expected integer class ids")
    if Gn:
        _check(bool((gt_classes >= 0).all() and (gt_classes < K).all()), "gt_classes",
               f"class ids must lie in [0, {K})")
    if gt_iscrowd is None:
        gt_iscrowd = torch.zeros(Gn, dtype=torch.bool, device=device)
    gt_iscrowd = torch.as_tensor(gt_iscrowd, device=device).bool()
    _check(tuple(gt_iscrowd.shape) == (Gn,), "gt_iscrowd",
           f"expected shape ({Gn},), got {tuple(gt_iscrowd.shape)}")
    _check(isinstance(weights, torch.Tensor), "weights", f"expected a tensor, got {type(weights)}")
    _check(tuple(weights.shape) == (H, W), "weights", f"expected {H} x {W}, got {tuple(weights.shape)}")
    w = weights.to(device=device, dtype=dtype)
    _check_finite(w, "weights")
    _check(bool((w >= 0).all()), "weights", "must be non-negative")
    if area_thresholds is None:
        t = area_thresholds_from_isthing(is_thing.cpu(), stride=stride).to(device=device, dtype=dtype)
    else:
        t = torch.as_tensor(area_thresholds, device=device, dtype=dtype)
        _check(tuple(t.shape) == (K,), "area_thresholds", f"expected shape ({K},), got {tuple(t.shape)}")
        _check_finite(t, "area_thresholds")

    # ---- stuff: one segment per class on each side -----------------------------------------------
    pc = pred_classes.tolist()
    groups: List[List[int]] = []
    stuff_group = {}
    for s, c in enumerate(pc):
        if is_thing[c]:
            groups.append([s])
        elif c in stuff_group:
            groups[stuff_group[c]].append(s)
        else:
            stuff_group[c] = len(groups)
            groups.append([s])
    if any(len(g) > 1 for g in groups):
        M = torch.zeros(len(groups), S, dtype=dtype, device=device)
        for i, g in enumerate(groups):
            M[i, g] = 1
        P = torch.einsum("ts,shw->thw", M, Z).clamp(max=1)
    else:
        P = Z
    p_cls = torch.as_tensor([pc[g[0]] for g in groups], dtype=torch.long, device=device)

    keep = gt.flatten(1).sum(1) > 0
    crowd = gt[keep & gt_iscrowd]
    crowd_cls = gt_classes[keep & gt_iscrowd].tolist()
    real = gt[keep & ~gt_iscrowd]
    real_cls = gt_classes[keep & ~gt_iscrowd].tolist()
    g_list, g_cls, g_stuff = [], [], {}
    for m, c in zip(real, real_cls):
        if not is_thing[c] and c in g_stuff:
            i = g_stuff[c]
            g_list[i] = torch.maximum(g_list[i], m)
            continue
        if not is_thing[c]:
            g_stuff[c] = len(g_list)
        g_list.append(m)
        g_cls.append(c)
    Gm = torch.stack(g_list) if g_list else gt.new_zeros((0, H, W))

    # ---- per prediction: size gate sigma and ignore probability iota -----------------------------
    void = (w == 0).to(dtype)
    area = P.flatten(1).sum(1)                                            # 1^T p, unweighted
    t_p = t[p_cls]
    sigma_hard = ((area >= t_p) & (area > 0)).to(dtype)
    ign = void.expand(P.shape[0], H, W).clone() if P.shape[0] else void.new_zeros((0, H, W))
    for m, c in zip(crowd, crowd_cls):                                     # void or same-class crowd
        sel = p_cls == c
        if sel.any():
            ign[sel] = torch.maximum(ign[sel], m)
    nu = (P * ign).flatten(1).sum(1) / area.clamp_min(torch.finfo(dtype).tiny)
    iota_hard = (nu > 0.5).to(dtype)
    if hard:
        sigma, iota = sigma_hard, iota_hard
    else:
        sigma = torch.sigmoid(gate_slope * (area - t_p))
        iota = smooth_threshold(nu)

    # ---- matching per class (no_grad) ------------------------------------------------------------
    iou = soft_iou_matrix(P, Gm, w, eps=0.0 if hard else iou_eps)         # S' x G'
    iou_np = iou.detach().cpu().numpy()
    p_cls_np = p_cls.cpu().numpy()
    g_cls_np = np.asarray(g_cls, dtype=np.int64)
    rows, cols = [], []
    for c in np.intersect1d(p_cls_np, g_cls_np):
        pi = np.nonzero(p_cls_np == c)[0]
        gi = np.nonzero(g_cls_np == c)[0]
        r, q = match_segments(iou_np[np.ix_(pi, gi)], force_pq_matches)
        rows.extend(pi[r].tolist())
        cols.extend(gi[q].tolist())
    rows_t = torch.as_tensor(rows, dtype=torch.long, device=device)
    cols_t = torch.as_tensor(cols, dtype=torch.long, device=device)

    # ---- eq. 6 terms -----------------------------------------------------------------------------
    iou_k = iou[rows_t, cols_t]
    h_k = (iou_k > 0.5).to(dtype) if hard else smooth_threshold(iou_k)
    tp_k = h_k * sigma[rows_t]
    h_pred = torch.zeros(P.shape[0], dtype=dtype, device=device).index_put((rows_t,), h_k)
    # A prediction without pixels (an extra slot of the AMWC layer) is no segment: not a FP (choice 8).
    fp_p = sigma * (1 - iota) * (1 - h_pred) * (area > 0).to(dtype)
    fn_g = torch.ones(Gm.shape[0], dtype=dtype, device=device).index_put((cols_t,), 1 - tp_k)

    g_cls_t = torch.as_tensor(g_cls, dtype=torch.long, device=device)
    m_cls = p_cls[rows_t]
    zeros = torch.zeros(K, dtype=dtype, device=device)
    iou_sum = zeros.index_add(0, m_cls, tp_k * iou_k)
    tp = zeros.index_add(0, m_cls, tp_k)
    fp = zeros.index_add(0, p_cls, fp_p)
    fn = zeros.index_add(0, g_cls_t, fn_g)
    present = torch.zeros(K, dtype=torch.bool, device=device)
    present[g_cls_t] = True
    present[p_cls[(sigma_hard > 0) & (iota_hard == 0)]] = True
    return PQSums(iou_sum, tp, fp, fn, present)


def pool_pq_sums(sums: Sequence[PQSums]) -> PQSums:
    """Pools per-image sums over a batch (sums; ``present`` is OR-ed)."""
    _check(len(sums) > 0, "sums", "empty sequence")
    out = sums[0]
    for s in sums[1:]:
        out = out + s
    return out


def pq_from_sums(sums: PQSums, pq_eps: float = 0.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-class ``PQ_l = (iou_sum + eps) / (tp + 0.5 fp + 0.5 fn + eps)`` (eq. 6; paper eps = 0,
    public code 0.1).

    Returns:
        (pq, present): K-vector (0 where the denominator vanishes) and the K-bool of classes averaged.
    """
    den = sums.tp + 0.5 * sums.fp + 0.5 * sums.fn + pq_eps
    pq = (sums.iou_sum + pq_eps) / den.clamp_min(torch.finfo(den.dtype).tiny)
    return pq, sums.present


def pq_surrogate_loss(sums: PQSums, weight: float = 1.0, pq_eps: float = 0.0) -> torch.Tensor:
    """``weight * (1 - mean_l PQ_l)`` over the classes that occur (pooled ``present``).

    With no class present the loss is 0 (still attached to the graph).
    """
    pq, present = pq_from_sums(sums, pq_eps)
    if not bool(present.any()):
        return pq.sum() * 0.0
    return weight * (1 - pq[present].mean())
