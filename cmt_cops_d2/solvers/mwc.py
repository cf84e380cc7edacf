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

``solve_mwc_warm`` solves the same problem started from the solution of a nearby problem (the layer's
backward: from the forward solution; see ``_warm``); ``prepare_lifted_problem`` /
``solve_lifted_mwc_warm`` do so for the lifted problems of one image without building their ``(N, J)``
costs in numpy.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

from . import _warm
from .amwc import (
    _TOL,
    _acquire_workspace,
    _release_workspace,
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

__all__ = ["solve_mwc", "solve_mwc_batch", "solve_mwc_warm", "LiftedProblem", "prepare_lifted_problem",
           "solve_lifted_mwc_warm", "accumulate_gradient", "label_margins", "DEFAULT_WARM_ROUNDS"]

accumulate_gradient = _warm.accumulate_gradient
label_margins = _warm.label_margins

DEFAULT_WARM_ROUNDS = 1


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


def _check_rounds(rounds):
    if isinstance(rounds, (bool, np.bool_)) or not isinstance(rounds, (int, np.integer)) or rounds < 1:
        raise ValueError(f"rounds must be a positive integer, got {rounds!r}")
    return int(rounds)


def validate_initial_labels(initial_labels, num_nodes: int, num_labels: int) -> np.ndarray:
    arr = np.asarray(initial_labels)
    if arr.shape != (num_nodes,):
        raise ValueError(f"initial_labels must have shape ({num_nodes},) to match node_costs, got shape {arr.shape}")
    if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        raise ValueError(f"initial_labels must be an integer array, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= num_labels):
        raise ValueError(f"initial_labels must lie in [0, {num_labels}) (the columns of node_costs)")
    return np.ascontiguousarray(arr, dtype=np.int64)


def solve_mwc_warm(
    node_costs,
    edges,
    edge_costs,
    initial_labels,
    initial_margins=None,
    *,
    rounds: int = DEFAULT_WARM_ROUNDS,
    cluster_passes: int = DEFAULT_CLUSTER_PASSES,
    node_passes: int = DEFAULT_NODE_PASSES,
) -> Tuple[np.ndarray, float]:
    """Multiway cut started from the solution of a nearby problem (the backward of the AMWC layer).

    A node is *free* when its initial label lost ground to its cheapest label, i.e. ``node_costs[v,
    z0_v] - min_l node_costs[v, l] > initial_margins[v]`` (``initial_margins``: the same margin in the
    problem ``initial_labels`` solved; default 0, every node whose initial label is not its cheapest).
    Connected regions of one initial label (fixed nodes) and of one (initial, cheapest) label pair (free
    nodes) are contracted into single nodes, that problem is solved as ``solve_mwc`` does, and node ICM
    on the full graph follows; ``rounds`` times, each from the previous labels. The result is never
    worse in energy than ``initial_labels`` (it is returned if nothing cheaper is found).

    Returns ``labels`` int64 ``(N,)`` and the energy, as ``solve_mwc``.
    """
    cp, npasses = _check_passes(cluster_passes, node_passes)
    nr = _check_rounds(rounds)
    theta, ed, c = _validate(node_costs, edges, edge_costs)
    N, J = theta.shape
    z0 = validate_initial_labels(initial_labels, N, J)
    if initial_margins is None:
        margin0 = np.zeros(N, np.float64)
    else:
        margin0 = np.asarray(initial_margins, dtype=np.float64)
        if margin0.shape != (N,) or not np.isfinite(margin0).all():
            raise ValueError(f"initial_margins must be a finite array of shape ({N},), got shape {margin0.shape}")
        margin0 = np.ascontiguousarray(margin0)
    if N == 0:
        return np.zeros(0, np.int64), 0.0
    labels, energy, _, _ = _warm.warm_mwc_kernel(theta, ed, c, z0, margin0, nr, cp, npasses, _TOL)
    return labels, float(energy)


class LiftedProblem:
    """The perturbed lifted MWC problems of one image in Algorithm 1, prepared once for all its
    ``lambda`` samples (``prepare_lifted_problem``); ``solve_lifted_mwc_warm`` solves one sample."""

    __slots__ = ("theta", "m", "slot", "initial_labels", "edges", "edge_costs", "prepared")

    def __init__(self, theta, m, slot, initial_labels, edges, edge_costs, prepared):
        self.theta, self.m, self.slot, self.initial_labels = theta, m, slot, initial_labels
        self.edges, self.edge_costs, self.prepared = edges, edge_costs, prepared

    @property
    def shape(self) -> Tuple[int, int]:
        """``(N, J)``: nodes and lifted labels."""
        return self.theta.shape[0], self.m.shape[0]


def prepare_lifted_problem(theta, m, slot, grad, initial_labels, edges, edge_costs) -> LiftedProblem:
    """Per-image part of ``solve_lifted_mwc_warm``: the lifted node costs of a sample are
    ``theta[v, m[l]] + lambda * grad[slot[l], v]`` (the ``grad`` term only where ``slot[l] >= 0``).

    For the AMWC layer, whose inputs are checked once per batch: ``theta`` (N, K) finite float64 and
    ``grad`` (S, N) finite float64 or float32 (kept: the lifted costs are computed in float64 from it), ``m`` / ``slot`` (J,) int64 with ``0 <= m < K`` and ``-1 <= slot < S``,
    ``initial_labels`` (N,) int64 in ``[0, J)`` (the forward solution lifted; its margins in the forward
    problem, ``solve_mwc_warm``'s ``initial_margins``, follow from ``theta``), ``edges`` / ``edge_costs``
    as validated by ``solve_mwc``. Shapes and index ranges are checked here.
    """
    theta = np.ascontiguousarray(theta, dtype=np.float64)
    grad = np.ascontiguousarray(grad, dtype=np.float32 if np.asarray(grad).dtype == np.float32 else np.float64)
    m = np.ascontiguousarray(m, dtype=np.int64)
    slot = np.ascontiguousarray(slot, dtype=np.int64)
    N, K = theta.shape
    J = m.shape[0]
    S = grad.shape[0]
    if (slot.shape != (J,) or grad.ndim != 2 or grad.shape[1] != N or np.shape(initial_labels) != (N,)
            or edges.ndim != 2 or edge_costs.shape != (edges.shape[0],)):
        raise ValueError("prepare_lifted_problem: inconsistent shapes of theta (N, K), m / slot (J,), grad (S, N), "
                         "initial labels (N,), edges (E, 2), edge_costs (E,)")
    if J == 0 or m.min() < 0 or m.max() >= K or slot.min() < -1 or slot.max() >= S:
        raise ValueError(f"prepare_lifted_problem: m must lie in [0, {K}) and slot in [-1, {S})")
    z0 = validate_initial_labels(initial_labels, N, J)
    prepared = _warm.lifted_prepare(theta, m, grad, slot, z0, edges, edge_costs) if N else None
    return LiftedProblem(theta, m, slot, z0, edges, edge_costs, prepared)


def solve_lifted_mwc_warm(
    problem: LiftedProblem,
    lam: float,
    *,
    rounds: int = DEFAULT_WARM_ROUNDS,
    cluster_passes: int = DEFAULT_CLUSTER_PASSES,
    node_passes: int = DEFAULT_NODE_PASSES,
) -> Tuple[np.ndarray, float]:
    """One sample of Algorithm 1: the multiway cut of ``problem``'s lifted costs perturbed by ``lam``,
    started from its initial labels as ``solve_mwc_warm`` (the forward segments, computed once per image,
    stay one cluster even where free nodes cut them apart). The ``(N, J)`` costs are built inside the
    kernel into a work array kept across solves. Returns ``labels`` and the energy."""
    cp, npasses = _check_passes(cluster_passes, node_passes)
    nr = _check_rounds(rounds)
    N, J = problem.shape
    if N == 0:
        return np.zeros(0, np.int64), 0.0
    lam = float(lam)
    tmin, best, free, nfree = _warm.lifted_free_nodes(problem.theta, problem.m, problem.slot, lam,
                                                      problem.initial_labels, problem.prepared, _TOL)
    cap = nfree + N // 64 + 64  # the free nodes' rows and room for the few the node ICM builds
    ws = _acquire_workspace()  # pages kept across solves (fresh ones cost a fault each)
    try:
        ws.fit(cap * J, 0, 0)
        labels, energy, _, _ = _warm.lifted_sample(
            problem.theta, problem.m, problem.slot, lam, problem.initial_labels, problem.prepared, problem.edges,
            problem.edge_costs, tmin, best, free, ws.f8[: cap * J].reshape(cap, J), nr, cp, npasses, _TOL)
    finally:
        _release_workspace(ws)
    return labels, float(energy)
