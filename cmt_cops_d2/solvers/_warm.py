"""Numba kernels of the warm-started multiway cut (the backward pass of the AMWC layer, Algorithm 1).

Every MWC problem of the backward differs from the problem the forward pass solved only by the
perturbation ``lambda * dL/dZ`` of the node costs. A cold solve contracts the whole pixel graph from
singletons again; the warm start keeps what the perturbation cannot have changed:

1. **Free nodes.** Node ``v`` is *free* when its initial label ``z0_v`` lost ground to its cheapest
   label: ``theta[v, z0_v] - min_l theta[v, l] > margin0[v] + tol``, ``margin0[v]`` being the same
   margin in the problem ``z0`` solved (for the layer: the forward AMWC problem). Where the
   perturbation favours the current label or leaves it alone, nothing pushes the node away.
2. **Initial clusters**: the connected regions of one initial label (the forward segments), without
   the free nodes whose cheapest label is another one; those form clusters of their own, the connected
   components of equal pair ``(z0_v, argmin_l theta[v, l])``. (Free nodes are not made singletons: a
   contraction from singletons on the lifted space, where the labels of one class tie, ends several
   percent above the warm result on realistic problems. A region that loses free nodes may fall
   apart; its pieces stay one cluster, which MWC allows: its energy depends on the labels only.)
3. **Contracted problem**: summed cost rows of the clusters and summed edge costs between them,
   solved by the full pipeline of ``_core.solve_kernel`` (greedy contraction with exact gains, cluster
   and node ICM) with every label non-partitionable.
4. **Expanded** to the nodes and improved by node ICM on the original graph (``icm_mwc``, the MWC case
   of ``_core.refine_nodes``), started from the free nodes and the relabelled nodes with their
   neighbours (the neighbours of a free node that kept its label see no change but their own
   perturbation, which did not push them; a node moved to a label of the same cost with all its
   edges' cuts unchanged, e.g. a whole segment taking a tied lifted label, changes nothing either).

Further rounds (``rounds > 1``) repeat 2-4 from the previous labels ``x`` with the connected components
of equal key ``x_v`` (fixed nodes) / ``(x_v, argmin)`` (free nodes) as clusters. 5. The energy is
evaluated and the result replaced by ``z0`` if ``z0`` is cheaper: never worse than the starting
labelling.

**Lifted problems of the layer** (``lifted_prepare`` once per image, ``lifted_sample`` per ``lambda``).
The costs ``theta[v, m[l]] + lambda * G[v, slot[l]]`` (``G`` the incoming gradient ``dL/dZ``, 0 for
labels without a slot) are never built as a whole: a node's row is built (and stored in a growing
array) only when something reads the whole row. Step 1 needs no row for most nodes: with ``G_z0[v]``
the gradient of ``v``'s own label and ``G_min[v]`` the smallest gradient over the labels (both fixed
per image), ``theta[v, z0] - min_l theta[v, l] <= margin0[v] + lambda (G_z0[v] - G_min[v])``, so ``v`` is
certainly fixed when ``lambda (G_z0[v] - G_min[v]) <= tol`` (the usual case: a pixel whose segment the
loss wants to keep). The summed rows of the forward segments come from their class and slot sums
(``(n_seg, K)`` and ``(n_seg, S)``, per image), corrected by the rows of the nodes that left them. The
result equals ``warm_mwc_kernel`` on the built costs up to summation order.

Performance: as in ``_core``, the hot loops call no helper that takes arrays (each such call costs
atomic reference-count updates): the small helpers are inlined (``inline="always"``) and the node
ICM reads the lifted costs inline, which made it about 3x faster.
"""
import numpy as np
from numba import njit

from ._core import components_by_key, incidence_csr, solve_kernel, unique_edges


