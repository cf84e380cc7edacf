"""CMT-DeepLab losses (Sec. 3.3-3.4, eq. 13-14; the PQ-style loss and auxiliary losses of MaX-DeepLab).

Targets are given at the output stride (4) per image:

* ``labels``: G contiguous class ids, ``masks``: G x h x w binary, non-overlapping;
* pixels covered by no mask (unlabelled, crowd, padding) are *void*: they are excluded from every loss.

Predictions: ``pred_logits`` (B x N x K+1, last = void class), ``pred_masks`` (B x N x h x w mask logits,
softmax over the N clusters), ``pixel_features`` (B x D x h x w, L2-normalised, for instance
discrimination), ``sem_logits`` (B x K x h x w, auxiliary semantic head), ``ref_points`` (B x N x 2M,
reference masks as [h_1..h_M, w_1..w_M] in [0, 1]) and ``aux_outputs`` (the same keys for every earlier
clustering result: deep supervision).

The paper says every loss but its own two follows MaX-DeepLab; where the paper is silent this module does
what DeepLab2's ``MaXDeepLabLoss`` does. Every loss is computed per image and then averaged over the
batch. With N clusters, matched pairs ``(i, j)`` (Hungarian on ``p_i(c_j) * Dice(m_i, g_j)``, unsmoothed
Dice over labelled pixels) and unmatched clusters ``u``, per image:

* **PQ-style loss, class term** (``loss_pq_class``): ``w * mean_n[ a_n * q_n * CE(p_n, y_n) ]`` over all N
  clusters, where ``y_n`` is the matched ground-truth class or void; ``a_n`` is ``alpha`` (0.75) for
  matched and ``beta`` (0.25) for unmatched clusters; ``q_n`` (no gradient) is the matched unsmoothed
  Dice for a matched cluster and, for an unmatched one, the fraction of its mask's mass that lies on
  void pixels (predicting void where the ground truth is void costs little), both clamped at ``1e-5``.
  The mean counts the non-zero terms, as DeepLab2 does.
* **PQ-style loss, mask term** (``loss_pq_dice``): ``w * alpha / N * sum_(i,j) p_i(c_j) * (1 - Dice_1(m_i,
  g_j))`` with ``p_i(c_j)`` clamped at ``1e-5`` without gradient and ``Dice_1`` the smoothed Dice
  ``(2I + 1) / (|m| + |g| + 1)``. Together with the class term this is MaX-DeepLab's
  ``p(c) * Dice`` objective: each factor's gradient is weighted by the other factor.
* **mask-ID cross-entropy**: per labelled pixel of a matched mask, CE over the N mask logits against
  its matched cluster; mean over the pixels.
* **instance discrimination**, pixel-wise (eq. 14, CMT-DeepLab) on ``|A|`` pixels sampled by Gumbel
  top-k with logits ``tau_s * log(HW / area of the pixel's mask)``; or MaX-DeepLab's instance-wise
  version (every thing pixel classified among the mask-averaged features of all masks).
* **semantic segmentation** CE on the auxiliary semantic head, mean over labelled pixels.
* **mask approximation** (eq. 13): L1 between the extreme points / centre of each matched reference mask
  and those of its ground-truth mask, averaged over the matched pairs.

The matching and the class-term weights ``q_n`` of the final output are reused for every auxiliary
output (``share_final_matching``, as DeepLab2). When an image has more ground-truth masks than clusters
(G > N), the G - N masks with the lowest similarity stay unmatched: they count in the instance
discrimination and semantic losses only, and a warning is logged (raise ``MODEL.CMT.NUM_CLUSTERS``).
"""
import logging
from typing import Dict, List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .matcher import dice_matrix, hungarian_match, smoothed_dice

__all__ = ["CMTCriterion", "Matching", "mask_approximation_loss", "pixel_instance_discrimination_loss",
           "instance_discrimination_loss", "sample_pixels_size_balanced", "mean_of_nonzero"]

logger = logging.getLogger(__name__)


