"""Differential tests: adaptive's compiled hot paths (the core's DensityHeaps, open_bins, hazard_table,
density_table) against the pure-Python reference, exactly (same victims, same tables, same events).

The reference is the Python code beside them in kvroute/eviction/policies/adaptive.py; an Adaptive bound
while ``adaptive._NATIVE`` is None runs it.  Skipped when the core is not built or KVROUTE_PURE_PYTHON=1.
"""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvroute.eviction import RequestInfo, TieredCache
from kvroute.eviction.policies import adaptive as A
from kvroute.eviction.replay import load_trace

NATIVE = A._NATIVE
pytestmark = pytest.mark.skipif(NATIVE is None, reason="compiled core not available (or KVROUTE_PURE_PYTHON=1)")


def _policy(native: bool, **w):
    """An Adaptive factory whose instances bind the compiled heaps or the Python reference."""

    class P(A.Adaptive):
        def bind(self, capacity):
            saved = A._NATIVE
            A._NATIVE = NATIVE if native else None
            try:
                super().bind(capacity)
            finally:
                A._NATIVE = saved

    return lambda: P(**w)


# ------------------------------------------------------------------ DensityHeaps vs a model
def _model_peek(live: dict, table: list, q: float, now: float):
    """The victim by definition: every class's head (oldest (t, seq)) ranked at ``now``, lowest rank wins."""
    heads: dict = {}
    for seq, (c, t, key) in live.items():
        if c not in heads or (t, seq) < heads[c][:2]:
            heads[c] = (t, seq, key)
    best = None
    for c, (t, seq, key) in heads.items():
        v = table[c][A._bin(now - t)]
        lv = (math.floor(math.log2(v) / q) if v > 0 else -math.inf) if q else v
        r = (lv, t, c, seq, key, v)
        if best is None or r[:4] < best[:4]:
            best = r
    return best


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_density_heaps_match_the_model(data):
    C = data.draw(st.integers(1, 6))
    q = data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    dh = NATIVE.DensityHeaps(C, A._EDGES, A._NBINS, q)
    vals = st.sampled_from([0.0, 1e-6, 0.003, 0.01, 0.02, 0.5, 1.0, 3.0])
    table = [[1.0] * A._NBINS for _ in range(C)]
    live: dict = {}
    seq = 0
    now = 0.0
    for _ in range(data.draw(st.integers(1, 120))):
        op = data.draw(st.sampled_from(["push", "push", "push", "withdraw", "withdraw", "peek", "peek", "table",
                                        "invalidate", "head", "tick"]))
        if op == "push":
            seq += 1
            c = data.draw(st.integers(0, C - 1))
            t = data.draw(st.sampled_from([0.0, 1.0, 2.5, 10.0, 100.0, now]))
            live[seq] = (c, t, f"k{seq}")
            dh.push(c, t, seq, f"k{seq}")
        elif op == "withdraw":
            s = data.draw(st.sampled_from(sorted(live))) if live and data.draw(st.booleans()) else seq + 5
            live.pop(s, None)
            dh.withdraw(s)
        elif op == "table":
            table = [[data.draw(vals) for _ in range(A._NBINS)] for _ in range(C)]
            dh.set_table(np.array(table))
        elif op == "invalidate":
            dh.invalidate()
        elif op == "tick":
            now = data.draw(st.sampled_from([now, now + 0.1, now + 7.0, now + 400.0, max(0.0, now - 3.0)]))
        elif op == "head":
            c = data.draw(st.integers(0, C - 1))
            want = min(((t, s, k) for s, (cc, t, k) in live.items() if cc == c), default=None)
            assert dh.head(c) == want
        got = dh.peek(now)
        want = _model_peek(live, table, q, now)
        assert (got is None) == (want is None)
        if got is not None:
            assert got[1:] == want[1:] and got[0] == want[0], (got, want)
        assert dh.live() == len(live)
        assert dh.entries() <= 4 * len(live) + 1024 + 1


def test_density_heaps_bins_like_the_reference():
    dh = NATIVE.DensityHeaps(1, A._EDGES, A._NBINS, 0.5)
    ages = [-1.0, 0.0, 1e-9, 0.25, 0.2500001, 3.0, *A._EDGES, *A._MIDS, 1e6, math.inf]
    assert [dh.bin(a) for a in ages] == [A._bin(a) for a in ages]


def test_density_heaps_reject_bad_input():
    dh = NATIVE.DensityHeaps(3, A._EDGES, A._NBINS, 0.5)
    with pytest.raises(IndexError):
        dh.push(3, 0.0, 1, "k")
    with pytest.raises(IndexError):
        dh.value(-1, 0.0, 1.0)
    with pytest.raises(ValueError):
        dh.set_table(np.ones((2, A._NBINS)))
    with pytest.raises(ValueError):
        NATIVE.DensityHeaps(0, A._EDGES, A._NBINS, 0.5)


