"""Solver entry points reject costs whose energy sums could overflow float64 (a ValueError naming the
problem instead of an energy of -inf), and still solve large but safe costs."""
import math

import numpy as np
import pytest

from cmt_cops_d2.solvers import grid_edges, solve_amwc, solve_amwc_batch, solve_mwc, solve_mwc_batch
from cmt_cops_d2.solvers.amwc import MAX_ENERGY


def _problem(node_scale=1.0, edge_scale=1.0, h=4, w=5, k=3, seed=0):
    rng = np.random.default_rng(seed)
    edges = grid_edges(h, w, [1])
    theta = rng.normal(size=(h * w, k)) * node_scale
    costs = rng.normal(size=len(edges)) * edge_scale
    return theta, edges, costs, np.array([True, False, True][:k])


def _amwc(theta, edges, costs, part):
    return solve_amwc(theta, edges, costs, part)[2]


def _amwc_batch(theta, edges, costs, part):
    return solve_amwc_batch([(theta, edges, costs, part)] * 2, num_threads=2)[0][2]


def _mwc(theta, edges, costs, part):
    return solve_mwc(theta, edges, costs)[1]


def _mwc_batch(theta, edges, costs, part):
    return solve_mwc_batch([(theta, edges, costs)] * 2, num_threads=2)[0][1]


ENTRIES = [_amwc, _amwc_batch, _mwc, _mwc_batch]


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda f: f.__name__.strip("_"))
@pytest.mark.parametrize("node_scale,edge_scale", [(1e306, 1.0), (1.0, 1e306), (1e299, 1e299), (1e301, 0.0)],
                         ids=["node_costs_1e306", "edge_costs_1e306", "both_1e299_summed", "one_node_row_1e301"])
def test_costs_that_could_overflow_the_energy_are_rejected(entry, node_scale, edge_scale):
    problem = _problem(node_scale, edge_scale)
    with pytest.raises(ValueError, match=r"node_costs and edge_costs are too large: the energy could reach "
                                         r".*beyond 1e\+300.*scale all costs down"):
        entry(*problem)


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda f: f.__name__.strip("_"))
def test_large_but_safe_costs_give_a_finite_energy(entry):
    theta, edges, costs, part = _problem(1e290, 1e290)
    energy = entry(theta, edges, costs, part)
    assert math.isfinite(energy)
    # the same problem scaled down has the same solution up to the scale
    assert entry(theta * 1e-290, edges, costs * 1e-290, part) == pytest.approx(energy * 1e-290, rel=1e-9)


def test_the_bound_is_the_documented_sum():
    theta, edges, costs, part = _problem(1.0, 0.0)
    n = theta.shape[0]
    theta[:] = 0.999 * MAX_ENERGY / n  # sum over nodes of the largest |cost| just below MAX_ENERGY
    solve_amwc(theta, edges, costs, part)
    theta[0, 0] *= 1.1                 # just above: rejected
    with pytest.raises(ValueError, match="too large"):
        solve_amwc(theta, edges, costs, part)
