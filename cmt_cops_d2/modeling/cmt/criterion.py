"""CMT-DeepLab losses (Sec. 3.3-3.4, eq. 13-14; the PQ-style loss and auxiliary losses of MaX-DeepLab).

Targets are given at the output stride (4) per image:

* ``labels``: G contiguous class ids, ``masks``: G x h x w binary, non-overlapping;
* pixels covered by no mask (unlabelled, crowd, padding) are *void*: they are excluded from every loss.

Predictions: ``pred_logits`` (B x N x K+1, last = void class), ``pred_masks`` (B x N x h x w mask logits,
softmax over the N clusters), ``pixel_features`` (B x D x h x w, L2-normalised, for instance
discrimination), ``sem_logits`` (B x K x h x w, auxiliary semantic head), ``ref_points`` (B x N x 2M,
reference masks as [h_1..h_M, w_1..w_M] in [0, 1]) and ``aux_outputs`` (the same keys for every earlier
clustering result: deep supervision).

Losses (weights in ``MODEL.CMT.*_WEIGHT``):

* **PQ-style loss** on Hungarian-matched pairs (similarity ``p(c) * Dice``):
  ``alpha * mean_matched[ p(c).detach() * (1 - Dice) + Dice.detach() * (-log p(c)) ]
  + beta * mean_unmatched[ -log p(void) ]``. This is MaX-DeepLab's loss written with ``1 - Dice`` so that a
  perfect prediction costs 0 (same gradients).
* **mask-ID cross-entropy**: per labelled pixel, CE over the N mask logits against the cluster matched
  to the pixel's ground-truth mask.
* **instance discrimination**, pixel-wise (eq. 14, CMT-DeepLab) or instance-wise (MaX-DeepLab).
* **semantic segmentation** CE on the auxiliary semantic head.
* **mask approximation** (eq. 13): L1 between the extreme points / centre of each matched reference mask
  and those of its ground-truth mask.

When an image has more ground-truth masks than clusters (G > N), the G - N masks with the lowest
similarity stay unmatched: they count in the instance discrimination and semantic losses only, and a
warning is logged (raise ``MODEL.CMT.NUM_CLUSTERS`` for such data).
"""
import logging
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .matcher import dice_matrix, hungarian_match

__all__ = ["CMTCriterion", "mask_approximation_loss", "pixel_instance_discrimination_loss",
           "instance_discrimination_loss", "sample_pixels_size_balanced"]

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


