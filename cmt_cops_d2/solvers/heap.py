"""Indexed 4-ary min-heap on flat arrays (Numba), keyed by float64, holding item ids ``0..capacity-1``.

State: ``hk[i]`` key at heap position ``i``, ``he[i]`` item at position ``i``, ``pos[item]`` its position
(``-1`` when absent), and the current size ``n`` which every mutating call takes and returns. Keys are
stored next to the items (not looked up through ``pos``) so that sifting touches contiguous memory.
Ties are broken by heap position, which is deterministic for a given sequence of operations.
No function allocates.
"""
from numba import njit

__all__ = ["heap_heapify", "heap_set", "heap_remove", "heap_sift_down"]


@njit(cache=True, nogil=True)
def _sift_up(hk, he, pos, i):
    k = hk[i]
    e = he[i]
    while i > 0:
        p = (i - 1) >> 2
        if hk[p] <= k:
            break
        hk[i] = hk[p]
        he[i] = he[p]
        pos[he[i]] = i
        i = p
    hk[i] = k
    he[i] = e
    pos[e] = i


@njit(cache=True, nogil=True)
def heap_sift_down(hk, he, pos, i, n):
    """Restore the heap below position ``i`` after its key grew."""
    k = hk[i]
    e = he[i]
    while True:
        c0 = 4 * i + 1
        if c0 >= n:
            break
        c = c0
        kc = hk[c0]
        end = c0 + 4
        if end > n:
            end = n
        for j in range(c0 + 1, end):
            if hk[j] < kc:
                kc = hk[j]
                c = j
        if kc >= k:
            break
        hk[i] = hk[c]
        he[i] = he[c]
        pos[he[i]] = i
        i = c
    hk[i] = k
    he[i] = e
    pos[e] = i


@njit(cache=True, nogil=True)
def heap_heapify(hk, he, pos, n):
    """Turn the first ``n`` (key, item) pairs into a heap in O(n) (``pos`` is rewritten)."""
    for i in range(n):
        pos[he[i]] = i
    for i in range((n - 2) // 4, -1, -1):
        heap_sift_down(hk, he, pos, i, n)


@njit(cache=True, nogil=True)
def heap_set(hk, he, pos, n, e, key):
    """Insert item ``e`` with ``key``, or change its key if present. Returns the new size."""
    i = pos[e]
    if i < 0:
        hk[n] = key
        he[n] = e
        pos[e] = n
        _sift_up(hk, he, pos, n)
        return n + 1
    old = hk[i]
    hk[i] = key
    if key < old:
        _sift_up(hk, he, pos, i)
    elif key > old:
        heap_sift_down(hk, he, pos, i, n)
    return n


@njit(cache=True, nogil=True)
def heap_remove(hk, he, pos, n, e):
    """Remove item ``e`` if present. Returns the new size."""
    i = pos[e]
    if i < 0:
        return n
    pos[e] = -1
    n -= 1
    if i == n:
        return n
    hk[i] = hk[n]
    he[i] = he[n]
    pos[he[i]] = i
    if i > 0 and hk[i] < hk[(i - 1) >> 2]:
        _sift_up(hk, he, pos, i)
    else:
        heap_sift_down(hk, he, pos, i, n)
    return n