@njit(cache=True, nogil=True)
def label_margins(theta, x):
    """``theta[v, x_v] - min_l theta[v, l]`` per node (how much dearer the label is than the cheapest)."""
    N = theta.shape[0]
    out = np.empty(N, np.float64)
    for v in range(N):
        t = theta[v, 0]
        for l in range(1, theta.shape[1]):
            if theta[v, l] < t:
                t = theta[v, l]
        out[v] = theta[v, x[v]] - t
    return out


@njit(cache=True, nogil=True)
def half_edges(N, edges, costs):
    """Incidence CSR with the cost next to each half-edge: ``(ptr, nbr, hcost)``, node ``v``'s neighbours
    ``nbr[ptr[v]:ptr[v + 1]]`` and the costs of those edges (read in order by the node ICM)."""
    ptr, nbr, eid = incidence_csr(N, edges)
    hcost = np.empty(eid.shape[0], np.float64)
    for s in range(eid.shape[0]):
        hcost[s] = costs[eid[s]]
    return ptr, nbr, hcost


@njit(cache=True, nogil=True)
def row_sums(theta, comp, M):
    """Summed cost rows ``(M, J)`` of the clusters ``comp`` (row ``v`` of ``theta`` for node ``v``)."""
    J = theta.shape[1]
    tc = np.zeros((M, J), np.float64)
    for v in range(comp.shape[0]):
        r = comp[v]
        for l in range(J):
            tc[r, l] += theta[v, l]
    return tc


@njit(cache=True, nogil=True)
def contracted_edges(edges, costs, comp, M):
    """The unique edges between clusters ``(m, 2)`` and their summed costs ``(m,)`` (edges inside a
    cluster are dropped)."""
    cnt = 0
    for e in range(edges.shape[0]):
        if comp[edges[e, 0]] != comp[edges[e, 1]]:
            cnt += 1
    ce = np.empty((cnt, 2), np.int64)
    cc = np.empty(cnt, np.float64)
    k = 0
    for e in range(edges.shape[0]):
        a = comp[edges[e, 0]]
        b = comp[edges[e, 1]]
        if a != b:
            ce[k, 0] = a
            ce[k, 1] = b
            cc[k] = costs[e]
            k += 1
    return unique_edges(M, ce, cc)


@njit(cache=True, nogil=True, inline="always")
def _cost(v, l, rows, row_of, src):
    """``theta_lifted[v, l]``: from the built row ``rows[row_of[v]]``, else from ``src = (theta, m, slot,
    has, has_slot, grad_t, lam)``."""
    r = row_of[v]
    if r >= 0:
        return rows[r, l]
    theta, m, slot, _, _, grad_t, lam = src
    s = slot[l]
    return theta[v, m[l]] + lam * grad_t[v, s] if s >= 0 else theta[v, m[l]]


@njit(cache=True, nogil=True)
def _ensure_row(v, rows, row_of, count, tmin, src):
    """Build the row of node ``v`` of the lifted costs (and ``tmin[v]``, its smallest entry) unless it is
    built: rows are stored one after the other in ``rows`` (``count[0]`` used), which grows by doubling.
    Returns ``rows`` (a new array when it grew)."""
    if row_of[v] >= 0:
        return rows
    if count[0] == rows.shape[0]:
        grown = np.empty((2 * rows.shape[0] + 16, rows.shape[1]), np.float64)
        grown[: count[0]] = rows[: count[0]]
        rows = grown
    row_of[v] = count[0]
    count[0] += 1
    theta, m, _, has, has_slot, grad_t, lam = src
    o = rows[row_of[v]]
    th = theta[v]
    gr = grad_t[v]
    J = m.shape[0]
    for l in range(J):
        o[l] = th[m[l]]
    for i in range(has.shape[0]):
        o[has[i]] += lam * gr[has_slot[i]]
    t = o[0]
    for l in range(1, J):
        t = min(t, o[l])
    tmin[v] = t
    return rows


