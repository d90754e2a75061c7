"""KVEventSubscriber over real ZMQ sockets on loopback: order, gaps, replay, restarts, resync, metrics.

No test sleeps: the subscriber is driven with ``poll(timeout)`` on real socket
events, the fake engines answer replays from the same loop, and replay
timeouts use an injected clock.
"""
import random
import time

import pytest
import zmq

from kvroute.adapters.subscriber import EndpointError, KVEventSubscriber, SubscriberConfig, rank_endpoint
from kvroute.adapters.vllm import encode
from kvroute.kvindex import BlockStored, EventBatch, KVIndex, Tier

from fake_engine import FakeEngine


class FakeClock:
    def __init__(self, t=1000.0):
        self.t = t

    def __call__(self):
        return self.t


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.destroy(linger=0)


def make_sub(ctx, bs=4, **cfg):
    clock = FakeClock()
    sub = KVEventSubscriber(KVIndex(bs), context=ctx, clock=clock,
                            wall_clock=lambda: 1_700_000_000.0 + 5.0, config=SubscriberConfig(**cfg))
    sub.fake_clock = clock
    return sub


def attach(sub, eng, wid="w", replay=True):
    sub.add_worker(wid, eng.endpoint, eng.replay_endpoint if replay else None)
    assert eng.wait_for_subscribers(1, 5000)


def pump(sub, engines, until, timeout_s=10.0):
    """Drive the loop (and the engines' replay servers) until ``until()``; fail on timeout."""
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, f"timed out; metrics={sub.metrics()}"
        sub.poll(5)
        sub.check_invariants()
        for e in engines:
            e.serve_replay(0)


def caught_up(sub, eng, key="w"):
    def cond():
        w = sub.metrics()["workers"].get(key)
        # next_seq alone is not enough: after a restart the new stream can reach the old number
        return (w is not None and w["next_seq"] == eng.seq and w["pending"] == 0 and not w["replaying"]
                and w["last_ts"] == eng.ts)
    return cond


