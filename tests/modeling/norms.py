"""Test helper: batch norms with arbitrary statistics, so that every norm matters in a comparison."""
import torch
from torch import nn


def randomize_batch_norms(module: nn.Module, seed: int = 0, shift_scale: float = 1.0) -> nn.Module:
    """Random gamma in [0.5, 1.5), beta and running mean ~ N(0, shift_scale^2), running var in
    [0.5, 1.5) for every batch norm of ``module`` (zero-initialised scales included)."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * shift_scale)
                m.running_mean.copy_(torch.randn(c, generator=g) * shift_scale)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return module