@njit(cache=True, nogil=True, inline="always")
def _row_min(v, src):
    """Smallest lifted cost of node ``v`` and its first label, without building the row."""
    theta, m, slot, _, _, grad_t, lam = src
    th = theta[v]
    gr = grad_t[v]
    t = np.inf
    a = 0
    for l in range(m.shape[0]):
        s = slot[l]
        val = th[m[l]] + lam * gr[s] if s >= 0 else th[m[l]]
        if val < t:
            t = val
            a = l
    return t, a


@njit(cache=True, nogil=True, inline="always")
def _first_min(o, t):
    for l in range(o.shape[0]):
        if o[l] == t:
            return l
    return 0


@njit(cache=True, nogil=True)
def energy_of(rows, row_of, src, edges, costs, x):
    """``sum_v theta[v, x_v] + sum_e costs[e] [x_u != x_v]`` (rows not built are read from ``src``)."""
    e = 0.0
    for v in range(x.shape[0]):
        e += _cost(v, x[v], rows, row_of, src)
    for i in range(edges.shape[0]):
        if x[edges[i, 0]] != x[edges[i, 1]]:
            e += costs[i]
    return e


@njit(cache=True, nogil=True)
def energy_from(rows, row_of, src, ptr, nbr, hcost, z0, e_z0, x):
    """Energy of ``x`` from the energy ``e_z0`` of ``z0``: only the nodes that changed label and their
    edges are visited."""
    N = x.shape[0]
    e = e_z0
    for v in range(N):
        if x[v] == z0[v]:
            continue
        e += _cost(v, x[v], rows, row_of, src) - _cost(v, z0[v], rows, row_of, src)
        for s in range(ptr[v], ptr[v + 1]):
            w = nbr[s]
            if x[w] != z0[w] and w < v:
                continue  # counted from w
            e += hcost[s] * ((1.0 if x[v] != x[w] else 0.0) - (1.0 if z0[v] != z0[w] else 0.0))
    return e


@njit(cache=True, nogil=True)
def icm_mwc(rows, row_of, count, src, tmin, ptr, nbr, hcost, x, active, max_passes, tol):
    """Node ICM of ``_core.refine_nodes`` for a multiway cut (every label non-partitionable, so a node's
    segment is its label): a node takes a neighbour's label, or its cheapest label if no neighbour has
    it, when that lowers the energy by more than ``tol``. Visits the nodes with ``active[v] != 0``
    first, then the neighbours of the nodes that moved. ``tmin[v]`` is the smallest cost of ``v`` or a
    lower bound of it where the row is not built (``row_of[v] < 0``): entries are read one by one, and
    a row is built only when the bound lets the cheapest label compete (then the exact check decides,
    so the moves are those made with every row built). Returns the number of moves and ``rows``."""
    N = x.shape[0]
    J = rows.shape[1]
    theta, m, slot, _, _, grad_t, lam = src
    acc = np.zeros(J, np.float64)
    stamp = np.zeros(J, np.int64)
    maxdeg = 0
    for v in range(N):
        maxdeg = max(maxdeg, ptr[v + 1] - ptr[v])
    touched = np.empty(maxdeg + 1, np.int64)
    nxt = np.zeros(N, np.uint8)
    token = 0
    total = 0
    for _ in range(max_passes):
        changed = 0
        for v in range(N):
            if active[v] == 0:
                continue
            active[v] = 0
            token += 1
            nt = 0
            xv = x[v]
            scur = 0.0
            for s in range(ptr[v], ptr[v + 1]):
                k = x[nbr[s]]
                if k == xv:
                    scur += hcost[s]
                    continue
                if stamp[k] != token:
                    stamp[k] = token
                    acc[k] = 0.0
                    touched[nt] = k
                    nt += 1
                acc[k] += hcost[s]
            # lifted costs read inline (``_cost``): a helper taking arrays would cost reference counting
            r = row_of[v]
            if r >= 0:
                base = rows[r, xv] - scur
            else:
                sl = slot[xv]
                base = (theta[v, m[xv]] + lam * grad_t[v, sl] if sl >= 0 else theta[v, m[xv]]) - scur
            best = -tol
            bl = -1
            for t in range(nt):
                k = touched[t]
                if r >= 0:
                    ck = rows[r, k]
                else:
                    sl = slot[k]
                    ck = theta[v, m[k]] + lam * grad_t[v, sl] if sl >= 0 else theta[v, m[k]]
                d = ck - base - acc[k]
                if d < best:
                    best = d
                    bl = k
            if tmin[v] - base < best and row_of[v] < 0:
                rows = _ensure_row(v, rows, row_of, count, tmin, src)  # the bound lets it compete: exact check
            if tmin[v] - base < best:
                la = _first_min(rows[row_of[v]], tmin[v])
                if la != xv and stamp[la] != token:
                    best = tmin[v] - base
                    bl = la
            if bl < 0:
                continue
            x[v] = bl
            changed += 1
            for s in range(ptr[v], ptr[v + 1]):
                nxt[nbr[s]] = 1
        total += changed
        if changed == 0:
            break
        for v in range(N):
            active[v] = nxt[v]
            nxt[v] = 0
    return total, rows