def sample_pixels_size_balanced(mask_ids: torch.Tensor, num_samples: int,
                                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Indices of up to ``num_samples`` labelled pixels (mask id >= 0), drawn without replacement with
    probability proportional to 1 / area of the pixel's mask, so that every mask has the same total
    sampling mass (small objects are not drowned by large ones). Gumbel-top-k."""
    valid = torch.nonzero(mask_ids >= 0, as_tuple=True)[0]
    if valid.numel() <= num_samples:
        return valid
    ids = mask_ids[valid]
    area = torch.bincount(ids).float()
    logits = -torch.log(area[ids])
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
    return -((same * log_prob).sum(1) / same.sum(1)).mean()


def instance_discrimination_loss(features: torch.Tensor, mask_ids: torch.Tensor,
                                 temperature: float) -> torch.Tensor:
    """MaX-DeepLab's instance-wise discrimination: each pixel is classified among the mask-averaged
    (L2-normalised) features of the ground-truth masks: CE(f_p . g_j / t, own mask)."""
    ids, inverse = torch.unique(mask_ids, return_inverse=True)
    centers = torch.zeros(len(ids), features.shape[1], device=features.device, dtype=features.dtype)
    centers.index_add_(0, inverse, features)
    centers = F.normalize(centers, dim=1)
    return F.cross_entropy((features @ centers.t()).float() / temperature, inverse)


class CMTCriterion(nn.Module):
    """All CMT-DeepLab training losses with deep supervision (see the module docstring)."""

    def __init__(self, num_classes: int, pq_weight: float = 3.0, pq_alpha: float = 0.75,
                 pq_beta: float = 0.25, mask_id_weight: float = 0.3, insdis_weight: float = 1.0,
                 insdis_type: str = "pixel", insdis_temperature: float = 0.3,
                 insdis_num_pixels: int = 4096, semantic_weight: float = 1.0,
                 mask_approx_weight: float = 1.0, deep_supervision: bool = True,
                 share_final_matching: bool = True):
        super().__init__()
        if insdis_type not in ("pixel", "instance"):
            raise ValueError(f"MODEL.CMT.INSDIS_TYPE={insdis_type!r}: use 'pixel' (CMT-DeepLab eq. 14) "
                             "or 'instance' (MaX-DeepLab)")
        self.num_classes = num_classes
        self.pq_weight, self.pq_alpha, self.pq_beta = pq_weight, pq_alpha, pq_beta
        self.mask_id_weight, self.insdis_weight = mask_id_weight, insdis_weight
        self.insdis_type, self.insdis_temperature = insdis_type, insdis_temperature
        self.insdis_num_pixels = insdis_num_pixels
        self.semantic_weight, self.mask_approx_weight = semantic_weight, mask_approx_weight
        self.deep_supervision, self.share_final_matching = deep_supervision, share_final_matching
        self._warned = False

    # --- per-output pieces ------------------------------------------------------------------------
    def _prepare(self, pred_masks: torch.Tensor, size) -> torch.Tensor:
        if tuple(pred_masks.shape[-2:]) != tuple(size):
            pred_masks = F.interpolate(pred_masks, size=size, mode="bilinear", align_corners=False)
        return pred_masks

    def match(self, pred_logits, pred_masks, targets) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Per image (pred_idx, gt_idx) maximising sum p(c) * Dice over labelled pixels."""
        indices = []
        for b, t in enumerate(targets):
            G = len(t["labels"])
            if G == 0:
                empty = torch.zeros(0, dtype=torch.long, device=pred_logits.device)
                indices.append((empty, empty))
                continue
            valid = t["masks"].flatten(1).any(0).float()
            prob = pred_masks[b].flatten(1).float().softmax(0) * valid
            sim = pred_logits[b].float().softmax(-1)[:, t["labels"]] * dice_matrix(
                prob, t["masks"].flatten(1).float())
            indices.append(hungarian_match(sim))
            if G > len(prob) and not self._warned:
                logger.warning(f"an image has {G} ground-truth masks but the model has only {len(prob)} "
                               "clusters; the extra masks stay unmatched (raise MODEL.CMT.NUM_CLUSTERS)")
                self._warned = True
        return indices

    def output_losses(self, out: Dict, targets: List[Dict], indices) -> Dict[str, torch.Tensor]:
        """PQ-style, mask-ID CE and mask approximation losses of one (final or auxiliary) output."""
        pred_logits = out["pred_logits"]
        size = targets[0]["masks"].shape[-2:]
        pred_masks = self._prepare(out["pred_masks"], size)
        B, N = pred_logits.shape[:2]
        void = self.num_classes
        pos, neg, mask_id, approx = [], [], [], []
        for b, (t, (src, tgt)) in enumerate(zip(targets, indices)):
            gt = t["masks"].flatten(1).float()                               # G x P
            valid = gt.any(0)
            log_p = pred_logits[b].float().log_softmax(-1)                    # N x K+1
            mask_logits = pred_masks[b].flatten(1).float()                    # N x P
            prob = mask_logits.softmax(0) * valid
            # PQ-style loss: matched pairs ...
            if len(src):
                dice = dice_matrix(prob[src], gt[tgt]).diagonal()
                log_pc = log_p[src, t["labels"][tgt]]
                pos.append(log_pc.exp().detach() * (1 - dice) + dice.detach() * (-log_pc))
            # ... and unmatched clusters predict void.
            unmatched = torch.ones(N, dtype=torch.bool, device=pred_logits.device)
            unmatched[src] = False
            neg.append(-log_p[unmatched, void])
            # Mask-ID CE: every pixel of a matched mask should pick its cluster.
            if len(src):
                pixel_target = torch.full((gt.shape[1],), -1, dtype=torch.long, device=gt.device)
                covered = gt[tgt] > 0                                         # K x P
                pixel_target[covered.nonzero(as_tuple=True)[1]] = src.repeat_interleave(covered.sum(1))
                keep = pixel_target >= 0
                mask_id.append(F.cross_entropy(mask_logits[:, keep].t(), pixel_target[keep],
                                               reduction="none"))
            if "ref_points" in out and len(src):
                approx.append(mask_approximation_loss(out["ref_points"][b, src].float(),
                                                      t["masks"][tgt]))
        zero = pred_logits.sum() * 0.0
        pos_l = torch.cat(pos).mean() if pos else zero
        neg_l = torch.cat(neg).mean() if neg and sum(len(n) for n in neg) else zero
        losses = {
            "loss_pq": self.pq_weight * (self.pq_alpha * pos_l + self.pq_beta * neg_l),
            "loss_mask_id": self.mask_id_weight * (torch.cat(mask_id).mean() if mask_id else zero),
        }
        if "ref_points" in out:
            losses["loss_mask_approx"] = self.mask_approx_weight * (
                torch.stack(approx).mean() if approx else zero)
        return losses

    def discrimination_loss(self, features: torch.Tensor, targets: List[Dict]) -> torch.Tensor:
        features = self._prepare(features, targets[0]["masks"].shape[-2:])
        total = []
        for b, t in enumerate(targets):
            if len(t["labels"]) == 0:
                continue
            gt = t["masks"].flatten(1)
            ids = torch.where(gt.any(0), gt.float().argmax(0), torch.full_like(gt[0], -1, dtype=torch.long))
            sel = sample_pixels_size_balanced(ids, self.insdis_num_pixels)
            if len(sel) < 2:
                continue
            f = F.normalize(features[b].flatten(1)[:, sel].t().float(), dim=1)
            fn = (pixel_instance_discrimination_loss if self.insdis_type == "pixel"
                  else instance_discrimination_loss)
            total.append(fn(f, ids[sel], self.insdis_temperature))
        return torch.stack(total).mean() if total else features.sum() * 0.0

    def semantic_loss(self, sem_logits: torch.Tensor, targets: List[Dict]) -> torch.Tensor:
        size = targets[0]["masks"].shape[-2:]
        sem_logits = self._prepare(sem_logits, size)
        sem = []
        for t in targets:
            s = torch.full(tuple(size), 255, dtype=torch.long, device=sem_logits.device)
            for label, m in zip(t["labels"], t["masks"]):
                s[m.bool()] = label
            sem.append(s)
        sem = torch.stack(sem)
        if (sem == 255).all():
            return sem_logits.sum() * 0.0
        return F.cross_entropy(sem_logits.float(), sem, ignore_index=255)

    def forward(self, outputs: Dict, targets: List[Dict]) -> Dict[str, torch.Tensor]:
        size = targets[0]["masks"].shape[-2:]
        final_masks = self._prepare(outputs["pred_masks"], size)
        indices = self.match(outputs["pred_logits"], final_masks, targets)
        losses = self.output_losses(outputs, targets, indices)
        if self.insdis_weight > 0 and "pixel_features" in outputs:
            losses["loss_insdis"] = self.insdis_weight * self.discrimination_loss(
                outputs["pixel_features"], targets)
        if self.semantic_weight > 0 and "sem_logits" in outputs:
            losses["loss_sem_seg"] = self.semantic_weight * self.semantic_loss(outputs["sem_logits"], targets)
        if self.deep_supervision:
            for i, aux in enumerate(outputs.get("aux_outputs", [])):
                aux_idx = indices if self.share_final_matching else self.match(
                    aux["pred_logits"], self._prepare(aux["pred_masks"], size), targets)
                for k, v in self.output_losses(aux, targets, aux_idx).items():
                    losses[f"{k}_{i}"] = v
        return losses
