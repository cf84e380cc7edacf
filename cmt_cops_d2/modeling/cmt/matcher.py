"""Hungarian matching of predicted masks to ground-truth masks on the PQ-style similarity.

MaX-DeepLab / CMT-DeepLab: ``sim(i, j) = p_i(c_j) * Dice(m_i, m_j)``, where ``p_i`` is the class
distribution of prediction i, ``m_i`` its (softmax-over-clusters) mask, and the Dice coefficient is taken
over labelled pixels only. The assignment maximising the total similarity is found with scipy's
``linear_sum_assignment`` on CPU.
"""
from typing import Tuple

import torch
from scipy.optimize import linear_sum_assignment

__all__ = ["dice_matrix", "pq_similarity", "hungarian_match"]


def dice_matrix(pred_masks: torch.Tensor, gt_masks: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Dice(m_i, m_j) = (2 sum m_i m_j + eps) / (sum m_i + sum m_j + eps) for all pairs.

    Args:
        pred_masks: N x P mask probabilities (void pixels already zeroed).
        gt_masks: G x P binary masks.
    Returns:
        N x G.
    """
    inter = pred_masks @ gt_masks.t()
    return (2 * inter + eps) / (pred_masks.sum(1)[:, None] + gt_masks.sum(1)[None, :] + eps)


def pq_similarity(class_prob: torch.Tensor, pred_masks: torch.Tensor, gt_classes: torch.Tensor,
                  gt_masks: torch.Tensor) -> torch.Tensor:
    """PQ-style similarity p_i(c_j) * Dice(m_i, m_j): N x G."""
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
