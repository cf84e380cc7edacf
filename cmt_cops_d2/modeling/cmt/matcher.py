"""Hungarian matching of predicted masks to ground-truth masks on the PQ-style similarity.

MaX-DeepLab / CMT-DeepLab: ``sim(i, j) = p_i(c_j) * Dice(m_i, m_j)``, where ``p_i`` is the class
distribution of prediction i (softmax over the K+1 classes), ``m_i`` its (softmax-over-clusters) mask and
the Dice coefficient is taken over labelled pixels only, without smoothing (as DeepLab2's
``_mask_similarity``; the smoothed Dice of :func:`smoothed_dice` is the loss's, not the matching's). The
assignment maximising the total similarity is found with scipy's ``linear_sum_assignment`` on CPU.
"""
from typing import Tuple

import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["dice_matrix", "smoothed_dice", "pq_similarity", "hungarian_match"]

# DeepLab2's denominator epsilon of the mask similarity: I / ((|m| + |g|) / 2 + 1e-5).
DICE_DENOMINATOR_EPS = 1e-5


def dice_matrix(pred_masks: torch.Tensor, gt_masks: torch.Tensor) -> torch.Tensor:
    """Dice(m_i, g_j) = 2 sum(m_i g_j) / (sum m_i + sum g_j) for all pairs (no smoothing; a
    ``2e-5`` in the denominator keeps empty pairs at 0).

    Args:
        pred_masks: N x P mask probabilities (void pixels already zeroed).
        gt_masks: G x P binary masks.
    Returns:
        N x G.
    """
    inter = pred_masks @ gt_masks.t()
    half_sizes = (pred_masks.sum(1)[:, None] + gt_masks.sum(1)[None, :]) / 2
    return inter / (half_sizes + DICE_DENOMINATOR_EPS)


def smoothed_dice(pred_masks: torch.Tensor, gt_masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Row-aligned Dice with additive smoothing, the PQ-style loss's mask term (V-Net Dice):
    ``(2 sum(m_k g_k) + smooth) / (sum m_k + sum g_k + smooth)``.

    Args:
        pred_masks, gt_masks: K x P (void pixels of ``pred_masks`` already zeroed).
    Returns:
        K.
    """
    inter = (pred_masks * gt_masks).sum(1)
    return (2 * inter + smooth) / (pred_masks.sum(1) + gt_masks.sum(1) + smooth)


def pq_similarity(class_prob: torch.Tensor, pred_masks: torch.Tensor, gt_classes: torch.Tensor,
                  gt_masks: torch.Tensor) -> torch.Tensor:
    """PQ-style similarity p_i(c_j) * Dice(m_i, g_j): N x G."""
    return class_prob[:, gt_classes] * dice_matrix(pred_masks, gt_masks)


@torch.no_grad()
def hungarian_match(similarity: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Maximum-similarity one-to-one assignment.

    Args:
        similarity: N x G.
    Returns:
        (pred_idx, gt_idx): matched pairs, sorted by ``gt_idx``; min(N, G) pairs.
    """
    rows, cols = linear_sum_assignment(similarity.detach().float().cpu().numpy(), maximize=True)
    order = cols.argsort()
    return (torch.as_tensor(rows[order], dtype=torch.long, device=similarity.device),
            torch.as_tensor(cols[order], dtype=torch.long, device=similarity.device))
