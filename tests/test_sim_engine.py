"""The simulator's bookkeeping: fidelity to vLLM's LRU, conservation, ideal hits, hand-timed runs."""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from kvroute.sim.cost import CostModel
from kvroute.sim.engine import SimConfig, SimConfigError, Simulation, simulate
from kvroute.traces import Request, ideal_hit_ratio, load_trace, reshape
from kvroute.sim.workloads import multi_turn_chat, shared_system_prompt


@pytest.fixture(scope="module")
def conversation():
    return load_trace("conversation")


def _fidelity_config(cap: int) -> SimConfig:
    # vLLM 0.32 replay: 32-token blocks, one request at a time, no host tier, last block recomputed
    return SimConfig(workers=1, routing="kvroute", eviction="lru", gpu_blocks=cap, host_blocks=0,
                     block_tokens=32, serial=True, vllm_last_block=True)


def test_fidelity_lru_first_3000_requests_matches_vllm(conversation):
    reqs = reshape(conversation[:3000], block_tokens=32, max_blocks=56)
    s = simulate(reqs, _fidelity_config(2196))
    assert s.completed == 3000
    assert s.prefix_hit_ratio == pytest.approx(0.0704, abs=5e-5)


def test_fidelity_lru_whole_conversation_trace_matches_vllm(conversation):
    reqs = reshape(conversation, block_tokens=32, max_blocks=56)
    s = simulate(reqs, _fidelity_config(7480))
    # real vLLM 0.32 (CPU build, num_gpu_blocks_override=7481): 0.2077
    assert s.prefix_hit_ratio == pytest.approx(0.2077, abs=2e-4)


def test_one_worker_infinite_cache_reaches_the_ideal_hit_ratio(conversation):
    s = simulate(conversation, SimConfig(workers=1, gpu_blocks=10**7, host_blocks=0, serial=True))
    assert s.prefix_hit_ratio == pytest.approx(ideal_hit_ratio(conversation), abs=1e-12)
    assert s.prefix_hit_ratio == pytest.approx(0.366, abs=5e-4)
    assert s.gpu_hit_ratio == s.prefix_hit_ratio and s.host_hit_ratio == 0.0


def test_infinite_cache_with_real_arrival_times(conversation):
    reqs = conversation[:1500]
    s = simulate(reqs, SimConfig(workers=1, gpu_blocks=10**7, host_blocks=0, rate_scale=0.5))
    assert s.prefix_hit_ratio == pytest.approx(ideal_hit_ratio(reqs), abs=1e-12)


def _check_conservation(sim: Simulation, n: int) -> None:
    rec = sim.rec
    assert np.all(rec.finished_count == 1), "every request finishes exactly once"
    assert not np.isnan(rec.finish).any()
    assert np.all(rec.first_token >= rec.arrival - 1e-12)
    assert np.all(rec.finish >= rec.first_token - 1e-12)
    assert np.all(rec.worker >= 0)
    assert sim.router.in_flight() == 0
    assert not sim._placement and not sim._tickets
    for w in sim.workers:
        assert not w.queue and not w.running and not w.joining
        if w.cache is not None:
            w.cache.check_invariants()
            assert not w.cache._pins, "no block stays pinned"
            # the router's index follows the cache's events exactly
            held = {k: {t.label for t in ts} for k, ts in sim.index.blocks_of(w.wid).items()}
            assert held == {k: {t.label} for k, t in w.cache.blocks().items()}
    sim.index.check_invariants()


@pytest.mark.parametrize("routing", ["kvroute", "dynamo", "sglang", "llmd", "preble", "round_robin",
                                     "least_loaded", "power_of_two"])
def test_conservation_every_routing_policy(conversation, routing):
    reqs = conversation[:400]
    cfg = SimConfig(workers=4, routing=routing, eviction="lru", gpu_blocks=300, host_blocks=600, rate_scale=4.0)
    sim = Simulation(reqs, cfg)
    sim.run()
    _check_conservation(sim, len(reqs))


