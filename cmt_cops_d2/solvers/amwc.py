"""Asymmetric multiway cut (AMWC, COPS eq. 2): numpy API over the Numba kernels in ``_core``.

Conventions (as in COPS / LPMP):

* ``node_costs[v, l]`` is the cost of giving node ``v`` label ``l`` (lower is better);
* ``edge_costs[e]`` is paid when edge ``e`` is cut; positive = attractive (prefers "same segment");
* ``partitionable[l]`` is True for *thing* labels (may form several instances) and False for *stuff*.

``solve_amwc`` minimises ``sum_v node_costs[v, labels[v]] + sum_e edge_costs[e] * y_e`` with
``y_e = [cluster_ids[u] != cluster_ids[v]]`` and guarantees, for every output:

1. ``labels[u] != labels[v]`` => ``cluster_ids[u] != cluster_ids[v]`` for every edge, and every cluster
   carries a single label;
2. every cluster is connected through edges whose both endpoints lie in it, so ``y`` is a valid
   multicut and its clusters are exactly the connected components of the uncut edges;
3. for a stuff label ``l``: every edge whose endpoints both have label ``l`` is uncut. Hence all nodes of
   label ``l`` connected through ``l``-``l`` edges form one cluster. Stuff nodes that are *not* connected
   through such edges (e.g. two separate sky regions) stay separate clusters: merging them across the
   graph is a post-processing decision (COPS makes one segment per stuff class), not part of eq. (2);
4. ``energy`` is eq. (2) evaluated on the *input* edge rows (so parallel edges add up).

Special cases: ``N == 0`` returns empty arrays and energy 0.0; with no edges every node takes its
``argmin`` label (first index on ties, like ``np.argmin``) and is its own cluster, stuff included
(guarantee 3 then asks nothing); with a single label the problem is a plain multicut (thing) or a
single component per connected piece (stuff). Parallel edges (``(u, v)`` listed twice, in either
order) are summed. Labels are chosen with first-index tie-breaking throughout (LPMP takes the largest
index); results are deterministic.

Algorithm (details in ``_core``): greedy joint labelling + contraction (GAEC-like, as LPMP) but with
the contraction order of *exact* gains (LPMP re-scores only some edges and contracts with stale gains
and labels), then local search on the state in which adjacent clusters of one stuff label count as
merged (LPMP's stuff post-pass): relabelling whole contracted clusters (most improving first), then
single-node moves (join a neighbouring instance / stuff region, or start a singleton). The local
search accepts strict decreases only, so it never worsens the contraction result;
``cluster_passes = node_passes = 0`` gives the plain contraction (+ stuff merge).

Performance: every kernel is single-threaded and releases the GIL (``solve_amwc_batch`` runs images in
parallel threads). Parallel edges are found with a hash map keyed by packed node pairs, which covers
graphs up to ~7e5 nodes with 5 grid distances (``edgehash.packing_fits``); larger graphs use a slower
fallback that walks the kept cluster's edge list at each contraction. The kernel's large arrays
(~130 bytes per edge plus 4 per node and label: ~175 MiB for a 256 x 512 grid with 6 distances,
~42 MiB for 160 x 160 with 133 labels) come from work arrays that are kept for the next solve (see
"work arrays kept across solves" below; ``release_workspaces()`` frees them).
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from . import _core

__all__ = ["solve_amwc", "solve_amwc_batch", "release_workspaces", "DEFAULT_CLUSTER_PASSES", "DEFAULT_NODE_PASSES"]

DEFAULT_CLUSTER_PASSES = 4
DEFAULT_NODE_PASSES = 4
_TOL = 1e-9

AmwcResult = Tuple[np.ndarray, np.ndarray, float]


# ----------------------------------------------------------------------------------------------------
# input validation (shared with mwc.py and reference.py)
# ----------------------------------------------------------------------------------------------------
def _as_real_array(name: str, value: Any) -> np.ndarray:
    try:
        arr = np.asarray(value)
    except Exception as exc:  # ragged lists and the like
        raise ValueError(f"{name} could not be converted to an array: {exc}") from None
    if arr.dtype == np.bool_ or arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold real numbers (integer or float dtype), got dtype {arr.dtype}")
    return arr


def validate_node_costs(node_costs: Any) -> np.ndarray:
    arr = _as_real_array("node_costs", node_costs)
    if arr.ndim != 2:
        raise ValueError(f"node_costs must have shape (N, K), got shape {arr.shape}")
    if arr.shape[1] == 0:
        raise ValueError("node_costs has K == 0 labels; at least one label is needed")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("node_costs contains NaN or inf")
    return arr


def validate_edges(edges: Any, num_nodes: int) -> np.ndarray:
    try:
        arr = np.asarray(edges)
    except Exception as exc:
        raise ValueError(f"edges could not be converted to an array: {exc}") from None
    if arr.size == 0 and arr.ndim <= 2 and (arr.ndim < 2 or arr.shape[-1] in (0, 2)):
        return np.zeros((0, 2), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"edges must have shape (E, 2), got shape {arr.shape}")
    if arr.dtype.kind in "iu" and arr.dtype != np.bool_:
        if arr.dtype.kind == "u" and arr.max() > np.iinfo(np.int64).max:
            raise ValueError(f"edges index out of range [0, {num_nodes})")
        arr = arr.astype(np.int64, copy=False)
    elif arr.dtype.kind == "f":
        if not np.isfinite(arr).all() or not (arr == np.round(arr)).all():
            raise ValueError(f"edges must hold integer node indices, got non-integral values (dtype {arr.dtype})")
        if np.abs(arr).max() >= 2.0**62:
            raise ValueError(f"edges index out of range [0, {num_nodes})")
        arr = arr.astype(np.int64)
    else:
        raise ValueError(f"edges must be an integer array, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= num_nodes:
        raise ValueError(f"edges index out of range [0, {num_nodes}): found {lo if lo < 0 else hi}")
    if (arr[:, 0] == arr[:, 1]).any():
        i = int(np.flatnonzero(arr[:, 0] == arr[:, 1])[0])
        raise ValueError(f"edges contains a self-loop at row {i} ({int(arr[i, 0])}, {int(arr[i, 1])})")
    return np.ascontiguousarray(arr)


def validate_edge_costs(edge_costs: Any, num_edges: int) -> np.ndarray:
    arr = _as_real_array("edge_costs", edge_costs)
    if arr.size == 0 and num_edges == 0:
        return np.zeros(0, dtype=np.float64)
    if arr.ndim != 1 or arr.shape[0] != num_edges:
        raise ValueError(f"edge_costs must have shape ({num_edges},) to match edges, got shape {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float64)
    if not np.isfinite(arr).all():
        raise ValueError("edge_costs contains NaN or inf")
    return arr


def validate_partitionable(partitionable: Any, num_labels: int) -> np.ndarray:
    try:
        arr = np.asarray(partitionable)
    except Exception as exc:
        raise ValueError(f"partitionable could not be converted to an array: {exc}") from None
    if arr.shape != (num_labels,):
        raise ValueError(f"partitionable must have shape ({num_labels},) to match node_costs, got shape {arr.shape}")
    if arr.dtype != np.bool_:
        if arr.dtype.kind not in "iuf" or not np.isin(arr, (0, 1)).all():
            raise ValueError(f"partitionable must be boolean (or 0/1), got dtype {arr.dtype}")
        arr = arr != 0
    return np.ascontiguousarray(arr, dtype=np.bool_)


# Largest energy magnitude the costs may reach: the kernel adds node cost rows and edge costs (and
# takes differences of such sums), which overflow float64 (1.8e308) to inf beyond this with margin.
MAX_ENERGY = 1e300


def validate_magnitudes(theta: np.ndarray, costs: np.ndarray) -> None:
    """Reject costs whose sums could overflow: ``sum_v max_l |theta[v, l]| + sum_e |c_e|`` (a bound on
    every energy and partial sum) must stay below :data:`MAX_ENERGY`. ``theta`` and ``costs`` are
    validated (finite float64) arrays."""
    bound = float(_core.magnitude_bound(theta, costs))  # inf once it overflows
    if not bound <= MAX_ENERGY:
        raise ValueError(
            f"node_costs and edge_costs are too large: the energy could reach {bound:.3g} (sum over nodes of "
            f"the largest |node cost| plus the sum of |edge costs|), beyond {MAX_ENERGY:g}, where float64 "
            "sums overflow; scale all costs down by one positive factor (the solution stays the same)")


def validate_problem(node_costs, edges, edge_costs, partitionable):
    """Checks and converts one AMWC problem; raises ``ValueError`` naming the offending argument."""
    theta = validate_node_costs(node_costs)
    ed = validate_edges(edges, theta.shape[0])
    c = validate_edge_costs(edge_costs, ed.shape[0])
    part = validate_partitionable(partitionable, theta.shape[1])
    validate_magnitudes(theta, c)
    return theta, ed, c, part


def _check_passes(cluster_passes, node_passes):
    for name, v in (("cluster_passes", cluster_passes), ("node_passes", node_passes)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    return int(cluster_passes), int(node_passes)


# ----------------------------------------------------------------------------------------------------
# work arrays kept across solves
# ----------------------------------------------------------------------------------------------------
# The kernel's large arrays (edge records, hash table, heap, edge lists, cost rows of merged clusters)
# are carved from three flat work arrays (``_core.workspace_sizes``). Fresh memory costs a page fault
# and zeroing per 4 KiB page (15% of a Cityscapes-size solve), so finished solves hand their work arrays
# back to a small pool and the next solve (any thread) reuses them. The pool keeps at most
# ``CMT_AMWC_WORKSPACE_MB`` (environment, default 1024) MiB; ``release_workspaces()`` empties it.
# The variable is read at the first solve (not at import, so a bad value breaks nothing else): a value
# that is not a whole number >= 0 makes that solve raise ``ValueError`` naming the variable.
_WS_LOCK = threading.Lock()
_WS_FREE: List["_Workspace"] = []
_WS_LIMIT: Optional[int] = None  # bytes; None until read from the environment
_WS_ENV = "CMT_AMWC_WORKSPACE_MB"


def workspace_limit() -> int:
    """The pool's cap in bytes, from ``CMT_AMWC_WORKSPACE_MB`` (read once); ``ValueError`` if malformed."""
    global _WS_LIMIT
    if _WS_LIMIT is None:
        raw = os.environ.get(_WS_ENV, "1024")
        try:
            mb = int(raw.strip())
        except ValueError:
            mb = -1
        if mb < 0:
            raise ValueError(f"environment variable {_WS_ENV}={raw!r} must be a whole number of MiB >= 0 "
                             f"(the cap of the AMWC solver's kept work arrays, default 1024); fix or unset it")
        _WS_LIMIT = mb << 20
    return _WS_LIMIT


