#!/usr/bin/env python
"""Benchmark of the AMWC / MWC solvers on realistic synthetic panoptic problems.

An instance is made from a synthetic ground-truth panoptic map on the stride-4 grid (Voronoi stuff
regions + elliptic instances that occlude each other):

* node costs ``theta = -log_softmax(logits)``, logits = bonus for the true class + a weaker bonus for
  one "confuser" class per segment + spatially smooth and i.i.d. Gaussian noise;
* edge costs = logit of P(same segment): ``+-mu_d`` (sign from the ground truth, ``mu_d`` shrinking with
  the distance ``d``) + smooth and i.i.d. noise.

Reported per size: solve time on one thread (median over ``--repeats``), the energy, the energy and
time of the plain greedy contraction with stale gains (LPMP behaviour, ``solve_amwc_gaec_stale``) and
of our contraction without local search, the wall time of a batch of ``--batch`` images on
``--threads`` threads, and the time of the backward pass: ``--samples`` multiway cuts in a lifted label
space (absent classes + one label per ground-truth segment, costs perturbed by ``lambda * dL/dz``).

Times are medians, so they exclude the first solve of a size, which also allocates the solver's work
arrays (kept for later solves, ``cmt_cops_d2.solvers.release_workspaces``); the batch and backward
timings are taken after one untimed batch / multiway cut for the same reason.

    python tools/benchmark_amwc.py --sizes coco cityscapes --repeats 3 --threads 2
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

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


def make_instance(seed, h, w, num_labels, num_things, distances, num_instances):
    """Returns ``(theta (N, K) float64, edges (E, 2), edge_costs (E,), partitionable (K,), cls, seg)``."""
    grid_edges = _solvers()[0]
    rng = np.random.default_rng(seed)
    cls, seg = make_ground_truth(rng, h, w, num_labels, num_things, num_instances)
    N = h * w
    # semantic logits
    logits = 1.2 * rng.standard_normal((h, w, num_labels)).astype(np.float32)
    logits += _smooth_noise(rng, h, w, num_labels, 12)
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
    smooth = _smooth_noise(rng, h, w, 1, 16)[..., 0].reshape(-1)
    lo = 0
    for d in distances:
        n_d = max(h - d, 0) * w + h * max(w - d, 0)
        mu = 3.0 / (1.0 + 0.25 * np.log2(d))
        sl = slice(lo, lo + n_d)
        costs[sl] = np.where(same[sl], mu, -mu) + 1.5 * rng.standard_normal(n_d) + smooth[edges[sl, 0]]
        lo += n_d
    part = np.zeros(num_labels, bool)
    part[:num_things] = True
    return theta, edges, costs, part, cls, seg


def lifted_problem(rng, theta, cls, seg, part, lam):
    """Lifted label space of the backward pass (COPS Alg. 1): absent classes first (one label each, no
    perturbation), then one label per ground-truth segment of each present class, perturbed by
    ``lam * dL/dz`` with a synthetic gradient (negative inside the segment, positive outside)."""
    N, K = theta.shape
    cflat = cls.reshape(-1)
    sflat = seg.reshape(-1)
    present = np.unique(cflat)
    absent = np.setdiff1d(np.arange(K), present)
    cols = [theta[:, absent]]
    for c in present:
        for s in np.unique(sflat[cflat == c]):
            inside = sflat == s
            grad = np.where(inside, -1.0, 0.2) * 5e-4 * (1.0 + 0.5 * rng.standard_normal(N))
            cols.append((theta[:, c] + lam * grad)[:, None])
    return np.ascontiguousarray(np.concatenate(cols, axis=1))


def _median_time(fn, repeats):
    ts = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def run(sizes, repeats, threads, batch, samples, seed):
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
        probs = [make_instance(seed + i, h, w, K, Kt, ds, ninst) for i in range(max(batch, 1))]
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
        # backward: `samples` MWC solves on the lifted space, lambda ~ U[1, 5000]
        rng = np.random.default_rng(seed)
        lifted = [lifted_problem(rng, theta, cls, seg, part, rng.uniform(1.0, 5000.0)) for _ in range(samples)]

        def backward():
            return [solve_mwc(tl, edges, costs) for tl in lifted]

        solve_mwc(lifted[0], edges, costs)  # untimed: work arrays sized for the lifted label space

        t_bw, _ = _median_time(backward, max(1, repeats // 2))
        gt_segments = len(np.unique(seg))
        ncl = int(cid.max()) + 1
        rows.append((name, t_ours, t_gaec, t_stale, e_ours, e_gaec, e_stale, better, len(probs),
                     float(np.mean(diffs)), t_b1, t_bn, t_bw, lifted[0].shape[1], ncl, gt_segments))
        print(f"  ours (GAEC exact + local search): {t_ours * 1e3:8.1f} ms   energy {e_ours:14.2f}   "
              f"clusters {ncl} (ground truth {gt_segments} segments)")
        print(f"  ours, contraction only          : {t_gaec * 1e3:8.1f} ms   energy {e_gaec:14.2f}")
        print(f"  stale-gain GAEC (LPMP-like)     : {t_stale * 1e3:8.1f} ms   energy {e_stale:14.2f}")
        print(f"  ours <= stale on {better}/{len(probs)} images, mean energy difference {np.mean(diffs):.2f}")
        print(f"  batch of {len(plist)}: 1 thread {t_b1 * 1e3:.1f} ms, {threads} threads {t_bn * 1e3:.1f} ms "
              f"(speed-up {t_b1 / t_bn:.2f}x)")
        print(f"  backward: {samples} x MWC with J={lifted[0].shape[1]} lifted labels: {t_bw * 1e3:.1f} ms "
              f"= {t_bw / t_ours:.2f}x forward")

    print("\nSummary (times in ms, single thread unless noted; energies: lower is better)")
    hdr = (f"{'size':<11}{'ours':>8}{'GAEC':>8}{'stale':>8}{'E ours':>14}{'E GAEC':>14}{'E stale':>14}"
           f"{'ours<=stale':>12}{'batch1T':>9}{'batchNT':>9}{'bwd':>9}{'bwd/fwd':>8}{'ours/stale':>11}"
           f"{'1T/NT':>7}")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        (name, t_o, t_g, t_s, e_o, e_g, e_s, bt, nb, _, t_b1, t_bn, t_bw, _, _, _) = r
        print(f"{name:<11}{t_o * 1e3:8.1f}{t_g * 1e3:8.1f}{t_s * 1e3:8.1f}{e_o:14.1f}{e_g:14.1f}{e_s:14.1f}"
              f"{f'{bt}/{nb}':>12}{t_b1 * 1e3:9.1f}{t_bn * 1e3:9.1f}{t_bw * 1e3:9.1f}{t_bw / t_o:8.2f}"
              f"{t_o / t_s:11.2f}{t_b1 / t_bn:7.2f}")
    print("ratios, measured in this run: ours/stale = our forward's time over the shipped stale-gain GAEC "
          "baseline's (solvers/reference.py, LPMP's labels and energies on COCO instances); 1T/NT = the "
          "batch's speed-up from 1 thread to --threads; bwd/fwd = the backward's time over the forward's")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=["coco", "cityscapes"], choices=sorted(SIZES))
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (median reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for the batch timing")
    ap.add_argument("--batch", type=int, default=4, help="images per batch (also the images compared)")
    ap.add_argument("--samples", type=int, default=5, help="MWC solves per backward pass (N in eq. 4)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    run(args.sizes, max(1, args.repeats), max(1, args.threads), max(1, args.batch), max(1, args.samples), args.seed)


if __name__ == "__main__":
    sys.exit(main())
