"""Numba kernels of the AMWC / MWC solver (no Python objects inside loops, no torch).

Problem (COPS eq. 2): minimise ``sum_v theta[v, x_v] + sum_e c_e * y_e`` over labels ``x`` and a
multicut ``y`` (``y_e = 1``: edge cut), with ``x_u != x_v => y_uv = 1`` and, for a label ``l`` that is
not partitionable (stuff), ``x_u == x_v == l => y_uv = 0``. ``c_e > 0`` is attractive.

Pipeline of ``solve_kernel`` / ``solve_kernel_ws``:

1. ``incidence_csr``: per-node incident edges (parallel edges are summed inside the contraction, or by
   ``unique_edges`` beforehand when the hash map cannot be used; self-loops are rejected by the wrapper).
2. ``gaec_exact`` / ``_gaec``: greedy joint labelling + contraction. Every cluster ``A`` holds its summed
   costs ``Theta_A`` and takes the label ``argmin Theta_A``. Contracting ``A`` and ``B`` changes the
   energy by ``g(A, B) = min_l (Theta_A + Theta_B)[l] - min Theta_A - min Theta_B - w_AB`` (``w_AB`` the
   summed cost of the edges between them); the most negative ``g`` is contracted until none is < 0.
   Unlike the public LPMP solver (stale gains), the contraction order is that of exact gains: the heap
   holds *lower bounds* of the gains, which stay valid as clusters grow, and the popped edge is
   contracted only if its key is exact, otherwise re-scored (O(K)) and re-inserted. Bounds are O(1):
   same label -> exact ``-w``; different labels -> ``p >= min(gap_v[lab_u], delta_u)`` (and
   symmetrically), ``delta`` the margin between the best and second-best label; at initialisation the
   weaker ``p >= min(delta_u, delta_v)``, which needs no cost row (see ``_init_records``). See ``_gaec``
   for which contractions can invalidate a bound and how those edges are found without walking the big
   cluster's edge list. Since every key is a valid lower bound and only exact keys are contracted, the
   contraction sequence does not depend on how tight the bounds are (up to exact ties).
3. ``refine_clusters``: the "canonical" state reads clusters of a stuff label as merged with every
   adjacent cluster of the same label (the stuff post-pass of LPMP). Iterated conditional modes on the
   contracted graph: relabel one GAEC cluster at a time to any label if that lowers the energy of the
   canonical state, most improving first (covers LPMP's tie relabel in MWC: a cluster moves to an
   equally cheap label to stay apart from a repulsive same-label neighbour).
4. ``refine_nodes``: node moves on the original graph (a node joins a neighbouring instance, a
   neighbouring stuff region, or becomes a singleton), again only when the canonical energy drops.
5. ``finalize``: cluster ids = connected components of the uncut edges (``x_u == x_v`` and the label is
   stuff or both nodes are in the same instance); energy evaluated on the original edges.

Performance notes (the contraction is bound by cache misses on large graphs):

* one 32-byte record per edge (``E64`` / ``E32``, one cache line holds two), per-cluster edge lists in
  one int32 pool, a packed hash map from cluster pairs to edges (``edgehash``, built in home-slot order),
  an indexed 8-ary heap (``heap``) whose positions live in the edge records;
* summed costs exist only for merged clusters (rows recycled), the input costs are never copied;
* a contraction handles the edges of the absorbed cluster in stages whose memory accesses are
  independent within a stage (all records, then all hash lookups, then the folds), so that their cache
  misses overlap;
* no reference counting in the hot loops: helpers called from them take scalars only, and the heap
  updates are written out in the loop (a call taking arrays costs atomic increments / decrements);
* the large arrays (~130 bytes per edge) are carved from caller-provided work arrays
  (``solve_kernel_ws``; ``amwc.run_kernel`` keeps them across solves), since fresh pages cost a fault
  and zeroing each (~15% of a Cityscapes-size solve).
"""
import numpy as np
from numba import njit

from .edgehash import _ebits, packing_fits, pair_key, table_bits, table_build, table_find_or_insert, table_new
from .heap import heap_heapify

_INF = np.inf


# ----------------------------------------------------------------------------------------------------
# graph construction
# ----------------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def unique_edges(n, edges, costs):
    """Sum parallel edges. Returns ``(unique (m, 2) with u < v, w (m,))``. O(n + E), no sorting."""
    E = edges.shape[0]
    ptr = np.zeros(n + 1, np.int64)
    for e in range(E):
        a = edges[e, 0]
        b = edges[e, 1]
        if b < a:
            a = b
        ptr[a + 1] += 1
    for i in range(n):
        ptr[i + 1] += ptr[i]
    fill = ptr[:n].copy()
    tgt = np.empty(E, np.int64)
    src = np.empty(E, np.int64)
    for e in range(E):
        a = edges[e, 0]
        b = edges[e, 1]
        if b < a:
            a, b = b, a
        s = fill[a]
        tgt[s] = b
        src[s] = e
        fill[a] = s + 1
    owner = np.full(n, -1, np.int64)
    slot = np.empty(n, np.int64)
    out = np.empty((E, 2), np.int64)
    w = np.empty(E, np.float64)
    m = 0
    for a in range(n):
        for s in range(ptr[a], ptr[a + 1]):
            b = tgt[s]
            if owner[b] != a:
                owner[b] = a
                slot[b] = m
                out[m, 0] = a
                out[m, 1] = b
                w[m] = costs[src[s]]
                m += 1
            else:
                w[slot[b]] += costs[src[s]]
    return out[:m].copy(), w[:m].copy()


@njit(cache=True, nogil=True)
def incidence_csr(n, edges):
    """Symmetric CSR of ``edges`` (m, 2): for node ``v`` the half-edges ``ptr[v]:ptr[v+1]`` hold the
    neighbour ``nbr`` and the edge index ``eid`` (both int32). Returns ``(ptr, nbr, eid)``."""
    m = edges.shape[0]
    nbr = np.empty(2 * m, np.int32)
    eid = np.empty(2 * m, np.int32)
    ptr = incidence_csr_into(n, edges, nbr, eid)
    return ptr, nbr, eid