@pytest.mark.parametrize("eviction", ["lru", "lfu", "lrfu"])
def test_conservation_eviction_policies_and_disaggregation(eviction):
    reqs = multi_turn_chat(60, seed=1)
    for npre in (0, 2):
        cfg = SimConfig(workers=4, eviction=eviction, gpu_blocks=60, host_blocks=120, prefill_workers=npre,
                        rate_scale=8.0)
        sim = Simulation(reqs, cfg)
        sim.run()
        _check_conservation(sim, len(reqs))
        if npre:
            assert set(sim.rec.worker) <= {0, 1} and set(sim.rec.decode_worker) <= {2, 3}


def test_prompt_longer_than_the_gpu_cache_is_dropped_and_counted():
    reqs = [Request(0, 0.0, 512 * 5, 3, (1, 2, 3, 4, 5)), Request(1, 0.1, 512, 3, (9,))]
    sim = Simulation(reqs, SimConfig(workers=1, gpu_blocks=4, host_blocks=0))
    rec = sim.run()
    assert rec.dropped == 1 and rec.finished_count.tolist() == [0, 1]
    assert sim.router.in_flight() == 0


TOY = CostModel(
    name="toy", params=1e9, n_layers=2, d_model=4, kv_bytes_per_token=1000, tp=1, gpu_flops=1e12,
    hbm_bytes_per_s=1e12, hbm_bytes=10e9, gpu_memory_utilization=0.5, prefill_mfu=1.0,
    decode_bw_efficiency=1.0, decode_mfu=1.0, prefill_overhead_s=0.0, decode_overhead_s=0.0,
    pcie_bytes_per_s=1e9, kv_transfer_bytes_per_s=1e8, kv_transfer_latency_s=0.0, host_kv_bytes=1e6,
)


def _toy(**kw) -> SimConfig:
    base = dict(workers=1, gpu_blocks=100, host_blocks=0, block_tokens=4, cost=TOY, report_load=False)
    base.update(kw)
    return SimConfig(**base)


def test_single_request_timeline_by_hand():
    reqs = [Request(0, 0.0, 8, 5, (1, 2))]
    sim = Simulation(reqs, _toy())
    rec = sim.run()
    ttft = TOY.prefill_s(8, 0)
    step = TOY.decode_step_s(1, 9)
    assert rec.first_token[0] == pytest.approx(ttft)
    assert rec.finish[0] == pytest.approx(ttft + 4 * step)


def test_prefix_hit_shortens_the_second_prefill_by_hand():
    reqs = [Request(0, 0.0, 8, 1, (1, 2)), Request(1, 10.0, 12, 1, (1, 2, 3))]
    rec = Simulation(reqs, _toy()).run()
    assert rec.first_token[1] - 10.0 == pytest.approx(TOY.prefill_s(4, 8))
    assert rec.gpu_hit.tolist() == [0, 2]


def test_host_hit_costs_a_reload_by_hand():
    # GPU holds 2 blocks: request 0's blocks are demoted to host when request 1 needs room.
    reqs = [Request(0, 0.0, 8, 1, (1, 2)), Request(1, 1.0, 8, 1, (5, 6)), Request(2, 2.0, 8, 1, (1, 2))]
    rec = Simulation(reqs, _toy(gpu_blocks=2, host_blocks=10)).run()
    assert rec.host_hit[2] == 2 and rec.gpu_hit[2] == 0
    # a fully cached prompt still computes its last token
    assert rec.first_token[2] - 2.0 == pytest.approx(TOY.prefill_s(1, 7) + TOY.reload_s(7))


def test_host_reload_covers_only_the_cached_tail_of_a_partial_last_block():
    # GPU of 2 blocks: request 1 demotes block 2; request 2 (6 tokens: its last block is partial) hits
    # block 1 on the GPU and block 2 on the host, of which only 5 - 4 = 1 cached token is reloaded.
    reqs = [Request(0, 0.0, 8, 1, (1, 2)), Request(1, 1.0, 8, 1, (1, 5)), Request(2, 2.0, 6, 1, (1, 2))]
    rec = Simulation(reqs, _toy(gpu_blocks=2, host_blocks=10)).run()
    assert rec.gpu_hit[2] == 1 and rec.host_hit[2] == 1
    assert rec.first_token[2] - 2.0 == pytest.approx(TOY.prefill_s(1, 5) + TOY.reload_s(1))


