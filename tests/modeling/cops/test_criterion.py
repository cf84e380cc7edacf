"""COPS criterion pieces with deliberate settings: the affinity loss's top-k (public
``compute_affinity_loss``) and cost dropout without rescaling (public ``DropoutPixels`` / edge
dropout), each against a dense computation written here."""
import numpy as np
import pytest
import torch

from cmt_cops_d2.modeling.cops.amwc_layer import AMWCSettings
from cmt_cops_d2.modeling.cops.criterion import COPSCriterion, affinity_losses


def _criterion(cost_dropout):
    return COPSCriterion(edge_distances=[1, 2], is_thing=np.array([False, True, True]), affinity_loss_weight=0.25,
                         affinity_top_k=0.25, amwc_settings=AMWCSettings(), pq_loss_weight=10.0, thing_area=200.0,
                         stuff_area=4096.0, target_stride=4, cost_dropout=cost_dropout)


@pytest.mark.parametrize("top_k", [0.25, 0.6, 1.0])
def test_affinity_loss_is_the_mean_of_the_hardest_weighted_bce_per_direction(top_k):
    """Per distance and direction: weighted BCE of every slot of the batch, the ``int(top_k * n)`` largest
    kept, their mean; the two directions summed; times the loss weight."""
    gen = torch.Generator().manual_seed(0)
    B, D, h, w = 2, 3, 5, 7
    logits = torch.randn(B, D, 2, h, w, generator=gen, dtype=torch.float64)
    targets = (torch.rand(B, D, 2, h, w, generator=gen) < 0.3).double()
    weights = torch.randint(0, 3, (B, D, 2, h, w), generator=gen).double() * 2.0  # 0, 2 or 4
    out = affinity_losses(logits, targets, weights, [1, 4, 9], top_k, 0.25)
    assert sorted(out) == ["loss_affinity_d1", "loss_affinity_d4", "loss_affinity_d9"]
    x, t, wt = logits.numpy(), targets.numpy(), weights.numpy()
    bce = (np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))) * wt
    for k, d in enumerate([1, 4, 9]):
        want = 0.0
        for ch in range(2):
            v = np.sort(bce[:, k, ch].reshape(-1))[::-1]
            want += v[: int(top_k * v.size)].mean()
        assert out[f"loss_affinity_d{d}"].item() == pytest.approx(0.25 * want, rel=1e-12)


def test_cost_dropout_zeroes_whole_pixels_and_single_edges_without_rescaling():
    torch.manual_seed(0)
    crit = _criterion(0.3)
    node = torch.rand(4, 3, 40, 50, dtype=torch.float64) + 0.5  # no zero to begin with
    edge = torch.rand(4, 2, 2, 40, 50, dtype=torch.float64) + 0.5
    dn, de = crit.dropout_costs(node, edge)
    dropped_px = (dn == 0).all(dim=1)
    assert ((dn == 0).any(dim=1) == dropped_px).all()          # a pixel loses all its class costs at once
    assert torch.equal(dn[:, :, ~dropped_px[0]][0], node[:, :, ~dropped_px[0]][0])  # kept costs unscaled
    assert torch.equal(torch.where(dropped_px[:, None], node, dn), node)
    assert torch.equal(torch.where(de == 0, edge, de), edge)
    assert dropped_px.double().mean().item() == pytest.approx(0.3, abs=0.02)
    assert (de == 0).double().mean().item() == pytest.approx(0.3, abs=0.02)
    # edges are dropped independently of their pixels
    same = ((de[:, 0, 0] == 0) == dropped_px).double().mean().item()
    assert same == pytest.approx(0.7 * 0.7 + 0.3 * 0.3, abs=0.03)
    # p = 0: the costs themselves
    n0, e0 = _criterion(0.0).dropout_costs(node, edge)
    assert n0 is node and e0 is edge