@njit(cache=True, nogil=True)
def incidence_csr_into(n, edges, nbr, eid):
    """``incidence_csr`` writing ``nbr`` / ``eid`` (length >= 2m) in place; returns ``ptr``."""
    m = edges.shape[0]
    ptr = np.zeros(n + 1, np.int64)
    for e in range(m):
        ptr[edges[e, 0] + 1] += 1
        ptr[edges[e, 1] + 1] += 1
    for i in range(n):
        ptr[i + 1] += ptr[i]
    fill = ptr[:n].copy()
    for e in range(m):
        a = edges[e, 0]
        b = edges[e, 1]
        s = fill[a]
        nbr[s] = b
        eid[s] = e
        fill[a] = s + 1
        s = fill[b]
        nbr[s] = a
        eid[s] = e
        fill[b] = s + 1
    return ptr


@njit(cache=True, nogil=True)
def magnitude_bound(theta, costs):
    """``sum_v max_l |theta[v, l]| + sum_e |costs[e]|``, a bound on every energy and partial sum of the
    problem (one pass; numpy's row reductions over short rows cost several times more)."""
    K = theta.shape[1]
    K4 = K - K % 4
    b = 0.0
    for v in range(theta.shape[0]):
        t0 = t1 = t2 = t3 = 0.0  # four independent chains, as in _row_stats
        for k in range(0, K4, 4):
            t0 = max(t0, abs(theta[v, k]))
            t1 = max(t1, abs(theta[v, k + 1]))
            t2 = max(t2, abs(theta[v, k + 2]))
            t3 = max(t3, abs(theta[v, k + 3]))
        for k in range(K4, K):
            t0 = max(t0, abs(theta[v, k]))
        b += max(max(t0, t1), max(t2, t3))
    for e in range(costs.shape[0]):
        b += abs(costs[e])
    return b


# ----------------------------------------------------------------------------------------------------
# greedy contraction with exact gains
# ----------------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _row_stats(theta, r, K):
    """argmin (first index on ties), min, and gap to the second-smallest entry (inf if K == 1)."""
    # min over 4 independent chains (no loop-carried compare-and-select over the whole row), then the
    # first index of the min, then the smallest of the other entries
    m0 = _INF
    m1 = _INF
    m2 = _INF
    m3 = _INF
    K4 = K - K % 4
    for l in range(0, K4, 4):
        t0 = theta[r, l]
        t1 = theta[r, l + 1]
        t2 = theta[r, l + 2]
        t3 = theta[r, l + 3]
        m0 = t0 if t0 < m0 else m0
        m1 = t1 if t1 < m1 else m1
        m2 = t2 if t2 < m2 else m2
        m3 = t3 if t3 < m3 else m3
    for l in range(K4, K):
        t0 = theta[r, l]
        m0 = t0 if t0 < m0 else m0
    m0 = m1 if m1 < m0 else m0
    m2 = m3 if m3 < m2 else m2
    m = m2 if m2 < m0 else m0
    a = 0
    while a < K - 1 and theta[r, a] != m:  # (the bound only matters for rows that overflowed to nan)
        a += 1
    s0 = _INF
    s1 = _INF
    for l in range(0, a):
        t0 = theta[r, l]
        s0 = t0 if t0 < s0 else s0
    for l in range(a + 1, K):
        t1 = theta[r, l]
        s1 = t1 if t1 < s1 else s1
    s = s1 if s1 < s0 else s0
    return a, m, s - m


@njit(cache=True, nogil=True)
def _pair_min(theta0, csum, crow, a, b, K):
    """``min_l (Theta_a + Theta_b)[l]`` of two clusters (summed costs in ``csum`` rows or, for single
    nodes, in ``theta0``)."""
    ra = crow[a]
    rb = crow[b]
    X = csum if ra >= 0 else theta0
    Y = csum if rb >= 0 else theta0
    xa = ra if ra >= 0 else a
    yb = rb if rb >= 0 else b
    best0 = _INF
    best1 = _INF
    K2 = K - K % 2
    for l in range(0, K2, 2):  # two independent chains
        t0 = X[xa, l] + Y[yb, l]
        t1 = X[xa, l + 1] + Y[yb, l + 1]
        best0 = t0 if t0 < best0 else best0
        best1 = t1 if t1 < best1 else best1
    if K2 < K:
        t0 = X[xa, K2] + Y[yb, K2]
        best0 = t0 if t0 < best0 else best0
    return best1 if best1 < best0 else best0


@njit(cache=True, nogil=True)
def _penalty_bound(wf, gv, gu, du, dv):
    """Lower bound ``L`` on the label penalty ``p(u, v) = min_l (gap_u + gap_v)[l]`` of two clusters with
    different labels (``gap_x[l] = Theta_x[l] - min Theta_x``), capped at ``wf``, and whether it is
    exact. Arguments: ``gv = gap_v[lab_u]``, ``gu = gap_u[lab_v]``, ``du``/``dv`` the margins between
    the best and second-best label of ``u``/``v``. O(1): ``p >= min(gap_v[lab_u], delta_u)`` (take
    ``l = lab_u`` or any other label) and symmetrically; ``p <= min(gap_v[lab_u], gap_u[lab_v])``.
    A bound above ``wf`` is never needed (gain >= 0 already) and would only inflate ``lmax``. Scalars
    only, so that calls cost no reference counting."""
    t1 = gv if gv < du else du
    t2 = gu if gu < dv else dv
    lo = t1 if t1 > t2 else t2
    hi = gv if gv < gu else gu
    ex = lo >= hi
    L = hi if ex else lo
    if L > wf:
        L = wf
    return L, ex


