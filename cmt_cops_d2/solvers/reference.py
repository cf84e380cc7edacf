"""Reference baseline: greedy contraction with *stale* gains, as the public LPMP AMWC GAEC behaves.

Re-implemented from a description of LPMP's AMWC greedy contraction (no code copied) to serve
as the energy / speed baseline of ``tools/benchmark_amwc.py`` and of the tests. Behaviour kept on
purpose:

* initial label ``argmin`` with ties to the *largest* index;
* heap entries carry (gain, edge, label, stamp); an entry is skipped when its edge died or its stamp
  is old, the loop stops at the first entry with gain >= 0;
* after contracting (i, j) the cluster takes the label stored in the heap entry, and only the edges of
  the absorbed node are re-scored (folded into an existing edge: weight summed, stamp bumped; moved:
  re-scored) -- edges of the kept node to other clusters keep their stale gains (quirk 1);
* the gain ignores partitionability (quirk 3); a final pass merges adjacent clusters of the same stuff
  label.

Not for production use: ``cmt_cops_d2.solvers.solve_amwc`` is the solver of this project.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ._core import find_roots, incidence_csr, unique_edges
from .edgehash import packing_fits, pair_key, table_delete, table_find_or_insert, table_new
from .amwc import validate_problem

__all__ = ["solve_amwc_gaec_stale"]


@njit(cache=True, nogil=True)
def _gain(theta, lab, w, a, b, K):
    best = np.inf
    bl = 0
    for l in range(K):
        t = theta[a, l] + theta[b, l]
        if t <= best:  # ties -> largest label
            best = t
            bl = l
    return best - (w + theta[a, lab[a]] + theta[b, lab[b]]), bl


@njit(cache=True, nogil=True)
def _push(hk, he, hl, hs, n, key, e, l, st):
    if n == hk.shape[0]:
        size = 2 * n + 16
        hk2 = np.empty(size, np.float64)
        he2 = np.empty(size, np.int64)
        hl2 = np.empty(size, np.int64)
        hs2 = np.empty(size, np.int64)
        hk2[:n] = hk[:n]
        he2[:n] = he[:n]
        hl2[:n] = hl[:n]
        hs2[:n] = hs[:n]
        hk, he, hl, hs = hk2, he2, hl2, hs2
    i = n
    while i > 0:
        p = (i - 1) >> 1
        if hk[p] <= key:
            break
        hk[i] = hk[p]
        he[i] = he[p]
        hl[i] = hl[p]
        hs[i] = hs[p]
        i = p
    hk[i] = key
    he[i] = e
    hl[i] = l
    hs[i] = st
    return hk, he, hl, hs, n + 1


@njit(cache=True, nogil=True)
def _pop(hk, he, hl, hs, n):
    key, e, l, st = hk[0], he[0], hl[0], hs[0]
    n -= 1
    if n > 0:
        k = hk[n]
        ee, ll, ss = he[n], hl[n], hs[n]
        i = 0
        while True:
            c = 2 * i + 1
            if c >= n:
                break
            if c + 1 < n and hk[c + 1] < hk[c]:
                c += 1
            if hk[c] >= k:
                break
            hk[i] = hk[c]
            he[i] = he[c]
            hl[i] = hl[c]
            hs[i] = hs[c]
            i = c
        hk[i] = k
        he[i] = ee
        hl[i] = ll
        hs[i] = ss
    return key, e, l, st, n


@njit(cache=True, nogil=True)
def _stale_kernel(theta0, edges, costs, part):
    N = theta0.shape[0]
    K = theta0.shape[1]
    ue, w0 = unique_edges(N, edges, costs)
    ptr, nbr, eid = incidence_csr(N, ue)
    eu = np.ascontiguousarray(ue[:, 0])
    ev = np.ascontiguousarray(ue[:, 1])
    m = eu.shape[0]
    theta = theta0.copy()
    w = w0.copy()
    lab = np.empty(N, np.int64)
    for v in range(N):
        best = np.inf
        for l in range(K):
            if theta[v, l] <= best:
                best = theta[v, l]
                lab[v] = l
    adj_start = ptr[:N].copy()
    adj_len = np.empty(N, np.int64)
    for v in range(N):
        adj_len[v] = ptr[v + 1] - ptr[v]
    adj_cap = adj_len.copy()
    deg = adj_len.copy()
    pool = np.empty(6 * m + 16, np.int32)  # edge ids, like the int32 ``eid`` of ``incidence_csr``
    pool[: 2 * m] = eid
    pend = 2 * m
    alive = np.ones(m, np.uint8)
    stamp = np.zeros(m, np.int64)
    hk = np.empty(m + 16, np.float64)
    he = np.empty(m + 16, np.int64)
    hl = np.empty(m + 16, np.int64)
    hs = np.empty(m + 16, np.int64)
    n = 0
    for e in range(m):
        g, l = _gain(theta, lab, w[e], eu[e], ev[e], K)
        if g <= 0.0:
            hk, he, hl, hs, n = _push(hk, he, hl, hs, n, g, e, l, 0)
    parent = np.arange(N)
    tab, bits, ebits = table_new(m, m)
    for e in range(m):
        table_find_or_insert(tab, bits, ebits, pair_key(eu[e], ev[e], N), e)
    while n > 0:
        g, e, l, st, n = _pop(hk, he, hl, hs, n)
        if alive[e] == 0 or st != stamp[e]:
            continue
        if g >= 0.0:
            break
        i = eu[e]
        j = ev[e]
        alive[e] = 0
        if deg[i] < deg[j]:
            stable, merge = j, i
        else:
            stable, merge = i, j
        for k in range(K):
            theta[stable, k] += theta[merge, k]
        lab[stable] = l
        parent[merge] = stable
        table_delete(tab, bits, ebits, pair_key(i, j, N))
        # room for the absorbed node's edges in the kept node's list
        s0 = adj_start[stable]
        ls = adj_len[stable]
        need = ls + adj_len[merge]
        if need > adj_cap[stable]:
            cnt = 0
            for q in range(s0, s0 + ls):
                if alive[pool[q]]:
                    cnt += 1
            newcap = 2 * (cnt + adj_len[merge])
            if pend + newcap > pool.shape[0]:
                bigger = np.empty(max(2 * pool.shape[0], pend + newcap), np.int32)
                bigger[:pend] = pool[:pend]
                pool = bigger
            wp = pend
            for q in range(s0, s0 + ls):
                f = pool[q]
                if alive[f]:
                    pool[wp] = f
                    wp += 1
            adj_start[stable] = pend
            adj_cap[stable] = newcap
            pend += newcap
            ls = cnt
        wp = adj_start[stable] + ls
        sm = adj_start[merge]
        for q in range(sm, sm + adj_len[merge]):
            f = pool[q]
            if alive[f] == 0:
                continue
            h = eu[f] + ev[f] - merge
            table_delete(tab, bits, ebits, pair_key(merge, h, N))
            fs = table_find_or_insert(tab, bits, ebits, pair_key(stable, h, N), f)
            if fs >= 0:
                w[fs] += w[f]
                stamp[fs] += 1
                alive[f] = 0
                deg[h] -= 1
                g2, l2 = _gain(theta, lab, w[fs], stable, h, K)
                if g2 <= 0.0:
                    hk, he, hl, hs, n = _push(hk, he, hl, hs, n, g2, fs, l2, stamp[fs])
            else:
                if eu[f] == merge:
                    eu[f] = stable
                else:
                    ev[f] = stable
                stamp[f] += 1
                pool[wp] = f
                wp += 1
                deg[stable] += 1
                g2, l2 = _gain(theta, lab, w[f], stable, h, K)
                if g2 <= 0.0:
                    hk, he, hl, hs, n = _push(hk, he, hl, hs, n, g2, f, l2, stamp[f])
        adj_len[stable] = wp - adj_start[stable]
        deg[stable] -= 1
        adj_len[merge] = 0
        deg[merge] = 0
    root = find_roots(parent)
    # stuff post-pass over the original edges
    for e in range(edges.shape[0]):
        a = root[edges[e, 0]]
        b = root[edges[e, 1]]
        while parent[a] != a:
            a = parent[a]
        while parent[b] != b:
            b = parent[b]
        if a != b and lab[a] == lab[b] and not part[lab[a]]:
            parent[b] = a
    root = find_roots(parent)
    labels = np.empty(N, np.int64)
    newid = np.full(N, -1, np.int64)
    cids = np.empty(N, np.int64)
    k = 0
    for v in range(N):
        r = root[v]
        labels[v] = lab[r]
        if newid[r] < 0:
            newid[r] = k
            k += 1
        cids[v] = newid[r]
    energy = 0.0
    for v in range(N):
        energy += theta0[v, labels[v]]
    for e in range(edges.shape[0]):
        if cids[edges[e, 0]] != cids[edges[e, 1]]:
            energy += costs[e]
    return labels, cids, energy


def solve_amwc_gaec_stale(node_costs, edges, edge_costs, partitionable):
    """Stale-gain GAEC baseline (LPMP behaviour). Same inputs / outputs as ``solve_amwc``."""
    theta, ed, c, part = validate_problem(node_costs, edges, edge_costs, partitionable)
    if theta.shape[0] == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0.0
    if not packing_fits(theta.shape[0], ed.shape[0]):
        raise ValueError("graph too large for the reference solver's hash keys")
    labels, cids, energy = _stale_kernel(theta, ed, c, part)
    return labels, cids, float(energy)