class _Workspace:
    __slots__ = ("f8", "i4", "i8")

    def __init__(self):
        self.f8 = np.empty(0, np.float64)
        self.i4 = np.empty(0, np.int32)
        self.i8 = np.empty(0, np.int64)

    @property
    def nbytes(self) -> int:
        return self.f8.nbytes + self.i4.nbytes + self.i8.nbytes

    def fit(self, nf8: int, ni4: int, ni8: int) -> None:
        if self.f8.shape[0] < nf8:
            self.f8 = np.empty(nf8, np.float64)
        if self.i4.shape[0] < ni4:
            self.i4 = np.empty(ni4, np.int32)
        if self.i8.shape[0] < ni8:
            self.i8 = np.empty(ni8, np.int64)


def _acquire_workspace() -> _Workspace:
    with _WS_LOCK:
        return _WS_FREE.pop() if _WS_FREE else _Workspace()


def _release_workspace(ws: _Workspace) -> None:
    with _WS_LOCK:
        if sum(w.nbytes for w in _WS_FREE) + ws.nbytes <= workspace_limit():
            _WS_FREE.append(ws)


def release_workspaces() -> None:
    """Free the work arrays kept for later solves (they are re-created on demand)."""
    with _WS_LOCK:
        _WS_FREE.clear()


