"""Numba kernels of the AMWC / MWC solver (no Python objects inside loops, no torch).

Problem (COPS eq. 2): minimise ``sum_v theta[v, x_v] + sum_e c_e * y_e`` over labels ``x`` and a
multicut ``y`` (``y_e = 1``: edge cut), with ``x_u != x_v => y_uv = 1`` and, for a label ``l`` that is
not partitionable (stuff), ``x_u == x_v == l => y_uv = 0``. ``c_e > 0`` is attractive.

Pipeline of ``solve_kernel``:

1. ``incidence_csr``: per-node incident edges (parallel edges are summed inside the contraction, or by
   ``unique_edges`` beforehand when the hash map cannot be used; self-loops are rejected by the wrapper).
2. ``gaec_exact``: greedy joint labelling + contraction. Every cluster ``A`` holds its summed costs
   ``Theta_A`` and takes the label ``argmin Theta_A``. Contracting ``A`` and ``B`` changes the energy by
   ``g(A, B) = min_l (Theta_A + Theta_B)[l] - min Theta_A - min Theta_B - w_AB`` (``w_AB`` the summed
   cost of the edges between them); the most negative ``g`` is contracted until none is < 0. Unlike the
   public LPMP solver (stale gains), the contraction order is that of exact gains: the heap holds
   *lower bounds* of the gains, which stay valid as clusters grow, and the popped edge is contracted
   only if its key is exact, otherwise re-scored (O(K)) and re-inserted. Bounds are O(1): same label ->
   exact ``-w``; different labels -> ``p >= min(gap_v[lab_u], delta_u)`` (and symmetrically), ``delta``
   the margin between the best and second-best label. See ``gaec_exact`` for which contractions can
   invalidate a bound and how those edges are found without walking the big cluster's edge list.
3. ``refine_clusters``: the "canonical" state reads clusters of a stuff label as merged with every
   adjacent cluster of the same label (the stuff post-pass of LPMP). Iterated conditional modes on the
   contracted graph: relabel one GAEC cluster at a time to any label if that lowers the energy of the
   canonical state, most improving first (covers LPMP's tie relabel in MWC: a cluster moves to an
   equally cheap label to stay apart from a repulsive same-label neighbour).
4. ``refine_nodes``: node moves on the original graph (a node joins a neighbouring instance, a
   neighbouring stuff region, or becomes a singleton), again only when the canonical energy drops.
5. ``finalize``: cluster ids = connected components of the uncut edges (``x_u == x_v`` and the label is
   stuff or both nodes are in the same instance); energy evaluated on the original edges.

Memory layout (the contraction is bound by cache misses on large graphs): one 32-byte record per edge
(``EDGE_RECORD``), per-cluster edge lists in one int32 pool, a packed hash map from cluster pairs to
edges (``edgehash``), an indexed 4-ary heap (``heap``) on float64 keys.
"""
import numpy as np
from numba import njit