# ------------------------------------------------------------------ refresh: tables equal exactly
counts = st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0, 7.5, 40.0, 1234.0])


@settings(max_examples=40, deadline=None)
@given(st.data(), st.floats(0.5, 1e5), st.floats(0.0, 3e4))
def test_compiled_refresh_equals_the_numpy_reference(data, T, now):
    py, nat = _policy(False)(), _policy(True)()
    for p in (py, nat):
        p.bind(100)
    assert py._dh is None and nat._dh is not None
    C = py.nclasses
    rows = data.draw(st.lists(st.tuples(st.integers(0, C - 1), st.lists(counts, min_size=A._NBINS,
                                                                       max_size=A._NBINS)), max_size=12))
    opens = data.draw(st.lists(st.tuples(st.integers(0, C - 1), st.integers(-5, 9000), st.integers(1, 9)),
                               max_size=40))
    for p in (py, nat):
        for c, r in rows:
            p._hits[c] = list(r)
            p._gone[c] = [x / 2 for x in r]
            p._dirty.add(c)
        for c, s, n in opens:
            p._open[c][s] = p._open[c].get(s, 0) + n
        p.T = T
        p._refresh(now)
    assert np.asarray(nat._hd).tolist() == py._hd


def test_density_table_equals_the_scalar_reference():
    rng = random.Random(3)
    lam = np.array([[rng.random() ** 3 for _ in range(A._NBINS)] for _ in range(7)] + [[0.0] * A._NBINS])
    for T in (0.5, 7.0, 60.0, 3600.0, 1e5):
        assert NATIVE.density_table(lam, T, A._MIDS, A._A0).tolist() == [A._density(list(r), T) for r in lam]


# ------------------------------------------------------------------ whole caches: same decisions
def _run(reqs, factory, gpu, host, hints, admission=True):
    events = []
    c = TieredCache(gpu, host, factory, host_policy=factory, on_event=events.append, gpu_admission=admission)
    out = []
    for i, (ts, keys, info) in enumerate(reqs):
        t = c.start_request(keys, ts, info)
        c.finish_request(t, ts)
        if hints and i % 7 == 3:
            c.hint({keys[0]: 0.5, keys[-1]: 2.0})
        out.append((t.gpu_hit, t.host_hit, t.inserted, t.stored_host))
        c.check_invariants()
    return out, [(b.ts, b.events) for b in events], c.stats(), [p._victim_hd for p in c.policies]


@st.composite
def workloads(draw):
    """Prompts that share prefixes: paths in a small tree of blocks, at increasing times, some with
    client hints (expected return times, some infinite)."""
    n = draw(st.integers(5, 60))
    roots = draw(st.integers(1, 4))
    reqs = []
    ts = 0.0
    for _ in range(n):
        ts += draw(st.sampled_from([0.0, 0.5, 3.0, 20.0, 90.0, 400.0]))
        r = draw(st.integers(0, roots - 1))
        path = [r]
        for _ in range(draw(st.integers(0, 12))):
            path.append(path[-1] * 3 + draw(st.integers(1, 3)))
        keys = [hash(tuple(path[: i + 1])) & 0xFFFFFFFF for i in range(len(path))]
        info = None
        if draw(st.integers(0, 4)) == 0:
            info = RequestInfo(output_tokens=draw(st.integers(0, 900)),
                               expected_return_s=draw(st.sampled_from([None, 5.0, 60.0, math.inf])))
        reqs.append((ts, keys, info))
    return reqs


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads(), st.integers(1, 12), st.sampled_from([0, 1, 4]), st.booleans(), st.booleans())
def test_compiled_and_python_adaptive_decide_alike(reqs, gpu, host_ratio, hints, admission):
    a = _run(reqs, _policy(False, refresh_requests=3), gpu, gpu * host_ratio, hints, admission)
    b = _run(reqs, _policy(True, refresh_requests=3), gpu, gpu * host_ratio, hints, admission)
    assert a == b


@pytest.mark.parametrize("host", [0, 4])
def test_compiled_and_python_adaptive_replay_a_trace_alike(host):
    reqs = [(r.ts, r.keys, RequestInfo(output_tokens=r.output_length))
            for r in load_trace("mooncake_conversation.jsonl", limit=1200)]
    a = _run(reqs, _policy(False), 300, 300 * host, hints=False)
    b = _run(reqs, _policy(True), 300, 300 * host, hints=False)
    assert a[2] == b[2] and a[3] == b[3]
    assert a[0] == b[0] and a[1] == b[1]