@njit(cache=True, nogil=True)
def initial_clusters(edges, z0, seg, n_seg, free, best, J):
    """Step 2: cluster of every node (``seg`` the forward segments, ids ``0..n_seg-1``; the free nodes
    whose cheapest label differs from ``z0`` in components of equal ``(z0, best)``, ids from ``n_seg``)
    and the number of clusters."""
    N = z0.shape[0]
    key = np.full(N, -1, np.int64)
    for v in range(N):
        if free[v] != 0 and best[v] != z0[v]:
            key[v] = z0[v] * J + best[v]
    moved, n_moved = components_by_key(edges, key)  # the ids of nodes with key -1 are not used
    newid = np.full(n_moved, -1, np.int64)
    comp = np.empty(N, np.int64)
    M = n_seg
    for v in range(N):
        if key[v] < 0:
            comp[v] = seg[v]
        else:
            r = moved[v]
            if newid[r] < 0:
                newid[r] = M
                M += 1
            comp[v] = newid[r]
    return comp, M


@njit(cache=True, nogil=True, inline="always")
def _relabel_matters(v, xn, x, rows, row_of, src, ptr, nbr):
    """Whether the relabelling ``x[v] -> xn[v]`` changed anything the node ICM looks at: ``v``'s cost or
    the cut of one of its edges. A segment moved as a whole to a label of equal cost (lifted labels of
    one class without perturbation tie) changes neither."""
    if _cost(v, xn[v], rows, row_of, src) != _cost(v, x[v], rows, row_of, src):
        return True
    for s in range(ptr[v], ptr[v + 1]):
        w = nbr[s]
        if (xn[v] == xn[w]) != (x[v] == x[w]):
            return True
    return False


@njit(cache=True, nogil=True)
def _round(rows, row_of, count, src, tmin, edges, costs, x, comp, M, tc, free, ptr, nbr, hcost, cluster_passes,
           node_passes, tol):
    """Steps 3-4: solve the problem contracted to ``comp`` (summed rows ``tc``), expand, node ICM from
    the free nodes and the relabelled nodes with their neighbours. Returns the new labels and ``rows``."""
    N = x.shape[0]
    part = np.zeros(rows.shape[1], np.bool_)
    ue, uw = contracted_edges(edges, costs, comp, M)
    zc, _, _, _ = solve_kernel(tc, ue, uw, part, cluster_passes, node_passes, tol, True)
    xn = np.empty(N, np.int64)
    for v in range(N):
        xn[v] = zc[comp[v]]
    if node_passes > 0:
        active = np.zeros(N, np.uint8)
        for v in range(N):
            if xn[v] != x[v] and _relabel_matters(v, xn, x, rows, row_of, src, ptr, nbr):
                active[v] = 1
                for s in range(ptr[v], ptr[v + 1]):
                    active[nbr[s]] = 1
            elif free[v] != 0:
                active[v] = 1
        _, rows = icm_mwc(rows, row_of, count, src, tmin, ptr, nbr, hcost, xn, active, node_passes, tol)
    return xn, rows


