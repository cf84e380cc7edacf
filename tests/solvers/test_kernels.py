"""Building blocks of the AMWC kernel that the end-to-end tests exercise only indirectly: the row
statistics, the 8-ary heap construction, the bucketed hash-table build, the work arrays kept across
solves (``amwc`` workspace pool) and parallel edges given more than twice."""
import threading

import numpy as np
import pytest

from cmt_cops_d2.solvers import grid_edges, solve_amwc, solve_amwc_batch
from cmt_cops_d2.solvers import _core, amwc
from cmt_cops_d2.solvers.checks import check_amwc_solution
from cmt_cops_d2.solvers.edgehash import (
    pair_key,
    table_bits,
    table_build,
    table_find,
    table_find_or_insert,
    table_new,
)
from cmt_cops_d2.solvers.heap import heap_heapify

from .test_amwc import random_grid


def _grid_problem(rng, h, w, k):
    """:func:`random_grid` with the longer edge distances these tests use."""
    return random_grid(rng, h, w, k, distances=(1, 3, 8))


def test_row_stats_matches_numpy():
    """argmin with the first index on ties, the min, and the gap to the second smallest (0 on a tied
    minimum, inf for one label), for every row length around the 4-way unrolling."""
    rng = np.random.default_rng(0)
    for K in list(range(1, 12)) + [19, 38, 133, 134]:
        rows = np.round(rng.normal(0.0, 1.0, (60, K)), 1)  # rounding makes ties frequent
        rows[0] = 0.0
        for r in range(rows.shape[0]):
            a, m, gap = _core._row_stats(rows, r, K)
            row = rows[r]
            assert a == int(np.argmin(row)) and m == row.min()
            expect = np.inf if K == 1 else np.sort(row)[1] - row.min()
            assert gap == expect


@pytest.mark.parametrize("la", [1, 2, 3])
def test_heapify_gives_a_heap(la):
    rng = np.random.default_rng(1)
    for n in [0, 1, 2, 8, 9, 10, 73, 1000]:
        hk = np.round(rng.normal(0.0, 1.0, n + 5), 1)
        he = rng.permutation(n + 5).astype(np.int32)
        items = he[:n].copy()
        keys = dict(zip(he[:n].tolist(), hk[:n].tolist()))
        pos = np.full(n + 5, -1, np.int32)
        heap_heapify(hk, he, pos, n, la)
        assert sorted(he[:n].tolist()) == sorted(items.tolist())
        assert all(keys[int(he[i])] == hk[i] for i in range(n))
        for i in range(1, n):
            assert hk[(i - 1) >> la] <= hk[i]
        for i in range(n):
            assert pos[he[i]] == i


@pytest.mark.parametrize("n_nodes, n_edges", [(12, 40), (300, 5000)])
def test_table_build_equals_inserts_in_edge_order(n_nodes, n_edges):
    """Bucketed build == ``table_find_or_insert`` in edge order: same lookups, same parallel edges kept
    (the first one), for a small table (one bucket) and a multi-bucket one."""
    rng = np.random.default_rng(2)
    a = rng.integers(0, n_nodes, n_edges)
    b = rng.integers(0, n_nodes, n_edges)
    keep = a != b
    edges = np.stack([a[keep], b[keep]], 1).astype(np.int64)
    m = len(edges)
    ref, bits, ebits = table_new(2 * m, m)
    ref_dup = {}
    for e in range(m):
        g = table_find_or_insert(ref, bits, ebits, pair_key(edges[e, 0], edges[e, 1], n_nodes), e)
        if g >= 0:
            ref_dup[e] = g
    assert bits == table_bits(2 * m)
    tab = np.full(1 << bits, -1, np.int64)
    scratch = np.empty(m, np.int64)
    occupied, ndup = table_build(tab, bits, ebits, edges, n_nodes, scratch)
    assert occupied == m - len(ref_dup) == (tab != -1).sum()
    dups = {int(x >> 32): int(x & 0xFFFFFFFF) for x in scratch[:ndup]}
    assert dups == ref_dup
    for e in range(m):
        key = pair_key(edges[e, 0], edges[e, 1], n_nodes)
        assert table_find(tab, bits, ebits, key) == table_find(ref, bits, ebits, key)
    assert sorted(tab[tab != -1].tolist()) == sorted(ref[ref != -1].tolist())


