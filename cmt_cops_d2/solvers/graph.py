"""Grid graphs for the AMWC layer: edge lists and the per-distance edge maps of the network.

Nodes are the pixels of an ``(height, width)`` grid (the stride-4 grid of COPS), node index
``r * width + c``. For every distance ``d`` there are two kinds of edges:

* channel 0, *vertical*:   ``(r, c) -- (r + d, c)`` for ``r in [0, height - d)``, ``c in [0, width)``;
* channel 1, *horizontal*: ``(r, c) -- (r, c + d)`` for ``r in [0, height)``, ``c in [0, width - d)``.

**Flat edge order** (``grid_edges``): distances in the order given; for each distance the vertical
edges (row-major over their anchors), then the horizontal edges (row-major). This is the order of the
public COPS code (row edges, then column edges, per distance).

**Edge maps** (what the affinity branch predicts) have shape ``(D, 2, height, width)`` (or a list of
``D`` arrays ``(2, height, width)``), ``D = len(distances)``. We use the **anchor convention**: slot
``[i, ch, r, c]`` holds the edge of distance ``distances[i]`` and channel ``ch`` that *starts* at
``(r, c)``, i.e. whose first (smaller-index) endpoint is ``(r, c)``. Slots whose edge would leave the
grid (the last ``d`` rows of channel 0, the last ``d`` columns of channel 1) are invalid. This differs
from the public COPS code, which centres long edges on the slot (``(r - d/2, c) -- (r + d/2, c)``);
the network side of this project uses the anchor convention throughout, so features must be
differenced as ``F[r + d] - F[r]`` at slot ``r``.

Everything here is plain numpy (no torch); ``grid_edge_slots`` gives the index arrays with which a
torch tensor can be gathered / scattered (``maps.reshape(-1)[slots]``).
"""
from __future__ import annotations

from typing import Iterable, List, Sequence, Tuple

import numpy as np

__all__ = [
    "grid_edges",
    "grid_edge_counts",
    "grid_edge_slots",
    "grid_edge_valid_mask",
    "edge_maps_to_flat",
    "flat_to_edge_maps",
]


def _check_grid(height, width, distances) -> Tuple[int, int, List[int]]:
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    try:
        ds = [d for d in distances]
    except TypeError:
        raise ValueError(f"distances must be a sequence of positive integers, got {distances!r}") from None
    out = []
    for d in ds:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) or d <= 0:
            raise ValueError(f"distances must be positive integers, got {distances!r}")
        out.append(int(d))
    if len(set(out)) != len(out):
        raise ValueError(f"distances must be distinct, got {distances!r}")
    return int(height), int(width), out


def grid_edge_counts(height: int, width: int, distances: Iterable[int]) -> np.ndarray:
    """Number of edges per (distance, channel): int64 array ``(D, 2)``; channel 0 vertical, 1 horizontal."""
    h, w, ds = _check_grid(height, width, distances)
    return np.array([[max(h - d, 0) * w, h * max(w - d, 0)] for d in ds], dtype=np.int64).reshape(-1, 2)


def grid_edges(height: int, width: int, distances: Iterable[int]) -> np.ndarray:
    """Edge list ``(E, 2)`` int64 of the multi-distance grid graph, in the flat order of the module doc.

    Every row is ``(u, v)`` with ``u < v``; ``u`` is the anchor node ``r * width + c``.
    """
    h, w, ds = _check_grid(height, width, distances)
    parts = []
    idx = np.arange(h * w, dtype=np.int64).reshape(h, w)
    for d in ds:
        if d < h:  # vertical: (r, c) -- (r + d, c)
            u = idx[: h - d, :].reshape(-1)
            parts.append(np.stack([u, u + d * w], axis=1))
        if d < w:  # horizontal: (r, c) -- (r, c + d)
            u = idx[:, : w - d].reshape(-1)
            parts.append(np.stack([u, u + d], axis=1))
    if not parts:
        return np.zeros((0, 2), dtype=np.int64)
    return np.ascontiguousarray(np.concatenate(parts, axis=0))


def grid_edge_valid_mask(height: int, width: int, distances: Iterable[int]) -> np.ndarray:
    """Bool ``(D, 2, height, width)``: True at the slots that hold an edge (anchor convention)."""
    h, w, ds = _check_grid(height, width, distances)
    m = np.zeros((len(ds), 2, h, w), dtype=bool)
    for i, d in enumerate(ds):
        m[i, 0, : max(h - d, 0), :] = True
        m[i, 1, :, : max(w - d, 0)] = True
    return m


def grid_edge_slots(height: int, width: int, distances: Iterable[int]) -> np.ndarray:
    """For every edge of ``grid_edges`` (same order), its index into a flattened ``(D, 2, h, w)`` map.

    ``flat = maps.reshape(-1)[slots]`` gathers the flat edge vector from edge maps, and
    ``maps.reshape(-1)[slots] = flat`` scatters it back (works for numpy arrays and torch tensors).
    """
    h, w, ds = _check_grid(height, width, distances)
    mask = grid_edge_valid_mask(h, w, ds)
    # np.nonzero walks the mask in C order: distance, channel, row, column -- exactly the flat order.
    return np.flatnonzero(mask.reshape(-1)).astype(np.int64)


def _stack_maps(maps, height, width, num_d) -> np.ndarray:
    if isinstance(maps, np.ndarray):
        arr = maps
    else:
        arr = np.stack([np.asarray(m) for m in maps], axis=0)
    if arr.shape != (num_d, 2, height, width):
        raise ValueError(f"maps must have shape ({num_d}, 2, {height}, {width}), got {arr.shape}")
    return arr


def edge_maps_to_flat(maps, distances: Sequence[int]) -> np.ndarray:
    """Per-distance edge maps ``(D, 2, h, w)`` (or a list of ``(2, h, w)``) -> flat edge vector ``(E,)``.

    Invalid slots are ignored. The result follows the order of ``grid_edges(h, w, distances)``.
    """
    ds = list(distances)
    first = maps if isinstance(maps, np.ndarray) else np.asarray(maps[0])
    h, w = int(first.shape[-2]), int(first.shape[-1])
    arr = _stack_maps(maps, h, w, len(ds))
    return arr.reshape(-1)[grid_edge_slots(h, w, ds)]


def flat_to_edge_maps(values, height: int, width: int, distances: Sequence[int], fill=0) -> np.ndarray:
    """Flat edge vector ``(E,)`` (order of ``grid_edges``) -> edge maps ``(D, 2, h, w)``; invalid slots = ``fill``."""
    ds = list(distances)
    slots = grid_edge_slots(height, width, ds)
    values = np.asarray(values)
    if values.shape != slots.shape:
        raise ValueError(f"values must have shape {slots.shape} for this grid, got {values.shape}")
    out = np.full((len(ds), 2, int(height), int(width)), fill, dtype=values.dtype)
    out.reshape(-1)[slots] = values
    return out
