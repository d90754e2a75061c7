"""A long chain enters the router's tables in chunks, the lock free between them (issue 17, item 9),
and the router bounds ``num_tokens``.

A maximal prompt (131,072 blocks) added to the pending table in one go held the router lock for
~20-50 ms: every other client waited.  Here the chunk size is shrunk and a hook placed between
chunks checks, from another thread, that the lock is free and that a small request routes there;
the tables end as a one-shot add leaves them.  Timing figures: bench/sidecar_stall.py.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from kvroute.kvindex import BACKEND
from kvroute.kvindex.index import KVIndex as PyKVIndex
from kvroute.router import PromptLengthError, Router
from kvroute.router import router as router_mod

BS = 4
CHUNK = 8
BACKENDS = ["python"] + (["native"] if BACKEND == "native" else [])


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(backend: str, clock: Clock, **kw) -> Router:
    index = PyKVIndex(BS) if backend == "python" else None
    r = Router(["a", "b", "c"], BS, clock=clock, index=index, **kw)
    assert (r._core is None) == (backend == "python")
    return r


def prompt(n_blocks: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 50_000, n_blocks * BS).astype("<u4")


def lock_is_free(lock) -> bool:
    """Whether another thread can take ``lock`` now (it gives it back at once)."""
    got = []

    def probe() -> None:
        ok = lock.acquire(timeout=2)
        got.append(ok)
        if ok:
            lock.release()

    t = threading.Thread(target=probe)
    t.start()
    t.join(5)
    return got == [True]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(router_mod, "CHAIN_CHUNK_BLOCKS", CHUNK)
    monkeypatch.setattr(router_mod, "APPROX_CHUNK_BLOCKS", CHUNK // 2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lock_is_free_between_chunks_and_others_route_there(backend):
    clk = Clock()
    r = make(backend, clk)
    seen = []

    def hook() -> None:
        i = len(seen)
        other = threading.Thread(target=lambda: r.route(prompt(3, 100 + i), request_id=f"small{i}"))
        other.start()
        other.join(5)
        seen.append((lock_is_free(r.lock), not other.is_alive()))

    r.between_chunks = hook
    n = 100
    d = r.route(prompt(n), request_id="big")
    assert len(seen) == (n - 1) // CHUNK  # first chunk with the decision, then one turn per chunk
    assert all(free and routed for free, routed in seen), seen
    # the whole chain ended pending on the chosen worker, as a one-shot add leaves it
    slot = r._slot[d.worker]
    from kvroute.kvindex.hashing import block_hash_list

    chain = block_hash_list(prompt(n), BS)
    assert r._pending.match(chain)[slot] == n
    r._pending.check_invariants()
    assert r.in_flight() == 1 + len(seen)


@pytest.mark.parametrize("backend", BACKENDS)
def test_chunked_tables_equal_a_one_shot_add(backend, monkeypatch):
    """Same decisions and same pending depths with chunks as with chunks larger than any chain."""
    from kvroute.kvindex.hashing import block_hash_list

    prompts = [prompt(n, s) for s, n in enumerate([5, 40, 9, 77, 40, 3, 120])]
    prompts.append(np.concatenate([prompts[3], prompt(30, 99)]))  # extends a routed chain
    results = []
    for chunk in (CHUNK, 1 << 30):
        monkeypatch.setattr(router_mod, "CHAIN_CHUNK_BLOCKS", chunk)
        monkeypatch.setattr(router_mod, "APPROX_CHUNK_BLOCKS", chunk // 2)
        clk = Clock()
        r = make(backend, clk)
        ds = [r.route(p, request_id=i).worker for i, p in enumerate(prompts)]
        depths = [r._pending.match(block_hash_list(p, BS)) for p in prompts]
        results.append((ds, depths, len(r._pending)))
        r._pending.check_invariants()
    assert results[0] == results[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_generation_rotating_mid_chain_restarts_from_the_root(backend):
    """A generation turning over between chunks must not leave the chain's tail without its head
    (the bisection walk needs each generation prefix-closed): the add restarts from the root."""
    from kvroute.kvindex.hashing import block_hash_list

    clk = Clock()
    r = make(backend, clk, pending_ttl_s=1.0)
    calls = []

    def hook() -> None:
        calls.append(1)
        if len(calls) == 3:
            clk.t += 1.0  # the next epoch: the chunks added so far move to the old generation
            r._pending.expire()

    r.between_chunks = hook
    n = 60
    d = r.route(prompt(n), request_id="big")
    chain = block_hash_list(prompt(n), BS)
    slot = r._slot[d.worker]
    assert r._pending.match(chain)[slot] == n
    clk.t += 1.0  # one more epoch: only what the restart put in the (then) current generation is left
    r._pending.expire()
    assert r._pending.match(chain).get(slot) == n
    assert len(calls) > (n - 1) // CHUNK  # the restart took extra turns
    r._pending.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_worker_removed_mid_chain_stops_the_add(backend):
    clk = Clock()
    r = make(backend, clk)
    calls = []
    removed = []

    def hook() -> None:
        calls.append(1)
        if len(calls) == 2:
            w = r._requests["big"].prefill.id
            removed.append((w, r._slot[w]))
            r.remove_worker(w)
            r.add_worker("new")  # takes the freed slot: it must not inherit the rest of the chain

    r.between_chunks = hook
    r.route(prompt(100), request_id="big")
    assert len(calls) == 2
    (w, slot), = removed
    assert r._slot["new"] == slot
    from kvroute.kvindex.hashing import block_hash_list

    assert r._pending.match(block_hash_list(prompt(100), BS)).get(slot) is None
    r._pending.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_approximate_table_chunked(backend, monkeypatch):
    """Approximate-mode workers: the predicted chain is added in chunks too, and ends whole."""
    from kvroute.kvindex.hashing import block_hash_list

    outs = []
    for chunk in (CHUNK, 1 << 30):
        monkeypatch.setattr(router_mod, "CHAIN_CHUNK_BLOCKS", chunk)
        monkeypatch.setattr(router_mod, "APPROX_CHUNK_BLOCKS", chunk // 2)
        clk = Clock()
        r = make(backend, clk)
        for w in r.workers():
            r.set_approximate(w)
        turns = []
        r.between_chunks = lambda: turns.append(lock_is_free(r.lock))
        d = r.route(prompt(50), request_id="big")
        assert all(turns)
        outs.append((d.worker, r.approx_dump(d.worker), len(turns) > 0))
    assert outs[0][:2] == outs[1][:2]
    assert [len(h) for h in [outs[0][1]]] == [50]
    assert outs[0][2] and not outs[1][2]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cap", [7, 16, 49, 50, 51, 200])
def test_approximate_chain_longer_than_the_bound_ends_as_a_whole_add(backend, cap):
    """A chain longer than the worker's bound starts where the bound would leave it (Router._approx_skip):
    the predicted table ends as one ``ApproxPrefixes.add`` of the whole chain leaves it, older entries
    of the worker included."""
    from kvroute.kvindex.hashing import block_hash_list
    from kvroute.router.approx import ApproxPrefixes

    clk = Clock()
    r = make(backend, clk, approx_capacity_blocks=cap)
    for w in r.workers():
        r.set_approximate(w)
    ref = ApproxPrefixes(r._approx.ttl_s)
    d0 = r.route(prompt(30, seed=1), request_id="old")  # older entries on some worker
    for w in r.workers():
        slot = r._slot[w]
        if w == d0.worker:
            ref.add(slot, block_hash_list(prompt(30, seed=1), BS), clk.t, capacity=cap)
    clk.t += 1
    r.between_chunks = lambda: None
    big = prompt(50, seed=2)
    r.add_approx(d0.worker, block_hash_list(big, BS))
    ref.add(r._slot[d0.worker], block_hash_list(big, BS), clk.t, capacity=cap)
    want = [h for h, _ in ref.dump(r._slot[d0.worker], clk.t)]
    assert [h for h, _ in r.approx_dump(d0.worker)] == want
    r._approx.check_invariants()


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_pending_from_a_peer_is_chunked(backend):
    from kvroute.kvindex.hashing import block_hash_list

    clk = Clock()
    r = make(backend, clk)
    turns = []
    r.between_chunks = lambda: turns.append(lock_is_free(r.lock))
    chain = block_hash_list(prompt(70), BS)
    r.add_pending("b", chain)
    assert turns and all(turns)
    assert r._pending.match(chain)[r._slot["b"]] == 70


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [2 ** 63, -1, True, 1.5, (1 << 24) + 1])
def test_num_tokens_bounded(backend, n):
    """route_hashes(num_tokens=2**63) booked 2**63 tokens of prefill on a worker, which then lost
    every cached prompt to the others: a typed error now, and nothing booked."""
    r = make(backend, Clock())
    with pytest.raises(PromptLengthError):
        r.route_hashes([1, 2, 3], num_tokens=n, request_id="x")
    assert r.in_flight() == 0
    assert all(r.worker_state(w).prefill_tokens == 0 for w in r.workers())
    assert isinstance(PromptLengthError("x"), ValueError)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prompt_longer_than_max_prompt_tokens(backend):
    r = make(backend, Clock(), max_prompt_tokens=64)
    r.route(prompt(16), request_id="ok")  # 64 tokens: the limit itself
    with pytest.raises(PromptLengthError):
        r.route(prompt(17), request_id="long")
    with pytest.raises(PromptLengthError):
        r.route_hashes(list(range(1, 18)), num_tokens=0, request_id="long")
    assert r.in_flight() == 1
    with pytest.raises(ValueError):
        Router(["a"], BS, max_prompt_tokens=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_dropped_generation_is_freed_after_the_lock_is_released(backend):
    """Freeing a generation of millions of pending entries took ~17 ms (2.6M entries, compiled core)
    inside ``expire``, under the router's lock, every ``pending_ttl_s``: the rest of the sidecar's
    clients waited.  ``expire`` now keeps the dropped storage; the router frees it with ``reap`` once
    its lock is released."""
    clk = Clock()
    r = make(backend, clk, pending_ttl_s=1.0)
    pend = r._pending
    for k in range(3):
        r.route(prompt(20, seed=k), request_id=f"fill{k}")
        r.finish(f"fill{k}")
    held = len(pend)
    assert held > 0
    # two epochs on: both generations drop at the next expire; held until reap
    clk.t += 2.0
    with r.lock:
        pend.expire(clk())
        assert len(pend) == 0 and pend.dead_len() == held
    assert pend.reap() >= 1 and pend.dead_len() == 0
    # through the router: the reap runs with the lock free, after a decision that dropped a generation
    r.route(prompt(20, seed=7), request_id="x")
    r.finish("x")
    calls = []
    real_reap = pend.reap

    def spy() -> int:
        calls.append((pend.dead_len(), lock_is_free(r.lock)))
        return real_reap()

    pend.reap = spy  # type: ignore[method-assign]
    clk.t += 1.0  # one epoch: "x"'s chain moves to the old generation; the one before is dropped
    r.route(prompt(20, seed=8), request_id="y")
    clk.t += 1.0  # "x"'s generation is dropped by this decision
    r.route(prompt(20, seed=9), request_id="z")
    assert any(n > 0 for n, _ in calls) and all(free for _, free in calls)
    assert pend.dead_len() == 0
    pend.check_invariants() if hasattr(pend, "check_invariants") else None
