"""Multiway cut (MWC) for the backward pass of the AMWC layer (COPS Sec. 3.3.3, Algorithm 1).

MWC is AMWC with no partitionable label (``P = {}``): an edge is cut iff its endpoints' labels differ,
so the energy is ``sum_v theta[v, x_v] + sum_e c_e [x_u != x_v]`` and only the labels matter. In the
backward pass the labels are the "lifted" panoptic labels (one per ground-truth segment, plus absent
classes) and ``theta`` is perturbed by ``lambda * dL/dz``.

Solver: the same kernel as ``solve_amwc`` with every label non-partitionable (greedy contraction with
exact gains, then ICM). **Ties.** In the lifted space several labels often have exactly equal costs
(instances of one class where the perturbation is zero). The greedy contraction gives every cluster
the first minimal label, so two instances of one class may end up with the same lifted label even
though the edges between them are repulsive; MWC would then fuse them. LPMP handles this with a tie
relabel inside its contraction (swap to an equally cheap label when a same-label pair has a positive
gain). Here the cluster ICM step does it, and more generally: every contracted cluster is relabelled
to whichever label (tied or not) lowers the energy given its neighbours, so a cluster moves to an
equally cheap label whenever the edges to a same-label neighbour are repulsive in sum. With exact
ties and no such benefit the first minimal label is kept (deterministic).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from .amwc import (
    DEFAULT_CLUSTER_PASSES,
    DEFAULT_NODE_PASSES,
    _check_passes,
    run_batch,
    run_kernel,
    validate_edge_costs,
    validate_edges,
    validate_magnitudes,
    validate_node_costs,
)

__all__ = ["solve_mwc", "solve_mwc_batch"]


def _validate(node_costs, edges, edge_costs):
    theta = validate_node_costs(node_costs)
    ed = validate_edges(edges, theta.shape[0])
    c = validate_edge_costs(edge_costs, ed.shape[0])
    validate_magnitudes(theta, c)
    return theta, ed, c


def solve_mwc(
    node_costs,
    edges,
    edge_costs,
    *,
    cluster_passes: int = DEFAULT_CLUSTER_PASSES,
    node_passes: int = DEFAULT_NODE_PASSES,
) -> Tuple[np.ndarray, float]:
    """Approximately solve the multiway cut problem.

    Args:
        node_costs: ``(N, J)`` real array (lifted label costs).
        edges: ``(E, 2)`` integer array; edge_costs: ``(E,)``, paid when the edge is cut (positive = attractive).

    Returns:
        ``labels`` int64 ``(N,)`` and the energy (float). The cut indicator is ``labels[u] != labels[v]``.
    """
    cp, npasses = _check_passes(cluster_passes, node_passes)
    theta, ed, c = _validate(node_costs, edges, edge_costs)
    part = np.zeros(theta.shape[1], dtype=np.bool_)
    labels, _, energy = run_kernel(theta, ed, c, part, cp, npasses)
    return labels, energy


def solve_mwc_batch(
    problems: Sequence[Any],
    num_threads: Optional[int] = None,
    *,
    cluster_passes: int = DEFAULT_CLUSTER_PASSES,
    node_passes: int = DEFAULT_NODE_PASSES,
) -> List[Tuple[np.ndarray, float]]:
    """``solve_mwc`` over ``(node_costs, edges, edge_costs)`` triples in parallel threads (GIL released),
    results in input order; the first exception propagates."""
    cp, npasses = _check_passes(cluster_passes, node_passes)

    def work(p):
        if not isinstance(p, (tuple, list)) or len(p) != 3:
            raise ValueError("each problem must be (node_costs, edges, edge_costs)")
        return solve_mwc(p[0], p[1], p[2], cluster_passes=cp, node_passes=npasses)

    return run_batch(work, problems, num_threads)