# One 32-byte record per edge, so that handling an edge touches one cache line. The records live in
# one float64 (m, 4) buffer ``E64`` that is also read through an int32 (m, 8) view ``E32`` (plain 2-D
# arrays instead of a structured dtype). int32 lanes: current cluster endpoints (``u = -1`` once the
# edge is dead), the exactness stamp and the heap position (-1: not in the heap); float64 lanes: summed
# cost and penalty bound.
_U = 0
_V = 1
_STAMP = 2
_POS = 3
_W = 2
_PEN = 3
_NOT_EXACT = -1
_EXACT_WHILE_SAME_LABEL = 2**31 - 1
_LOG_ARITY = 3  # the heap has 8 children per node (``heap``)


@njit(cache=True, nogil=True)
def _init_records(edges, w0, lab, dlt, lmax, E32, E64, hk, he, again):
    """Fill the edge records (``again``: keep endpoints and costs, skip dead edges), the penalty bounds of
    the attractive edges, ``lmax``, and the heap entries ``(pen - w, e)`` with a negative key in edge
    order. Returns the number of heap entries.

    Between single nodes with different labels the bound is ``min(delta_u, delta_v)``: for every label
    ``l`` one of the two gaps is a gap to a label other than that node's best, hence at least its
    ``delta``. It is weaker than ``_penalty_bound`` but needs no cost row, whose reads (at a random label,
    for the about half of the attractive edges that join different labels) dominated the
    initialisation; an edge whose weak key reaches the top of the heap is re-scored exactly then."""
    m = edges.shape[0]
    n = 0
    for e in range(m):
        if again:
            if E32[e, _U] < 0:
                continue
            we = E64[e, _W]
            a = E32[e, _U]
            b = E32[e, _V]
        else:
            we = w0[e]
            a = edges[e, 0]
            b = edges[e, 1]
            E32[e, _U] = a
            E32[e, _V] = b
            E32[e, _POS] = -1
            E64[e, _W] = we
        E32[e, _STAMP] = _NOT_EXACT
        E64[e, _PEN] = 0.0
        if we <= 0.0:
            continue
        la = lab[a]
        lb = lab[b]
        if la == lb:
            E32[e, _STAMP] = _EXACT_WHILE_SAME_LABEL
            key = -we
        else:
            da = dlt[a]
            db = dlt[b]
            L = da if da < db else db
            if L > we:
                L = we
            E64[e, _PEN] = L
            if L > lmax[a]:
                lmax[a] = L
            if L > lmax[b]:
                lmax[b] = L
            key = L - we
        if key < 0.0:
            hk[n] = key
            he[n] = e
            n += 1
    return n


