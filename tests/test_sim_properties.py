"""Property test of the simulator's bookkeeping over random small workloads and cluster shapes."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvroute.router import POLICIES as ROUTING
from kvroute.sim.engine import SimConfig, Simulation
from kvroute.sim.workloads import GENERATORS

EVICTION = ["lru", "lfu", "lrfu", "arc"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    gen=st.sampled_from(sorted(GENERATORS)),
    seed=st.integers(0, 10**6),
    workers=st.integers(1, 4),
    disagg=st.booleans(),
    routing=st.sampled_from(sorted(ROUTING)),
    eviction=st.sampled_from(EVICTION),
    gpu_blocks=st.integers(40, 200),
    host_blocks=st.sampled_from([0, 50, 400]),
    rate_scale=st.sampled_from([0.5, 2.0, 8.0]),
    chunked=st.sampled_from([0, 512, 4096]),
    lag=st.sampled_from([0.0, 0.2]),
    vllm_last_block=st.booleans(),
)
def test_every_request_finishes_once_and_the_index_follows_the_caches(
    gen, seed, workers, disagg, routing, eviction, gpu_blocks, host_blocks, rate_scale, chunked, lag, vllm_last_block
):
    kw = {"shared_system_prompt": {"n_requests": 60}, "multi_turn_chat": {"n_sessions": 15},
          "agent_sessions": {"n_sessions": 6}, "rag_documents": {"n_requests": 40, "n_docs": 20},
          "sibling_bursts": {"n_bursts": 6}, "long_single_shot": {"n_requests": 20},
          "mix": {"n_requests": 60}}[gen]
    reqs = GENERATORS[gen](seed=seed, **kw)
    npre = workers // 2 if (disagg and workers > 1) else 0
    cfg = SimConfig(workers=workers, prefill_workers=npre, routing=routing, eviction=eviction,
                    gpu_blocks=gpu_blocks, host_blocks=host_blocks, rate_scale=rate_scale,
                    chunked_prefill_tokens=chunked, event_lag_s=lag, vllm_last_block=vllm_last_block, seed=seed)
    sim = Simulation(reqs, cfg)
    rec = sim.run()
    big = np.array([len(r.hash_ids) > gpu_blocks for r in reqs])
    assert np.all(rec.finished_count[~big] == 1) and np.all(rec.finished_count[big] == 0)
    assert rec.dropped == int(big.sum())
    done = rec.finished_count == 1
    assert np.all(rec.first_token[done] >= rec.arrival[done] - 1e-12)
    assert np.all(rec.finish[done] >= rec.first_token[done] - 1e-12)
    assert np.all(rec.gpu_hit + rec.host_hit <= rec.blocks)
    assert sim.router.in_flight() == 0 and not sim._tickets and not sim._placement
    for w in sim.workers:
        assert not w.queue and not w.running and not w.joining and w.chunk_req == -1
        assert w.kv_blocks == 0 and w.private == 0 and not w.pins
        if w.cache is not None:
            w.cache.check_invariants()
            held = {k: {t.label for t in ts} for k, ts in sim.index.blocks_of(w.wid).items()}
            assert held == {k: {t.label} for k, t in w.cache.blocks().items()}
        else:
            assert sim.index.blocks_of(w.wid) == {}
    sim.index.check_invariants()