def _reset_workspaces_after_fork() -> None:
    # a forked child (e.g. a data-loader worker) must not inherit a lock held by another thread, and
    # should not write into pages it shares copy-on-write with the parent
    global _WS_LOCK
    _WS_LOCK = threading.Lock()
    _WS_FREE.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_workspaces_after_fork)


def run_kernel(theta, edges, costs, part, cluster_passes, node_passes) -> AmwcResult:
    """Solve a validated problem (releases the GIL inside the kernel)."""
    if theta.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0.0
    workspace_limit()  # a malformed CMT_AMWC_WORKSPACE_MB fails here, before the solve
    ws = _acquire_workspace()
    try:
        ws.fit(*_core.workspace_sizes(theta.shape[0], theta.shape[1], edges.shape[0]))
        labels, cids, energy, _ = _core.solve_kernel_ws(
            theta, edges, costs, part, cluster_passes, node_passes, _TOL, True, ws.f8, ws.i4, ws.i8
        )
    finally:
        _release_workspace(ws)
    return labels, cids, float(energy)


# ----------------------------------------------------------------------------------------------------
# public API
# ----------------------------------------------------------------------------------------------------
def solve_amwc(
    node_costs,
    edges,
    edge_costs,
    partitionable,
    *,
    cluster_passes: int = DEFAULT_CLUSTER_PASSES,
    node_passes: int = DEFAULT_NODE_PASSES,
) -> AmwcResult:
    """Approximately solve the AMWC problem (eq. 2); see the module doc for the guarantees.

    Args:
        node_costs: ``(N, K)`` real array, cost of label ``l`` at node ``v``.
        edges: ``(E, 2)`` integer array of node indices (undirected, no self-loops).
        edge_costs: ``(E,)`` real array, paid when the edge is cut (positive = attractive).
        partitionable: ``(K,)`` bool, True for thing labels.
        cluster_passes, node_passes: maximum ICM sweeps over clusters / nodes (0 disables).

    Returns:
        ``labels`` int64 ``(N,)``, ``cluster_ids`` int64 ``(N,)`` numbered ``0..M-1`` in order of first
        node, and ``energy`` (float) of eq. (2).
    """
    cp, npasses = _check_passes(cluster_passes, node_passes)
    theta, ed, c, part = validate_problem(node_costs, edges, edge_costs, partitionable)
    return run_kernel(theta, ed, c, part, cp, npasses)


