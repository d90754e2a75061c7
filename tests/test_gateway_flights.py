"""GatewayRouting: the state every gateway drop-in shares (no gateway package needed)."""
from __future__ import annotations

import pytest

from kvroute import Router
from kvroute.gateways import GatewayRouting
from kvroute.kvindex.hashing import block_hash_list
from kvroute.router import NoHealthyWorkerError, WorkerStatus

BS = 4


def _g(**kw) -> GatewayRouting:
    return GatewayRouting(Router([], BS, clock=lambda: 0.0), **kw)


def _toks(base: int, n_blocks: int) -> list[int]:
    return [base + i for i in range(n_blocks * BS)]


def test_one_decision_per_request_and_release_exactly_once():
    g = _g()
    first = g.route("r1", _toks(0, 3), ["a", "b"])
    assert sorted(first) == ["a", "b"]
    assert g.route("r1", _toks(0, 3), ["a", "b"]) == first  # Serve's backoff asks again: same answer
    assert g.router.in_flight() == 1 and g.stats.routed == 1
    assert g.route("r1", _toks(0, 3), [first[1]]) == [first[1]]  # restricted to current candidates
    with pytest.raises(NoHealthyWorkerError):
        g.route("r1", _toks(0, 3), ["c"])
    assert g.release("r1", success=False) is True
    assert g.release("r1", success=False) is False
    assert (g.router.in_flight(), g.stats.failed, g.stats.unknown_releases) == (0, 1, 1)
    for w in g.router.workers():
        s = g.router.worker_state(w)
        assert (s.active_requests, s.prefill_tokens, s.decode_blocks) == (0, 0, 0)


def test_sync_drains_missing_backends_and_forget_removes_them():
    g = _g()
    g.sync(["a", "b", "c"])
    g.route("r1", _toks(0, 2), ["a", "b", "c"])
    g.sync(["a", "b"])
    assert g.router.worker_state("c").status is WorkerStatus.DRAINING
    assert g.route("r2", _toks(100, 2), ["a", "b"])[0] in {"a", "b"}
    g.sync(["a", "b", "c"])
    assert g.router.worker_state("c").status is WorkerStatus.HEALTHY
    g.forget("c")
    assert "c" not in g.router.workers()
    g.release("r1", success=True)  # its worker may be gone: still released
    g.release("r2", success=True)
    assert g.router.in_flight() == 0


def test_approximate_index_records_served_prompts_and_is_bounded():
    g = _g(approximate=True, approx_capacity_blocks=5)
    t1, t2 = _toks(0, 3), _toks(1000, 3)
    g.route("r1", t1, ["a", "b"])
    g.release("r1", success=True, served_by="b")  # where it ran, whatever kvroute chose
    assert g.router.index.match(block_hash_list(t1, BS))["b"].total == 3
    assert g.route("r2", t1 + [9], ["a", "b"])[0] == "b"  # the prefix now sticks
    g.release("r2", success=False)  # failures record nothing
    g.route("r3", t2, ["a", "b"])
    g.release("r3", success=True, served_by="b")  # 6 blocks on b > 5: the oldest one goes
    assert g.stats.approx_evicted_blocks == 1
    assert g.router.index.match(block_hash_list(t1, BS)).get("b") is None  # t1's first block forgotten
    assert g.router.index.match(block_hash_list(t2, BS))["b"].total == 3
    g.router.index.check_invariants()


def test_off_by_default_and_diverted_counted():
    g = _g()
    g.route("r1", _toks(0, 2), ["a", "b"])
    chosen = g.decision("r1").worker
    g.served_by("r1", "b" if chosen == "a" else "a")
    g.release("r1", success=True)
    assert g.stats.diverted == 1
    assert g.router.index.match(block_hash_list(_toks(0, 2), BS)) == {} or all(
        ov.total == 0 for ov in g.router.index.match(block_hash_list(_toks(0, 2), BS)).values())
    with pytest.raises(ValueError):
        _g(approx_capacity_blocks=0)
