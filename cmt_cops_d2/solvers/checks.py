"""Independent checks for AMWC / MWC solutions: feasibility, energy, and exact brute force on tiny graphs.

Written in plain numpy / scipy on purpose, sharing no code with the Numba solver, so that tests compare
the solver against an independent reading of COPS eq. (2).
"""
from __future__ import annotations

import itertools
import math
from typing import Iterator, List, Tuple

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

__all__ = [
    "FeasibilityError",
    "amwc_energy",
    "mwc_energy",
    "check_amwc_solution",
    "check_mwc_solution",
    "brute_force_amwc",
    "brute_force_mwc",
]


class FeasibilityError(AssertionError):
    """A solution violates a constraint of eq. (2) or reports a wrong energy."""


def _edges(edges) -> np.ndarray:
    e = np.asarray(edges, dtype=np.int64)
    return e.reshape(-1, 2)


def amwc_energy(node_costs, edges, edge_costs, labels, cluster_ids) -> float:
    """Eq. (2) with ``y_e = [cluster_ids[u] != cluster_ids[v]]`` (exactly rounded sum, ``math.fsum``)."""
    theta = np.asarray(node_costs, dtype=np.float64)
    e = _edges(edges)
    c = np.asarray(edge_costs, dtype=np.float64).reshape(-1)
    lab = np.asarray(labels, dtype=np.int64)
    cid = np.asarray(cluster_ids, dtype=np.int64)
    node_terms = theta[np.arange(theta.shape[0]), lab] if theta.shape[0] else np.zeros(0)
    cut = cid[e[:, 0]] != cid[e[:, 1]] if e.shape[0] else np.zeros(0, bool)
    return math.fsum(node_terms.tolist()) + math.fsum(c[cut].tolist())


def mwc_energy(node_costs, edges, edge_costs, labels) -> float:
    """Multiway cut energy: ``sum_v theta[v, x_v] + sum_e c_e [x_u != x_v]``."""
    return amwc_energy(node_costs, edges, edge_costs, labels, labels)


def _tol(node_costs, edge_costs) -> float:
    scale = float(np.abs(np.asarray(node_costs, dtype=np.float64)).sum()) + float(
        np.abs(np.asarray(edge_costs, dtype=np.float64)).sum()
    )
    return 1e-9 * max(1.0, scale)


def check_amwc_solution(node_costs, edges, edge_costs, partitionable, labels, cluster_ids, energy=None) -> float:
    """Raise ``FeasibilityError`` unless (labels, cluster_ids) is feasible for eq. (2); return its energy.

    Verified: shapes and ranges; one label per cluster (so different labels => different clusters);
    every cluster connected through its internal edges (so ``y = [cluster differs]`` is a valid
    multicut whose components are the clusters); every edge between two nodes of the same stuff label
    is uncut; ``energy`` (if given) matches eq. (2).
    """
    theta = np.asarray(node_costs, dtype=np.float64)
    N, K = theta.shape
    e = _edges(edges)
    part = np.asarray(partitionable, dtype=bool)
    lab = np.asarray(labels)
    cid = np.asarray(cluster_ids)
    if lab.shape != (N,) or cid.shape != (N,):
        raise FeasibilityError(f"labels / cluster_ids must have shape ({N},), got {lab.shape} / {cid.shape}")
    if N == 0:
        if energy is not None and abs(energy) > 1e-12:
            raise FeasibilityError(f"empty problem must have energy 0, got {energy}")
        return 0.0
    if lab.dtype.kind not in "iu" or cid.dtype.kind not in "iu":
        raise FeasibilityError("labels and cluster_ids must be integer arrays")
    if lab.min() < 0 or lab.max() >= K:
        raise FeasibilityError("labels out of range")
    # one label per cluster
    _, inv = np.unique(cid, return_inverse=True)
    M = int(inv.max()) + 1
    lab_of = np.full(M, -1, dtype=np.int64)
    lab_of[inv] = lab
    if (lab_of[inv] != lab).any():
        v = int(np.flatnonzero(lab_of[inv] != lab)[0])
        raise FeasibilityError(f"cluster {int(cid[v])} holds more than one label (node {v})")
    # clusters connected through internal edges
    if e.shape[0]:
        inside = inv[e[:, 0]] == inv[e[:, 1]]
        ei = e[inside]
    else:
        ei = np.zeros((0, 2), np.int64)
    g = coo_matrix((np.ones(ei.shape[0]), (ei[:, 0], ei[:, 1])), shape=(N, N))
    ncomp, comp = connected_components(g, directed=False)
    if ncomp != M:
        raise FeasibilityError(f"{M} clusters but {ncomp} connected pieces: some cluster is not connected")
    # stuff labels form no internal cuts
    if e.shape[0]:
        lu, lv = lab[e[:, 0]], lab[e[:, 1]]
        bad = (lu == lv) & ~part[lu] & (inv[e[:, 0]] != inv[e[:, 1]])
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise FeasibilityError(f"edge {i} {tuple(e[i])} joins two nodes of stuff label {int(lu[i])} but is cut")
    en = amwc_energy(theta, e, edge_costs, lab, cid)
    if energy is not None and abs(float(energy) - en) > _tol(theta, edge_costs):
        raise FeasibilityError(f"reported energy {energy!r} differs from recomputed {en!r}")
    return en