def test_arrival_cuts_a_decode_run_at_the_next_step_boundary():
    a = Request(0, 0.0, 8, 101, (1, 2))
    t_a = TOY.prefill_s(8)
    step = TOY.decode_step_s(1, 9)
    arrive_b = t_a + 2.5 * step  # mid third step
    b = Request(1, arrive_b, 4, 1, (7,))
    rec = Simulation([a, b], _toy()).run()
    start_b = t_a + 3 * step
    assert rec.first_token[1] == pytest.approx(start_b + TOY.prefill_s(4))
    # A resumes after B's prefill: 3 steps at batch 1 done, 97 left
    step2 = TOY.decode_step_s(1, 9 + 3)
    assert rec.finish[0] == pytest.approx(rec.first_token[1] + 97 * step2)


def test_disaggregated_timeline_by_hand():
    reqs = [Request(0, 0.0, 8, 3, (1, 2))]
    sim = Simulation(reqs, _toy(workers=2, prefill_workers=1))
    rec = sim.run()
    ttft = TOY.prefill_s(8)
    assert rec.first_token[0] == pytest.approx(ttft)
    assert rec.finish[0] == pytest.approx(ttft + TOY.transfer_s(8) + 2 * TOY.decode_step_s(1, 9))
    assert rec.worker[0] == 0 and rec.decode_worker[0] == 1


def test_rate_scale_compresses_arrivals():
    reqs = shared_system_prompt(50, seed=2)
    r1 = Simulation(reqs, SimConfig(workers=2, gpu_blocks=200, rate_scale=1.0)).run()
    r2 = Simulation(reqs, SimConfig(workers=2, gpu_blocks=200, rate_scale=2.0)).run()
    assert np.allclose(r2.arrival * 2.0, r1.arrival)


def test_summary_fields_are_consistent(conversation):
    s = simulate(conversation[:300], SimConfig(workers=2, gpu_blocks=200, host_blocks=400))
    d = s.to_dict()
    assert d["ttft_p50_s"] <= d["ttft_p90_s"] <= d["ttft_p99_s"]
    assert d["prefix_hit_ratio"] == pytest.approx(d["gpu_hit_ratio"] + d["host_hit_ratio"])
    assert sum(d["per_worker_requests"]) == 300
    assert d["router_us_mean"] > 0 and d["throughput_tok_s"] > 0
    assert not any(isinstance(v, float) and math.isnan(v) for v in d.values())


def test_bad_configs_are_typed_errors():
    with pytest.raises(SimConfigError):
        SimConfig(workers=0).validate()
    with pytest.raises(SimConfigError):
        SimConfig(workers=2, prefill_workers=2).validate()
    with pytest.raises(SimConfigError):
        SimConfig(rate_scale=0).validate()
    with pytest.raises(SimConfigError):
        dataclasses.replace(SimConfig(), gpu_blocks=0).validate()


def test_prompt_waits_for_kv_room_like_vllm():
    # 4 GPU blocks: A holds 3 pinned blocks while it decodes, so B (3 other blocks) waits for A to finish
    a = Request(0, 0.0, 12, 11, (1, 2, 3))
    b = Request(1, 0.0, 12, 1, (7, 8, 9))
    sim = Simulation([a, b], _toy(gpu_blocks=4))
    rec = sim.run()
    assert rec.first_token[0] == pytest.approx(TOY.prefill_s(12))
    assert rec.finish[0] == pytest.approx(rec.first_token[0] + 10 * TOY.decode_step_s(1, 13))
    assert rec.first_token[1] == pytest.approx(rec.finish[0] + TOY.prefill_s(12))
    # with room for both, B is prefilled right after A
    rec2 = Simulation([a, b], _toy(gpu_blocks=6)).run()
    assert rec2.first_token[1] == pytest.approx(2 * TOY.prefill_s(12))


def test_shared_prefix_in_use_needs_no_extra_room():
    # B shares A's two pinned blocks: it needs one new block and fits beside A in 4 blocks
    a = Request(0, 0.0, 12, 11, (1, 2, 3))
    b = Request(1, 0.0, 12, 1, (1, 2, 9))
    rec = Simulation([a, b], _toy(gpu_blocks=4)).run()
    assert rec.first_token[1] == pytest.approx(TOY.prefill_s(12) + TOY.prefill_s(4, 8))
    assert rec.gpu_hit.tolist() == [0, 2]


