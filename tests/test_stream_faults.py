"""Event-stream faults found by fault injection (issue 17), each reproduced over real ZMQ sockets.

* a replay overrun whose first reply is a batch already buffered must not leave that batch in
  the buffer (it made every end of replay send a new request, forever);
* replaying an engine's history from seq 0 over entries the index already holds (a re-added
  worker, a snapshot without usable positions) must not count second physical copies
  (phantom blocks the engine's removals never clear);
* after a replay timeout, a second hole among the buffered batches is requested at once,
  not when the next live batch happens to arrive.

Helpers come from ``test_subscriber`` (same conventions: no sleeps, injected replay clock).
"""
import random
import time

from kvroute.adapters.subscriber import KVEventSubscriber
from kvroute.kvindex import KVIndex

from chaos_soak import over_predicted
from fake_engine import FakeEngine
from test_subscriber import attach, caught_up, ctx, make_sub, prompts, pump  # noqa: F401 (ctx: fixture)


def test_overrun_onto_a_buffered_batch_does_not_loop(ctx):
    """The publisher keeps one batch; the gap's replay starts at a batch already buffered live
    (overrun onto it).  Before the fix that batch stayed buffered below next_seq and every end
    marker sent another replay request."""
    eng = FakeEngine(ctx, capacity=40, replay_buffer=1)
    with make_sub(ctx) as sub:
        attach(sub, eng)
        gen = prompts(random.Random(21), 100)
        eng.request(next(gen))
        eng.publish()
        pump(sub, [eng], caught_up(sub, eng))
        for _ in range(3):
            eng.request(next(gen))
            eng.publish(drop=True)
        eng.request(next(gen))
        eng.publish()  # seq 4: gap 1..3; the buffer only has seq 4
        pump(sub, [eng], caught_up(sub, eng), timeout_s=3)
        for _ in range(20):  # give a looping stream every chance to show itself
            sub.poll(2)
            eng.serve_replay(0)
        m = sub.metrics()
        assert m["replay_requests"] == 1, m
        assert m["replays_failed"] == {"overrun": 1}
        w = m["workers"]["w"]
        assert w["pending"] == 0 and w["pending_bytes"] == 0 and not w["replaying"] and w["next_seq"] == 5
        sub.check_invariants()
        truth = eng.true_blocks()
        assert all(truth.get(c) == t for c, t in sub.index.blocks_of("w").items())
    eng.close()


def follow_some(ctx, eng, ps, path=None):
    """A subscriber follows ``eng`` through ``ps``; with ``path``, its index is saved there (no positions)."""
    sub = make_sub(ctx)
    attach(sub, eng)
    for p in ps:
        eng.request(p)
        eng.publish()
    pump(sub, [eng], caught_up(sub, eng))
    if path is not None:
        with sub.lock:
            sub.index.save(path)
    return sub


def test_readding_a_live_worker_does_not_make_phantom_copies(ctx):
    """add_worker again with the same endpoints: the history replayed from seq 0 lands on the
    entries the index holds.  Before the fix each held block became a second copy, so the
    engine's later removals left it in the index (an over-predicted hit)."""
    eng = FakeEngine(ctx, capacity=16)
    rnd = random.Random(22)
    ps = list(prompts(rnd, 60))
    with follow_some(ctx, eng, ps[:20]) as sub:
        attach(sub, eng)  # re-add, same endpoints
        for p in ps[20:]:  # evicts most of what was held before the re-add
            eng.request(p)
            eng.publish()
        pump(sub, [eng], caught_up(sub, eng))
        m = sub.metrics()
        assert m["block_copies_added"] == 0, m
        assert sub.index.blocks_of("w") == eng.true_blocks()
        assert over_predicted(sub.index, "w", eng.true_blocks(), ps, eng.block_size) == 0
        assert sub.stale_workers() == set()
        sub.index.check_invariants()
    eng.close()


def test_restored_snapshot_without_positions_does_not_make_phantom_copies(ctx, tmp_path):
    """A restored index whose positions are unusable: streams start at 0 and the engine's
    history is replayed over the restored entries; the index must end equal to the engine."""
    eng = FakeEngine(ctx, capacity=16)
    rnd = random.Random(23)
    ps = list(prompts(rnd, 60))
    follow_some(ctx, eng, ps[:20], tmp_path / "ix.snap").close()
    ix = KVIndex.load(tmp_path / "ix.snap")
    with KVEventSubscriber(ix, context=ctx) as sub2:
        sub2.add_worker("w", eng.endpoint, eng.replay_endpoint)  # no start_seq: from 0
        assert eng.wait_for_subscribers(1, 5000)
        for p in ps[20:]:
            eng.request(p)
            eng.publish()
        pump(sub2, [eng], caught_up(sub2, eng))
        m = sub2.metrics()
        assert m["block_copies_added"] == 0, m
        assert ix.blocks_of("w") == eng.true_blocks()
        assert over_predicted(ix, "w", eng.true_blocks(), ps, eng.block_size) == 0
    eng.close()


def test_second_hole_is_requested_without_new_traffic(ctx):
    """Replay endpoint that never answers: after the first timeout the buffered batches up to a
    second hole are applied, and that hole is requested at once (then times out in turn), with
    no live batch arriving meanwhile."""
    eng = FakeEngine(ctx, capacity=40)
    with make_sub(ctx, replay_timeout_s=2.0) as sub:
        attach(sub, eng)
        gen = prompts(random.Random(24), 100)
        eng.request(next(gen))
        eng.publish()
        eng.request(next(gen))
        eng.publish(drop=True)  # hole 1 (seq 1)
        for _ in range(3):
            eng.request(next(gen))
            eng.publish()  # seq 2..4 buffered
        eng.request(next(gen))
        eng.publish(drop=True)  # hole 2 (seq 5)
        for _ in range(3):
            eng.request(next(gen))
            eng.publish()  # seq 6..8 buffered
        deadline = time.monotonic() + 10
        while sub.metrics()["workers"]["w"]["pending"] < 6:
            assert time.monotonic() < deadline, sub.metrics()
            sub.poll(5)
        assert sub.metrics()["replay_requests"] == 1
        sub.fake_clock.t += 2.1
        sub.poll(0)  # hole 1 times out: 2..4 applied, hole 2 must be requested now
        m = sub.metrics()
        assert m["workers"]["w"]["next_seq"] == 5 and m["workers"]["w"]["pending"] == 3
        assert m["replay_requests"] == 2 and m["workers"]["w"]["replaying"], m
        sub.fake_clock.t += 2.1
        sub.poll(0)
        m = sub.metrics()
        assert m["workers"]["w"]["next_seq"] == 9 and m["workers"]["w"]["pending"] == 0
        assert m["replays_failed"] == {"timeout": 2}
        truth = eng.true_blocks()
        assert all(truth.get(c) == t for c, t in sub.index.blocks_of("w").items())
    eng.close()