@njit(cache=True, nogil=True)
def _finish(rows, row_of, count, src, tmin, edges, costs, z0, e_z0, x, best, free, ptr, nbr, hcost, rounds,
            cluster_passes, node_passes, tol):
    """Rounds 2.. (clusters: components of equal ``x`` / ``(x, best)``; every row built) and step 5
    (``e_z0`` the energy of ``z0``)."""
    N = x.shape[0]
    J = rows.shape[1]
    if rounds > 1:
        for v in range(N):
            rows = _ensure_row(v, rows, row_of, count, tmin, src)
        ordered = True
        for v in range(N):
            ordered = ordered and row_of[v] == v
        if not ordered:  # the rows in node order, for row_sums
            rows = rows[row_of.copy()]
            for v in range(N):
                row_of[v] = v
            count[0] = N
        key = np.empty(N, np.int64)
        for _ in range(rounds - 1):
            for v in range(N):
                key[v] = x[v] * J + (best[v] if free[v] != 0 else x[v])
            comp, M = components_by_key(edges, key)
            x, rows = _round(rows, row_of, count, src, tmin, edges, costs, x, comp, M, row_sums(rows, comp, M), free,
                             ptr, nbr, hcost, cluster_passes, node_passes, tol)
    energy = energy_from(rows, row_of, src, ptr, nbr, hcost, z0, e_z0, x)
    if e_z0 <= energy:
        return z0.copy(), e_z0
    return x, energy


@njit(cache=True, nogil=True)
def warm_mwc_kernel(theta, edges, costs, z0, margin0, rounds, cluster_passes, node_passes, tol):
    """Multiway cut of ``theta`` (N, J) started from the labelling ``z0`` (module doc, steps 1-5).
    Returns ``(labels (N,), energy, free nodes, initial clusters)``."""
    N, J = theta.shape
    tmin = np.empty(N, np.float64)
    best = np.empty(N, np.int64)
    free = np.zeros(N, np.uint8)
    nfree = 0
    for v in range(N):  # step 1
        o = theta[v]
        t = o[0]
        for l in range(1, J):
            t = min(t, o[l])
        tmin[v] = t
        best[v] = z0[v]
        if o[z0[v]] - t > margin0[v] + tol:
            free[v] = 1
            nfree += 1
            best[v] = _first_min(o, t)
    seg, n_seg = components_by_key(edges, z0)
    comp, M = initial_clusters(edges, z0, seg, n_seg, free, best, J)
    row_of = np.arange(N)  # every row given
    count = np.full(1, N, np.int64)
    dummy = np.zeros((1, 1), np.float64)
    empty = np.zeros(0, np.int64)
    src = (dummy, empty, empty, empty, empty, dummy, 0.0)
    ptr, nbr, hcost = half_edges(N, edges, costs)
    x, _ = _round(theta, row_of, count, src, tmin, edges, costs, z0, comp, M, row_sums(theta, comp, M), free, ptr,
                  nbr, hcost, cluster_passes, node_passes, tol)
    e_z0 = energy_of(theta, row_of, src, edges, costs, z0)
    x, energy = _finish(theta, row_of, count, src, tmin, edges, costs, z0, e_z0, x, best, free, ptr, nbr, hcost,
                        rounds, cluster_passes, node_passes, tol)
    return x, energy, nfree, M


