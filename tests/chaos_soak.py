"""Chaos soak of the KV-event path: 4 fake vLLM engines, every fault at once, the index checked against the truth.

Faults, drawn at random each step (seeded): dropped batches (replayed), held batches (reordered),
duplicated batches, engine restarts, re-added workers (``add_worker`` with the same endpoints),
router restarts from a snapshot whose positions file is valid, missing, garbage or foreign
(the sidecar's own ``_save_positions`` / ``_load_positions``), replay outages long enough to
time out (injected clock), engines whose replay buffer is short (overruns).

Every ``--check-every`` seconds the soak settles (held batches released, one more batch per
engine so a trailing drop shows as a gap, replays served until every stream is caught up) and
checks, per worker: every index entry is in the engine's true cache with the same tiers (never
a block the engine dropped), no sampled prompt is over-predicted, and the index *equals* the
truth wherever the stream is complete (a lost gap leaves a subset until the engine's cache is
next known empty).  At the end each engine resets its prefix cache once (``AllBlocksCleared``)
and the index must equal every engine's truth.

    python tests/chaos_soak.py --seconds 600      # the 10-minute soak (docs/events.md has its figures)

``tests/test_chaos_soak.py`` runs it for 60 s in CI.  Real ZMQ sockets on loopback; the
subscriber is driven by this loop (``poll``), so nothing sleeps.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from collections import Counter
from typing import Any

import zmq

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fake_engine import FakeEngine  # noqa: E402

from kvroute.adapters.subscriber import KVEventSubscriber, SubscriberConfig  # noqa: E402
from kvroute.kvindex import KVIndex, block_hash_list  # noqa: E402
from kvroute.sidecar.server import _load_positions, _save_positions  # noqa: E402

BS = 4
SUB_COUNTERS = ("batches", "gaps", "gaps_closed", "replay_requests", "restarts", "duplicates", "block_copies_added",
                "replays_failed", "resyncs")


def over_predicted(index: KVIndex, key: Any, truth: dict, prompts: list[list[int]], block_size: int) -> int:
    """Prompts whose cached prefix the index claims longer on ``key`` than the engine's true cache holds."""
    bad = 0
    for p in prompts:
        hs = block_hash_list(p, block_size)
        ov = index.match(hs).get(key)
        depth = 0
        for h in hs:
            if h not in truth:
                break
            depth += 1
        bad += (ov.total if ov is not None else 0) > depth
    return bad


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Soak:
    def __init__(self, seed: int, tmp: str) -> None:
        self.rnd = random.Random(seed)
        self.ctx = zmq.Context()
        self.clock = Clock()
        self.tmp = tmp
        #: engine i: capacity, host tier, replay buffer (two short: overruns), hash mode
        specs = [(48, 0, 10_000, "int"), (40, 12, 10_000, "signed"), (56, 0, 24, "bytes"), (32, 8, 30, "int")]
        self.engines = [FakeEngine(self.ctx, block_size=BS, capacity=c, host_capacity=h, replay_buffer=b, hash_mode=m,
                                   seed=i) for i, (c, h, b, m) in enumerate(specs)]
        self.ids = [f"w{i}" for i in range(len(self.engines))]
        self.outage = [0.0] * len(self.engines)  # fake-clock time until which engine i answers no replay
        self.since_restart = [1] * len(self.engines)
        self.heads = [[self.rnd.randrange(5000) for _ in range(BS * self.rnd.randrange(1, 5))] for _ in range(24)]
        self.sample: list[list[int]] = []
        self.c: Counter = Counter()
        #: subscriber counters summed over the subscribers a snapshot restart closed
        self.totals: Counter = Counter()
        self.sub = self._new_sub(KVIndex(BS))
        for i in range(len(self.engines)):
            self._attach(i)

    # ------------------------------------------------------------------ plumbing
    def _new_sub(self, index: KVIndex) -> KVEventSubscriber:
        return KVEventSubscriber(index, context=self.ctx, clock=self.clock,
                                 config=SubscriberConfig(replay_timeout_s=2.0, max_pending=400))

    def _attach(self, i: int, start_seq: int | None = None, incomplete: tuple[int, ...] = ()) -> None:
        e = self.engines[i]
        self.sub.add_worker(self.ids[i], e.endpoint, e.replay_endpoint, start_seq=start_seq, incomplete=incomplete)
        assert e.wait_for_subscribers(1, 5000), "subscription never reached the engine"

    def _prompt(self) -> list[int]:
        r = self.rnd
        head = r.choice(self.heads)
        tail = [r.randrange(5000) for _ in range(BS * r.randrange(0, 6))]
        p = head + tail + [7] * r.randrange(BS)
        if len(self.sample) < 400:
            self.sample.append(p)
        elif r.random() < 0.05:
            self.sample[r.randrange(len(self.sample))] = p
        return p

    def pump(self, n: int = 1) -> None:
        for _ in range(n):
            self.sub.poll(1)
            for i, e in enumerate(self.engines):
                if self.clock.t >= self.outage[i]:
                    e.serve_replay(0)

    # ------------------------------------------------------------------ faults
    def step(self) -> None:
        r = self.rnd
        i = r.randrange(len(self.engines))
        e = self.engines[i]
        for _ in range(r.randrange(1, 3)):
            e.request(self._prompt())
        x = r.random()
        first = self.since_restart[i] == 0  # never lose a restarted engine's first batch (docs/events.md limit)
        if not first and x < 0.10:
            e.publish(drop=True)
            self.c["dropped"] += 1
        elif not first and x < 0.18 and not e.held:
            e.publish(hold=True)
            self.c["held"] += 1
        elif x < 0.24:
            seq = e.publish()
            e._send(seq, e.buffer[seq])  # the very same batch again
            self.c["duplicated"] += 1
        else:
            e.publish()
            if e.held and r.random() < 0.5:
                e.release_held()
        self.since_restart[i] += 1
        self.c["batches_published"] += 1
        y = r.random()
        if y < 0.004:
            self.settle()
            e.restart()
            self.since_restart[i] = 0
            self.c["engine_restarts"] += 1
        elif y < 0.008:
            self._attach(i)
            self.c["re_adds"] += 1
        elif y < 0.010:
            self.snapshot_restart()
        elif y < 0.014 and self.clock.t >= self.outage[i]:
            self.outage[i] = self.clock.t + 2.5  # longer than replay_timeout_s: a pending replay times out
            self.c["replay_outages"] += 1
        self.clock.t += 0.01
        self.pump(1)

    def snapshot_restart(self) -> None:
        """Stop the router, save index + positions, damage the positions file (or not), restore."""
        self.settle()
        path = os.path.join(self.tmp, "ix.snap")
        with self.sub.lock:
            self.sub.index.save(path)
            pos = [(st["worker"], st["rank"], st["next_seq"], st["complete"])
                   for st in self.sub.metrics()["workers"].values()]
        _save_positions(path, pos)
        self._add_totals()
        kind = self.rnd.choice(["valid", "missing", "garbage", "foreign"])
        if kind == "missing":
            os.remove(path + ".seq")
        elif kind == "garbage":
            with open(path + ".seq", "wb") as f:
                f.write(b"\x00{not json")
        elif kind == "foreign":
            doc = json.load(open(path + ".seq"))
            doc["snapshot"] = "0123456789abcdef"
            doc["streams"] = [[w, r, s + 7, *c] for w, r, s, *c in doc["streams"]]
            with open(path + ".seq", "w") as f:
                json.dump(doc, f)
        self.sub.close()
        for _ in range(self.rnd.randrange(0, 4)):  # published while no router listens
            e = self.rnd.choice(self.engines)
            e.request(self._prompt())
            e.publish()
        self.sub = self._new_sub(KVIndex.load(path))
        gaps: set = set()
        resume = _load_positions(path, gaps)
        for i, wid in enumerate(self.ids):
            self._attach(i, resume.get((wid, 0)), (0,) if (wid, 0) in gaps else ())
        self.c[f"snapshot_restarts_{kind}"] += 1

    def _add_totals(self) -> None:
        m = self.sub.metrics()
        for k in SUB_COUNTERS:
            if isinstance(m[k], dict):
                for r, n in m[k].items():
                    self.totals[f"{k}_{r}"] += n
            else:
                self.totals[k] += m[k]

    # ------------------------------------------------------------------ checks
    def settle(self, timeout_s: float = 30.0) -> None:
        """Release held batches, expose trailing drops, serve replays until every stream is caught up."""
        for i, e in enumerate(self.engines):
            self.outage[i] = 0.0
            e.release_held()
            e.publish()  # an in-order batch after any trailing drop opens its gap
            self.since_restart[i] += 1
        deadline = time.monotonic() + timeout_s
        while not self.caught_up():
            if time.monotonic() > deadline:
                raise AssertionError(f"not caught up: {self.sub.metrics()['workers']}")
            self.pump(1)
            self.clock.t += 0.5  # lets a replay whose answer was lost time out
        self.sub.check_invariants()

    def caught_up(self) -> bool:
        ws = self.sub.metrics()["workers"]
        for wid, e in zip(self.ids, self.engines):
            w = ws.get(wid)
            if w is None or w["next_seq"] != e.seq or w["pending"] or w["replaying"] or w["last_ts"] != e.ts:
                return False
        return True

    def check(self, *, require_exact: bool = False) -> None:
        ix = self.sub.index
        ix.check_invariants()
        ws = self.sub.metrics()["workers"]
        for wid, e in zip(self.ids, self.engines):
            truth = e.true_blocks()
            got = ix.blocks_of(wid)
            extra = {c: t for c, t in got.items() if truth.get(c) != t}
            assert not extra, f"{wid}: {len(extra)} index entries the engine does not hold ({len(got)} vs {len(truth)})"
            complete = ws[wid]["complete"] and not ws[wid]["stale"]
            if complete or require_exact:
                assert got == truth, f"{wid}: complete stream but {len(truth) - len(got)} blocks missing"
                self.c["checks_exact"] += 1
            else:
                self.c["checks_subset"] += 1
            bad = over_predicted(ix, wid, truth, self.sample, BS)
            assert not bad, f"{wid}: {bad} prompts over-predicted"
            self.c["prompts_checked"] += len(self.sample)

    def finish(self) -> None:
        self.settle()
        self.check()
        for e in self.engines:  # the engines' caches become known-empty once: every stream is complete
            e.reset_prefix_cache()
            for _ in range(3):
                e.request(self._prompt())
            e.publish()
        self.settle()
        self.check(require_exact=True)

    def close(self) -> None:
        self.sub.close()
        for e in self.engines:
            e.close()
        self.ctx.destroy(linger=0)