from .edgehash import packing_fits, pair_key, table_find, table_find_or_insert, table_new
from .heap import heap_heapify, heap_remove, heap_set, heap_sift_down

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
    neighbour ``nbr`` and the edge index ``eid``."""
    m = edges.shape[0]
    ptr = np.zeros(n + 1, np.int64)
    for e in range(m):
        ptr[edges[e, 0] + 1] += 1
        ptr[edges[e, 1] + 1] += 1
    for i in range(n):
        ptr[i + 1] += ptr[i]
    fill = ptr[:n].copy()
    nbr = np.empty(2 * m, np.int64)
    eid = np.empty(2 * m, np.int64)
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
    return ptr, nbr, eid


# ----------------------------------------------------------------------------------------------------
# greedy contraction with exact gains
# ----------------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _row_stats(theta, r, K):
    """argmin (first index on ties), min, and gap to the second-smallest entry (inf if K == 1)."""
    m = _INF
    s = _INF
    a = 0
    for l in range(K):
        t = theta[r, l]
        if t < m:
            s = m
            m = t
            a = l
        elif t < s:
            s = t
    return a, m, s - m


@njit(cache=True, nogil=True)
def _pair_min(theta, a, b, K):
    best = _INF
    for l in range(K):
        t = theta[a, l] + theta[b, l]
        if t < best:
            best = t
    return best


@njit(cache=True, nogil=True)
def _penalty_bound(theta, lab, mval, dlt, u, v):
    """Lower bound ``L`` on the label penalty ``p(u, v) = min_l (gap_u + gap_v)[l]`` of two clusters with
    different labels (``gap_x[l] = Theta_x[l] - min Theta_x``), and whether it is exact. O(1):
    ``p >= min(gap_v[lab_u], delta_u)`` (take ``l = lab_u`` or any other label) and symmetrically;
    ``p <= min(gap_v[lab_u], gap_u[lab_v])``."""
    gv = theta[v, lab[u]] - mval[v]
    gu = theta[u, lab[v]] - mval[u]
    t1 = gv if gv < dlt[u] else dlt[u]
    t2 = gu if gu < dlt[v] else dlt[v]
    lo = t1 if t1 > t2 else t2
    hi = gv if gv < gu else gu
    if lo >= hi:
        return hi, True
    return lo, False


# One 32-byte record per edge, so that handling an edge touches one cache line: current cluster
# endpoints (u = -1 once the edge is dead), heap position, exactness stamp, summed cost, penalty bound.
EDGE_RECORD = np.dtype(
    [("u", np.int32), ("v", np.int32), ("pos", np.int32), ("stamp", np.int32), ("w", np.float64), ("pen", np.float64)],
    align=True,
)
_NOT_EXACT = np.int32(-1)
_EXACT_WHILE_SAME_LABEL = np.int32(2**31 - 1)


@njit(cache=True, nogil=True)
def _rescore(f, u, v, T, theta, lab, mval, dlt, rec, lmax, hk, he, pos, n):
    """Recompute the heap key of edge ``f`` between clusters ``u`` and ``v`` at time ``T``.

    Only attractive edges (``w > 0``) can have a negative gain ``p - w``; others leave the heap. Same
    label: ``p = 0`` exactly. Different labels: key from ``_penalty_bound`` (``stamp = T`` if exact)."""
    r = rec[f]
    wf = r.w
    if wf <= 0.0:
        return heap_remove(hk, he, pos, n, f)
    if lab[u] == lab[v]:
        r.pen = 0.0
        r.stamp = _EXACT_WHILE_SAME_LABEL
        key = -wf
    else:
        L, ex = _penalty_bound(theta, lab, mval, dlt, u, v)
        if L > wf:  # gain >= 0 already; a bound above w is never needed (keeps lmax small)
            L = wf
        r.pen = L
        r.stamp = T if ex else _NOT_EXACT
        if L > lmax[u]:
            lmax[u] = L
        if L > lmax[v]:
            lmax[v] = L
        key = L - wf
    if key < 0.0:
        return heap_set(hk, he, pos, n, f, key)
    return heap_remove(hk, he, pos, n, f)


@njit(cache=True, nogil=True)
def gaec_exact(theta, edges, w0, ptr, eid, allow_hash):
    """Greedy additive edge contraction with joint labelling and exact gains.

    ``theta`` (N, K) is overwritten with per-cluster summed costs (valid at the root rows). ``edges``
    (m, 2) and ``w0`` are the edges and costs, ``ptr``/``eid`` their incidence CSR. Parallel edges are
    summed on the way (found by the hash map); without the hash map (``allow_hash`` False or a graph too
    large for packed keys) the edges must be unique already (``unique_edges``). Returns
    ``(parent, lab, cu, cv, cw, alive, num_merges)``: ``parent[v] == v`` for cluster roots (every
    non-root points to the cluster it was merged into), ``lab[root]`` the cluster label (argmin of its
    summed costs); the contracted graph is given by the edges with ``alive[e]``, joining clusters
    ``cu[e]``, ``cv[e]`` with summed cost ``cw[e]``.

    Invariant: every edge with ``w > 0`` has ``pen[e] <= min(p(e), w)`` (``p`` the true label
    penalty; a bound above ``w`` is capped since ``p >= w`` already means "gain >= 0"), the heap holds
    exactly the edges with ``pen - w < 0`` keyed by ``pen - w``, and ``lmax[u] >= pen[e]`` for every
    attractive edge of ``u`` with different labels. The popped edge is contracted only when its key is
    exact (same labels, or evaluated after the last change of both clusters); otherwise its exact
    penalty is computed (O(K)) and it is re-inserted. A contraction of ``A`` and ``B`` into ``R``
    changes penalties as follows: if ``A`` and ``B`` had the same label every gap of ``R`` is >= the gaps
    of ``A`` and ``B``, so all bounds stay valid; if a side keeps its label ``l`` the penalty of any of
    its edges is still >= ``min(gap_h[l], delta_R) >= min(pen, delta_R)``, so only edges with
    ``pen > delta_R`` need a new bound (none when ``lmax <= delta_R``, the usual case for a large
    cluster absorbing a noisy one); a side whose label changed re-scores all its attractive edges.
    Parallel edges are found with a hash map on cluster pairs (``edgehash``), so a contraction costs
    O(deg(B) + re-scored edges) heap/hash operations plus O(K) for the cost vectors. (Graphs too large
    for the packed hash keys fall back to marking the neighbours of ``A`` by walking its list.)
    """
    N = theta.shape[0]
    K = theta.shape[1]
    m = edges.shape[0]
    rec = np.empty(m, dtype=EDGE_RECORD)
    for e in range(m):
        r = rec[e]
        r.u = edges[e, 0]
        r.v = edges[e, 1]
        r.pos = -1
        r.stamp = _NOT_EXACT
        r.w = w0[e]
        r.pen = 0.0
    pos = rec["pos"]
    lab = np.empty(N, np.int32)
    mval = np.empty(N, np.float64)
    dlt = np.empty(N, np.float64)
    for v in range(N):
        a, mv, dv = _row_stats(theta, v, K)
        lab[v] = a
        mval[v] = mv
        dlt[v] = dv
    lastchg = np.zeros(N, np.int32)
    lmax = np.zeros(N, np.float64)
    # per-cluster edge lists in one pool; a list that outgrows its block moves (compacted) to the end
    pool = np.empty(4 * m + 16, np.int32)
    pool[: 2 * m] = eid
    start = ptr[:N].copy()
    ln = np.empty(N, np.int64)
    for v in range(N):
        ln[v] = ptr[v + 1] - ptr[v]
    cap = ln.copy()
    deg = ln.copy()
    pend = 2 * m
    use_hash = allow_hash and packing_fits(N, m)
    # entries of contracted-away clusters are left in the table (they are never looked up again) and
    # swept out by a rebuild when the table gets 3/4 full
    tab, bits, ebits = table_new(2 * m if use_hash else 1, m)
    occupied = 0
    if use_hash:
        for e in range(m):
            a = edges[e, 0]
            b = edges[e, 1]
            g = table_find_or_insert(tab, bits, ebits, pair_key(a, b, N), e)
            if g >= 0:  # parallel edge: fold into the first one
                rec[g].w += rec[e].w
                rec[e].u = -1
                deg[a] -= 1
                deg[b] -= 1
            else:
                occupied += 1
    max_occupied = (3 * tab.shape[0]) // 4
    mark = np.full(N if not use_hash else 1, -1, np.int64)
    sink = np.zeros(1, np.float64)
    hk = np.empty(m, np.float64)
    he = np.empty(m, np.int32)
    n = 0
    for e in range(m):
        r = rec[e]
        we = r.w
        if we <= 0.0 or r.u < 0:
            continue
        a = r.u
        b = r.v
        if lab[a] == lab[b]:
            r.stamp = _EXACT_WHILE_SAME_LABEL
            key = -we
        else:
            L, ex = _penalty_bound(theta, lab, mval, dlt, a, b)
            if L > we:
                L = we
            r.pen = L
            if ex:
                r.stamp = 0
            if L > lmax[a]:
                lmax[a] = L
            if L > lmax[b]:
                lmax[b] = L
            key = L - we
        if key < 0.0:
            hk[n] = key
            he[n] = e
            n += 1
    heap_heapify(hk, he, pos, n)
    parent = np.arange(N)
    T = 0
    while n > 0:
        e = he[0]
        r = rec[e]
        a = np.int64(r.u)
        b = np.int64(r.v)
        if lab[a] != lab[b] and (r.stamp < lastchg[a] or r.stamp < lastchg[b]):
            p = _pair_min(theta, a, b, K) - (mval[a] + mval[b])
            we = r.w
            g = p - we
            if p > we:
                p = we
            r.pen = p
            r.stamp = T
            if p > lmax[a]:
                lmax[a] = p
            if p > lmax[b]:
                lmax[b] = p
            if g < 0.0:
                hk[0] = g
                heap_sift_down(hk, he, pos, 0, n)
            else:
                n = heap_remove(hk, he, pos, n, e)
            continue
        # contract a and b (keep the one with more edges)
        T += 1
        n = heap_remove(hk, he, pos, n, e)
        r.u = -1
        if use_hash and occupied + ln[a] + ln[b] > max_occupied:
            tab[:] = -1
            occupied = 0
            for f in range(m):
                if rec[f].u >= 0:
                    table_find_or_insert(tab, bits, ebits, pair_key(rec[f].u, rec[f].v, N), f)
                    occupied += 1
        if deg[a] < deg[b]:
            a, b = b, a
        la = lab[a]
        lb = lab[b]
        for l in range(K):
            theta[a, l] += theta[b, l]
        nl, mv, dv = _row_stats(theta, a, K)
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
                rf = rec[f]
                if rf.u < 0:
                    continue
                pool[wp] = f
                wp += 1
                h = rf.u + rf.v - a
                if not use_hash:
                    mark[h] = f
                if rf.w <= 0.0:
                    continue
                if relab or (lab[h] != nl and rf.pen > dv):
                    n = _rescore(f, a, h, T, theta, lab, mval, dlt, rec, lmax, hk, he, pos, n)
                if lab[h] != nl and rf.pen > newmax:
                    newmax = rf.pen
            ln[a] = wp - sa
            lmax[a] = newmax
        # 2. room for b's edges in a's list
        need = ln[a] + ln[b]
        if need > cap[a]:
            sa = start[a]
            cnt = 0
            for i in range(sa, sa + ln[a]):
                if rec[pool[i]].u >= 0:
                    cnt += 1
            newcap = 2 * (cnt + ln[b])
            if pend + newcap > pool.shape[0]:
                bigger = np.empty(max(2 * pool.shape[0], pend + newcap), np.int32)
                bigger[:pend] = pool[:pend]
                pool = bigger
            wp = pend
            for i in range(sa, sa + ln[a]):
                f = pool[i]
                if rec[f].u >= 0:
                    pool[wp] = f
                    wp += 1
            start[a] = pend
            ln[a] = cnt
            cap[a] = newcap
            pend += newcap
        # 3. fold or move b's edges. A first read-only sweep touches the memory the second one will
        # need (edge records, hash slots, heap entries): its loads do not depend on each other, so
        # their cache misses overlap instead of being paid one after the other.
        sb = start[b]
        eb = sb + ln[b]
        if use_hash:
            touch = 0.0
            for i in range(sb, eb):
                f = pool[i]
                rf = rec[f]
                if rf.u < 0:
                    continue
                h = rf.u + rf.v - b
                touch += theta[h, nl]
                g2 = table_find(tab, bits, ebits, pair_key(a, h, N))
                if g2 >= 0:
                    touch += rec[g2].w
            sink[0] += touch
        wp = start[a] + ln[a]
        for i in range(sb, eb):
            f = pool[i]
            rf = rec[f]
            if rf.u < 0:
                continue
            h = rf.u + rf.v - b
            if use_hash:
                g2 = table_find_or_insert(tab, bits, ebits, pair_key(a, h, N), f)
                if g2 < 0:
                    occupied += 1
            else:
                g2 = mark[h]
            if g2 >= 0:
                rec[g2].w += rf.w
                rf.u = -1
                n = heap_remove(hk, he, pos, n, f)
                deg[h] -= 1
                n = _rescore(g2, a, h, T, theta, lab, mval, dlt, rec, lmax, hk, he, pos, n)
                continue
            if rf.u == b:
                rf.u = a
            else:
                rf.v = a
            pool[wp] = f
            wp += 1
            deg[a] += 1
            if rf.w <= 0.0:
                continue
            if nl != lb:
                n = _rescore(f, a, h, T, theta, lab, mval, dlt, rec, lmax, hk, he, pos, n)
            elif lab[h] != nl:
                pf = rf.pen
                if not agree and pf > dv:
                    n = _rescore(f, a, h, T, theta, lab, mval, dlt, rec, lmax, hk, he, pos, n)
                elif pf > lmax[a]:
                    lmax[a] = pf
        ln[a] = wp - start[a]
        ln[b] = 0
        deg[b] = 0
        if not use_hash:
            for i in range(start[a], start[a] + ln[a]):
                f = pool[i]
                mark[rec[f].u + rec[f].v - a] = -1
    cu = np.empty(m, np.int64)
    cv = np.empty(m, np.int64)
    cw = np.empty(m, np.float64)
    alive = np.empty(m, np.uint8)
    for e in range(m):
        r = rec[e]
        alive[e] = r.u >= 0
        cu[e] = r.u
        cv[e] = r.v
        cw[e] = r.w
    return parent, lab.astype(np.int64), cu, cv, cw, alive, T


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


# ----------------------------------------------------------------------------------------------------
# local improvement on the canonical state (stuff clusters of equal label read as merged)
# ----------------------------------------------------------------------------------------------------
@njit(cache=True, nogil=True)
def _best_relabel(c, theta, x, part, ptr, nbr, nw, acc, stamp, token, K):
    """Best label change of cluster ``c`` on the canonical state: ``(delta, label)`` (label -1 if none)."""
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
    base = theta[c, xc] - scur
    best = 0.0
    bl = -1
    for l in range(K):
        if l == xc:
            continue
        d = theta[c, l] - base
        if stamp[l] == token:
            d -= acc[l]
        if d < best:
            best = d
            bl = l
    return best, bl


@njit(cache=True, nogil=True)
def refine_clusters(theta, x, part, eu, ev, w, alive, root, max_passes, tol):
    """ICM over GAEC clusters: relabel a cluster (all K labels tried) when the canonical energy drops.

    ``theta`` holds the summed costs at the root rows, ``x[root]`` the cluster labels (updated in
    place); the contracted graph is given by the alive edges (endpoints are roots). Each sweep scores
    every cluster, then applies the improving relabels from the most to the least improving one
    (each re-scored just before it is applied). Returns the number of relabels.
    """
    N = theta.shape[0]
    K = theta.shape[1]
    m = eu.shape[0]
    ptr = np.zeros(N + 1, np.int64)
    cnt = 0
    for e in range(m):
        if alive[e]:
            ptr[eu[e] + 1] += 1
            ptr[ev[e] + 1] += 1
            cnt += 1
    if cnt == 0:
        return 0
    for i in range(N):
        ptr[i + 1] += ptr[i]
    fill = ptr[:N].copy()
    nbr = np.empty(2 * cnt, np.int64)
    nw = np.empty(2 * cnt, np.float64)
    for e in range(m):
        if alive[e]:
            a = eu[e]
            b = ev[e]
            nbr[fill[a]] = b
            nw[fill[a]] = w[e]
            fill[a] += 1
            nbr[fill[b]] = a
            nw[fill[b]] = w[e]
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
            d, l = _best_relabel(nodes[i], theta, x, part, ptr, nbr, nw, acc, stamp, token, K)
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
            d, l = _best_relabel(c, theta, x, part, ptr, nbr, nw, acc, stamp, token, K)
            if d < -tol:
                x[c] = l
                changed += 1
        total += changed
        if changed == 0:
            break
    return total


@njit(cache=True, nogil=True)
def refine_nodes(theta0, part, ptr, nbr, hw, x, cid, max_passes, tol):
    """ICM over nodes. ``x`` (labels) and ``cid`` (instance id of thing nodes, -1 for stuff nodes,
    ids < N) are updated in place; ``hw[s]`` is the cost of half-edge ``s`` of the CSR ``ptr``/``nbr``.

    A node may join a neighbouring instance or stuff region (all edges to it become uncut), or start a
    singleton with its best thing label / its best label if that is a stuff label no neighbour has.
    The first sweep visits every node, later sweeps only the neighbours of nodes that moved. Returns
    the number of moves.
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
    # smallest cost per node (a singleton move can only help if theta[v, x_v] - (uncut weight) exceeds it)
    tmin = np.empty(N, np.float64)
    for v in range(N):
        t = theta0[v, 0]
        for l in range(1, K):
            t = min(t, theta0[v, l])
        tmin[v] = t
    nkeys = K + cap_ids
    acc = np.zeros(nkeys, np.float64)
    stamp = np.zeros(nkeys, np.int64)
    maxdeg = 0
    for v in range(N):
        if ptr[v + 1] - ptr[v] > maxdeg:
            maxdeg = ptr[v + 1] - ptr[v]
    touched = np.empty(maxdeg + 2, np.int64)
    active = np.ones(N, np.uint8)
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
            for s in range(ptr[v], ptr[v + 1]):
                u = nbr[s]
                k = x[u] if cid[u] < 0 else K + cid[u]
                if stamp[k] != token:
                    stamp[k] = token
                    acc[k] = 0.0
                    touched[nt] = k
                    nt += 1
                acc[k] += hw[s]
            xv = x[v]
            kv = xv if cid[v] < 0 else K + cid[v]
            scur = acc[kv] if stamp[kv] == token else 0.0
            base = theta0[v, xv] - scur
            best = -tol
            bk = -1
            bl = -1
            for t in range(nt):
                k = touched[t]
                if k == kv:
                    continue
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
    parent = np.arange(N)
    for e in range(edges.shape[0]):
        a = edges[e, 0]
        b = edges[e, 1]
        if x[a] != x[b]:
            continue
        if part[x[a]] and cid[a] != cid[b]:
            continue
        ra = a
        while parent[ra] != ra:
            parent[ra] = parent[parent[ra]]
            ra = parent[ra]
        rb = b
        while parent[rb] != rb:
            parent[rb] = parent[parent[rb]]
            rb = parent[rb]
        if ra != rb:
            if ra < rb:
                parent[rb] = ra
            else:
                parent[ra] = rb
    root = find_roots(parent)
    newid = np.full(N, -1, np.int64)
    out = np.empty(N, np.int64)
    k = 0
    for v in range(N):
        r = root[v]
        if newid[r] < 0:
            newid[r] = k
            k += 1
        out[v] = newid[r]
    energy = 0.0
    for v in range(N):
        energy += theta0[v, x[v]]
    for e in range(edges.shape[0]):
        if out[edges[e, 0]] != out[edges[e, 1]]:
            energy += costs[e]
    return out, energy