def mask_approximation_loss(ref_points: torch.Tensor, gt_masks: torch.Tensor) -> torch.Tensor:
    """Eq. (13): L_ext + L_cen, averaged over the K matched pairs.

    Args:
        ref_points: K x 2M reference points [h_1..h_M, w_1..w_M] in [0, 1].
        gt_masks: K x h x w binary ground-truth masks (coordinates normalised like ``pixel_coordinates``).
    """
    K, two_m = ref_points.shape
    if K == 0:
        return ref_points.sum() * 0.0
    M = two_m // 2
    h, w = gt_masks.shape[-2:]
    ys = torch.linspace(0, 1, h, device=gt_masks.device) if h > 1 else gt_masks.new_zeros(1).float()
    xs = torch.linspace(0, 1, w, device=gt_masks.device) if w > 1 else gt_masks.new_zeros(1).float()
    m = gt_masks.float()
    area = m.sum((1, 2)).clamp(min=1)
    rows, cols = m.amax(2) > 0, m.amax(1) > 0              # K x h, K x w: occupied rows / columns
    big = 2.0
    y_min = torch.where(rows, ys, big).amin(1)
    y_max = torch.where(rows, ys, -big).amax(1)
    x_min = torch.where(cols, xs, big).amin(1)
    x_max = torch.where(cols, xs, -big).amax(1)
    y_avg = (m.sum(2) * ys).sum(1) / area
    x_avg = (m.sum(1) * xs).sum(1) / area
    rh, rw = ref_points[:, :M], ref_points[:, M:]
    l_ext = ((rh.amin(1) - y_min).abs() + (rh.amax(1) - y_max).abs()
             + (rw.amin(1) - x_min).abs() + (rw.amax(1) - x_max).abs()).sum() / (4 * K)
    l_cen = ((rh.mean(1) - y_avg).abs() + (rw.mean(1) - x_avg).abs()).sum() / (2 * K)
    return l_ext + l_cen


def mean_of_nonzero(losses: torch.Tensor) -> torch.Tensor:
    """Sum over the non-zero entries / their count, 0 when there are none (DeepLab2's reduction of
    per-pixel and per-cluster losses: weighted-out entries do not count)."""
    return losses.sum() / (losses != 0).sum().clamp(min=1)


