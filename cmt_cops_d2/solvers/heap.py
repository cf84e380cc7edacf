"""Indexed d-ary min-heap on flat arrays (Numba), keyed by float64, holding item ids ``0..capacity-1``.

State: ``hk[i]`` key at heap position ``i``, ``he[i]`` item at position ``i``, ``pos[item]`` its position
(``-1`` when absent), and the current size ``n``; node ``i`` has the children ``(i << la) + 1 ..
(i << la) + 2**la`` (``la`` = log2 of the arity). Keys are stored next to the items (not looked up
through ``pos``) so that sifting touches contiguous memory. The solver uses 8 children per node: they
are 8 consecutive keys (64 bytes, one cache line) and the heap is a third as deep as a binary one,
which matters because the heap of a large instance does not fit in cache. Ties are broken by heap
position, which is deterministic for a given sequence of operations.

Only the construction lives here. The updates (insert, re-key, remove, pop) are written out inside the
contraction loop of ``_core._gaec``, in one place, with the same sift as ``_place_down`` below:
calling a Numba function that takes the heap arrays from a hot loop makes Numba update their reference
counts (atomic instructions) on every call, which cost more than the sift itself. The arity is an
argument (not a constant shared with ``_core``) so that Numba's per-file caches cannot disagree on it.
"""
from numba import njit

__all__ = ["heap_heapify"]


@njit(cache=True, nogil=True)
def _place_down(hk, he, pos, i, k, e, n, la):
    """Put item ``e`` with key ``k`` into the hole at ``i``, moving the hole down while the smallest
    child (first one on ties) is smaller."""
    while True:
        c0 = (i << la) + 1
        if c0 >= n:
            break
        c = c0
        kc = hk[c0]
        end = c0 + (1 << la)
        if end > n:
            end = n
        for j in range(c0 + 1, end):
            kj = hk[j]
            if kj < kc:
                kc = kj
                c = j
        if kc >= k:
            break
        hk[i] = kc
        ec = he[c]
        he[i] = ec
        pos[ec] = i
        i = c
    hk[i] = k
    he[i] = e
    pos[e] = i


@njit(cache=True, nogil=True)
def heap_heapify(hk, he, pos, n, la):
    """Turn the first ``n`` (key, item) pairs into a heap with ``2**la`` children per node in O(n)
    (``pos`` is rewritten for them)."""
    for i in range(n):
        pos[he[i]] = i
    for i in range((n - 2) >> la, -1, -1):
        _place_down(hk, he, pos, i, hk[i], he[i], n, la)
