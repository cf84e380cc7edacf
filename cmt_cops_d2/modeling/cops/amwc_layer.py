"""The AMWC layer of COPS: forward = asymmetric multiway cut (eq. 2), backward = Algorithm 1.

Forward
-------
For every image ``b`` of the batch the layer solves the AMWC problem (eq. 2) on the node costs
``theta[b]`` (``K x h x w``, cost of a class at a pixel, lower is better) and the edge costs ``c[b]``
(paid when an edge is cut, positive = attractive) with ``cmt_cops_d2.solvers.solve_amwc_batch``: one
thread per image, the Numba kernel releases the GIL (never a process per image).

**Output representation** (what the PQ-surrogate loss consumes). Per image the solution is turned into
*segment slots*:

* one slot per *stuff* class present in the labelling (all pixels of that class, as the public COPS
  code does: one segment per stuff class, whatever its connectivity);
* one slot per AMWC cluster of a *thing* class (an instance) with at least ``settings.min_thing_size``
  pixels (default 3, the public code's ``IGNORE_INSTANCE_SIZE_AMC 12 // 4`` grid pixels); the pixels of
  smaller thing clusters are in no slot (the loss sees them as unpredicted);
* then one empty slot per entry of ``extra_slot_classes[b]`` (a class id each). They are the
  prediction "channels" of ground-truth segments that no prediction matches (false negatives): the
  loss compares such a GT segment with an empty mask and its gradient tells the backward pass where
  that segment should appear. A good choice is the class of every GT segment of the image (at most
  that many FN per class); they cost nothing when unused. Extra slots of a stuff class are kept only
  if no predicted segment has that class, and at most one per stuff class (a stuff class has one
  segment on each side, so it has no false negative otherwise).

Slots are ordered by class, then (things) by the first pixel of the instance, then the extra slots.
The batch is padded to ``S = max_b S_b`` slots. ``segments`` (``B x S x h x w``, the dtype of the node
costs) is the one-hot of the slot of every pixel; it is the only differentiable output. Alongside
come ``segment_classes`` (``B x S``, -1 on padding), ``segment_is_pred`` (``B x S``, True for slots
holding a predicted segment), the class labels ``x`` (``B x h x w``), the AMWC cluster ids
(``B x h x w``), the edge cut indicators ``y`` (``B x E``, float 0/1, ``y_e = [cluster_u != cluster_v]``)
and the energies (``B``). The loss matches predicted slots to GT segments *of the same class* and
puts its gradient ``dL/dZ`` on the slots (matched, unmatched predictions, and the extra slots it
uses for its false negatives); gradient on padding slots is ignored.

Backward (Algorithm 1 with the robust average of eq. 4)
------------------------------------------------------
Lifted label space of image ``b`` (Sec. 3.3.3; the public code's ``add_semantic_costs_to_instance_costs``):
for every class ``c`` in ascending order, one lifted label per *active* slot of class ``c`` (a slot is
active if it holds a predicted segment or receives a non-zero gradient), or a single label if class
``c`` has no active slot; a class with active slots and dropped small clusters gets one more label
without a slot, which the dropped clusters' pixels hold in the forward solution (the public code has no
such label: a cold solve must put them into some segment in every sample, whether or not the
perturbation touches them; here they keep their class cost and move only where a segment's perturbed
cost draws them). ``m(l)`` is the class of lifted label ``l``. For ``i = 1..N`` with
``lambda_i ~ U[lambda_min, lambda_max]`` (or fixed ``lambdas``):

1. ``c'_V(v, l) = theta(v, m(l)) + lambda_i * dL/dZ(slot(l), v)`` (0 for labels without a slot);
2. ``z_p = MWC(c'_V, c_E)`` (edge costs detached, not perturbed), by default started from the forward
   solution (below);
3. ``x_p = m(z_p)``, ``y_p(uv) = [z_p(u) != z_p(v)]``;
4. ``dL/dtheta += (onehot(x_p) - onehot(x)) / lambda_i``; ``dL/dc += (y_p - y) / lambda_i``;

then both are divided by ``N``. One task per image prepares its problems, then all ``B * N`` MWC
problems run in one thread pool (``settings.num_threads``). Finally the node
gradient of pixel ``v`` is multiplied by ``pixel_weights[v]`` (0 at void / crowd / padding) for every
class, and the gradient of edge ``uv`` by ``min(pixel_weights[u], pixel_weights[v])`` (so an edge
touching a void pixel gets none, as the public code's ``affinity_weights``).

**Sign convention.** The layer minimises (eq. 2): ``W(c) = argmin_x <c, x>``. Eq. (3) (Vlastelica et
al.) is ``d(L o W)_lambda / dc = [W(c + lambda dL/dW) - W(c)] / lambda``: where the loss wants a
segment to grow (``dL/dZ < 0`` at a pixel), the perturbed lifted cost of that segment's label drops, the
perturbed solution takes the pixel (``x_p = 1`` where ``x = 0``), so ``dL/dtheta > 0`` for that class:
a gradient-descent step *lowers* the class cost there, i.e. makes the solver prefer the label the loss
wants. The same holds for edges: ``y_p - y < 0`` on an edge the perturbed solution no longer cuts, so
descent raises its cost, i.e. makes it more attractive. The returned tensors are plain gradients
(``dL/dtheta``, ``dL/dc``) that autograd carries on into the network.

Choices where the paper is silent (or differs from the public code)
------------------------------------------------------------------
* Reference solution: the paper subtracts the AMWC forward solution ``(x, y)``
  (``reference="amwc"``, default). The public code does the same; since MWC on the lifted space is a
  different (heuristic) solver, the difference can be non-zero even for tiny ``lambda``.
  ``reference="mwc"`` subtracts instead the unperturbed lifted MWC solution (one more solve per image);
  this is an option, not the paper.
* The MWC solver (the paper says only "MWC"; the public code solves each perturbed problem from
  scratch with LPMP): ``backward_solver="warm"`` (default) starts every problem from the forward
  solution lifted to the label space (each pixel the label of its slot; ``solvers.solve_mwc_warm``):
  the forward segments stay clusters except where the perturbation pushes pixels away from their label
  (their label lost ground to their cheapest one), the contracted problem is solved as ``solve_mwc``
  does, then node ICM. On the layer's problems it is 5-10x faster than a cold solve and its energy is
  lower on most samples (up to ~9%: a cold contraction on the lifted space, whose labels of one class
  tie, often ends worse) and at most ~0.3% higher on the others (``tools/benchmark_amwc.py``,
  ``tests/solvers/test_warm.py``). It returns the forward solution unless it finds a strictly cheaper
  labelling, so a perturbation too small to matter gives zero gradient, where a cold solve can differ
  from the forward solution for any ``lambda``. ``"cold"``: ``solve_mwc`` from scratch.
* If the incoming gradient of an image is exactly zero on all its slots, the perturbation is zero and
  eq. (3) is ``W(c) - W(c) = 0``: the image gets an exactly zero gradient without any solve.
* ``lambda`` defaults ``U[1, 5000]``, ``N = 5`` (the public code's Cityscapes setting; the paper only
  says "relatively large" and ``N = 5``). ``lambda`` multiplies ``dL/dZ``, so it must be chosen together
  with the loss weight (COCO in the public code: ``U[1000, 5000]`` with loss weight 100).
* ``lambda``s are drawn per image and sample, on the calling thread, from ``settings.generator``
  (created from ``settings.seed`` on first use and kept, so consecutive backward calls draw new values
  reproducibly).
* Only ``segments`` is differentiable: the loss of the paper (eq. 6) depends on the panoptic labels
  ``z`` only, and Algorithm 1 has no input for gradients w.r.t. ``x`` or ``y``.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np
import torch

from cmt_cops_d2.solvers import grid_edge_slots, grid_edges, solve_amwc_batch, solve_mwc_batch
from cmt_cops_d2.solvers.amwc import MAX_ENERGY, run_batch
from cmt_cops_d2.solvers.mwc import (DEFAULT_WARM_ROUNDS, accumulate_gradient, prepare_lifted_problem,
                                     solve_lifted_mwc_warm)

__all__ = ["AMWCSettings", "AMWCFunction", "AMWCOutput", "amwc_layer", "solve_amwc_maps"]


# ----------------------------------------------------------------------------------------------------
# settings
# ----------------------------------------------------------------------------------------------------
@dataclass
class AMWCSettings:
    """Forward / backward settings of the AMWC layer.

    Args:
        num_samples: ``N`` of eq. (4), the number of ``lambda`` draws (paper: 5).
        lambda_min, lambda_max: ``lambda ~ U[lambda_min, lambda_max]`` (``0 < min <= max``).
        lambdas: fixed ``lambda`` values (overrides sampling; ``num_samples`` becomes ``len(lambdas)``).
        seed: seed of the ``numpy`` generator created on first use (``None``: fresh entropy).
        generator: a ``numpy.random.Generator`` to draw from (takes precedence over ``seed``).
        reference: ``"amwc"`` (paper: subtract the forward AMWC solution) or ``"mwc"`` (subtract the
            unperturbed lifted MWC solution).
        num_threads: threads for the forward and backward solves (default ``os.cpu_count()``).
        backward_solver: ``"warm"`` (default: every perturbed MWC starts from the forward solution,
            ``solvers.solve_mwc_warm``) or ``"cold"`` (``solve_mwc`` from scratch).
        warm_rounds: rounds of the warm start (``solve_mwc_warm``'s ``rounds``).
        min_thing_size: thing clusters with fewer pixels get no slot (public code: 12 // 4 = 3 grid
            pixels, as at inference); 0 or 1 keeps every cluster.
    """

    num_samples: int = 5
    lambda_min: float = 1.0
    lambda_max: float = 5000.0
    lambdas: Optional[Sequence[float]] = None
    seed: Optional[int] = None
    generator: Optional[np.random.Generator] = None
    reference: str = "amwc"
    num_threads: Optional[int] = None
    backward_solver: str = "warm"
    warm_rounds: int = DEFAULT_WARM_ROUNDS
    min_thing_size: int = 3

    def __post_init__(self):
        if self.lambdas is not None:
            lam = np.asarray(self.lambdas, dtype=np.float64).reshape(-1)
            if lam.size == 0 or not np.isfinite(lam).all() or (lam <= 0).any():
                raise ValueError(f"lambdas must be a non-empty sequence of finite positive numbers, got {self.lambdas!r}")
            self.lambdas = tuple(float(v) for v in lam)
            self.num_samples = len(self.lambdas)
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, (int, np.integer)) or self.num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {self.num_samples!r}")
        lo, hi = float(self.lambda_min), float(self.lambda_max)
        if not (np.isfinite(lo) and np.isfinite(hi) and 0.0 < lo <= hi):
            raise ValueError(f"need 0 < lambda_min <= lambda_max (finite), got [{self.lambda_min}, {self.lambda_max}]")
        if self.reference not in ("amwc", "mwc"):
            raise ValueError(f"reference must be 'amwc' or 'mwc', got {self.reference!r}")
        if self.backward_solver not in ("warm", "cold"):
            raise ValueError(f"backward_solver must be 'warm' or 'cold', got {self.backward_solver!r}")
        if isinstance(self.warm_rounds, bool) or not isinstance(self.warm_rounds, (int, np.integer)) or self.warm_rounds < 1:
            raise ValueError(f"warm_rounds must be a positive integer, got {self.warm_rounds!r}")
        if (isinstance(self.min_thing_size, bool) or not isinstance(self.min_thing_size, (int, np.integer))
                or self.min_thing_size < 0):
            raise ValueError(f"min_thing_size must be a non-negative integer, got {self.min_thing_size!r}")
        if self.num_threads is not None and (
            isinstance(self.num_threads, bool) or not isinstance(self.num_threads, (int, np.integer)) or self.num_threads < 1
        ):
            raise ValueError(f"num_threads must be a positive integer or None, got {self.num_threads!r}")
        if self.generator is not None and not isinstance(self.generator, np.random.Generator):
            raise ValueError("generator must be a numpy.random.Generator")

    def threads(self, num_jobs: int) -> int:
        n = self.num_threads if self.num_threads is not None else (os.cpu_count() or 1)
        return max(1, min(int(n), max(num_jobs, 1)))

    def draw_lambdas(self, batch_size: int) -> np.ndarray:
        """``(batch_size, num_samples)`` interpolation ranges (float64)."""
        if self.lambdas is not None:
            return np.tile(np.asarray(self.lambdas, dtype=np.float64), (batch_size, 1))
        if self.generator is None:
            self.generator = np.random.default_rng(self.seed)
        return self.generator.uniform(float(self.lambda_min), float(self.lambda_max), size=(batch_size, self.num_samples))


# ----------------------------------------------------------------------------------------------------
# validation helpers
# ----------------------------------------------------------------------------------------------------
def _check_tensor(name: str, t: Any, ndim: Optional[int] = None) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    return t


def _finite(name: str, arr: np.ndarray) -> None:
    if not np.isfinite(arr).all():
        bad = np.argwhere(~np.isfinite(arr))[0]
        raise ValueError(f"{name} contains NaN or inf (first at index {tuple(int(i) for i in bad)})")


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def _check_edges(edges: Any, num_nodes: int) -> np.ndarray:
    if isinstance(edges, torch.Tensor):
        edges = edges.detach().cpu().numpy()
    arr = np.asarray(edges)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"edges must have shape (E, 2), got shape {arr.shape}")
    if arr.dtype.kind not in "iu" or arr.dtype == np.bool_:
        raise ValueError(f"edges must be an integer array, got dtype {arr.dtype}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= num_nodes):
        raise ValueError(f"edges index out of range [0, {num_nodes}) for an h*w grid of {num_nodes} nodes")
    if (arr[:, 0] == arr[:, 1]).any():
        raise ValueError("edges contains a self-loop")
    return arr


def _check_distances(edges: Any) -> List[int]:
    if isinstance(edges, (np.ndarray, torch.Tensor)) or not isinstance(edges, (list, tuple)):
        raise ValueError(
            "per-distance edge maps (B, D, 2, h, w) need `edges` to be the list of distances "
            f"(e.g. [1, 4, 16]), got {type(edges).__name__}"
        )
    ds = []
    for d in edges:
        if isinstance(d, (bool, np.bool_)) or not isinstance(d, (int, np.integer)) or d <= 0:
            raise ValueError(f"distances must be positive integers, got {edges!r}")
        ds.append(int(d))
    if len(set(ds)) != len(ds):
        raise ValueError(f"distances must be distinct, got {edges!r}")
    return ds


def _check_partitionable(partitionable: Any, K: int) -> np.ndarray:
    if isinstance(partitionable, torch.Tensor):
        partitionable = partitionable.detach().cpu().numpy()
    arr = np.asarray(partitionable)
    if arr.shape != (K,):
        raise ValueError(f"partitionable must have shape ({K},) to match the K={K} classes of node_costs, got {arr.shape}")
    if arr.dtype != np.bool_:
        if arr.dtype.kind not in "iuf" or not np.isin(arr, (0, 1)).all():
            raise ValueError(f"partitionable must be boolean (or 0/1), got dtype {arr.dtype}")
    return np.ascontiguousarray(arr != 0)


def _check_extra(extra: Any, B: int, K: int) -> List[np.ndarray]:
    if extra is None:
        return [np.zeros(0, np.int64) for _ in range(B)]
    if isinstance(extra, (torch.Tensor, np.ndarray)) and np.asarray(extra).ndim == 2:
        extra = list(extra)
    if not isinstance(extra, (list, tuple)) or len(extra) != B:
        raise ValueError(f"extra_slot_classes must be a sequence of {B} (one per image) integer arrays")
    out = []
    for b, e in enumerate(extra):
        if isinstance(e, torch.Tensor):
            e = e.detach().cpu().numpy()
        a = np.asarray(e).reshape(-1)
        if a.size and (a.dtype.kind not in "iu" or a.dtype == np.bool_):
            raise ValueError(f"extra_slot_classes[{b}] must hold integer class ids, got dtype {a.dtype}")
        a = a.astype(np.int64)
        if a.size and (a.min() < 0 or a.max() >= K):
            raise ValueError(f"extra_slot_classes[{b}] has a class id outside [0, {K})")
        out.append(a)
    return out


# ----------------------------------------------------------------------------------------------------
# the solver entry
# ----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _grid_graph(h: int, w: int, distances: Tuple[int, ...]) -> Tuple[np.ndarray, np.ndarray]:
    """``grid_edges`` and ``grid_edge_slots`` of an ``h x w`` grid, cached (0.12 s for a Cityscapes-size
    grid, about a third of its solve). Shared between calls: never modify them."""
    return grid_edges(h, w, distances), grid_edge_slots(h, w, distances)


def solve_amwc_maps(node_costs: torch.Tensor, edge_costs: torch.Tensor, edges: Any, partitionable: Any,
                num_threads: int):
    """The one entry into the AMWC solver for training (the layer's forward) and inference: checks the
    inputs once (shapes, dtypes, finite values, edges, ``partitionable``) and solves every image of the
    batch (``solve_amwc_batch``, one thread per image).

    Args:
        node_costs: ``B x K x h x w``; edge_costs: ``B x D x 2 x h x w`` maps with ``edges`` the list of
            distances, or ``B x E`` with ``edges`` an ``E x 2`` array; partitionable: ``(K,)`` bools.
    Returns:
        ``theta (B, N, K)``, ``c (B, E)`` float64 arrays, the edges ``(E, 2)``, the map slots of the
        edges (None for ``B x E`` input), ``partitionable`` as bools, and per image ``(labels,
        clusters, energy)``.
    """
    _check_tensor("node_costs", node_costs, 4)
    B, K, h, w = (int(s) for s in node_costs.shape)
    if K == 0:
        raise ValueError("node_costs has K == 0 classes")
    N = h * w
    theta = np.ascontiguousarray(_to_numpy(node_costs).reshape(B, K, N).transpose(0, 2, 1))  # (B, N, K)
    _finite("node_costs", theta)

    _check_tensor("edge_costs", edge_costs)
    if edge_costs.dim() == 5:
        ds = _check_distances(edges)
        if tuple(edge_costs.shape) != (B, len(ds), 2, h, w):
            raise ValueError(
                f"edge maps must have shape {(B, len(ds), 2, h, w)} for {len(ds)} distances, got {tuple(edge_costs.shape)}"
            )
        ed, slots = _grid_graph(h, w, tuple(ds))
        c = np.ascontiguousarray(_to_numpy(edge_costs).reshape(B, -1)[:, slots])
    elif edge_costs.dim() == 2:
        ed = _check_edges(edges, N)
        slots = None
        if tuple(edge_costs.shape) != (B, ed.shape[0]):
            raise ValueError(f"edge_costs must have shape (B, E) = {(B, ed.shape[0])}, got {tuple(edge_costs.shape)}")
        c = np.ascontiguousarray(_to_numpy(edge_costs))
    else:
        raise ValueError(f"edge_costs must be (B, E) or per-distance maps (B, D, 2, h, w), got shape {tuple(edge_costs.shape)}")
    if edge_costs.shape[0] != B:
        raise ValueError("edge_costs and node_costs disagree on the batch size")
    _finite("edge_costs", c)
    part = _check_partitionable(partitionable, K)

    problems = [(theta[b], ed, c[b], part) for b in range(B)]
    try:
        results = solve_amwc_batch(problems, num_threads=num_threads)
    except Exception as exc:
        raise RuntimeError(f"AMWC forward solve failed: {type(exc).__name__}: {exc}") from exc
    return theta, c, ed, slots, part, results


# ----------------------------------------------------------------------------------------------------
# segments from an AMWC solution
# ----------------------------------------------------------------------------------------------------
def _segments(labels: np.ndarray, cids: np.ndarray, part: np.ndarray,
              min_thing_size: int) -> Tuple[np.ndarray, np.ndarray]:
    """Slot of every node (-1: a thing cluster of fewer than ``min_thing_size`` nodes, which gets no
    slot) and class of every slot: one slot per stuff class, one per kept thing cluster. Ordered by
    class, then by cluster id (= order of the first node; ``solve_amwc`` numbers them so)."""
    N = labels.shape[0]
    key = labels * (N + 1) + np.where(part[labels], cids + 1, 0)
    uniq, inv, counts = np.unique(key, return_inverse=True, return_counts=True)
    cls = (uniq // (N + 1)).astype(np.int64)
    kept = ~part[cls] | (counts >= min_thing_size)
    new_id = np.where(kept, np.cumsum(kept) - 1, -1)
    return new_id[inv.reshape(-1)].astype(np.int64), cls[kept]


def _lifted_space(g: np.ndarray, slot_cls: np.ndarray, is_pred: np.ndarray, K: int,
                  unslotted_classes: np.ndarray):
    """Lifted labels of one image: ``m`` (J,) class of each label, ``slot`` (J,) its slot or -1.
    Per class in ascending order: one label per active slot (predicted, or with a non-zero gradient),
    then one label without a slot if the class has no active slot or is in ``unslotted_classes`` (the
    classes of the dropped small thing clusters, whose nodes have no slot)."""
    active = is_pred | (g != 0).any(axis=1)
    extra = np.zeros(K, bool)
    extra[unslotted_classes] = True
    m, slot = [], []
    for c in range(K):
        s = np.flatnonzero(active & (slot_cls == c))
        m.extend([c] * s.size)
        slot.extend(s.tolist())
        if s.size == 0 or extra[c]:
            m.append(c)
            slot.append(-1)
    return np.asarray(m, np.int64), np.asarray(slot, np.int64)


def lifted_labels(g: np.ndarray, slot_cls: np.ndarray, is_pred: np.ndarray, labels: np.ndarray,
                  slot_of: np.ndarray, K: int) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The lifted label space of one image and the forward solution in it: ``(m, slot, z0)``, ``z0[v]``
    the label of ``v``'s slot, or for a node without a slot (a dropped small thing cluster) the label
    without a slot of its class. ``g`` (S, N) the incoming gradient, ``labels`` (N,) the forward classes,
    ``slot_of`` (N,) the slot of every node or -1 (``_segments``)."""
    loose = slot_of < 0
    m, slot = _lifted_space(g, slot_cls, is_pred, K, np.unique(labels[loose]))
    label_of_slot = np.full(g.shape[0], -1, np.int64)
    label_of_slot[slot[slot >= 0]] = np.flatnonzero(slot >= 0)
    unslotted = np.full(K, -1, np.int64)
    unslotted[m[slot < 0]] = np.flatnonzero(slot < 0)
    z0 = np.where(loose, unslotted[labels], label_of_slot[np.maximum(slot_of, 0)])
    return m, slot, z0


def _keep_extra(extra: np.ndarray, pred_cls: np.ndarray, part: np.ndarray) -> np.ndarray:
    """Extra (false-negative) slots kept: all of thing classes; for a stuff class at most one, and none
    if the class already has its predicted segment (one segment per stuff class on each side, so such a
    class can have no false negative; a second stuff slot would only split the class in the backward)."""
    seen = set(pred_cls[~part[pred_cls]].tolist())
    keep = []
    for e in extra.tolist():
        if not part[e]:
            if e in seen:
                continue
            seen.add(e)
        keep.append(e)
    return np.asarray(keep, np.int64)


class _Ctx:
    """Plain container for what the backward needs (numpy, detached)."""


def _image_gradient(g: np.ndarray, st: "_Ctx", b: int) -> np.ndarray:
    """Incoming gradient of image ``b`` (S, N), zero on padding slots (``g`` may share memory with the
    incoming tensor: never written)."""
    pad = st.seg_cls[b] < 0
    if not pad.any():
        return g[b]
    gb = g[b].copy()
    gb[pad] = 0.0
    return gb


def _backward_warm(st: "_Ctx", g: np.ndarray, lambdas: np.ndarray, gtheta: np.ndarray, gc: np.ndarray) -> None:
    """Algorithm 1 steps 1-4 summed into ``gtheta`` (B, N, K) / ``gc`` (B, E), every perturbed MWC started
    from the forward solution lifted to the label space (``solve_lifted_mwc_warm``): one task per image
    prepares its problems, then one task per image and ``lambda``."""
    settings = st.settings
    B, K = st.shape[:2]
    images = []
    for b in range(B):
        gb = _image_gradient(g, st, b)
        g_max = float(max(gb.max(), -gb.min())) if gb.size else 0.0
        if g_max == 0.0:
            continue  # zero perturbation: eq. (3) gives exactly zero
        lams = list(lambdas[b]) + ([0.0] if settings.reference == "mwc" else [])
        _check_perturbed_magnitude(gb.shape[1], g_max, max(lams), st.c[b])
        images.append((b, gb, lams))
    if not images:
        return

    def prepare(item):
        b, gb, _ = item
        m, slot, z0 = lifted_labels(gb, st.seg_cls[b], st.seg_pred[b], st.labels[b], st.slot_of[b], K)
        return prepare_lifted_problem(st.theta[b], m, slot, gb, z0, st.edges, st.c[b])

    def solve(job):
        problem, lam = job
        return solve_lifted_mwc_warm(problem, lam, rounds=settings.warm_rounds)[0]

    try:
        problems = run_batch(prepare, images, settings.threads(len(images)))
        jobs = [(problem, lam) for problem, (_, _, lams) in zip(problems, images) for lam in lams]
        sols = run_batch(solve, jobs, settings.threads(len(jobs)))
    except Exception as exc:
        raise RuntimeError(f"MWC backward solve failed: {type(exc).__name__}: {exc}") from exc
    meta = [(b, lam, problem.m) for problem, (b, _, lams) in zip(problems, images) for lam in lams]
    _accumulate(st, meta, sols, gtheta, gc)


def _check_perturbed_magnitude(num_nodes: int, g_max: float, lam: float, c: np.ndarray) -> None:
    """The check ``solve_mwc`` makes on its input (``solvers.amwc.validate_magnitudes``) for the part the
    perturbation adds, bounded over every lifted problem of the image (the perturbed costs are built
    inside the warm solver; the class costs passed the same check in the forward)."""
    with np.errstate(over="ignore"):
        bound = lam * num_nodes * g_max + float(np.abs(c).sum())
    if not bound <= MAX_ENERGY:
        raise ValueError(f"incoming gradient dL/dsegments times lambda = {lam:.4g} is too large: the perturbed "
                         f"MWC energy could reach {bound:.3g}, beyond {MAX_ENERGY:g} where float64 sums overflow")


def _backward_cold(st: "_Ctx", g: np.ndarray, lambdas: np.ndarray, gtheta: np.ndarray, gc: np.ndarray) -> None:
    """``_backward_warm`` with every perturbed MWC solved from scratch (``solve_mwc``)."""
    settings = st.settings
    B, K = st.shape[:2]
    N = st.theta.shape[1]
    jobs, problems = [], []
    for b in range(B):
        gb = _image_gradient(g, st, b)
        if not gb.any():
            continue
        m, slot, _ = lifted_labels(gb, st.seg_cls[b], st.seg_pred[b], st.labels[b], st.slot_of[b], K)
        gb = gb.astype(np.float64, copy=False)
        delta = np.zeros((N, m.size), np.float64)
        has = slot >= 0
        delta[:, has] = gb[slot[has]].T
        base = st.theta[b][:, m]
        lams = list(lambdas[b]) + ([0.0] if settings.reference == "mwc" else [])
        for lam in lams:
            jobs.append((b, float(lam), m))
            problems.append((np.ascontiguousarray(base + lam * delta), st.edges, st.c[b]))
    if not problems:
        return
    try:
        sols = solve_mwc_batch(problems, num_threads=settings.threads(len(problems)))
    except Exception as exc:
        raise RuntimeError(f"MWC backward solve failed: {type(exc).__name__}: {exc}") from exc
    _accumulate(st, jobs, [zp for zp, _ in sols], gtheta, gc)


def _accumulate(st: "_Ctx", jobs: list, sols: list, gtheta: np.ndarray, gc: np.ndarray) -> None:
    """Step 4: ``(onehot(m[z_p]) - onehot(x_ref)) / lambda`` and ``(y_p - y_ref) / lambda`` per sample, the
    reference being the forward solution or (``reference="mwc"``, ``lambda = 0`` jobs) the unperturbed
    lifted MWC solution."""
    u, v = st.edges[:, 0], st.edges[:, 1]
    ref = {b: (st.labels[b], st.cut[b]) for b in range(st.shape[0])}
    for job, zp in zip(jobs, sols):
        b, lam, m = job[:3]
        if lam == 0.0:
            ref[b] = (m[zp], (zp[u] != zp[v]).astype(np.float64))
    for job, zp in zip(jobs, sols):
        b, lam, m = job[:3]
        if lam != 0.0:
            x_ref, y_ref = ref[b]
            accumulate_gradient(gtheta[b], gc[b], m, zp, x_ref, y_ref, st.edges, 1.0 / lam)


# ----------------------------------------------------------------------------------------------------
# autograd function
# ----------------------------------------------------------------------------------------------------
class AMWCFunction(torch.autograd.Function):
    """``AMWCFunction.apply(node_costs, edge_costs, edges, partitionable, pixel_weights=None,
    extra_slot_classes=None, settings=None)``; see the module doc.

    Args:
        node_costs: ``(B, K, h, w)`` float tensor (cost of class k at a pixel).
        edge_costs: ``(B, E)`` with ``edges`` an ``(E, 2)`` integer array of pixel indices ``r * w + c``;
            or per-distance maps ``(B, D, 2, h, w)`` (anchor convention of ``solvers.graph``) with
            ``edges`` the list of the ``D`` distances. The edge gradient has the shape of ``edge_costs``
            (zero at invalid map slots).
        partitionable: ``(K,)`` bool, True for thing classes.
        pixel_weights: ``(B, h, w)`` non-negative gradient weights (0 = void / crowd); default ones.
        extra_slot_classes: per image, class ids of empty slots appended for false negatives.
        settings: ``AMWCSettings``.

    Returns ``(segments, segment_classes, segment_is_pred, labels, cluster_ids, edge_cut, energy)``;
    only ``segments`` is differentiable. ``edge_cut`` is flat ``(B, E)`` in the order of ``edges`` (for
    maps: of ``grid_edges(h, w, distances)``).
    """

    @staticmethod
    def forward(ctx, node_costs, edge_costs, edges, partitionable, pixel_weights=None, extra_slot_classes=None, settings=None):
        settings = AMWCSettings() if settings is None else settings
        if not isinstance(settings, AMWCSettings):
            raise ValueError(f"settings must be an AMWCSettings, got {type(settings).__name__}")
        # the per-image inputs of the backward first (no solve for a bad call), then the solver entry
        _check_tensor("node_costs", node_costs, 4)
        B, K, h, w = (int(s) for s in node_costs.shape)
        N = h * w
        if pixel_weights is None:
            wts = np.ones((B, N), np.float64)
        else:
            _check_tensor("pixel_weights", pixel_weights)
            if tuple(pixel_weights.shape) != (B, h, w):
                raise ValueError(f"pixel_weights must have shape {(B, h, w)}, got {tuple(pixel_weights.shape)}")
            wts = _to_numpy(pixel_weights).reshape(B, N)
            _finite("pixel_weights", wts)
            if (wts < 0).any():
                raise ValueError("pixel_weights must be non-negative")
        extra = _check_extra(extra_slot_classes, B, max(K, 1))
        theta, c, ed, slots, part, results = solve_amwc_maps(node_costs, edge_costs, edges, partitionable,
                                                             settings.threads(B))

        slot_of, slot_cls, n_pred = [], [], []
        for b, (lab, cid, _) in enumerate(results):
            so, sc = _segments(lab, cid, part, settings.min_thing_size)
            slot_of.append(so)
            n_pred.append(sc.size)
            slot_cls.append(np.concatenate([sc, _keep_extra(extra[b], sc, part)]))
        S = max([s.size for s in slot_cls] + [0])
        seg_cls = np.full((B, S), -1, np.int64)
        seg_pred = np.zeros((B, S), bool)
        Z = np.zeros((B, S, N), np.float64)
        labels = np.stack([r[0] for r in results]).reshape(B, N)
        cids = np.stack([r[1] for r in results]).reshape(B, N)
        for b in range(B):
            seg_cls[b, : slot_cls[b].size] = slot_cls[b]
            seg_pred[b, : n_pred[b]] = True
            has = slot_of[b] >= 0  # nodes of dropped small thing clusters are in no slot
            Z[b, slot_of[b][has], np.flatnonzero(has)] = 1.0
        cut = (cids[:, ed[:, 0]] != cids[:, ed[:, 1]]).astype(np.float64)  # (B, E)
        energy = np.array([r[2] for r in results], np.float64)

        st = _Ctx()
        st.theta, st.c, st.edges, st.slots, st.part = theta, c, ed, slots, part
        st.labels, st.cut, st.seg_cls, st.seg_pred, st.wts = labels, cut, seg_cls, seg_pred, wts
        st.slot_of = slot_of
        st.shape, st.edge_shape, st.settings = (B, K, h, w), tuple(edge_costs.shape), settings
        st.node_meta = (node_costs.dtype, node_costs.device)
        st.edge_meta = (edge_costs.dtype, edge_costs.device)
        ctx.state = st

        dev = node_costs.device
        outs = (
            torch.from_numpy(Z.reshape(B, S, h, w)).to(device=dev, dtype=node_costs.dtype),
            torch.from_numpy(seg_cls).to(dev),
            torch.from_numpy(seg_pred).to(dev),
            torch.from_numpy(labels.reshape(B, h, w)).to(dev),
            torch.from_numpy(cids.reshape(B, h, w)).to(dev),
            torch.from_numpy(cut).to(device=dev, dtype=node_costs.dtype),
            torch.from_numpy(energy).to(dev),
        )
        ctx.mark_non_differentiable(*outs[1:])
        return outs

    @staticmethod
    def backward(ctx, grad_segments, *unused):
        st = ctx.state
        B, K, h, w = st.shape
        N = h * w
        E = st.edges.shape[0]
        gtheta = np.zeros((B, N, K), np.float64)
        gc = np.zeros((B, E), np.float64)
        if grad_segments is not None:
            S = st.seg_cls.shape[1]
            g = grad_segments.detach()
            if g.dtype not in (torch.float32, torch.float64):
                g = g.float()
            g = g.cpu().numpy().reshape(B, S, N)  # float32 stays float32 (exact; half the memory traffic)
            _finite("incoming gradient dL/dsegments", g)
            settings = st.settings
            lambdas = settings.draw_lambdas(B)  # drawn for every image, so draws do not depend on the data
            solve = _backward_warm if settings.backward_solver == "warm" else _backward_cold
            solve(st, g, lambdas, gtheta, gc)
            u, v = st.edges[:, 0], st.edges[:, 1]
            n = settings.num_samples
            gtheta /= n
            gc /= n
            gtheta *= st.wts[:, :, None]
            gc *= np.minimum(st.wts[:, u], st.wts[:, v])
        ndt, ndev = st.node_meta
        edt, edev = st.edge_meta
        grad_theta = torch.from_numpy(np.ascontiguousarray(gtheta.transpose(0, 2, 1)).reshape(B, K, h, w)).to(device=ndev, dtype=ndt)
        if st.slots is not None:
            full = np.zeros((B, int(np.prod(st.edge_shape[1:]))), np.float64)
            full[:, st.slots] = gc
            gc = full.reshape(st.edge_shape)
        grad_c = torch.from_numpy(np.ascontiguousarray(gc)).to(device=edev, dtype=edt)
        return grad_theta, grad_c, None, None, None, None, None


# ----------------------------------------------------------------------------------------------------
# convenience wrapper
# ----------------------------------------------------------------------------------------------------
@dataclass
class AMWCOutput:
    """Named outputs of ``amwc_layer`` (see the module doc)."""

    segments: torch.Tensor  # (B, S, h, w) one-hot of the slot of every pixel, differentiable
    segment_classes: torch.Tensor  # (B, S) long, -1 on padding slots
    segment_is_pred: torch.Tensor  # (B, S) bool, True for slots holding a predicted segment
    labels: torch.Tensor  # (B, h, w) long, AMWC class labels x
    cluster_ids: torch.Tensor  # (B, h, w) long, AMWC clusters (0..M-1 per image)
    edge_cut: torch.Tensor  # (B, E) float 0/1, y
    energy: torch.Tensor  # (B,) float64, eq. (2)


def amwc_layer(
    node_costs: torch.Tensor,
    edge_costs: torch.Tensor,
    edges: Any,
    partitionable: Any,
    pixel_weights: Optional[torch.Tensor] = None,
    extra_slot_classes: Optional[Sequence[Any]] = None,
    settings: Optional[AMWCSettings] = None,
) -> AMWCOutput:
    """``AMWCFunction.apply`` with named outputs."""
    return AMWCOutput(*AMWCFunction.apply(node_costs, edge_costs, edges, partitionable, pixel_weights, extra_slot_classes, settings))
