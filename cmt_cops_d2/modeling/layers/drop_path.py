"""Stochastic depth ("drop path", Huang et al., ECCV 2016) for residual branches.

In training, each sample's residual branch is kept with probability ``keep = 1 - drop_prob`` and
scaled by ``1 / keep`` so that its expectation is unchanged; in eval it is the identity.
CMT-DeepLab (Sec. 4) trains with a drop-path rate of 0.2.
"""
import torch
from torch import nn

__all__ = ["drop_path", "DropPath"]


def drop_path(x: torch.Tensor, drop_prob: float = 0.0, training: bool = False) -> torch.Tensor:
    """Zero whole samples of ``x`` with probability ``drop_prob`` and rescale the kept ones.

    Args:
        x: ``[N, ...]`` tensor, the output of a residual branch.
        drop_prob: probability of dropping one sample's branch, in ``[0, 1)``.
        training: identity when False.

    Returns:
        ``[N, ...]`` tensor, ``x * mask / (1 - drop_prob)`` with ``mask ~ Bernoulli(1 - drop_prob)``
        drawn once per sample (broadcast over all other dims).
    """
    if drop_prob == 0.0 or not training:
        return x
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
    keep = 1.0 - drop_prob
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
    return x * mask.div_(keep)


class DropPath(nn.Module):
    """Module form of :func:`drop_path`; follows ``self.training``."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"