@njit(cache=True, nogil=True)
def solve_kernel(theta0, edges, costs, part, cluster_passes, node_passes, tol, allow_hash):
    """Whole pipeline (see module doc). Returns ``(labels, cluster_ids, energy, merges)``."""
    N = theta0.shape[0]
    use_hash = allow_hash and packing_fits(N, edges.shape[0])
    if use_hash:  # parallel edges are summed inside the contraction
        ge = edges
        gw0 = costs
    else:
        ge, gw0 = unique_edges(N, edges, costs)
    ptr, nbr, eid = incidence_csr(N, ge)
    theta = theta0.copy()
    parent, lab, gu, gv, gw, alive, merges = gaec_exact(theta, ge, gw0, ptr, eid, use_hash)
    root = find_roots(parent)
    x = np.empty(N, np.int64)
    for v in range(N):
        x[v] = lab[v]
    if cluster_passes > 0:
        refine_clusters(theta, x, part, gu, gv, gw, alive, root, cluster_passes, tol)
    xn = np.empty(N, np.int64)
    cid = np.empty(N, np.int64)
    for v in range(N):
        r = root[v]
        xn[v] = x[r]
        cid[v] = r if part[x[r]] else -1
    if node_passes > 0:
        hw = np.empty(nbr.shape[0], np.float64)
        for i in range(nbr.shape[0]):
            hw[i] = gw0[eid[i]]
        refine_nodes(theta0, part, ptr, nbr, hw, xn, cid, node_passes, tol)
    out, energy = finalize(theta0, part, edges, costs, xn, cid)
    return xn, out, energy, merges