def check_mwc_solution(node_costs, edges, edge_costs, labels, energy=None) -> float:
    """Labels in range, energy (if given) equal to the multiway cut energy; returns the energy."""
    theta = np.asarray(node_costs, dtype=np.float64)
    lab = np.asarray(labels)
    if lab.shape != (theta.shape[0],):
        raise FeasibilityError(f"labels must have shape ({theta.shape[0]},), got {lab.shape}")
    if lab.size and (lab.dtype.kind not in "iu" or lab.min() < 0 or lab.max() >= theta.shape[1]):
        raise FeasibilityError("labels out of range or not integer")
    en = mwc_energy(theta, edges, edge_costs, lab)
    if energy is not None and abs(float(energy) - en) > _tol(theta, edge_costs):
        raise FeasibilityError(f"reported energy {energy!r} differs from recomputed {en!r}")
    return en


# ----------------------------------------------------------------------------------------------------
# brute force
# ----------------------------------------------------------------------------------------------------
def _set_partitions(n: int) -> Iterator[List[int]]:
    """All partitions of ``range(n)`` as restricted growth strings (block index per element)."""
    if n == 0:
        yield []
        return
    a = [0] * n

    def rec(i, m):
        if i == n:
            yield list(a)
            return
        for b in range(m + 1):
            a[i] = b
            yield from rec(i + 1, max(m, b + 1) if b == m else m)

    # element 0 is always in block 0
    yield from rec(1, 1)


def brute_force_amwc(node_costs, edges, edge_costs, partitionable) -> Tuple[float, np.ndarray, np.ndarray]:
    """Exact optimum of eq. (2) by enumerating all labelings and all set partitions (N <= 7).

    Feasibility is read directly from eq. (2): ``y`` = the cut of a partition; ``x_u != x_v => y = 1``;
    ``x_u == x_v`` stuff ``=> y = 0``. Returns ``(energy, labels, cluster_ids)`` of one optimum.
    """
    theta = np.asarray(node_costs, dtype=np.float64)
    N, K = theta.shape
    if N > 7:
        raise ValueError("brute force is limited to N <= 7")
    e = _edges(edges)
    c = np.asarray(edge_costs, dtype=np.float64).reshape(-1)
    part = np.asarray(partitionable, dtype=bool)
    parts = np.array(list(_set_partitions(N)), dtype=np.int64).reshape(-1, N)
    labs = np.array(list(itertools.product(range(K), repeat=N)), dtype=np.int64).reshape(-1, N)
    Y = parts[:, e[:, 0]] != parts[:, e[:, 1]]  # (P, E)
    D = labs[:, e[:, 0]] != labs[:, e[:, 1]]  # (L, E) labels differ -> must cut
    S = (~D) & ~part[labs[:, e[:, 0]]]  # (L, E) same stuff label -> must not cut
    feas = ~((D[:, None, :] & ~Y[None, :, :]) | (S[:, None, :] & Y[None, :, :])).any(axis=2)  # (L, P)
    node_term = theta[np.arange(N)[None, :], labs].sum(axis=1)  # (L,)
    edge_term = Y.astype(np.float64) @ c  # (P,)
    en = np.where(feas, node_term[:, None] + edge_term[None, :], np.inf)
    i, j = np.unravel_index(int(np.argmin(en)), en.shape)
    return float(en[i, j]), labs[i].copy(), parts[j].copy()


def brute_force_mwc(node_costs, edges, edge_costs) -> Tuple[float, np.ndarray]:
    """Exact multiway cut optimum by enumerating all labelings (K**N <= ~1e6)."""
    theta = np.asarray(node_costs, dtype=np.float64)
    N, K = theta.shape
    if K**N > 2_000_000:
        raise ValueError("brute force is limited to K**N <= 2e6")
    e = _edges(edges)
    c = np.asarray(edge_costs, dtype=np.float64).reshape(-1)
    labs = np.array(list(itertools.product(range(K), repeat=N)), dtype=np.int64).reshape(-1, N)
    en = theta[np.arange(N)[None, :], labs].sum(axis=1) + (labs[:, e[:, 0]] != labs[:, e[:, 1]]).astype(
        np.float64
    ) @ c
    i = int(np.argmin(en))
    return float(en[i]), labs[i].copy()