@njit(cache=True, nogil=True)
def lifted_prepare(theta, m, grad, slot, z0, edges, costs):
    """Per image, shared by its ``lambda`` samples: ``grad_t`` (N, S) the transposed incoming gradient,
    ``g_own[v]`` the gradient of ``v``'s own label ``z0_v`` and ``g_min[v]`` the smallest over the
    lifted labels (0 for labels without a slot), ``t_min[v]`` the smallest class cost, the forward
    segments ``seg`` (components of equal ``z0``), their number, their summed class costs ``seg_theta``
    (n_seg, K) and gradients ``seg_grad`` (n_seg, S), the half-edges ``(ptr, nbr, hcost)`` of the
    edges, the energy of ``z0`` as ``e_class + lambda * g_own_sum``, and ``margin0`` the forward label's
    margin ``theta[v, m[z0_v]] - t_min[v]`` (step 1's reference)."""
    N, K = theta.shape
    S = grad.shape[0]
    J = slot.shape[0]
    used = np.zeros(S, np.bool_)
    unslotted = False
    for l in range(J):
        if slot[l] >= 0:
            used[slot[l]] = True
        else:
            unslotted = True
    seg, n_seg = components_by_key(edges, z0)
    grad_t = np.empty((N, S), grad.dtype)  # float32 gradients stay float32: half the memory traffic
    g_min = np.full(N, 0.0 if unslotted else np.inf)
    seg_grad = np.zeros((n_seg, S), np.float64)
    for v0 in range(0, N, 64):  # one pass over the gradient, 64 nodes at a time (no array views in
        v1 = min(N, v0 + 64)  # these loops: each would cost reference counting)
        for s in range(S):
            if used[s]:
                for v in range(v0, v1):
                    g = grad[s, v]
                    grad_t[v, s] = g
                    g_min[v] = min(g_min[v], g)
            else:
                for v in range(v0, v1):
                    grad_t[v, s] = grad[s, v]
        for v in range(v0, v1):
            r = seg[v]
            for s in range(S):
                seg_grad[r, s] += grad_t[v, s]  # summed in float64
    seg_theta = np.zeros((n_seg, K), np.float64)
    g_own = np.empty(N, np.float64)
    t_min = np.empty(N, np.float64)
    margin0 = np.empty(N, np.float64)
    e_class = 0.0
    g_own_sum = 0.0
    for v in range(N):
        r = seg[v]
        t = theta[v, 0]
        for k in range(K):
            seg_theta[r, k] += theta[v, k]
            t = min(t, theta[v, k])
        t_min[v] = t
        margin0[v] = theta[v, m[z0[v]]] - t  # the forward label's margin (``label_margins``)
        s = slot[z0[v]]
        g_own[v] = grad_t[v, s] if s >= 0 else 0.0
        e_class += theta[v, m[z0[v]]]
        g_own_sum += g_own[v]
    for e in range(edges.shape[0]):
        if z0[edges[e, 0]] != z0[edges[e, 1]]:
            e_class += costs[e]
    ptr, nbr, hcost = half_edges(N, edges, costs)
    return grad_t, g_own, g_min, t_min, seg, n_seg, seg_theta, seg_grad, ptr, nbr, hcost, e_class, g_own_sum, margin0


@njit(cache=True, nogil=True)
def _lifted_src(theta, m, slot, grad_t, lam):
    has = np.flatnonzero(slot >= 0)
    return (theta, m, slot, has, slot[has], grad_t, lam)