def test_edges_given_three_times_equal_summed_graph():
    """Three copies of every edge (costs split unevenly, one copy reversed) == the plain graph."""
    rng = np.random.default_rng(3)
    theta, edges, costs, part = _grid_problem(rng, 9, 11, 4)
    f = rng.uniform(0.1, 0.5, len(edges))
    dup_edges = np.concatenate([edges, edges[:, ::-1], edges])
    dup_costs = np.concatenate([costs * f, costs * (1 - f) / 2, costs * (1 - f) / 2])
    a = solve_amwc(theta, edges, costs, part)
    b = solve_amwc(theta, dup_edges, dup_costs, part)
    check_amwc_solution(theta, dup_edges, dup_costs, part, *b)
    assert (a[0] == b[0]).all() and (a[1] == b[1]).all() and a[2] == pytest.approx(b[2], abs=1e-9)


def _fresh(problem):
    """Reference result with freshly allocated work arrays."""
    theta, edges, costs, part = amwc.validate_problem(*problem)
    labels, cids, energy, _ = _core.solve_kernel(theta, edges, costs, part, 4, 4, amwc._TOL, True)
    return labels, cids, float(energy)


def test_kept_work_arrays_give_identical_results():
    """Solves through the workspace pool (reused, grown, holding garbage from earlier solves of other
    sizes) equal solves with fresh work arrays; released pools are rebuilt on demand."""
    rng = np.random.default_rng(4)
    problems = [_grid_problem(rng, h, w, k) for h, w, k in [(20, 24, 5), (6, 7, 3), (31, 17, 6), (6, 7, 3)]]
    expected = [_fresh(p) for p in problems]
    amwc.release_workspaces()
    for _ in range(2):
        for p, ref in zip(problems, expected):
            out = solve_amwc(*p)
            assert (out[0] == ref[0]).all() and (out[1] == ref[1]).all() and out[2] == ref[2]
    assert len(amwc._WS_FREE) == 1  # sequential solves share one workspace
    for ws in amwc._WS_FREE:  # stale content must not matter
        ws.f8[:] = np.nan
        ws.i4[:] = -7
        ws.i8[:] = 123456789
    out = solve_amwc(*problems[2])
    assert (out[0] == expected[2][0]).all() and out[2] == expected[2][2]
    amwc.release_workspaces()
    assert amwc._WS_FREE == []
    out = solve_amwc(*problems[0])
    assert (out[1] == expected[0][1]).all()


def test_work_arrays_in_concurrent_solves():
    rng = np.random.default_rng(5)
    problems = [_grid_problem(rng, 8 + 3 * i, 10, 3 + i % 3) for i in range(8)]
    expected = [_fresh(p) for p in problems]
    amwc.release_workspaces()
    for _ in range(2):
        got = solve_amwc_batch(problems, num_threads=4)
        for out, ref in zip(got, expected):
            assert (out[0] == ref[0]).all() and (out[1] == ref[1]).all() and out[2] == ref[2]
    assert 1 <= len(amwc._WS_FREE) <= 4
    # plain threads too (not only the batch helper), several solves each
    errors = []

    def worker(i):
        try:
            for j in range(3):
                k = (i + j) % len(problems)
                out = solve_amwc(*problems[k])
                assert (out[1] == expected[k][1]).all() and out[2] == expected[k][2]
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_workspace_pool_respects_its_memory_cap(monkeypatch):
    rng = np.random.default_rng(6)
    problem = _grid_problem(rng, 12, 12, 4)
    amwc.release_workspaces()
    monkeypatch.setattr(amwc, "_WS_LIMIT", 0)
    solve_amwc(*problem)
    assert amwc._WS_FREE == []  # over the cap: dropped after the solve
    monkeypatch.undo()
    solve_amwc(*problem)
    assert len(amwc._WS_FREE) == 1


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_forked_child_starts_with_an_empty_workspace_pool():
    import os
    import signal

    rng = np.random.default_rng(7)
    problem = _grid_problem(rng, 10, 10, 3)
    solve_amwc(*problem)
    assert amwc._WS_FREE
    pid = os.fork()
    if pid == 0:  # child: empty pool, working lock, solver still fine
        signal.alarm(120)  # never hang the test run
        ok = not amwc._WS_FREE and amwc._WS_LOCK.acquire(timeout=5)
        if ok:
            amwc._WS_LOCK.release()
            ok = solve_amwc(*problem)[2] == _fresh(problem)[2]
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
