"""kvroute against a real vLLM engine (CPU build 0.32, tiny random Llama).

The engine runs in its own process under the interop venv (see ``conftest.py``);
this process subscribes to its ZMQ KV events with
:class:`kvroute.adapters.subscriber.KVEventSubscriber` into a
:class:`kvroute.kvindex.KVIndex`, exactly as a router does.  Before every
request the test predicts the engine's prefix hit from the index and compares
it with the ``num_cached_tokens`` vLLM reports for that request.

Prediction rule (vLLM's scheduler, brief section 2): the engine computes at
least the prompt's last token and caches only full blocks, so a prompt of
``n`` tokens whose first ``k`` blocks are cached reports
``min(k, (n - 1) // block_size) * block_size`` cached tokens.

No sleeps: after each request the driver reports the seq of the last batch the
engine published, and the test polls the subscriber until it has applied that
many batches (it replays from the engine's buffer if the live stream lost one).
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from engine_process import BS, NUM_GPU_BLOCKS, VOCAB, Follower, free_port, predicted_cached, start_and_sync

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(600)]

def test_predicted_cached_tokens_match_vllm(start_engine) -> None:
    rng = random.Random(20261126)

    def toks(n: int) -> list[int]:
        return [rng.choice(VOCAB) for _ in range(n)]

    systems = {"A": toks(4 * BS), "B": toks(3 * BS), "C": toks(6 * BS), "D": toks(2 * BS)}
    A = systems["A"]
    port, replay = free_port(), free_port()
    f = Follower("engine-0")
    try:
        eng = start_engine(port=port, replay_port=replay, num_gpu_blocks=NUM_GPU_BLOCKS)
        f.follow(eng)  # connect before the engine binds: zmq reconnects until it is up
        start_and_sync(f, eng, rng)

        # -- directed cases, small enough that nothing is evicted yet (hand-computed values)
        qa, qb = toks(50), toks(45)
        directed = [
            ("A+qa", A + qa, 0),
            ("A+qb", A + qb, 4 * BS),           # the shared 4-block prefix
            ("A+qa again", A + qa, 5 * BS),     # 178 tokens: 5 full blocks, all cached
            ("A+64", A + toks(64), 4 * BS),
        ]
        directed.append(("A+64 again (fully cached)", directed[-1][1], 5 * BS))  # one block less
        x74 = toks(74)
        directed += [("74 tokens", x74, 0), ("74 tokens again", x74, 2 * BS)]  # partial block never cached
        for tag, prompt, want in directed:
            rec = f.request(eng, prompt, tag)
            assert (rec["reported"], rec["predicted"]) == (want, want), (rec, f.log)

        # -- cache salt: vLLM hashes the salt into block 0; kvroute's index must agree
        salted = [("A+qa salted t1", A + qa, "tenant-1"), ("A+qa salted t1 again", A + qa, "tenant-1"),
                  ("A+qa salted t2", A + qa, "tenant-2")]
        got = [f.request(eng, p, tag, cache_salt=salt) for tag, p, salt in salted]
        assert got[0]["reported"] == 0 and got[1]["reported"] > 0 and got[2]["reported"] == 0, got

        # -- mixed shared-prefix workload that keeps evicting (23 usable blocks)
        seen: list[list[int]] = [p for _, p, _ in directed]
        shortfalls = 0  # requests vLLM served with fewer cached tokens than an unbounded cache would
        for i in range(48):
            if seen and rng.random() < 0.25:
                prompt = rng.choice(seen)
            else:
                sysname = rng.choice([*systems, None])
                prompt = (systems[sysname] if sysname else []) + toks(rng.randint(10, 150))
            bound = max((_lcp_blocks(prompt, p) for p in seen), default=0)
            bound = min(bound, (len(prompt) - 1) // BS) * BS
            rec = f.request(eng, prompt, f"mix{i}")
            shortfalls += rec["reported"] < bound
            seen.append(prompt)
        evicted = f.sub.metrics()["blocks_removed"]
        assert evicted > 0, "the small GPU cache never evicted: the test lost its point"
        assert shortfalls > 0, "no request lost a prefix to eviction"

        # -- prefix-cache reset: AllBlocksCleared reaches the index with the next step
        assert eng.reset_prefix_cache()["reset"] is True
        f.request(eng, toks(40), "probe after reset")
        rec = f.request(eng, A + qa, "A+qa after reset")
        assert rec["reported"] == 0, rec
        f.request(eng, A + qb, "A+qb after reset")  # A is cached again before the restart

        # -- engine restart on the same ports: seq starts again at 0, the subscriber must clear
        before_restart = predicted_cached(f.index, f.worker, A + qb)
        assert before_restart == 4 * BS + BS  # stale on purpose: the index cannot know yet
        eng.stop()
        f.new_lifetime()
        eng2 = start_engine(port=port, replay_port=replay, num_gpu_blocks=NUM_GPU_BLOCKS)
        start_and_sync(f, eng2, rng)
        assert f.sub.metrics()["restarts"] == 1
        rec = f.request(eng2, A + qb, "A+qb after restart")
        assert rec["reported"] == 0, rec
        for tag, prompt in [("A+qa after restart", A + qa), ("A+qb again after restart", A + qb),
                            ("C+q after restart", systems["C"] + toks(33))]:
            f.request(eng2, prompt, tag)

        bad = [r for r in f.log if r["predicted"] != r["reported"] or not (r["synced"] or r.get("probe"))]
        assert not bad, f"{len(bad)} of {len(f.log)} requests mispredicted or unsynced: {bad}\nall: {f.log}"
        m = f.sub.metrics()
        assert m["orphans"] == 0 and not m["decode_errors"] and not m["resyncs"], m
        hits = sum(r["reported"] > 0 for r in f.log)
        assert hits >= 10, f.log
    finally:
        f.close()


def _lcp_blocks(a: list[int], b: list[int]) -> int:
    """Full blocks two prompts share from the start."""
    n = 0
    while (n + 1) * BS <= min(len(a), len(b)) and a[n * BS:(n + 1) * BS] == b[n * BS:(n + 1) * BS]:
        n += 1
    return n


def test_router_across_two_engines(start_engine) -> None:
    """kvroute's Router over two real engines: every decision's predicted cached tokens
    equal what the chosen engine reports, and prompts follow their cached prefix."""
    from kvroute.router import Router

    rng = random.Random(42)

    def toks(n: int) -> list[int]:
        return [rng.choice(VOCAB) for _ in range(n)]

    names = ("engine-a", "engine-b")
    # both engines load at once (two processes); the waits below overlap their start-up
    # engine-b names blocks by raw 32-byte hashes in its events (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0)
    envs = {"engine-a": {}, "engine-b": {"VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES": "0"}}
    engines = {n: start_engine(port=free_port(), replay_port=free_port(), num_gpu_blocks=NUM_GPU_BLOCKS,
                               extra_env=envs[n]) for n in names}
    f = Follower(*names)
    try:
        for n, eng in engines.items():
            f.follow(eng, n)
        for n, eng in engines.items():
            start_and_sync(f, eng, rng, n)
        now = [0.0]
        router = Router(names, block_size=BS, index=f.index, clock=lambda: now[0], lock=f.sub.lock)
        systems = [toks(rng.randint(2, 4) * BS) for _ in range(6)]
        home: dict[int, str] = {}
        for i in range(36):
            k = rng.randrange(len(systems))
            prompt = systems[k] + toks(rng.randint(5, 60))
            with f.sub.lock:
                best = max((ov.total for ov in f.index.match_tokens(prompt, BS).values()), default=0)
            d = router.route(prompt, request_id=i)
            pred = min(d.predicted_cached_tokens, (len(prompt) - 1) // BS * BS)
            rec = f.request(engines[d.worker], prompt, f"r{i}", worker=d.worker, predicted=pred)
            router.finish(i)
            now[0] += 10.0  # past the speculative-prefix TTL: from now on the engine's events speak
            rec.update(system=k, best=min(best, (len(prompt) - 1) // BS) * BS, first=k not in home)
            home.setdefault(k, d.worker)

        bad = [r for r in f.log if r["predicted"] != r["reported"] or not (r["synced"] or r.get("probe"))]
        assert not bad, f"{len(bad)} of {len(f.log)} mispredicted or unsynced: {bad}\nall: {f.log}"
        for n, eng in engines.items():  # the index knows each engine's blocks by its own kind of hash
            cached = eng.cached_hashes()
            assert {type(h) for h in cached} == ({bytes} if n == "engine-b" else {int}), n
            with f.sub.lock:
                known = sum(f.index.content_hash_of(n, h) is not None for h in cached)
                held = len(f.index.blocks_of(n))
            assert known == held and held >= len(cached) - 1, (n, known, held, len(cached))
        routed = [r for r in f.log if "system" in r]
        # an idle fleet: the router takes the longest cached prefix whenever one exists
        missed = [r for r in routed if r["reported"] < r["best"]]
        assert not missed, missed
        assert sum(r["reported"] > 0 for r in routed) >= len(routed) - len(systems) - 4, routed
        # cold prompts are spread, not all sent to the first worker
        assert {home[k] for k in home} == set(names), home
    finally:
        f.close()