def run(seconds: float, seed: int = 0, check_every_s: float = 5.0) -> dict[str, Any]:
    """Run the soak for ``seconds`` of wall time; returns its figures (raises AssertionError on a wrong index)."""
    t0 = time.monotonic()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as tmp:
        s = Soak(seed, tmp)
        try:
            next_check = t0 + check_every_s
            steps = 0
            while time.monotonic() - t0 < seconds:
                s.step()
                steps += 1
                if time.monotonic() >= next_check:
                    s.settle()
                    s.check()
                    s.c["checkpoints"] += 1
                    next_check = time.monotonic() + check_every_s
            s.finish()
            s._add_totals()
            out: dict[str, Any] = dict(sorted(s.c.items()))
            out.update(steps=steps, seconds=round(time.monotonic() - t0, 1), seed=seed,
                       index_entries=len(s.sub.index), subscriber=dict(sorted(s.totals.items())),
                       max_rss_mib_start=round(rss0 / 1024, 1),
                       max_rss_mib_end=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
            return out
        finally:
            s.close()


def main() -> None:
    ap = argparse.ArgumentParser(description="Chaos soak of the KV-event path (see the module docstring).")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check-every", type=float, default=5.0)
    a = ap.parse_args()
    import logging

    logging.basicConfig(level=logging.ERROR)  # resyncs are expected here; they are counted, not logged
    print(json.dumps(run(a.seconds, a.seed, a.check_every), indent=1))


if __name__ == "__main__":
    main()