def sample_pixels_size_balanced(mask_ids: torch.Tensor, num_samples: int, temperature: float = 1.0,
                                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Indices of up to ``num_samples`` labelled pixels (mask id >= 0), drawn without replacement by
    Gumbel top-k with logits ``temperature * log(P / area of the pixel's mask)`` (P = number of pixels):
    a pixel's weight is ``area^-temperature``, so with ``temperature = 1`` every mask has the same total
    sampling mass and with larger values small masks are favoured further (DeepLab2's sampling)."""
    valid = torch.nonzero(mask_ids >= 0, as_tuple=True)[0]
    if valid.numel() <= num_samples:
        return valid
    ids = mask_ids[valid]
    area = torch.bincount(ids).float()
    logits = temperature * torch.log(mask_ids.numel() / area[ids])
    u = torch.rand(logits.shape, generator=generator, device=logits.device).clamp(1e-12, 1 - 1e-7)
    return valid[torch.topk(logits - torch.log(-torch.log(u)), num_samples).indices]


def pixel_instance_discrimination_loss(features: torch.Tensor, mask_ids: torch.Tensor,
                                       temperature: float) -> torch.Tensor:
    """Eq. (14), averaged over the sampled pixels A:
    ``mean_a -1/|P(a)| sum_{p in P(a)} log( exp(f_a.f_p/t) / sum_{b in A} exp(f_a.f_b/t) )``.

    Args:
        features: |A| x D (L2-normalised) features of the sampled pixels.
        mask_ids: |A| ground-truth mask of each sampled pixel. P(a) = sampled pixels of a's mask
            (a itself included, as in eq. 14).
    """
    logits = features @ features.t() / temperature
    log_prob = logits.float().log_softmax(dim=1)
    same = (mask_ids[:, None] == mask_ids[None, :]).float()
    return mean_of_nonzero(-(same * log_prob).sum(1) / same.sum(1))


def instance_discrimination_loss(features: torch.Tensor, mask_ids: torch.Tensor, temperature: float,
                                 weights: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MaX-DeepLab's instance-wise discrimination: each pixel p is classified among the mask-averaged,
    L2-normalised features g_j of the ground-truth masks, ``CE(f_p . g_j / t, own mask)``; the
    per-pixel losses are multiplied by ``weights`` (MaX-DeepLab: 1 on thing pixels, 0 elsewhere) and
    averaged over the non-zero ones.

    Args:
        features: P x D (L2-normalised) features of labelled pixels; mask_ids: P mask ids.
    """
    ids, inverse = torch.unique(mask_ids, return_inverse=True)
    centers = torch.zeros(len(ids), features.shape[1], device=features.device, dtype=features.dtype)
    centers.index_add_(0, inverse, features)
    centers = F.normalize(centers, dim=1)
    losses = F.cross_entropy((features @ centers.t()).float() / temperature, inverse, reduction="none")
    return mean_of_nonzero(losses if weights is None else losses * weights)


class Matching(NamedTuple):
    """The Hungarian matching of one image and the class-term weights derived from it (no gradient)."""
    src: torch.Tensor            # K matched clusters (sorted by ``tgt``)
    tgt: torch.Tensor            # K matched ground-truth masks
    dice: torch.Tensor           # K unsmoothed Dice of the matched pairs
    class_prob: torch.Tensor     # K matched class probabilities p_i(c_j)
    void_fraction: torch.Tensor  # N: fraction of each cluster's mask mass on void pixels


class CMTCriterion(nn.Module):
    """All CMT-DeepLab training losses with deep supervision (see the module docstring)."""

    def __init__(self, num_classes: int, pq_weight: float = 3.0, pq_alpha: float = 0.75,
                 pq_beta: float = 0.25, mask_id_weight: float = 0.3, insdis_weight: float = 1.0,
                 insdis_type: str = "pixel", insdis_temperature: float = 0.3,
                 insdis_num_pixels: int = 4096, insdis_sample_temperature: float = 1.5,
                 semantic_weight: float = 1.0, mask_approx_weight: float = 1.0,
                 deep_supervision: bool = True, share_final_matching: bool = True,
                 thing_classes: Sequence[int] = ()):
        super().__init__()
        if insdis_type not in ("pixel", "instance"):
            raise ValueError(f"MODEL.CMT.INSDIS_TYPE={insdis_type!r}: use 'pixel' (CMT-DeepLab eq. 14) "
                             "or 'instance' (MaX-DeepLab)")
        self.num_classes = num_classes
        self.pq_weight, self.pq_alpha, self.pq_beta = pq_weight, pq_alpha, pq_beta
        self.mask_id_weight, self.insdis_weight = mask_id_weight, insdis_weight
        self.insdis_type, self.insdis_temperature = insdis_type, insdis_temperature
        self.insdis_num_pixels = insdis_num_pixels
        self.insdis_sample_temperature = insdis_sample_temperature
        self.semantic_weight, self.mask_approx_weight = semantic_weight, mask_approx_weight
        self.deep_supervision, self.share_final_matching = deep_supervision, share_final_matching
        self.thing_classes = sorted(int(c) for c in thing_classes)
        self._warned = False

    # --- per-output pieces ------------------------------------------------------------------------
    def _prepare(self, pred_masks: torch.Tensor, size) -> torch.Tensor:
        if tuple(pred_masks.shape[-2:]) != tuple(size):
            pred_masks = F.interpolate(pred_masks, size=size, mode="bilinear", align_corners=False)
        return pred_masks

    @torch.no_grad()
    def match(self, pred_logits, pred_masks, targets) -> List[Matching]:
        """Per image, the pairs maximising ``sum p_i(c_j) * Dice(m_i, g_j)`` over labelled pixels, and
        the class-term weights of :class:`Matching`."""
        matchings = []
        for b, t in enumerate(targets):
            gt = t["masks"].flatten(1).float()                               # G x P
            valid = gt.amax(0) if len(gt) else gt.new_zeros(gt.shape[1])
            prob = pred_masks[b].flatten(1).float().softmax(0)               # N x P
            void_fraction = (prob * (1 - valid)).sum(1) / (prob.sum(1) + 1e-5)
            G = len(t["labels"])
            if G == 0:
                empty = torch.zeros(0, dtype=torch.long, device=pred_logits.device)
                matchings.append(Matching(empty, empty, prob.new_zeros(0), prob.new_zeros(0),
                                          void_fraction))
                continue
            class_prob = pred_logits[b].float().softmax(-1)[:, t["labels"]]  # N x G
            dice = dice_matrix(prob * valid, gt)
            src, tgt = hungarian_match(class_prob * dice)
            matchings.append(Matching(src, tgt, dice[src, tgt], class_prob[src, tgt], void_fraction))
            if G > len(prob) and not self._warned:
                logger.warning(f"an image has {G} ground-truth masks but the model has only {len(prob)} "
                               "clusters; the extra masks stay unmatched (raise MODEL.CMT.NUM_CLUSTERS)")
                self._warned = True
        return matchings

    def output_losses(self, out: Dict, targets: List[Dict],
                      matchings: List[Matching]) -> Dict[str, torch.Tensor]:
        """PQ-style (class and mask terms), mask-ID CE and mask approximation losses of one (final or
        auxiliary) output, each per image and then averaged over the batch."""
        pred_logits = out["pred_logits"]
        size = targets[0]["masks"].shape[-2:]
        pred_masks = self._prepare(out["pred_masks"], size)
        B, N = pred_logits.shape[:2]
        void = self.num_classes
        zero = pred_logits.sum() * 0.0
        pq_class, pq_dice, mask_id, approx = [], [], [], []
        for b, (t, m) in enumerate(zip(targets, matchings)):
            src, tgt = m.src, m.tgt
            gt = t["masks"].flatten(1).float()                               # G x P
            valid = gt.amax(0) if len(gt) else gt.new_zeros(gt.shape[1])
            log_p = pred_logits[b].float().log_softmax(-1)                    # N x K+1
            mask_logits = pred_masks[b].flatten(1).float()                    # N x P
            # Class term: matched clusters their class, weighted by their Dice; the others void,
            # weighted by how much of their mask lies on void pixels.
            target = torch.full((N,), void, dtype=torch.long, device=log_p.device)
            target[src] = t["labels"][tgt]
            alpha = torch.full((N,), self.pq_beta, device=log_p.device)
            alpha[src] = self.pq_alpha
            quality = m.void_fraction.clamp(min=1e-5)
            quality[src] = m.dice.clamp(min=1e-5)
            ce = -log_p.gather(1, target[:, None])[:, 0]
            pq_class.append(mean_of_nonzero(alpha * quality * ce))
            if len(src):
                prob = mask_logits.softmax(0) * valid
                # Mask term: matched pairs, weighted by their class probability.
                dice = smoothed_dice(prob[src], gt[tgt])
                pq_dice.append((m.class_prob.clamp(min=1e-5) * (1 - dice)).sum() * self.pq_alpha / N)
                # Mask-ID CE: every pixel of a matched mask should pick its cluster.
                pixel_target = torch.full((gt.shape[1],), -1, dtype=torch.long, device=gt.device)
                covered = gt[tgt] > 0                                         # K x P
                pixel_target[covered.nonzero(as_tuple=True)[1]] = src.repeat_interleave(covered.sum(1))
                keep = pixel_target >= 0
                mask_id.append(mean_of_nonzero(F.cross_entropy(
                    mask_logits[:, keep].t(), pixel_target[keep], reduction="none")))
                if "ref_points" in out:
                    approx.append(mask_approximation_loss(out["ref_points"][b, src].float(),
                                                          t["masks"][tgt]))

        def batch_mean(per_image):
            return torch.stack(per_image).sum() / B if per_image else zero

        losses = {
            "loss_pq_class": self.pq_weight * batch_mean(pq_class),
            "loss_pq_dice": self.pq_weight * batch_mean(pq_dice),
            "loss_mask_id": self.mask_id_weight * batch_mean(mask_id),
        }
        if "ref_points" in out:
            losses["loss_mask_approx"] = self.mask_approx_weight * batch_mean(approx)
        return losses

    def discrimination_loss(self, features: torch.Tensor, targets: List[Dict]) -> torch.Tensor:
        """Instance discrimination (pixel-wise eq. 14 or MaX-DeepLab's instance-wise), per image, then
        averaged over the batch."""
        features = self._prepare(features, targets[0]["masks"].shape[-2:])
        things = torch.tensor(self.thing_classes, dtype=torch.long, device=features.device)
        total = []
        for b, t in enumerate(targets):
            if len(t["labels"]) == 0:
                continue
            gt = t["masks"].flatten(1)
            ids = torch.where(gt.any(0), gt.float().argmax(0), torch.full_like(gt[0], -1, dtype=torch.long))
            f = features[b].flatten(1)
            if self.insdis_type == "pixel":
                sel = sample_pixels_size_balanced(ids, self.insdis_num_pixels, self.insdis_sample_temperature)
                if len(sel) < 2:
                    continue
                total.append(pixel_instance_discrimination_loss(
                    F.normalize(f[:, sel].t().float(), dim=1), ids[sel], self.insdis_temperature))
            else:
                sel = torch.nonzero(ids >= 0, as_tuple=True)[0]
                is_thing = torch.isin(t["labels"][ids[sel]], things).float()
                total.append(instance_discrimination_loss(
                    F.normalize(f[:, sel].t().float(), dim=1), ids[sel], self.insdis_temperature,
                    weights=is_thing))
        return torch.stack(total).sum() / len(targets) if total else features.sum() * 0.0

    def semantic_loss(self, sem_logits: torch.Tensor, targets: List[Dict]) -> torch.Tensor:
        """Cross-entropy over labelled pixels, per image, then averaged over the batch."""
        size = targets[0]["masks"].shape[-2:]
        sem_logits = self._prepare(sem_logits, size)
        total = []
        for b, t in enumerate(targets):
            s = torch.full(tuple(size), -1, dtype=torch.long, device=sem_logits.device)
            for label, m in zip(t["labels"], t["masks"]):
                s[m.bool()] = label
            keep = s >= 0
            if keep.any():
                total.append(F.cross_entropy(sem_logits[b][:, keep].t().float(), s[keep]))
        return torch.stack(total).sum() / len(targets) if total else sem_logits.sum() * 0.0

    def forward(self, outputs: Dict, targets: List[Dict]) -> Dict[str, torch.Tensor]:
        size = targets[0]["masks"].shape[-2:]
        final_masks = self._prepare(outputs["pred_masks"], size)
        matchings = self.match(outputs["pred_logits"], final_masks, targets)
        losses = self.output_losses(outputs, targets, matchings)
        if self.insdis_weight > 0 and "pixel_features" in outputs:
            losses["loss_insdis"] = self.insdis_weight * self.discrimination_loss(
                outputs["pixel_features"], targets)
        if self.semantic_weight > 0 and "sem_logits" in outputs:
            losses["loss_sem_seg"] = self.semantic_weight * self.semantic_loss(outputs["sem_logits"], targets)
        if self.deep_supervision:
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                aux_matchings = matchings if self.share_final_matching else self.match(
                    aux["pred_logits"], self._prepare(aux["pred_masks"], size), targets)
                for k, v in self.output_losses(aux, targets, aux_matchings).items():
                    losses[f"{k}_{i}"] = v
        return losses