@njit(cache=True, nogil=True)
def workspace_sizes(N, K, m):
    """Lengths ``(float64, int32, int64)`` of the work arrays that ``solve_kernel_ws`` carves its large
    arrays from, for ``N`` nodes, ``K`` labels and (at most) ``m`` edges."""
    nf8 = 5 * m + (N // 2 + 1) * K  # edge records (4 per edge), heap keys, cost rows of merged clusters
    ni4 = 4 * m + (4 * m + 16) + m + 4 * (m + 1)  # CSR, edge-list pool, heap items, step buffers
    ni8 = (1 << table_bits(2 * m)) + m  # hash table, its build scratch
    return nf8, ni4, ni8


@njit(cache=True, nogil=True)
def gaec_exact(theta0, edges, w0, ptr, eid, allow_hash):
    """The greedy contraction ``_gaec`` with freshly allocated work arrays (same results). ``allow_hash``
    False, or a graph too large for packed hash keys, selects the hash-free fallback, which needs
    unique edges (``unique_edges``)."""
    N = theta0.shape[0]
    nf8, ni4, ni8 = workspace_sizes(N, theta0.shape[1], edges.shape[0])
    use_hash = allow_hash and packing_fits(N, edges.shape[0])
    wf8 = np.empty(nf8, np.float64)
    wi4 = np.empty(ni4, np.int32)
    wi8 = np.empty(ni8, np.int64)
    return _gaec(theta0, edges, w0, ptr, eid, use_hash, wf8, wi4, wi8)


@njit(cache=True, nogil=True)
def _gaec(theta0, edges, w0, ptr, eid, use_hash, wf8, wi4, wi8):
    """Greedy additive edge contraction with joint labelling and exact gains.

    ``theta0`` (N, K) node costs (not modified), ``edges`` (m, 2) and ``w0`` the edges and costs,
    ``ptr``/``eid`` their incidence CSR. Parallel edges are summed on the way (found by the hash map);
    without the hash map (``use_hash`` False, e.g. a graph too large for packed keys) the edges must be
    unique already (``unique_edges``). Returns ``(parent, lab, E64, E32, csum, crow, tmin, num_merges)``:
    ``parent[v] == v`` for cluster roots (every non-root points to the cluster it was merged into),
    ``lab[root]`` the cluster label (argmin of its summed costs), the summed costs of a root ``r`` are
    ``csum[crow[r]]`` (``theta0[r]`` when ``crow[r] < 0``: a single node); the contracted graph is given
    by the edge records (``E32[e, 0] >= 0``: alive, joining clusters ``E32[e, 0]`` and ``E32[e, 1]``
    with summed cost ``E64[e, 2]``). Cost rows are created only for merged clusters (and recycled when
    a cluster is absorbed), so the (N, K) costs are never copied. The large arrays are carved from the
    work arrays ``wf8`` / ``wi4`` / ``wi8`` (sizes: ``workspace_sizes``; their content is irrelevant),
    so that a caller can reuse them across solves instead of paying fresh pages every time.

    Invariant: every edge with ``w > 0`` has ``pen[e] <= min(p(e), w)`` (``p`` the true label
    penalty; a bound above ``w`` is capped since ``p >= w`` already means "gain >= 0"), the heap holds
    exactly the edges with ``pen - w < 0`` keyed by ``pen - w`` (restored at the end of every step),
    and ``lmax[u] >= pen[e]`` for every attractive edge of ``u`` with different labels. The popped edge
    is contracted only when its key is exact (same labels, or evaluated after the last change of both
    clusters); otherwise its exact penalty is computed (O(K)) and it is re-inserted. A contraction of
    ``A`` and ``B`` into ``R`` changes penalties as follows: if ``A`` and ``B`` had the same label every
    gap of ``R`` is >= the gaps of ``A`` and ``B``, so all bounds stay valid; if a side keeps its label
    ``l`` the penalty of any of its edges is still >= ``min(gap_h[l], delta_R) >= min(pen, delta_R)``,
    so only edges with ``pen > delta_R`` need a new bound (none when ``lmax <= delta_R``, the usual case
    for a large cluster absorbing a noisy one); a side whose label changed re-scores all its attractive
    edges. Parallel edges are found with a hash map on cluster pairs (``edgehash``), so a contraction
    costs O(deg(B) + re-scored edges) heap/hash operations plus O(K) for the cost vectors. (Graphs too
    large for the packed hash keys fall back to marking the neighbours of ``A`` by walking its list.)

    Implementation: the records are updated in place during a step and the edges whose heap key may
    have changed are queued (``todo``); one loop at the end of the step brings them into the heap
    (insert, re-key or remove). That loop is the only place that moves heap entries, written out in
    this function: a call to a heap function would make Numba update the reference counts of the heap
    arrays (atomic instructions) on every call. The edges of the absorbed cluster are handled in
    stages (live edges and far ends; hash lookups and inserts; touching the records to be folded into;
    folds and moves): the memory accesses within a stage do not depend on each other, so their cache
    misses overlap. This changes no result: every key ``(a, h)`` looked up in one step is distinct.
    """
    N = theta0.shape[0]
    K = theta0.shape[1]
    m = edges.shape[0]
    E64 = wf8[: 4 * m].reshape((m, 4))
    E32 = E64.view(np.int32)
    lab = np.empty(N, np.int32)
    mval = np.empty(N, np.float64)
    dlt = np.empty(N, np.float64)
    for v in range(N):
        a, mv, dv = _row_stats(theta0, v, K)
        lab[v] = a
        mval[v] = mv
        dlt[v] = dv
    tmin = mval.copy()  # smallest cost of every node, returned for refine_nodes
    lastchg = np.zeros(N, np.int32)
    lmax = np.zeros(N, np.float64)
    # summed costs of merged clusters: row crow[v] of csum (at most N // 2 merged clusters are alive
    # at a time; rows of absorbed clusters are reused, last freed first, so they are warm in cache)
    crow = np.full(N, -1, np.int32)
    csum = wf8[5 * m : 5 * m + (N // 2 + 1) * K].reshape((N // 2 + 1, K))
    cfree = np.empty(N // 2 + 1, np.int32)
    nfree = 0
    nrows = 0
    # edge records, penalty bounds and the heap entries in one pass (redone below if parallel edges
    # have to be folded first)
    hk = wf8[4 * m : 5 * m]
    he = wi4[4 * m + 16 : 5 * m + 16]
    n = _init_records(edges, w0, lab, dlt, lmax, E32, E64, hk, he, False)
    # per-cluster edge lists in one pool; a list that outgrows its block moves (compacted) to the end
    pool = wi4[: 4 * m + 16]
    pool[: 2 * m] = eid[: 2 * m]
    start = ptr[:N].copy()
    ln = np.empty(N, np.int64)
    for v in range(N):
        ln[v] = ptr[v + 1] - ptr[v]
    cap = ln.copy()
    deg = ln.copy()
    pend = 2 * m
    # entries of contracted-away clusters are left in the table (they are never looked up again) and
    # swept out by a rebuild when the table gets 3/4 full
    if use_hash:
        bits = table_bits(2 * m)
        ebits = _ebits(m)
        tab = wi8[: 1 << bits]
        tab[:] = -1
    else:
        tab, bits, ebits = table_new(1, m)
    occupied = 0
    if use_hash:
        scratch = wi8[1 << bits : (1 << bits) + m]
        occupied, ndup = table_build(tab, bits, ebits, edges, N, scratch)
        if ndup > 0:  # parallel edges: fold into the first one (in edge order), then bounds anew
            dups = np.sort(scratch[:ndup])
            for q in range(ndup):
                e = dups[q] >> 32
                g = dups[q] & 0xFFFFFFFF
                E64[g, _W] += E64[e, _W]
                E32[e, _U] = -1
                deg[edges[e, 0]] -= 1
                deg[edges[e, 1]] -= 1
            lmax[:] = 0.0
            n = _init_records(edges, w0, lab, dlt, lmax, E32, E64, hk, he, True)
    max_occupied = (3 * tab.shape[0]) // 4
    mark = np.full(N if not use_hash else 1, -1, np.int64)
    sink = np.zeros(1, np.float64)
    heap_heapify(hk, he, E32[:, _POS], n, _LOG_ARITY)
    o = 5 * m + 16
    todo = wi4[o : o + m + 1]
    fb = wi4[o + m + 1 : o + 2 * m + 2]
    hb = wi4[o + 2 * m + 2 : o + 3 * m + 3]
    gb = wi4[o + 3 * m + 3 : o + 4 * m + 4]
    parent = np.arange(N)
    T = 0
    while n > 0:
        e = he[0]
        a = np.int64(E32[e, _U])
        b = np.int64(E32[e, _V])
        todo[0] = e
        nt = 1
        if lab[a] != lab[b] and (E32[e, _STAMP] < lastchg[a] or E32[e, _STAMP] < lastchg[b]):
            # inexact key: exact penalty now, the heap sync below re-keys (or drops) the edge
            p = _pair_min(theta0, csum, crow, a, b, K) - (mval[a] + mval[b])
            we = E64[e, _W]
            if p > we:
                p = we
            E64[e, _PEN] = p
            E32[e, _STAMP] = T
            if p > lmax[a]:
                lmax[a] = p
            if p > lmax[b]:
                lmax[b] = p
        else:
            # contract a and b (keep the one with more edges); the sync removes e from the heap
            T += 1
            E32[e, _U] = -1
            if use_hash and occupied + ln[a] + ln[b] > max_occupied:
                tab[:] = -1
                occupied = 0
                for f in range(m):
                    if E32[f, _U] >= 0:
                        table_find_or_insert(tab, bits, ebits, pair_key(E32[f, _U], E32[f, _V], N), f)
                        occupied += 1
            if deg[a] < deg[b]:
                a, b = b, a
            la = lab[a]
            lb = lab[b]
            ra = crow[a]
            rb = crow[b]
            if ra < 0:
                if nfree > 0:
                    nfree -= 1
                    ra = cfree[nfree]
                else:
                    ra = nrows
                    nrows += 1
                crow[a] = ra
                if rb >= 0:
                    for l in range(K):
                        csum[ra, l] = theta0[a, l] + csum[rb, l]
                else:
                    for l in range(K):
                        csum[ra, l] = theta0[a, l] + theta0[b, l]
            elif rb >= 0:
                for l in range(K):
                    csum[ra, l] += csum[rb, l]
            else:
                for l in range(K):
                    csum[ra, l] += theta0[b, l]
            if rb >= 0:
                crow[b] = -1
                cfree[nfree] = rb
                nfree += 1
            nl, mv, dv = _row_stats(csum, ra, K)
            lab[a] = nl
            mval[a] = mv
            dlt[a] = dv
            lastchg[a] = T
            parent[b] = a
            deg[a] -= 1
            agree = la == lb
            relab = nl != la
            # 1. a's own edges, only if some bound may have become invalid (or to mark them, without hash)
            if relab or (not agree and dv < lmax[a]) or not use_hash:
                newmax = 0.0
                sa = start[a]
                wp = sa
                for i in range(sa, sa + ln[a]):
                    f = pool[i]
                    if E32[f, _U] < 0:
                        continue
                    pool[wp] = f
                    wp += 1
                    h = E32[f, _U] + E32[f, _V] - a
                    if not use_hash:
                        mark[h] = f
                    if E64[f, _W] <= 0.0:
                        continue
                    if relab or (lab[h] != nl and E64[f, _PEN] > dv):
                        lu = lab[a]
                        lv = lab[h]
                        if lu == lv:
                            E64[f, _PEN] = 0.0
                            E32[f, _STAMP] = _EXACT_WHILE_SAME_LABEL
                        else:
                            rh = crow[h]
                            gv = (csum[rh, lu] if rh >= 0 else theta0[h, lu]) - mval[h]
                            L, ex = _penalty_bound(E64[f, _W], gv, csum[ra, lv] - mval[a], dlt[a], dlt[h])
                            E64[f, _PEN] = L
                            E32[f, _STAMP] = T if ex else _NOT_EXACT
                            if L > lmax[a]:
                                lmax[a] = L
                            if L > lmax[h]:
                                lmax[h] = L
                        todo[nt] = f
                        nt += 1
                    if lab[h] != nl and E64[f, _PEN] > newmax:
                        newmax = E64[f, _PEN]
                ln[a] = wp - sa
                lmax[a] = newmax
            # 2. room for b's edges in a's list
            need = ln[a] + ln[b]
            if need > cap[a]:
                sa = start[a]
                cnt = 0
                for i in range(sa, sa + ln[a]):
                    if E32[pool[i], _U] >= 0:
                        cnt += 1
                newcap = 2 * (cnt + ln[b])
                if pend + newcap > pool.shape[0]:
                    bigger = np.empty(max(2 * pool.shape[0], pend + newcap), np.int32)
                    bigger[:pend] = pool[:pend]
                    pool = bigger
                wp = pend
                for i in range(sa, sa + ln[a]):
                    f = pool[i]
                    if E32[f, _U] >= 0:
                        pool[wp] = f
                        wp += 1
                start[a] = pend
                ln[a] = cnt
                cap[a] = newcap
                pend += newcap
            # 3. fold or move b's edges, in stages whose memory accesses do not depend on each other
            # within a stage (so that their cache misses overlap): (a) live edges of b and their far
            # ends h, (b) the edge between a and h if any (hash lookups; new pairs are inserted here),
            # (c) touch the records that folds update, (d) fold or move.
            sb = start[b]
            eb = sb + ln[b]
            k = 0
            for i in range(sb, eb):
                f = pool[i]
                u = E32[f, _U]
                fb[k] = f
                hb[k] = u + E32[f, _V] - b
                k += np.int64(u >= 0)
            for j in range(k):
                h = hb[j]
                if use_hash:
                    g2 = table_find_or_insert(tab, bits, ebits, pair_key(a, h, N), fb[j])
                    if g2 < 0:
                        occupied += 1
                else:
                    g2 = mark[h]
                gb[j] = g2
            touch = 0.0
            for j in range(k):
                g2 = gb[j]
                if g2 >= 0:
                    touch += E64[g2, _W]
            sink[0] += touch
            wp = start[a] + ln[a]
            for j in range(k):
                f = fb[j]
                h = hb[j]
                g2 = gb[j]
                wf = E64[f, _W]
                if g2 >= 0:
                    wg = E64[g2, _W]
                    E64[g2, _W] = wg + wf
                    E32[f, _U] = -1
                    deg[h] -= 1
                    if wf > 0.0:  # f may be in the heap
                        todo[nt] = f
                        nt += 1
                    if wg + wf > 0.0:
                        lu = lab[a]
                        lv = lab[h]
                        if lu == lv:
                            E64[g2, _PEN] = 0.0
                            E32[g2, _STAMP] = _EXACT_WHILE_SAME_LABEL
                        else:
                            rh = crow[h]
                            gv = (csum[rh, lu] if rh >= 0 else theta0[h, lu]) - mval[h]
                            L, ex = _penalty_bound(E64[g2, _W], gv, csum[ra, lv] - mval[a], dlt[a], dlt[h])
                            E64[g2, _PEN] = L
                            E32[g2, _STAMP] = T if ex else _NOT_EXACT
                            if L > lmax[a]:
                                lmax[a] = L
                            if L > lmax[h]:
                                lmax[h] = L
                        todo[nt] = g2
                        nt += 1
                    elif wg > 0.0:  # turned repulsive: leaves the heap
                        todo[nt] = g2
                        nt += 1
                    continue
                if E32[f, _U] == b:
                    E32[f, _U] = a
                else:
                    E32[f, _V] = a
                pool[wp] = f
                wp += 1
                deg[a] += 1
                if wf <= 0.0:
                    continue
                if nl != lb:
                    lu = lab[a]
                    lv = lab[h]
                    if lu == lv:
                        E64[f, _PEN] = 0.0
                        E32[f, _STAMP] = _EXACT_WHILE_SAME_LABEL
                    else:
                        rh = crow[h]
                        gv = (csum[rh, lu] if rh >= 0 else theta0[h, lu]) - mval[h]
                        L, ex = _penalty_bound(E64[f, _W], gv, csum[ra, lv] - mval[a], dlt[a], dlt[h])
                        E64[f, _PEN] = L
                        E32[f, _STAMP] = T if ex else _NOT_EXACT
                        if L > lmax[a]:
                            lmax[a] = L
                        if L > lmax[h]:
                            lmax[h] = L
                    todo[nt] = f
                    nt += 1
                elif lab[h] != nl:
                    pf = E64[f, _PEN]
                    if not agree and pf > dv:
                        lu = lab[a]
                        lv = lab[h]
                        if lu == lv:
                            E64[f, _PEN] = 0.0
                            E32[f, _STAMP] = _EXACT_WHILE_SAME_LABEL
                        else:
                            rh = crow[h]
                            gv = (csum[rh, lu] if rh >= 0 else theta0[h, lu]) - mval[h]
                            L, ex = _penalty_bound(E64[f, _W], gv, csum[ra, lv] - mval[a], dlt[a], dlt[h])
                            E64[f, _PEN] = L
                            E32[f, _STAMP] = T if ex else _NOT_EXACT
                            if L > lmax[a]:
                                lmax[a] = L
                            if L > lmax[h]:
                                lmax[h] = L
                        todo[nt] = f
                        nt += 1
                    elif pf > lmax[a]:
                        lmax[a] = pf
            ln[a] = wp - start[a]
            ln[b] = 0
            deg[b] = 0
            if not use_hash:
                for i in range(start[a], start[a] + ln[a]):
                    f = pool[i]
                    mark[E32[f, _U] + E32[f, _V] - a] = -1
        # heap sync of the queued edges: key pen - w if alive, attractive and negative, else absent
        for t in range(nt):
            f = todo[t]
            i = np.int64(E32[f, _POS])
            key = 0.0
            if E32[f, _U] >= 0:
                wf = E64[f, _W]
                if wf > 0.0:
                    key = E64[f, _PEN] - wf
            if key < 0.0:
                kx = key
                x = f
                if i < 0:
                    i = n
                    n += 1
            else:
                if i < 0:
                    continue
                E32[f, _POS] = -1
                n -= 1
                if i == n:
                    continue
                kx = hk[n]
                x = he[n]
            # put (kx, x) into the hole at i: up while the parent is larger, else down while the
            # smallest child (first one on ties) is smaller
            moved = False
            while i > 0:
                q = (i - 1) >> _LOG_ARITY
                kq = hk[q]
                if kq <= kx:
                    break
                hk[i] = kq
                eq = he[q]
                he[i] = eq
                E32[eq, _POS] = i
                i = q
                moved = True
            if not moved:
                while True:
                    c0 = (i << _LOG_ARITY) + 1
                    if c0 >= n:
                        break
                    c = c0
                    kc = hk[c0]
                    end = c0 + (1 << _LOG_ARITY)
                    if end > n:
                        end = n
                    for j in range(c0 + 1, end):
                        kj = hk[j]
                        if kj < kc:
                            kc = kj
                            c = j
                    if kc >= kx:
                        break
                    hk[i] = kc
                    ec = he[c]
                    he[i] = ec
                    E32[ec, _POS] = i
                    i = c
            hk[i] = kx
            he[i] = x
            E32[x, _POS] = i
    return parent, lab.astype(np.int64), E64, E32, csum, crow, tmin, T


@njit(cache=True, nogil=True)
def find_roots(parent):
    """Root of every node (with path compression on ``parent``)."""
    N = parent.shape[0]
    root = np.empty(N, np.int64)
    for v in range(N):
        r = v
        while parent[r] != r:
            r = parent[r]
        u = v
        while parent[u] != r:
            nxt = parent[u]
            parent[u] = r
            u = nxt
        root[v] = r
    return root


@njit(cache=True, nogil=True)
def components_by_key(edges, key):
    """Connected components of the edges whose endpoints have equal ``key``; ids ``0..M-1`` in order of
    the first node. Returns ``(comp (N,), M)``."""
    N = key.shape[0]
    parent = np.arange(N)
    for e in range(edges.shape[0]):
        a = edges[e, 0]
        b = edges[e, 1]
        if key[a] != key[b]:
            continue
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        while parent[b] != b:
            parent[b] = parent[parent[b]]
            b = parent[b]
        if a != b:
            if a < b:
                parent[b] = a
            else:
                parent[a] = b
    root = find_roots(parent)
    newid = np.full(N, -1, np.int64)
    comp = np.empty(N, np.int64)
    M = 0
    for v in range(N):
        r = root[v]
        if newid[r] < 0:
            newid[r] = M
            M += 1
        comp[v] = newid[r]
    return comp, M


# ----------------------------------------------------------------------------------------------------
# local improvement on the canonical state (stuff clusters of equal label read as merged)
# ----------------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _best_relabel(c, theta0, csum, crow, x, part, ptr, nbr, nw, acc, stamp, token, K):
    """Best label change of cluster ``c`` on the canonical state: ``(delta, label)`` (label -1 if none)."""
    r = crow[c]
    for s in range(ptr[c], ptr[c + 1]):
        l = x[nbr[s]]
        if part[l]:
            continue
        if stamp[l] != token:
            stamp[l] = token
            acc[l] = 0.0
        acc[l] += nw[s]
    xc = x[c]
    scur = acc[xc] if stamp[xc] == token else 0.0
    base = (csum[r, xc] if r >= 0 else theta0[c, xc]) - scur
    best = 0.0
    bl = -1
    for l in range(K):
        if l == xc:
            continue
        d = (csum[r, l] if r >= 0 else theta0[c, l]) - base
        if stamp[l] == token:
            d -= acc[l]
        if d < best:
            best = d
            bl = l
    return best, bl


@njit(cache=True, nogil=True)
def refine_clusters(theta0, csum, crow, x, part, E32, E64, root, max_passes, tol):
    """ICM over GAEC clusters: relabel a cluster (all K labels tried) when the canonical energy drops.

    The summed costs of a root ``r`` are ``csum[crow[r]]`` (``theta0[r]`` if ``crow[r] < 0``),
    ``x[root]`` the cluster labels (updated in place); the contracted graph is given by the alive edge
    records of ``gaec_exact`` (endpoints are roots). Each sweep scores every cluster, then applies the
    improving relabels from the most to the least improving one (each re-scored just before it is
    applied). Returns the number of relabels.
    """
    N = theta0.shape[0]
    K = theta0.shape[1]
    m = E32.shape[0]
    ptr = np.zeros(N + 1, np.int64)
    cnt = 0
    for e in range(m):
        if E32[e, _U] >= 0:
            ptr[E32[e, _U] + 1] += 1
            ptr[E32[e, _V] + 1] += 1
            cnt += 1
    if cnt == 0:
        return 0
    for i in range(N):
        ptr[i + 1] += ptr[i]
    fill = ptr[:N].copy()
    nbr = np.empty(2 * cnt, np.int64)
    nw = np.empty(2 * cnt, np.float64)
    for e in range(m):
        if E32[e, _U] >= 0:
            a = E32[e, _U]
            b = E32[e, _V]
            we = E64[e, _W]
            nbr[fill[a]] = b
            nw[fill[a]] = we
            fill[a] += 1
            nbr[fill[b]] = a
            nw[fill[b]] = we
            fill[b] += 1
    nodes = np.empty(N, np.int64)
    nc = 0
    for c in range(N):
        if root[c] == c and ptr[c + 1] > ptr[c]:
            nodes[nc] = c
            nc += 1
    acc = np.zeros(K, np.float64)
    stamp = np.zeros(K, np.int64)
    cand = np.empty(nc, np.int64)
    gain = np.empty(nc, np.float64)
    token = 0
    total = 0
    for _ in range(max_passes):
        ncand = 0
        for i in range(nc):
            token += 1
            d, l = _best_relabel(nodes[i], theta0, csum, crow, x, part, ptr, nbr, nw, acc, stamp, token, K)
            if d < -tol:
                cand[ncand] = nodes[i]
                gain[ncand] = d
                ncand += 1
        if ncand == 0:
            break
        order = np.argsort(gain[:ncand])
        changed = 0
        for j in range(ncand):
            c = cand[order[j]]
            token += 1
            d, l = _best_relabel(c, theta0, csum, crow, x, part, ptr, nbr, nw, acc, stamp, token, K)
            if d < -tol:
                x[c] = l
                changed += 1
        total += changed
        if changed == 0:
            break
    return total


@njit(cache=True, nogil=True)
def refine_nodes(theta0, tmin, part, ptr, nbr, eid, costs, x, cid, active, max_passes, tol):
    """ICM over nodes. ``x`` (labels) and ``cid`` (instance id of thing nodes, -1 for stuff nodes,
    ids < N) are updated in place; half-edge ``s`` of the CSR ``ptr``/``nbr``/``eid`` costs
    ``costs[eid[s]]``; ``tmin[v] = min_l theta0[v, l]`` (a singleton move can only help if
    ``theta0[v, x_v]`` minus the uncut weight exceeds it).

    A node may join a neighbouring instance or stuff region (all edges to it become uncut), or start a
    singleton with its best thing label / its best label if that is a stuff label no neighbour has.
    The first sweep visits the nodes with ``active[v] != 0`` (uint8, overwritten), later sweeps only the
    neighbours of nodes that moved. Returns the number of moves.
    """
    N = theta0.shape[0]
    K = theta0.shape[1]
    cap_ids = 2 * N
    clab = np.full(cap_ids, -1, np.int64)
    csize = np.zeros(cap_ids, np.int64)
    for v in range(N):
        if cid[v] >= 0:
            clab[cid[v]] = x[v]
            csize[cid[v]] += 1
    next_id = N
    has_thing = False
    for l in range(K):
        if part[l]:
            has_thing = True
    nkeys = K + cap_ids
    acc = np.zeros(nkeys, np.float64)
    stamp = np.zeros(nkeys, np.int64)
    maxdeg = 0
    for v in range(N):
        if ptr[v + 1] - ptr[v] > maxdeg:
            maxdeg = ptr[v + 1] - ptr[v]
    touched = np.empty(maxdeg + 2, np.int64)
    # key of a node's segment: its label (stuff) or K + instance id (thing)
    kk = np.empty(N, np.int64)
    for v in range(N):
        kk[v] = x[v] if cid[v] < 0 else K + cid[v]
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
            kv = kk[v]
            scur = 0.0  # uncut weight to v's own segment
            for s in range(ptr[v], ptr[v + 1]):
                k = kk[nbr[s]]
                if k == kv:
                    scur += costs[eid[s]]
                    continue
                if stamp[k] != token:
                    stamp[k] = token
                    acc[k] = 0.0
                    touched[nt] = k
                    nt += 1
                acc[k] += costs[eid[s]]
            xv = x[v]
            base = theta0[v, xv] - scur
            best = -tol
            bk = -1
            bl = -1
            for t in range(nt):
                k = touched[t]
                l = k if k < K else clab[k - K]
                d = theta0[v, l] - base - acc[k]
                if d < best:
                    best = d
                    bk = k
                    bl = l
            if tmin[v] - base < best:
                # singleton candidates: best thing label (new instance), best label if absent stuff
                lt = -1
                la = -1
                vt = _INF
                va = _INF
                for l in range(K):
                    t = theta0[v, l]
                    if t < va:
                        va = t
                        la = l
                    if has_thing and part[l] and t < vt:
                        vt = t
                        lt = l
                if lt >= 0 and not (cid[v] >= 0 and csize[cid[v]] == 1 and lt == xv):
                    d = vt - base
                    if d < best:
                        best = d
                        bk = -2
                        bl = lt
                if not part[la] and la != xv and stamp[la] != token:
                    d = va - base
                    if d < best:
                        best = d
                        bk = la
                        bl = la
            if bl < 0:
                continue
            old = cid[v]
            if bk == -2:
                if old >= 0 and csize[old] == 1:
                    clab[old] = bl
                elif next_id < cap_ids:
                    if old >= 0:
                        csize[old] -= 1
                    cid[v] = next_id
                    clab[next_id] = bl
                    csize[next_id] = 1
                    next_id += 1
                else:
                    continue
            elif bk < K:
                if old >= 0:
                    csize[old] -= 1
                cid[v] = -1
            else:
                c = bk - K
                if old >= 0:
                    csize[old] -= 1
                cid[v] = c
                csize[c] += 1
            x[v] = bl
            kk[v] = bl if cid[v] < 0 else K + cid[v]
            changed += 1
            for s in range(ptr[v], ptr[v + 1]):
                nxt[nbr[s]] = 1
        total += changed
        if changed == 0:
            break
        for v in range(N):
            active[v] = nxt[v]
            nxt[v] = 0
    return total


@njit(cache=True, nogil=True)
def finalize(theta0, part, edges, costs, x, cid):
    """Cluster ids = components of the uncut edges; energy of eq. (2) on the original edges."""
    N = theta0.shape[0]
    K = theta0.shape[1]
    key = np.empty(N, np.int64)  # the segment of a node: its label (stuff) or K + its instance (thing)
    for v in range(N):
        key[v] = K + cid[v] if part[x[v]] else x[v]
    out, _ = components_by_key(edges, key)
    energy = 0.0
    for v in range(N):
        energy += theta0[v, x[v]]
    for e in range(edges.shape[0]):
        if out[edges[e, 0]] != out[edges[e, 1]]:
            energy += costs[e]
    return out, energy


@njit(cache=True, nogil=True)
def solve_kernel(theta0, edges, costs, part, cluster_passes, node_passes, tol, allow_hash):
    """Whole pipeline (see module doc) with freshly allocated work arrays. Returns ``(labels,
    cluster_ids, energy, merges)``."""
    nf8, ni4, ni8 = workspace_sizes(theta0.shape[0], theta0.shape[1], edges.shape[0])
    wf8 = np.empty(nf8, np.float64)
    wi4 = np.empty(ni4, np.int32)
    wi8 = np.empty(ni8, np.int64)
    return solve_kernel_ws(
        theta0, edges, costs, part, cluster_passes, node_passes, tol, allow_hash, wf8, wi4, wi8
    )


@njit(cache=True, nogil=True)
def solve_kernel_ws(theta0, edges, costs, part, cluster_passes, node_passes, tol, allow_hash, wf8, wi4, wi8):
    """``solve_kernel`` on caller-provided work arrays (lengths at least ``workspace_sizes(N, K, E)``;
    contents irrelevant), e.g. kept across calls: fresh pages would cost a page fault and zeroing each."""
    N = theta0.shape[0]
    use_hash = allow_hash and packing_fits(N, edges.shape[0])
    if use_hash:  # parallel edges are summed inside the contraction
        ge = edges
        gw0 = costs
    else:
        ge, gw0 = unique_edges(N, edges, costs)
    m = ge.shape[0]
    nbr = wi4[: 2 * m]
    eid = wi4[2 * m : 4 * m]
    ptr = incidence_csr_into(N, ge, nbr, eid)
    parent, lab, E64, E32, csum, crow, tmin, merges = _gaec(
        theta0, ge, gw0, ptr, eid, use_hash, wf8, wi4[4 * m :], wi8
    )
    root = find_roots(parent)
    x = np.empty(N, np.int64)
    for v in range(N):
        x[v] = lab[v]
    if cluster_passes > 0:
        refine_clusters(theta0, csum, crow, x, part, E32, E64, root, cluster_passes, tol)
    xn = np.empty(N, np.int64)
    cid = np.empty(N, np.int64)
    for v in range(N):
        r = root[v]
        xn[v] = x[r]
        cid[v] = r if part[x[r]] else -1
    if node_passes > 0:
        refine_nodes(theta0, tmin, part, ptr, nbr, eid, gw0, xn, cid, np.ones(N, np.uint8), node_passes, tol)
    out, energy = finalize(theta0, part, edges, costs, xn, cid)
    return xn, out, energy, merges
