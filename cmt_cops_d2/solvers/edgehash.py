"""Open-addressing hash map (Numba) from an unordered node pair to an edge id, one int64 per slot.

Linear probing, multiplicative (Fibonacci) hashing, deletion by backward shift (no tombstones), so a
long contraction with many deletions keeps short probe sequences. A slot holds
``(pair << ebits) | edge`` with ``pair = min(u, v) * n + max(u, v)`` (``-1`` = empty), so a probe
reads one 8-byte word. ``packing_fits(n, m)`` says whether that fits (``n**2 * 2**ebits <= 2**62``):
true for the stride-4 grids of COCO / Cityscapes (256x512 nodes, 1.4M edges), false for e.g. 2M
nodes; callers then use another structure. The caller sizes the table (``table_bits`` /
``table_new``) so that it never fills. Only ``table_new`` allocates (and ``table_build`` its bucket
counts); ``table_build`` fills an empty table with all edges of a graph in one go.
"""
import numpy as np
from numba import njit

__all__ = [
    "packing_fits",
    "table_bits",
    "table_new",
    "table_find",
    "table_delete",
    "table_find_or_insert",
    "table_build",
    "pair_key",
]

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=True, nogil=True)
def _ebits(m):
    b = 1
    while (1 << b) <= m:
        b += 1
    return b


@njit(cache=True, nogil=True)
def packing_fits(n, m):
    """True when pairs of ``n`` nodes and edge ids ``< m`` pack into one non-negative int64."""
    eb = _ebits(m)
    if eb >= 62:
        return False
    limit = (np.int64(1) << np.int64(62 - eb)) // max(n, 1)
    return n <= limit


@njit(cache=True, nogil=True)
def table_bits(num_items):
    """log2 of the table size for up to ``num_items`` entries (load factor <= 2/3)."""
    bits = 4
    while (1 << bits) < (3 * num_items) // 2:
        bits += 1
    return bits


@njit(cache=True, nogil=True)
def table_new(num_items, m):
    """Empty table for up to ``num_items`` entries (load factor <= 2/3), edge ids ``< m``.
    Returns ``(tab, bits, ebits)``."""
    bits = table_bits(num_items)
    return np.full(1 << bits, -1, np.int64), bits, _ebits(m)


@njit(cache=True, nogil=True)
def pair_key(u, v, n):
    if u < v:
        return np.int64(u) * n + v
    return np.int64(v) * n + u


@njit(cache=True, nogil=True)
def _home(key, bits):
    return np.int64((np.uint64(key) * _GOLDEN) >> np.uint64(64 - bits))


@njit(cache=True, nogil=True)
def table_find(tab, bits, ebits, key):
    """Edge stored for ``key``, or -1."""
    mask = (1 << bits) - 1
    emask = (np.int64(1) << ebits) - 1
    i = _home(key, bits)
    out = -1
    while True:
        s = tab[i]
        if s == -1:
            break
        if (s >> ebits) == key:
            out = s & emask
            break
        i = (i + 1) & mask
    return out


@njit(cache=True, nogil=True)
def table_find_or_insert(tab, bits, ebits, key, val):
    """Edge stored for ``key`` if present; otherwise store ``val`` for ``key`` and return -1."""
    mask = (1 << bits) - 1
    emask = (np.int64(1) << ebits) - 1
    i = _home(key, bits)
    out = -1
    while True:
        s = tab[i]
        if s == -1:
            tab[i] = (key << ebits) | val
            break
        if (s >> ebits) == key:
            out = s & emask
            break
        i = (i + 1) & mask
    return out


@njit(cache=True, nogil=True)
def table_delete(tab, bits, ebits, key):
    """Remove ``key`` if present (backward-shift deletion). Returns True if it was present."""
    mask = (1 << bits) - 1
    i = _home(key, bits)
    while True:
        s = tab[i]
        if s == -1:
            return False
        if (s >> ebits) == key:
            break
        i = (i + 1) & mask
    tab[i] = -1
    j = i
    while True:
        j = (j + 1) & mask
        s = tab[j]
        if s == -1:
            return True
        h = _home(s >> ebits, bits)
        # the entry at j may move into the hole at i unless its home lies cyclically in (i, j]
        if i <= j:
            stays = i < h <= j
        else:
            stays = h > i or h <= j
        if not stays:
            tab[i] = s
            tab[j] = -1
            i = j



@njit(cache=True, nogil=True)
def table_build(tab, bits, ebits, edges, n, order):
    """Insert ``(pair(edges[e]), e)`` for every edge into the empty table ``tab``, with the result of
    ``table_find_or_insert`` in edge order, using ``order`` (int64, ``>= len(edges)``) as scratch.
    Returns ``(occupied, num_dup)``; the parallel edges are listed in ``order[:num_dup]`` as
    ``(e << 32) | g`` (edge ``e`` repeats the pair of the earlier edge ``g``, the one kept), in no
    particular order.

    The inserts are bucketed by the top bits of their home slot first (a counting sort, stable in edge
    order), so that the table is written front to back instead of at random: a large table is built
    at streaming speed instead of one cache miss per edge. The set of entries, and which copy of a
    parallel edge is kept, are the same as with inserts in edge order."""
    m = edges.shape[0]
    bb = bits - 10 if bits > 10 else 0  # buckets of 1024 slots
    nb = 1 << bb
    sh = np.uint64(64 - bb)
    cnt = np.zeros(nb + 1, np.int64)
    for e in range(m):
        h = np.int64((np.uint64(pair_key(edges[e, 0], edges[e, 1], n)) * _GOLDEN) >> sh) if bb > 0 else 0
        cnt[h + 1] += 1
    for i in range(nb):
        cnt[i + 1] += cnt[i]
    for e in range(m):
        key = pair_key(edges[e, 0], edges[e, 1], n)
        h = np.int64((np.uint64(key) * _GOLDEN) >> sh) if bb > 0 else 0
        order[cnt[h]] = (key << ebits) | e
        cnt[h] += 1
    mask = (1 << bits) - 1
    emask = (np.int64(1) << ebits) - 1
    occupied = 0
    ndup = 0
    for j in range(m):
        wd = order[j]
        key = wd >> ebits
        i = _home(key, bits)
        while True:
            s = tab[i]
            if s == -1:
                tab[i] = wd
                occupied += 1
                break
            if (s >> ebits) == key:
                order[ndup] = ((wd & emask) << 32) | (s & emask)  # ndup <= j: already read
                ndup += 1
                break
            i = (i + 1) & mask
    return occupied, ndup