def test_events_reach_the_router_when_the_prefill_step_ends_plus_lag():
    p = TOY.prefill_s(8)
    lag = 0.5
    reqs = [
        Request(0, 0.0, 8, 1, (1, 2)),
        Request(1, p / 2, 8, 1, (1, 2)),  # during A's prefill: no event yet
        Request(2, p + lag / 2, 8, 1, (1, 2)),  # A's events still in flight
        Request(3, p + 2 * lag, 8, 1, (1, 2)),  # delivered
    ]
    rec = Simulation(reqs, _toy(routing="dynamo", event_lag_s=lag)).run()  # dynamo ignores speculative prefixes
    assert rec.predicted_cached.tolist() == [0, 0, 0, 8]
    rec0 = Simulation(reqs, _toy(routing="dynamo")).run()
    assert rec0.predicted_cached.tolist() == [0, 0, 8, 8]
    # the cache itself served B from A's blocks all along
    assert rec0.gpu_hit.tolist() == [0, 2, 2, 2]


def test_chunked_prefill_timeline_by_hand():
    # budget 5 tokens a step; A alone: chunks of 5 and 3, then 3 decode steps
    a = Request(0, 0.0, 8, 4, (1, 2))
    rec = Simulation([a], _toy(chunked_prefill_tokens=5)).run()
    first = TOY.step_s(5, 0, 0, 0) + TOY.step_s(3, 5, 0, 0)
    assert rec.first_token[0] == pytest.approx(first)
    assert rec.finish[0] == pytest.approx(first + 3 * TOY.decode_step_s(1, 9))


def test_chunked_prefill_shares_steps_with_decode_by_hand():
    a = Request(0, 0.0, 4, 100, (1,))
    t_a = TOY.step_s(4, 0, 0, 0)
    d1 = TOY.decode_step_s(1, 5)
    b = Request(1, t_a + 2.5 * d1, 8, 1, (5, 6))
    rec = Simulation([a, b], _toy(chunked_prefill_tokens=5)).run()
    assert rec.first_token[0] == pytest.approx(t_a)
    start_b = t_a + 3 * d1  # A decoded 3 tokens: 96 left, 8 in context
    first_b = start_b + TOY.step_s(4, 0, 1, 8) + TOY.step_s(4, 4, 1, 9)  # A decodes in both steps
    assert rec.first_token[1] == pytest.approx(first_b)
    assert rec.finish[0] == pytest.approx(first_b + 94 * TOY.decode_step_s(1, 10))


def test_conservation_with_chunked_prefill(conversation):
    reqs = conversation[:300]
    sim = Simulation(reqs, SimConfig(workers=3, gpu_blocks=300, host_blocks=200, rate_scale=6.0,
                                     chunked_prefill_tokens=2048))
    sim.run()
    _check_conservation(sim, len(reqs))
    assert all(w.chunk_req == -1 for w in sim.workers)


def test_belady_runs_on_one_worker_only_and_bounds_lru(conversation):
    reqs = reshape(conversation[:3000], block_tokens=32, max_blocks=56)
    lru = simulate(reqs, _fidelity_config(2196))
    opt = simulate(reqs, dataclasses.replace(_fidelity_config(2196), eviction="belady"))
    assert opt.prefix_hit_ratio > lru.prefix_hit_ratio
    with pytest.raises(SimConfigError, match="oracle"):
        SimConfig(workers=2, eviction="belady").validate()


def test_belady_future_skips_prompts_dropped_as_too_long(conversation):
    # prompts longer than the GPU are dropped before they reach the cache; the oracle's future must
    # leave them out, or its request count drifts from the requests it sees (it fell to LRU's hits here)
    from kvroute.eviction.replay import Request as BlockRequest, replay

    reqs, cap = conversation[:400], 40
    rec = Simulation(reqs, SimConfig(workers=1, eviction="belady", gpu_blocks=cap, host_blocks=0, serial=True,
                                      gpu_admission=True)).run()  # as the offline replay
    kept = [BlockRequest(r.arrival_s, r.hash_ids) for r in reqs if len(r.hash_ids) <= cap]
    assert rec.dropped == len(reqs) - len(kept) > 0
    assert int(rec.gpu_hit.sum()) == replay(kept, cap, "belady")["stats"]["gpu_hits"]


