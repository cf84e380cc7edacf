#!/usr/bin/env python
"""Benchmark of the AMWC / MWC solvers on realistic synthetic panoptic problems.

An instance is made from a synthetic ground-truth panoptic map on the stride-4 grid (Voronoi stuff
regions + elliptic instances that occlude each other):

* node costs ``theta = -log_softmax(logits)``, logits = bonus for the true class + a weaker bonus for
  one "confuser" class per segment + spatially smooth and i.i.d. Gaussian noise;
* edge costs = logit of P(same segment): ``+-mu_d`` (sign from the ground truth, ``mu_d`` shrinking with
  the distance ``d``) + smooth and i.i.d. noise.

``--noise`` scales every noise term. At 1 (default) the instances are a stress case: the solution has
about 17x (COCO size) to 40x (Cityscapes size) more segments than the ground truth, mostly thing
fragments of a few cells, and the backward's perturbed solutions move about half of the pixels. At 0.5
the solution is close to the ground truth (21 segments for 19 at COCO size, 37 for 32 at Cityscapes
size), as from a trained network.

Reported per size: solve time on one thread (median over ``--repeats``), the energy, the energy and
time of the plain greedy contraction with stale gains (LPMP behaviour, ``solve_amwc_gaec_stale``) and
of our contraction without local search, the wall time of a batch of ``--batch`` images on
``--threads`` threads, and the backward pass of the AMWC layer (Algorithm 1) as in full-stage
training: the layer's forward on float32 costs, the PQ surrogate loss against the instance's ground
truth, and ``--samples`` lifted multiway cuts perturbed by ``lambda * dL/dZ`` (``lambda ~ U[1, 5000]``),
solved with the warm start from the forward solution (the layer's default) and from scratch (cold),
with their energies; then the whole layer's forward and backward wall times with either.

Times are medians, so they exclude the first solve of a size, which also allocates the solver's work
arrays (kept for later solves, ``cmt_cops_d2.solvers.release_workspaces``); the batch and backward
timings are taken after one untimed batch / multiway cut for the same reason.

    python tools/benchmark_amwc.py --sizes coco cityscapes --repeats 3 --threads 2
    python tools/benchmark_amwc.py --sizes coco cityscapes --repeats 3 --threads 2 --noise 0.5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

STUFF_AREA = {"coco": 4096.0, "cityscapes": 2048.0}  # paper Sec. 4.1, for the PQ surrogate's size gate
SIZES = {
    # name: (height, width, num_labels, num_thing_labels, distances, num_instances)
    "coco": (160, 160, 133, 80, (1, 4, 16, 32, 64), 12),
    "cityscapes": (256, 512, 19, 8, (1, 4, 16, 32, 64, 128), 30),
}


def _solvers():
    from cmt_cops_d2.solvers import grid_edges, solve_amwc, solve_amwc_batch, solve_mwc
    from cmt_cops_d2.solvers.reference import solve_amwc_gaec_stale

    return grid_edges, solve_amwc, solve_amwc_batch, solve_mwc, solve_amwc_gaec_stale


def _smooth_noise(rng, h, w, channels, cell):
    """Bilinearly upsampled Gaussian noise with correlation length ``cell`` pixels, shape (h, w, C)."""
    gh, gw = h // cell + 2, w // cell + 2
    g = rng.standard_normal((gh, gw, channels)).astype(np.float32)
    ys = np.arange(h) / cell
    xs = np.arange(w) / cell
    y0 = np.floor(ys).astype(int)
    x0 = np.floor(xs).astype(int)
    fy = (ys - y0)[:, None, None].astype(np.float32)
    fx = (xs - x0)[None, :, None].astype(np.float32)
    a = g[y0][:, x0]
    b = g[y0][:, x0 + 1]
    c = g[y0 + 1][:, x0]
    d = g[y0 + 1][:, x0 + 1]
    return (a * (1 - fy) * (1 - fx) + b * (1 - fy) * fx + c * fy * (1 - fx) + d * fy * fx) * 1.6


def make_ground_truth(rng, h, w, num_labels, num_things, num_instances):
    """Synthetic panoptic map: ``(classes (h, w), segment ids (h, w))``. Things are labels
    ``0..num_things-1`` (COCO / Cityscapes style), stuff the rest."""
    stuff = np.arange(num_things, num_labels)
    n_regions = int(rng.integers(4, 8))
    seeds = rng.random((n_regions, 2)) * [h, w]
    yy, xx = np.mgrid[0:h, 0:w]
    dist = (yy[None] - seeds[:, 0, None, None]) ** 2 + (xx[None] - seeds[:, 1, None, None]) ** 2
    region = dist.argmin(0)
    region_cls = rng.choice(stuff, size=n_regions, replace=True)
    cls = region_cls[region]
    seg = region.copy()  # stuff segment id = region id (same class regions get merged below)
    _, seg = np.unique(cls, return_inverse=True)
    seg = seg.reshape(h, w)
    next_id = int(seg.max()) + 1
    for _ in range(num_instances):
        ry = rng.uniform(0.03, 0.2) * h
        rx = rng.uniform(0.03, 0.2) * w
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        if m.sum() < 4:
            continue
        cls[m] = int(rng.integers(0, num_things))
        seg[m] = next_id
        next_id += 1
    return cls, seg


def make_instance(seed, h, w, num_labels, num_things, distances, num_instances, noise=1.0):
    """Returns ``(theta (N, K) float64, edges (E, 2), edge_costs (E,), partitionable (K,), cls, seg)``.
    ``noise`` scales every noise term of the node and edge costs (1: the default stress instances)."""
    grid_edges = _solvers()[0]
    rng = np.random.default_rng(seed)
    cls, seg = make_ground_truth(rng, h, w, num_labels, num_things, num_instances)
    N = h * w
    # semantic logits
    logits = (1.2 * noise) * rng.standard_normal((h, w, num_labels)).astype(np.float32)
    logits += noise * _smooth_noise(rng, h, w, num_labels, 12)
    onehot_idx = cls.reshape(-1)
    flat = logits.reshape(N, num_labels)
    flat[np.arange(N), onehot_idx] += 4.0
    nseg = int(seg.max()) + 1
    confuser = rng.integers(0, num_labels, size=nseg)
    flat[np.arange(N), confuser[seg.reshape(-1)]] += 2.5
    flat -= flat.max(1, keepdims=True)
    theta = -(flat - np.log(np.exp(flat).sum(1, keepdims=True)))
    theta = np.ascontiguousarray(theta, dtype=np.float64)
    # affinities
    edges = grid_edges(h, w, distances)
    sflat = seg.reshape(-1)
    same = sflat[edges[:, 0]] == sflat[edges[:, 1]]
    costs = np.empty(edges.shape[0], np.float64)
    smooth = noise * _smooth_noise(rng, h, w, 1, 16)[..., 0].reshape(-1)
    lo = 0
    for d in distances:
        n_d = max(h - d, 0) * w + h * max(w - d, 0)
        mu = 3.0 / (1.0 + 0.25 * np.log2(d))
        sl = slice(lo, lo + n_d)
        costs[sl] = np.where(same[sl], mu, -mu) + (1.5 * noise) * rng.standard_normal(n_d) + smooth[edges[sl, 0]]
        lo += n_d
    part = np.zeros(num_labels, bool)
    part[:num_things] = True
    return theta, edges, costs, part, cls, seg


def backward_problems(theta, edges, costs, part, cls, seg, h, w, stuff_area, seed, samples):
    """The backward pass of the AMWC layer on one instance, as in full-stage training: the layer's
    forward (float32 costs, as a network gives them), the PQ surrogate loss against the instance's
    ground truth (paper thresholds, loss weight 10) and its gradient ``dL/dZ``; then the lifted problems
    of Algorithm 1 for ``samples`` draws ``lambda ~ U[1, 5000]``. Returns ``(lifted problem (the
    arguments of prepare_lifted_problem), lambdas, the layer as a function of the backward solver, the
    loss of a layer output, prepare_lifted_problem, the forward labels' margins)``."""
    import torch

    from cmt_cops_d2.modeling.cops.amwc_layer import AMWCSettings, amwc_layer, lifted_labels
    from cmt_cops_d2.modeling.cops.criterion import loss_slots
    from cmt_cops_d2.modeling.cops.pq_surrogate import (area_thresholds_from_isthing, pool_pq_sums,
                                                        pq_sums_single_image, pq_surrogate_loss)
    from cmt_cops_d2.solvers.mwc import label_margins, prepare_lifted_problem

    K = theta.shape[1]
    rng = np.random.default_rng(seed)
    lambdas = rng.uniform(1.0, 5000.0, size=samples)
    node = torch.tensor(np.ascontiguousarray(theta.T).reshape(1, K, h, w), dtype=torch.float32, requires_grad=True)
    edge = torch.tensor(costs[None], dtype=torch.float32, requires_grad=True)
    _, gt_seg = np.unique(seg, return_inverse=True)
    gt_seg = gt_seg.reshape(-1)
    gt_cls = np.zeros(gt_seg.max() + 1, np.int64)
    gt_cls[gt_seg] = cls.reshape(-1)
    gt_masks = torch.from_numpy(gt_seg.reshape(h, w))[None] == torch.arange(gt_cls.size)[:, None, None]
    thresholds = area_thresholds_from_isthing(part, 200.0, stuff_area, 4, dtype=torch.float32)

    def loss_of(out):
        keep = torch.from_numpy(loss_slots(out.segment_classes[0].numpy(), out.segment_is_pred[0].numpy(), gt_cls))
        sums = pq_sums_single_image(out.segments[0, keep], out.segment_classes[0, keep], gt_masks,
                                    torch.from_numpy(gt_cls), torch.ones(h, w), part, area_thresholds=thresholds)
        return pq_surrogate_loss(pool_pq_sums([sums]), weight=10.0)

    def layer(backward_solver):
        settings = AMWCSettings(lambdas=lambdas, num_threads=1, backward_solver=backward_solver)
        return amwc_layer(node, edge, edges, part, extra_slot_classes=[gt_cls], settings=settings)

    out = layer("warm")
    grad = torch.autograd.grad(loss_of(out), [out.segments])[0][0].reshape(out.segments.shape[1], -1).numpy()
    seg_cls, seg_pred = out.segment_classes[0].numpy(), out.segment_is_pred[0].numpy()
    grad = np.where((seg_cls >= 0)[:, None], grad, 0.0).astype(np.float32)
    theta64 = np.ascontiguousarray(node.detach().double().reshape(K, -1).T.numpy())
    c64 = edge.detach().double()[0].numpy()
    Z = out.segments[0].detach().reshape(grad.shape[0], -1).numpy()
    slot_of = np.where(Z.any(0), Z.argmax(0), -1)  # -1: a dropped small thing cluster
    labels = out.labels[0].reshape(-1).numpy()
    m, slot, z0 = lifted_labels(grad, seg_cls, seg_pred, labels, slot_of, K)
    problem = (theta64, m, slot, grad, z0, edges, c64)
    return problem, lambdas, layer, loss_of, prepare_lifted_problem, label_margins(theta64, labels)


def lifted_costs(problem, lam):
    """The ``(N, J)`` costs ``theta[v, m[l]] + lam * grad[slot[l], v]`` of one sample, built in numpy."""
    theta, m, slot, grad = problem[:4]
    delta = np.where(slot >= 0, grad[np.maximum(slot, 0)].astype(np.float64).T, 0.0)
    return np.ascontiguousarray(theta[:, m] + lam * delta)


def torch_grad(loss, tensor):
    import torch

    return torch.autograd.grad(loss, [tensor], retain_graph=True)[0]


def _median_time(fn, repeats):
    ts = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def run(sizes, repeats, threads, batch, samples, seed, noise=1.0):
    grid_edges, solve_amwc, solve_amwc_batch, solve_mwc, solve_stale = _solvers()
    # warm-up: compile / load the Numba caches outside the timings
    t0 = time.perf_counter()
    th0 = np.random.default_rng(0).random((6, 3))
    e0 = np.array([[0, 1], [1, 2], [3, 4], [4, 5], [0, 3]])
    c0 = np.array([1.0, -1.0, 0.5, 2.0, -0.3])
    p0 = np.array([True, False, True])
    solve_amwc(th0, e0, c0, p0)
    solve_amwc(th0, e0, c0, p0, cluster_passes=0, node_passes=0)
    solve_mwc(th0, e0, c0)
    solve_stale(th0, e0, c0, p0)
    print(f"numba load / compile: {time.perf_counter() - t0:.2f} s (cached after the first run)")

    rows = []
    for name in sizes:
        h, w, K, Kt, ds, ninst = SIZES[name]
        t0 = time.perf_counter()
        probs = [make_instance(seed + i, h, w, K, Kt, ds, ninst, noise) for i in range(max(batch, 1))]
        gen = time.perf_counter() - t0
        theta, edges, costs, part, cls, seg = probs[0]
        print(f"\n[{name}] {h}x{w} nodes={h * w} edges={edges.shape[0]} K={K} things={Kt} d={ds} "
              f"(instances generated in {gen:.1f} s)")
        t_ours, (lab, cid, e_ours) = _median_time(lambda: solve_amwc(theta, edges, costs, part), repeats)
        t_gaec, (_, _, e_gaec) = _median_time(
            lambda: solve_amwc(theta, edges, costs, part, cluster_passes=0, node_passes=0), repeats)
        t_stale, (_, _, e_stale) = _median_time(lambda: solve_stale(theta, edges, costs, part), repeats)
        # per-image energies over the batch, ours vs stale
        better = 0
        diffs = []
        for (th_i, ed_i, c_i, p_i, _, _) in probs:
            e1 = solve_amwc(th_i, ed_i, c_i, p_i)[2]
            e2 = solve_stale(th_i, ed_i, c_i, p_i)[2]
            diffs.append(e1 - e2)
            better += e1 <= e2 + 1e-6
        plist = [(p[0], p[1], p[2], p[3]) for p in probs]
        solve_amwc_batch(plist, num_threads=threads)  # untimed: work arrays for every thread
        t_b1, _ = _median_time(lambda: solve_amwc_batch(plist, num_threads=1), max(1, repeats // 2))
        t_bn, res = _median_time(lambda: solve_amwc_batch(plist, num_threads=threads), max(1, repeats // 2))
        # backward of the AMWC layer (Algorithm 1): `samples` lifted MWC problems
        from cmt_cops_d2.solvers import solve_lifted_mwc_warm, solve_mwc_warm
        from cmt_cops_d2.solvers.amwc import run_batch

        problem, lambdas, layer, loss_of, prepare, margins = backward_problems(
            theta, edges, costs, part, cls, seg, h, w, STUFF_AREA[name], seed, samples)
        theta64, _, _, _, z0, _, c64 = problem

        def warm_backward():
            lp = prepare(*problem)
            return [solve_lifted_mwc_warm(lp, lam) for lam in lambdas]

        def warm_backward_threads():  # the layer's way: the lambdas of the image in parallel threads
            lp = prepare(*problem)
            return run_batch(lambda lam: solve_lifted_mwc_warm(lp, lam), list(lambdas), threads)

        warm_backward()  # untimed: work arrays sized for the lifted label space
        warm_backward_threads()
        t_warm, warm = _median_time(warm_backward, repeats)
        t_warm_nt, _ = _median_time(warm_backward_threads, repeats)
        dense = [lifted_costs(problem, lam) for lam in lambdas]
        solve_mwc(dense[0], edges, c64)
        t_cold, cold = _median_time(lambda: [solve_mwc(tl, edges, c64) for tl in dense], max(1, repeats // 2))
        e_warm = np.array([e for _, e in warm])
        e_cold = np.array([e for _, e in cold])
        e_check = np.array([solve_mwc_warm(tl, edges, c64, z0, margins)[1] for tl in dense])
        t_fwd64, _ = _median_time(lambda: solve_amwc(theta64, edges, c64, part), repeats)
        # the whole layer (conversions, segments, gradient assembly) with the warm and the cold backward
        layer_times = {}
        for solver in ("warm", "warm", "cold"):  # the first warm run is a warm-up (work arrays, caches)
            t0 = time.perf_counter()
            out = layer(solver)
            t1 = time.perf_counter()
            loss = loss_of(out)
            g = torch_grad(loss, out.segments)
            t2 = time.perf_counter()
            out.segments.backward(g)
            layer_times[solver] = (t1 - t0, time.perf_counter() - t2)
        gt_segments = len(np.unique(seg))
        ncl = int(cid.max()) + 1
        J = problem[1].shape[0]
        rel = (e_warm - e_cold) / np.abs(e_cold)
        rows.append((name, t_ours, t_gaec, t_stale, e_ours, e_gaec, e_stale, better, len(probs),
                     float(np.mean(diffs)), t_b1, t_bn, t_warm, t_fwd64, t_cold, rel, layer_times, J, ncl,
                     gt_segments))
        print(f"  ours (GAEC exact + local search): {t_ours * 1e3:8.1f} ms   energy {e_ours:14.2f}   "
              f"clusters {ncl} (ground truth {gt_segments} segments)")
        print(f"  ours, contraction only          : {t_gaec * 1e3:8.1f} ms   energy {e_gaec:14.2f}")
        print(f"  stale-gain GAEC (LPMP-like)     : {t_stale * 1e3:8.1f} ms   energy {e_stale:14.2f}")
        print(f"  ours <= stale on {better}/{len(probs)} images, mean energy difference {np.mean(diffs):.2f}")
        print(f"  batch of {len(plist)}: 1 thread {t_b1 * 1e3:.1f} ms, {threads} threads {t_bn * 1e3:.1f} ms "
              f"(speed-up {t_b1 / t_bn:.2f}x)")
        print(f"  backward ({samples} lambdas, J={J} lifted labels, {problem[3].shape[0]} slots): warm start "
              f"{t_warm * 1e3:.1f} ms = {t_warm / t_fwd64:.2f}x the forward solve ({t_fwd64 * 1e3:.1f} ms on the "
              f"same costs), cold {t_cold * 1e3:.1f} ms = {t_cold / t_fwd64:.2f}x; warm on {threads} threads "
              f"{t_warm_nt * 1e3:.1f} ms (speed-up {t_warm / t_warm_nt:.2f}x)")
        print(f"  warm - cold energy per sample (relative): {', '.join(f'{r * 100:+.3f}%' for r in rel)}; "
              f"warm equals solve_mwc_warm on the built costs: {bool(np.allclose(e_warm, e_check, rtol=1e-9))}")
        for solver, (tf, tb) in layer_times.items():
            print(f"  whole layer, {solver} backward: forward {tf * 1e3:.0f} ms, backward {tb * 1e3:.0f} ms "
                  f"({tb / tf:.2f}x)")

    print("\nSummary (times in ms, single thread unless noted; energies: lower is better)")
    hdr = (f"{'size':<11}{'ours':>8}{'GAEC':>8}{'stale':>8}{'E ours':>14}{'E GAEC':>14}{'E stale':>14}"
           f"{'ours<=stale':>12}{'batch1T':>9}{'batchNT':>9}{'bwd':>9}{'bwd/fwd':>8}{'cold/fwd':>9}"
           f"{'warm<=cold':>11}{'ours/stale':>11}{'1T/NT':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        (name, t_o, t_g, t_s, e_o, e_g, e_s, bt, nb, _, t_b1, t_bn, t_w, t_f, t_c, rel, _, _, _, _) = r
        print(f"{name:<11}{t_o * 1e3:8.1f}{t_g * 1e3:8.1f}{t_s * 1e3:8.1f}{e_o:14.1f}{e_g:14.1f}{e_s:14.1f}"
              f"{f'{bt}/{nb}':>12}{t_b1 * 1e3:9.1f}{t_bn * 1e3:9.1f}{t_w * 1e3:9.1f}{t_w / t_f:8.2f}"
              f"{t_c / t_f:9.2f}{f'{int((rel <= 1e-12).sum())}/{rel.size}':>11}{t_o / t_s:11.2f}{t_b1 / t_bn:7.2f}")
    print("ratios, measured in this run: ours/stale = our forward's time over the shipped stale-gain GAEC "
          "baseline's (solvers/reference.py, LPMP's labels and energies on COCO instances); 1T/NT = the "
          "batch's speed-up from 1 thread to --threads; bwd/fwd = the backward's solves (Algorithm 1, warm "
          "start: per-image preparation + one solve per lambda) over the forward solve on the same costs; "
          "cold/fwd = the same with every lifted MWC solved from scratch; warm<=cold = samples where the "
          "warm start's energy is at most the cold solve's")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["coco", "cityscapes"], choices=sorted(SIZES))
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (median reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for the batch timing")
    ap.add_argument("--batch", type=int, default=4, help="images per batch (also the images compared)")
    ap.add_argument("--samples", type=int, default=5, help="MWC solves per backward pass (N in eq. 4)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--noise", type=float, default=1.0,
                    help="scale of every noise term of the costs (1: stress instances with ~10x more predicted "
                         "segments than ground-truth ones; smaller: closer to a trained network's costs)")
    args = ap.parse_args(argv)
    if not args.noise > 0:
        ap.error(f"--noise must be > 0, got {args.noise}")
    run(args.sizes, max(1, args.repeats), max(1, args.threads), max(1, args.batch), max(1, args.samples), args.seed,
        args.noise)


if __name__ == "__main__":
    sys.exit(main())
