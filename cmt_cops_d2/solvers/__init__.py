"""Combinatorial solvers of the COPS layer (Numba only; this package never imports torch).

* ``solve_amwc`` / ``solve_amwc_batch``: asymmetric multiway cut (forward pass, COPS eq. 2);
  ``release_workspaces`` frees the work arrays kept between solves;
* ``solve_mwc`` / ``solve_mwc_batch``: multiway cut on the lifted label space (backward, Algorithm 1);
  ``solve_mwc_warm`` / ``solve_lifted_mwc_warm``: the same started from the forward solution (the
  layer's default backward);
* grid helpers (``grid_edges`` and the edge-map <-> flat-edge conversions, anchor convention);
* ``checks``: an independent feasibility checker, energy functions and brute force for tests;
* ``reference.solve_amwc_gaec_stale``: the LPMP-like stale-gain baseline (benchmarks only).
"""
from .amwc import release_workspaces, solve_amwc, solve_amwc_batch
from .graph import (
    edge_maps_to_flat,
    flat_to_edge_maps,
    grid_edge_counts,
    grid_edge_slots,
    grid_edge_valid_mask,
    grid_edges,
)
from .mwc import solve_lifted_mwc_warm, solve_mwc, solve_mwc_batch, solve_mwc_warm

__all__ = [
    "solve_amwc",
    "solve_amwc_batch",
    "release_workspaces",
    "solve_mwc",
    "solve_mwc_batch",
    "solve_mwc_warm",
    "solve_lifted_mwc_warm",
    "grid_edges",
    "grid_edge_counts",
    "grid_edge_slots",
    "grid_edge_valid_mask",
    "edge_maps_to_flat",
    "flat_to_edge_maps",
]