def _unpack_problem(p) -> Tuple[Any, Any, Any, Any]:
    if isinstance(p, Mapping):
        try:
            return p["node_costs"], p["edges"], p["edge_costs"], p["partitionable"]
        except KeyError as exc:
            raise ValueError(f"problem dict lacks key {exc}") from None
    if not isinstance(p, (tuple, list)) or len(p) != 4:
        raise ValueError("each problem must be (node_costs, edges, edge_costs, partitionable) or a dict with those keys")
    return p[0], p[1], p[2], p[3]


def run_batch(fn, items: Sequence[Any], num_threads: Optional[int]) -> List[Any]:
    """Apply ``fn`` to every item in a thread pool; results in order; the first exception propagates
    (remaining queued items are cancelled)."""
    items = list(items)
    if num_threads is None:
        num_threads = os.cpu_count() or 1
    if isinstance(num_threads, (bool, np.bool_)) or not isinstance(num_threads, (int, np.integer)) or num_threads < 1:
        raise ValueError(f"num_threads must be a positive integer, got {num_threads!r}")
    if num_threads == 1 or len(items) <= 1:
        return [fn(it) for it in items]
    ex = ThreadPoolExecutor(max_workers=min(int(num_threads), len(items)))
    try:
        futures = [ex.submit(fn, it) for it in items]
        return [f.result() for f in futures]
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def solve_amwc_batch(
    problems: Sequence[Any],
    num_threads: Optional[int] = None,
    *,
    cluster_passes: int = DEFAULT_CLUSTER_PASSES,
    node_passes: int = DEFAULT_NODE_PASSES,
) -> List[AmwcResult]:
    """Solve several AMWC problems (e.g. the images of a batch) in parallel threads.

    Each problem is ``(node_costs, edges, edge_costs, partitionable)`` or a dict with those keys. The
    Numba kernel releases the GIL, so ``num_threads`` threads (default: ``os.cpu_count()``) run truly in
    parallel. Results come back in input order and equal those of ``solve_amwc``; an exception raised
    for any problem (validation included, which runs in the worker) propagates to the caller.
    """
    cp, npasses = _check_passes(cluster_passes, node_passes)

    def work(p):
        theta, ed, c, part = validate_problem(*_unpack_problem(p))
        return run_kernel(theta, ed, c, part, cp, npasses)

    return run_batch(work, problems, num_threads)