def prompts(rnd, n, bs=4, groups=6, max_blocks=8):
    """Prompts sharing prefixes: a group prefix plus a random tail."""
    heads = [[rnd.randrange(1000) for _ in range(bs * rnd.randrange(1, 4))] for _ in range(groups)]
    for _ in range(n):
        head = rnd.choice(heads)
        tail = [rnd.randrange(1000) for _ in range(bs * rnd.randrange(0, max_blocks - len(head) // bs))]
        yield head + tail + [7] * rnd.randrange(bs)  # partial last block never cached


def test_in_order_stream_matches_engine(ctx):
    eng = FakeEngine(ctx, capacity=24, hash_mode="signed")
    with make_sub(ctx) as sub:
        attach(sub, eng)
        rnd = random.Random(1)
        for p in prompts(rnd, 40):
            eng.request(p)
            eng.publish()
        pump(sub, [eng], caught_up(sub, eng))
        assert sub.index.blocks_of("w") == eng.true_blocks()
        m = sub.metrics()
        assert m["batches"] == 40 and m["gaps"] == 0 and m["resyncs"] == {} and m["restarts"] == 0
        assert m["blocks_removed"] > 0 and m["blocks_stored"] >= len(eng.true_blocks())
        assert m["lag_seconds"]["count"] == 40 and 4.9 < m["lag_seconds"]["max"] < 5.0
        assert m["lag_seconds"]["buckets"][-1] == (float("inf"), 40)
        assert sub.stale_workers() == set()
        sub.index.check_invariants()
    eng.close()


@pytest.mark.parametrize("seed,hash_mode,old_layout,host", [(2, "int", False, 0), (3, "bytes", True, 6), (4, "signed", False, 10)])
def test_drops_reorders_and_restarts_end_equal_to_truth(ctx, seed, hash_mode, old_layout, host):
    rnd = random.Random(seed)
    eng = FakeEngine(ctx, capacity=20, host_capacity=host, hash_mode=hash_mode, old_replay_layout=old_layout)
    with make_sub(ctx) as sub:
        attach(sub, eng)
        gen = prompts(rnd, 10_000)
        restarts = 0
        since_restart = 0
        for step in range(150):
            for _ in range(rnd.randrange(1, 3)):
                eng.request(next(gen))
            r = rnd.random()
            # never drop/hold the first batch after a restart: a restarted engine whose first
            # batches are all lost is indistinguishable from a continuing one (docs/events.md)
            if since_restart > 0 and r < 0.15:
                eng.publish(drop=True)
            elif since_restart > 0 and r < 0.25 and not eng.held:
                eng.publish(hold=True)
            else:
                eng.publish()
                eng.release_held()
            since_restart += 1
            if step in (50, 110):
                eng.release_held()
                pump(sub, [eng], caught_up(sub, eng))  # settle, then restart the engine
                eng.restart()
                restarts += 1
                since_restart = 0
            if step % 10 == 0:
                sub.poll(0)
                eng.serve_replay(0)
        eng.release_held()
        eng.publish()  # a final in-order batch exposes any trailing drop as a gap
        pump(sub, [eng], caught_up(sub, eng))
        assert sub.index.blocks_of("w") == eng.true_blocks()
        m = sub.metrics()
        assert m["workers"]["w"]["pending_bytes"] == 0  # the byte count follows every buffer change
        assert m["restarts"] == restarts
        assert m["gaps"] > 0 and m["gaps_closed"] == m["gaps"]
        assert m["replay_requests"] > 0 and m["replays_failed"] == {} and m["resyncs"] == {}
        assert m["orphans"] == 0 and m["decode_errors"] == {}
        assert sub.stale_workers() == set() and m["workers"]["w"]["complete"]
        if host:
            assert any(Tier.HOST in t for t in eng.true_blocks().values())
        sub.index.check_invariants()
    eng.close()


def test_unreplayable_gap_resyncs_marks_stale_then_rebuilds(ctx):
    eng = FakeEngine(ctx, capacity=40, replay_buffer=2)
    with make_sub(ctx) as sub:
        attach(sub, eng)
        rnd = random.Random(5)
        gen = prompts(rnd, 1000)
        for _ in range(5):
            eng.request(next(gen))
            eng.publish()
        pump(sub, [eng], caught_up(sub, eng))
        for _ in range(4):  # 4 lost batches, only 2 kept for replay
            eng.request(next(gen))
            eng.publish(drop=True)
        eng.request(next(gen))
        eng.publish()
        pump(sub, [eng], lambda: sub.metrics()["resyncs"])
        m = sub.metrics()
        assert m["replays_failed"] == {"overrun": 1} and m["resyncs"] == {"overrun": 1}
        pump(sub, [eng], caught_up(sub, eng))
        # after the resync the index holds only what was announced since: a subset of the truth
        truth = eng.true_blocks()
        got = sub.index.blocks_of("w")
        assert got and all(truth.get(c) == t for c, t in got.items()) and len(got) < len(truth)
        assert not sub.metrics()["workers"]["w"]["complete"]
        # the replayed batches after the resync were contiguous: fresh again (rebuild_batches=1)
        assert sub.stale_workers() == set()
        # an engine-side cache reset makes the index exact again
        eng.reset_prefix_cache()
        for _ in range(3):
            eng.request(next(gen))
            eng.publish()
        pump(sub, [eng], caught_up(sub, eng))
        assert sub.index.blocks_of("w") == eng.true_blocks()
        assert sub.metrics()["workers"]["w"]["complete"]
    eng.close()


def test_stale_until_rebuild_batches(ctx):
    eng = FakeEngine(ctx, capacity=40)
    with make_sub(ctx, rebuild_batches=3) as sub:
        attach(sub, eng, replay=False)
        gen = prompts(random.Random(6), 100)
        eng.request(next(gen))
        eng.publish(drop=True)
        eng.request(next(gen))
        eng.publish()
        pump(sub, [eng], caught_up(sub, eng))
        m = sub.metrics()
        assert m["replays_failed"] == {"no_endpoint": 1} and m["resyncs"] == {"no_endpoint": 1}
        assert sub.stale_workers() == {"w"}  # 1 clean batch of the 3 needed
        for i in range(2):
            eng.request(next(gen))
            eng.publish()
            pump(sub, [eng], caught_up(sub, eng))
            assert (sub.stale_workers() == {"w"}) == (i == 0)
    eng.close()


def test_replay_timeout_uses_the_injected_clock(ctx):
    eng = FakeEngine(ctx, capacity=40)
    with make_sub(ctx, replay_timeout_s=2.0) as sub:
        attach(sub, eng)
        gen = prompts(random.Random(7), 100)
        eng.request(next(gen))
        eng.publish(drop=True)
        eng.request(next(gen))
        eng.publish()
        # never serve the replay: the request stays outstanding until the clock passes the deadline
        deadline = time.monotonic() + 10
        while sub.metrics()["replay_requests"] == 0:
            assert time.monotonic() < deadline
            sub.poll(5)
        assert sub.metrics()["workers"]["w"]["replaying"]
        sub.fake_clock.t += 1.9
        sub.poll(0)
        assert sub.metrics()["replays_failed"] == {}
        sub.fake_clock.t += 0.2
        sub.poll(0)
        m = sub.metrics()
        assert m["replays_failed"] == {"timeout": 1} and m["resyncs"] == {"timeout": 1}
        assert m["workers"]["w"]["next_seq"] == 2 and sub.stale_workers() == set()  # seq 1 applied: 1 clean batch
        # a late answer to the abandoned request must not disturb anything
        eng.serve_replay(0)
        sub.poll(5)
        assert sub.metrics()["batches"] == 1
    eng.close()


def test_restart_with_lost_first_batch_replays_from_zero(ctx):
    eng = FakeEngine(ctx, capacity=40)
    with make_sub(ctx) as sub:
        attach(sub, eng)
        gen = prompts(random.Random(8), 100)
        for _ in range(6):
            eng.request(next(gen))
            eng.publish()
        pump(sub, [eng], caught_up(sub, eng))
        eng.restart()
        eng.request(next(gen))
        eng.publish(drop=True)  # new seq 0 lost
        eng.request(next(gen))
        eng.publish()  # seq 1 < next 6: restart; then the gap 0 is replayed
        pump(sub, [eng], caught_up(sub, eng))
        assert sub.index.blocks_of("w") == eng.true_blocks()
        m = sub.metrics()
        assert m["restarts"] == 1 and m["resyncs"] == {} and m["gaps_closed"] == 1
    eng.close()


def test_orphan_on_complete_stream_resyncs(ctx):
    eng = FakeEngine(ctx, capacity=40)
    with make_sub(ctx) as sub:
        attach(sub, eng)
        eng.request(list(range(8)))
        eng.publish()
        eng.publish(events=[BlockStored((99,), 12345, (1, 2, 3, 4), 4)])  # parent never announced
        pump(sub, [eng], caught_up(sub, eng))
        m = sub.metrics()
        assert m["orphans"] == 1 and m["resyncs"] == {"orphan": 1}
        assert sub.stale_workers() == {"w"} and sub.index.blocks_of("w") == {}
        # on an incomplete stream orphans are expected: counted, no second resync
        eng.publish(events=[BlockStored((98,), 777, (1, 2, 3, 4), 4)])
        eng.request(list(range(100, 108)))
        eng.publish()
        pump(sub, [eng], caught_up(sub, eng))
        m = sub.metrics()
        assert m["orphans"] == 2 and m["resyncs"] == {"orphan": 1} and sub.stale_workers() == set()
    eng.close()


def test_malformed_frames_are_counted_drops(ctx):
    pub = ctx.socket(zmq.XPUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    with make_sub(ctx) as sub:
        sub.add_worker("w", f"tcp://127.0.0.1:{port}")
        assert pub.poll(5000)
        pub.recv()
        good = encode(EventBatch(1.0, (BlockStored((1,), None, (1, 2, 3, 4), 4),), 0))
        pub.send_multipart([b"", good])  # two frames
        pub.send_multipart([b"", b"\x00" * 7, good])  # short seq
        pub.send_multipart([b"", b"\xff" * 8, good])  # the end marker is not a live seq
        pub.send_multipart([b"", (0).to_bytes(8, "big"), good, b"x"])  # four frames
        pub.send_multipart([b"", (0).to_bytes(8, "big"), b"\x93\xcb"])  # truncated msgpack
        pub.send_multipart([b"", (1).to_bytes(8, "big"), good])
        pump(sub, [], lambda: sub.metrics()["workers"]["w"]["next_seq"] == 2)
        m = sub.metrics()
        assert m["dropped_frames"] == {"bad_frame_count": 2, "bad_seq": 2}
        assert m["decode_errors"] == {"msgpack": 1} and m["resyncs"] == {"decode_error": 1}
        assert m["batches"] == 1 and len(sub.index.blocks_of("w")) == 1
    pub.close(linger=0)


def test_add_and_remove_workers_while_the_loop_thread_runs(ctx):
    engs = [FakeEngine(ctx, capacity=30, seed=i) for i in range(3)]
    sub = make_sub(ctx)
    sub.start()
    try:
        gen = prompts(random.Random(9), 1000)
        for i, e in enumerate(engs):
            sub.add_worker(f"w{i}", e.endpoint, e.replay_endpoint)
            assert e.wait_for_subscribers(1, 5000)
        for _ in range(20):
            for e in engs:
                e.request(next(gen))
                e.publish()

        def all_caught_up():
            with sub.lock:
                return all(caught_up(sub, e, f"w{i}")() for i, e in enumerate(engs))

        deadline = time.monotonic() + 10
        while not all_caught_up():
            assert time.monotonic() < deadline
            for e in engs:
                e.serve_replay(2)
        with sub.lock:
            for i, e in enumerate(engs):
                assert sub.index.blocks_of(f"w{i}") == e.true_blocks()
        sub.remove_worker("w1")
        deadline = time.monotonic() + 10
        while "w1" in sub.workers():
            assert time.monotonic() < deadline
            engs[1].serve_replay(2)
        with sub.lock:
            assert "w1" not in sub.index and "w0" in sub.index
    finally:
        sub.close()
        for e in engs:
            e.close()


def test_data_parallel_ranks_are_separate_index_workers(ctx):
    e0, e1 = FakeEngine(ctx, capacity=30, dp_rank=0), FakeEngine(ctx, capacity=30, dp_rank=1, seed=1)
    with make_sub(ctx) as sub:
        sub.add_worker("w", {0: e0.endpoint, 1: e1.endpoint}, {0: e0.replay_endpoint, 1: e1.replay_endpoint},
                       dp_ranks=(0, 1))
        assert e0.wait_for_subscribers() and e1.wait_for_subscribers()
        gen = prompts(random.Random(10), 100)
        for _ in range(10):
            e0.request(next(gen))
            e0.publish()
            e1.request(next(gen))
            e1.publish()
        pump(sub, [e0, e1], lambda: caught_up(sub, e0, ("w", 0))() and caught_up(sub, e1, ("w", 1))())
        assert sub.index.blocks_of(("w", 0)) == e0.true_blocks()
        assert sub.index.blocks_of(("w", 1)) == e1.true_blocks()
        sub.remove_worker("w")
        sub.poll(0)
        assert sub.index.workers() == []
    e0.close()
    e1.close()


def test_rank_endpoint_offsets_the_port():
    assert rank_endpoint("tcp://10.0.0.1:5557", 0) == "tcp://10.0.0.1:5557"
    assert rank_endpoint("tcp://10.0.0.1:5557", 3) == "tcp://10.0.0.1:5560"
    assert rank_endpoint("tcp://h:5557", 3, base_rank=2) == "tcp://h:5558"
    with pytest.raises(ValueError):
        rank_endpoint("ipc:///tmp/kv", 1)


class RecordingLock:
    """A lock that records whether it is held (to check apply runs under it)."""

    def __init__(self):
        import threading

        self._lock = threading.RLock()
        self.depth = 0

    def __enter__(self):
        self._lock.acquire()
        self.depth += 1
        return self

    def __exit__(self, *exc):
        self.depth -= 1
        self._lock.release()


def test_batches_are_applied_under_the_shared_lock(ctx):
    eng = FakeEngine(ctx, capacity=30)
    lock = RecordingLock()
    ix = KVIndex(4)
    seen = []
    real_apply = ix.apply

    def apply(worker, batch):
        seen.append(lock.depth)
        return real_apply(worker, batch)

    ix.apply = apply
    with KVEventSubscriber(ix, context=ctx, lock=lock) as sub:
        attach(sub, eng)
        for p in prompts(random.Random(11), 5):
            eng.request(p)
            eng.publish()
        pump(sub, [eng], caught_up(sub, eng))
    assert len(seen) == 5 and all(d >= 1 for d in seen)
    eng.close()


def test_garbage_payloads_never_stop_the_loop(ctx):
    """Random and mutated payloads over the wire: counted, resynced, and the loop keeps going."""
    eng = FakeEngine(ctx, capacity=30)
    rnd = random.Random(12)
    with make_sub(ctx) as sub:
        attach(sub, eng)
        gen = prompts(rnd, 1000)
        n_bad = 0
        for i in range(60):
            eng.request(next(gen))
            if i % 3 == 1:
                good = encode(EventBatch(1.0, tuple(eng.events), 0))
                b = bytearray(good)
                for _ in range(rnd.randrange(1, 4)):
                    b[rnd.randrange(len(b))] = rnd.randrange(256)
                eng.events = []
                eng.publish(payload=bytes(b) if rnd.random() < 0.7 else rnd.randbytes(rnd.randrange(40)))
                n_bad += 1
            else:
                eng.publish()
        pump(sub, [eng], caught_up(sub, eng))
        m = sub.metrics()
        errors = sum(m["decode_errors"].values())
        # every batch was handled exactly once: applied, or refused by the decoder
        assert m["batches"] + errors == 60 and errors >= 1
        assert m["resyncs"].get("decode_error", 0) == errors
        sub.index.check_invariants()
        # after a cache reset the index is exact again, garbage or not
        eng.reset_prefix_cache()
        eng.request(next(gen))
        eng.publish()
        pump(sub, [eng], caught_up(sub, eng))
        assert sub.index.blocks_of("w") == eng.true_blocks()
    eng.close()


from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

OPS = st.lists(st.sampled_from(["send", "send", "send", "drop", "hold", "restart", "reset", "flush"]),
               min_size=5, max_size=40)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(OPS, st.integers(0, 2**16), st.sampled_from([0, 8]))
def test_any_schedule_of_drops_reorders_restarts_ends_exact(ctx, ops, seed, host):
    rnd = random.Random(seed)
    eng = FakeEngine(ctx, capacity=16, host_capacity=host, hash_mode=rnd.choice(["int", "signed", "bytes"]))
    try:
        with make_sub(ctx) as sub:
            attach(sub, eng)
            gen = prompts(rnd, 10_000)
            fresh = True  # the first batch after a (re)start is never lost (see docs/events.md)
            for op in ops:
                if op == "restart":
                    eng.release_held()
                    eng.publish()
                    pump(sub, [eng], caught_up(sub, eng))
                    eng.restart()
                    fresh = True
                    continue
                if op == "reset":
                    eng.reset_prefix_cache()
                elif op == "flush":
                    sub.poll(0)
                    eng.serve_replay(0)
                    continue
                eng.request(next(gen))
                if op == "drop" and not fresh:
                    eng.publish(drop=True)
                elif op == "hold" and not fresh and not eng.held:
                    eng.publish(hold=True)
                else:
                    eng.publish()
                    eng.release_held()
                fresh = False
            eng.release_held()
            eng.publish()
            pump(sub, [eng], caught_up(sub, eng))
            assert sub.index.blocks_of("w") == eng.true_blocks()
            m = sub.metrics()
            assert m["resyncs"] == {} and m["replays_failed"] == {} and m["gaps_closed"] == m["gaps"]
            sub.index.check_invariants()
    finally:
        eng.close()


def test_a_batch_the_index_refuses_is_a_counted_loss(ctx):
    eng = FakeEngine(ctx, capacity=30)
    ix = KVIndex(4)
    real_apply = ix.apply
    calls = []

    def apply(worker, batch):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_apply(worker, batch)

    ix.apply = apply
    with KVEventSubscriber(ix, context=ctx) as sub:
        attach(sub, eng)
        for p in prompts(random.Random(13), 3):
            eng.request(p)
            eng.publish()
        pump(sub, [eng], caught_up(sub, eng))
        m = sub.metrics()
        assert m["decode_errors"] == {"apply_error": 1} and m["resyncs"] == {"decode_error": 1}
        assert m["batches"] == 2 and not m["workers"]["w"]["complete"]
    eng.close()


def test_bind_addresses_are_refused_early(ctx):
    with make_sub(ctx) as sub:
        with pytest.raises(ValueError):
            sub.add_worker("w", "tcp://*:5557")
        with pytest.raises(ValueError):
            sub.add_worker("w", "tcp://127.0.0.1:5557", "tcp://*:5558")
        assert sub.workers() == []
    own = KVEventSubscriber(KVIndex(4))  # its own context, terminated by close()
    own.close()
    for s in (sub, own):
        for use in (s.poll, s.start, lambda: s.add_worker("w", "tcp://127.0.0.1:5557")):
            with pytest.raises(RuntimeError):  # closed: a clear error, not a ZMQ one on a closed socket
                use()


@pytest.mark.parametrize("buffer", [10_000, 3])
def test_joining_a_running_engine_replays_its_history(ctx, buffer):
    eng = FakeEngine(ctx, capacity=24, replay_buffer=buffer)
    gen = prompts(random.Random(14), 100)
    for _ in range(10):  # published before anyone listens
        eng.request(next(gen))
        eng.publish()
    with make_sub(ctx) as sub:
        attach(sub, eng)
        eng.request(next(gen))
        eng.publish()
        pump(sub, [eng], caught_up(sub, eng))
        m = sub.metrics()
        if buffer > 10:  # the whole history was still buffered: exact
            assert sub.index.blocks_of("w") == eng.true_blocks()
            assert m["resyncs"] == {} and m["workers"]["w"]["complete"]
            # the delivery lag counts the live batch only, not the ten fetched from the engine's history
            assert m["replay_batches"] >= 10 and m["lag_seconds"]["count"] == 1
        else:  # history gone: resynced, a subset of the truth, incomplete
            assert m["replays_failed"] == {"overrun": 1} and not m["workers"]["w"]["complete"]
            truth = eng.true_blocks()
            assert all(truth.get(c) == t for c, t in sub.index.blocks_of("w").items())
    eng.close()


def snapshot_after(ctx, eng, gen, path, batches=8):
    """Follow ``eng`` for ``batches`` batches, then save the index and the positions together."""
    with make_sub(ctx) as sub:
        attach(sub, eng)
        for _ in range(batches):
            eng.request(next(gen))
            eng.publish()
        pump(sub, [eng], caught_up(sub, eng))
        with sub.lock:
            sub.index.save(path)
            return sub.positions()


def test_resume_from_a_snapshot_with_positions(ctx, tmp_path):
    eng = FakeEngine(ctx, capacity=24)
    gen = prompts(random.Random(15), 100)
    pos = snapshot_after(ctx, eng, gen, tmp_path / "ix.snap")
    assert pos == {"w": 8}
    for _ in range(5):  # published while no router listens
        eng.request(next(gen))
        eng.publish()
    ix = KVIndex.load(tmp_path / "ix.snap")
    with KVEventSubscriber(ix, context=ctx) as sub2:
        sub2.add_worker("w", eng.endpoint, eng.replay_endpoint, start_seq=pos["w"])
        assert eng.wait_for_subscribers(1, 5000)
        eng.request(next(gen))
        eng.publish()
        pump(sub2, [eng], caught_up(sub2, eng))
        m = sub2.metrics()
        assert ix.blocks_of("w") == eng.true_blocks()
        assert m["batches"] == 6 and m["resyncs"] == {} and m["workers"]["w"]["complete"]
        with pytest.raises(ValueError):
            sub2.add_worker("x", eng.endpoint, start_seq=-1)
    eng.close()


def test_resume_over_an_engine_that_restarted_meanwhile(ctx, tmp_path):
    """start_seq=N, but the engine restarted while no router listened: its new seqs 0.. are
    a restart (they never reached this stream), not echoes of a replay; the index ends exact."""
    eng = FakeEngine(ctx, capacity=24)
    gen = prompts(random.Random(16), 100)
    pos = snapshot_after(ctx, eng, gen, tmp_path / "ix.snap")
    eng.restart()
    ix = KVIndex.load(tmp_path / "ix.snap")
    assert ix.blocks_of("w")
    with KVEventSubscriber(ix, context=ctx) as sub2:
        sub2.add_worker("w", eng.endpoint, eng.replay_endpoint, start_seq=pos["w"])
        assert eng.wait_for_subscribers(1, 5000)
        for _ in range(3):
            eng.request(next(gen))
            eng.publish()
        pump(sub2, [eng], caught_up(sub2, eng))
        m = sub2.metrics()
        assert m["restarts"] == 1 and m["duplicates"] == 0 and m["batches"] == 3
        assert ix.blocks_of("w") == eng.true_blocks()
    eng.close()


def test_a_bad_endpoint_is_refused_and_the_old_subscription_stays(ctx):
    eng = FakeEngine(ctx, capacity=24)
    with make_sub(ctx) as sub:
        attach(sub, eng)
        n_socks = len(sub._poller.sockets)
        for bad in ("foo://bar", "tcp://127.0.0.1:notaport", "garbage"):
            with pytest.raises(EndpointError):
                sub.add_worker("w", bad)
            with pytest.raises(EndpointError):
                sub.add_worker("w", eng.endpoint, bad)
        with pytest.raises(EndpointError):
            sub.add_worker("x", {1: eng.endpoint}, dp_ranks=(0, 1))
        assert sub.workers() == ["w"] and len(sub._poller.sockets) == n_socks
        eng.request([1, 2, 3, 4])
        eng.publish()
        pump(sub, [eng], caught_up(sub, eng))  # the old subscription still delivers
        assert sub.index.blocks_of("w") == eng.true_blocks()
    eng.close()


@pytest.mark.parametrize("cfg", [{"max_pending": 3}, {"max_pending_bytes": 1}])
def test_an_open_gap_buffers_boundedly_then_resyncs(ctx, cfg):
    """A gap whose replay never comes: past max_pending batches (or max_pending_bytes) the gap
    is given up, the stream resyncs and goes on from the buffered batches."""
    eng = FakeEngine(ctx, capacity=40)
    with make_sub(ctx, **cfg) as sub:
        attach(sub, eng)  # the replay endpoint exists but is never served here
        gen = prompts(random.Random(17), 100)
        eng.request(next(gen))
        eng.publish(drop=True)
        for _ in range(5):
            eng.request(next(gen))
            eng.publish()
        deadline = time.monotonic() + 10
        while not caught_up(sub, eng)():
            assert time.monotonic() < deadline, sub.metrics()
            sub.poll(5)
        m = sub.metrics()
        assert m["replays_failed"] == {"pending_overflow": 1} and m["resyncs"] == {"pending_overflow": 1}
        assert m["workers"]["w"]["pending"] == 0 and m["workers"]["w"]["pending_bytes"] == 0
        assert not m["workers"]["w"]["complete"]
        truth = eng.true_blocks()
        got = sub.index.blocks_of("w")
        assert got and all(truth.get(c) == t for c, t in got.items())
    eng.close()