@njit(cache=True, nogil=True)
def lifted_free_nodes(theta, m, slot, lam, z0, prepared, tol):
    """Step 1 of one sample of Algorithm 1 (lifted costs ``theta[v, m[l]] + lam * grad[slot[l], v]``,
    ``prepared`` from ``lifted_prepare``): ``(tmin, best, free, number of free nodes)``, ``tmin[v]`` the
    smallest cost where computed, else a lower bound of it. Most nodes are fixed by the bound alone."""
    grad_t, g_own, g_min, t_min, margin0 = prepared[0], prepared[1], prepared[2], prepared[3], prepared[13]
    N = theta.shape[0]
    src = _lifted_src(theta, m, slot, grad_t, lam)
    tmin = np.empty(N, np.float64)
    best = np.empty(N, np.int64)
    free = np.zeros(N, np.uint8)
    nfree = 0
    for v in range(N):
        best[v] = z0[v]
        tmin[v] = t_min[v] + lam * g_min[v]  # lower bound of the smallest cost
        if lam * (g_own[v] - g_min[v]) <= tol:
            continue
        t, a = _row_min(v, src)
        tmin[v] = t
        if theta[v, m[z0[v]]] + lam * g_own[v] - t > margin0[v] + tol:
            free[v] = 1
            nfree += 1
            best[v] = a
    return tmin, best, free, nfree


@njit(cache=True, nogil=True)
def lifted_sample(theta, m, slot, lam, z0, prepared, edges, costs, tmin, best, free, rows, rounds, cluster_passes,
                  node_passes, tol):
    """Steps 2-5 of one sample after ``lifted_free_nodes``: the multiway cut of the lifted costs started
    from ``z0`` (module doc). ``rows`` (capacity, J) receives the rows built (the free nodes' and the
    few the node ICM needs; a larger array is allocated if it fills up; content irrelevant). Returns
    ``(labels, energy, initial clusters, built rows)``."""
    grad_t, g_own, g_min, t_min, seg, n_seg, seg_theta, seg_grad, ptr, nbr, hcost, e_class, g_own_sum, _ = prepared
    N = theta.shape[0]
    J = m.shape[0]
    src = _lifted_src(theta, m, slot, grad_t, lam)
    row_of = np.full(N, -1, np.int64)  # built rows: rows[row_of[v]]
    count = np.zeros(1, np.int64)
    for v in range(N):
        if free[v] != 0:
            rows = _ensure_row(v, rows, row_of, count, tmin, src)  # read by the contraction
    comp, M = initial_clusters(edges, z0, seg, n_seg, free, best, J)
    tc = np.zeros((M, J), np.float64)
    for r in range(n_seg):  # the forward segments' rows from their class / slot sums ...
        for l in range(J):
            s = slot[l]
            tc[r, l] = seg_theta[r, m[l]] + lam * seg_grad[r, s] if s >= 0 else seg_theta[r, m[l]]
    for v in range(N):  # ... moved to their new clusters node by node (their rows are built)
        b = comp[v]
        if b >= n_seg:
            a = seg[v]
            o = rows[row_of[v]]
            for l in range(J):
                tc[a, l] -= o[l]
                tc[b, l] += o[l]
    x, rows = _round(rows, row_of, count, src, tmin, edges, costs, z0, comp, M, tc, free, ptr, nbr, hcost,
                     cluster_passes, node_passes, tol)
    e_z0 = e_class + lam * g_own_sum  # energy of z0 on this sample's costs
    x, energy = _finish(rows, row_of, count, src, tmin, edges, costs, z0, e_z0, x, best, free, ptr, nbr, hcost,
                        rounds, cluster_passes, node_passes, tol)
    return x, energy, M, count[0]


@njit(cache=True, nogil=True)
def accumulate_gradient(gtheta, gcost, m, zp, x_ref, cut_ref, edges, scale):
    """Algorithm 1 step 4 for one sample: ``gtheta[v, m[zp_v]] += scale``, ``gtheta[v, x_ref_v] -= scale``,
    ``gcost[e] += scale * ([zp_u != zp_v] - cut_ref[e])`` (``scale = 1 / lambda``)."""
    for v in range(zp.shape[0]):
        gtheta[v, m[zp[v]]] += scale
        gtheta[v, x_ref[v]] -= scale
    for e in range(edges.shape[0]):
        y = 1.0 if zp[edges[e, 0]] != zp[edges[e, 1]] else 0.0
        gcost[e] += scale * (y - cut_ref[e])