def test_blocks_the_cache_refuses_still_hold_kv_while_the_request_runs(monkeypatch):
    from kvroute import eviction
    from kvroute.eviction.policies.lru import LRU

    class RefuseAll(LRU):
        name = "refuse_all"

        def admit(self, key, depth, now):
            return False

    monkeypatch.setitem(eviction.POLICIES, "refuse_all", RefuseAll)
    a = Request(0, 0.0, 12, 11, (1, 2, 3))
    b = Request(1, 0.0, 12, 1, (7, 8, 9))
    sim = Simulation([a, b], _toy(gpu_blocks=4, eviction="refuse_all", gpu_admission=True))
    rec = sim.run()
    assert len(sim.workers[0].cache) == 0  # nothing was cached ...
    assert rec.first_token[1] == pytest.approx(rec.finish[0] + TOY.prefill_s(12))  # ... yet B waited for A's KV
    assert sim.workers[0].private == 0
    engine = Simulation([a, b], _toy(gpu_blocks=4, eviction="refuse_all"))  # default: the GPU pool cannot refuse
    engine.run()
    assert len(engine.workers[0].cache) > 0


def test_disaggregated_load_balance_is_measured_over_the_prefill_pool():
    reqs = shared_system_prompt(80, seed=4)
    s = simulate(reqs, SimConfig(workers=4, prefill_workers=2, routing="round_robin", gpu_blocks=200))
    assert len(s.per_worker_requests) == 2 and sum(s.per_worker_requests) == 80
    assert s.load_max_over_mean == pytest.approx(1.0)


def test_decode_worker_admits_transferred_requests_while_its_kv_has_room():
    a = Request(0, 0.0, 12, 31, (1, 2, 3))
    b = Request(1, 0.0, 12, 3, (7, 8, 9))
    rec = Simulation([a, b], _toy(workers=2, prefill_workers=1, gpu_blocks=4)).run()
    d = TOY.decode_step_s(1, 13)
    p, tr = TOY.prefill_s(12), TOY.transfer_s(12)
    # (B's arrival cuts A's decode run; the restarted run prices the grown context: a 1e-5 effect)
    assert rec.finish[0] == pytest.approx(p + tr + 30 * d, rel=1e-4)
    assert rec.first_token[1] + tr < rec.finish[0]  # B's KV arrives while A still decodes
    # B's prefill waited for A's blocks to leave the prefill worker, B's decode for A's KV to leave the decode worker
    assert rec.first_token[1] == pytest.approx(p + tr + p)
    assert rec.finish[1] == pytest.approx(rec.finish[0] + 2 * d)
    rec2 = Simulation([a, b], _toy(workers=2, prefill_workers=1, gpu_blocks=8)).run()
    assert rec2.finish[1] < rec2.finish[0]


def test_periodic_load_reports_reach_the_router_only_at_scrapes():
    """``load_report_period_s``: the router sees each worker's waiting/running as of the last scrape."""
    cfg = _toy(routing="least_loaded", load_report_period_s=1.0, workers=2, report_load=True)
    reqs = [Request(i, 0.1 * i, 8, 50, (i + 1, i + 100)) for i in range(3)]
    sim = Simulation(reqs, cfg)
    seen = []
    orig = sim.router.update_load

    def spy(w, **kw):
        seen.append((sim.now, w, kw))
        return orig(w, **kw)

    sim.router.update_load = spy  # type: ignore[method-assign]
    rec = sim.run()
    assert seen and all(abs(t - round(t)) < 1e-9 for t, _, _ in seen)  # whole seconds only
    assert {w for t, w, _ in seen if t == seen[0][0]} == {"w0", "w1"}  # every worker at each scrape
    assert (rec.finished_count == 1).all()
    last = max(t for t, _, _ in seen)
    assert last <= np.nanmax(rec.finish) + 1.0  # scrapes stop once every request finished
    with pytest.raises(SimConfigError):
        Simulation(reqs, _toy(load_report_period_s=-1.0))
    # period 0 (default): a report after each state change, not on whole seconds
    seen.clear()
    sim0 = Simulation(reqs, _toy(routing="least_loaded", workers=2, report_load=True))
    sim0.router.update_load = lambda w, **kw: seen.append((sim0.now, w, kw))  # type: ignore[method-assign]
    sim0.run()
    assert any(abs(t - round(t)) > 1e-6 for t, _, _ in seen)
