"""``kvroute sim --router-replicas K --replica-sync none|shared``: the JSON contract, what sync recovers,
and approximate mode's prediction accuracy against the simulator's truth (small workloads)."""
from __future__ import annotations

import dataclasses
import json

import pytest
from click.testing import CliRunner

from kvroute.cli import main
from kvroute.sim.engine import SimConfig, SimConfigError, Simulation, simulate
from kvroute.traces import load_trace


def sim_json(*extra: str) -> list[dict]:
    res = CliRunner().invoke(main, ["sim", "--trace", "conversation", "--limit", "400", "--workers", "4",
                                    "--routing", "kvroute", "--json", "--no-progress", "--rate-scale", "3", *extra],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)["results"]


def test_json_rows_same_as_plain_sim():
    plain = sim_json()
    for mode in ("shared", "none"):
        rows = sim_json("--router-replicas", "3", "--replica-sync", mode, "--sync-delay", "0.001")
        assert list(rows[0]) == list(plain[0])  # same fields, same order
        assert rows[0]["completed"] == 400
        assert rows[0]["extra"]["router_replicas"] == 3 and rows[0]["extra"]["replica_sync"] == mode


@pytest.fixture(scope="module")
def reqs():
    return load_trace("conversation", limit=600)


def test_shared_sync_without_delay_matches_one_router(reqs):
    """With no delay, synced replicas see every decision: the same load and prefixes as one router
    (only tie-breaking streams differ), so TTFT stays close; unsynced replicas lose it."""
    cfg = SimConfig(workers=4, rate_scale=3.0)
    one = simulate(reqs, cfg)
    shared = simulate(reqs, dataclasses.replace(cfg, router_replicas=4))
    none = simulate(reqs, dataclasses.replace(cfg, router_replicas=4, replica_sync="none"))
    assert shared.ttft_mean_s == pytest.approx(one.ttft_mean_s, rel=0.05)
    assert none.ttft_mean_s > shared.ttft_mean_s
    assert shared.extra["sync_batches"] > 2 * len(reqs)  # a route, a prefill_done and a finish each


def test_replicas_agree_on_load_mid_run(reqs):
    """Stop the simulation half way: every synced replica's per-worker load equals the sum of the
    replicas' own (local) requests."""
    cfg = SimConfig(workers=4, rate_scale=3.0, router_replicas=3, sync_delay_s=0.0)
    sim = Simulation(reqs[:300], cfg)
    sim.run()
    # all finished: nothing in flight anywhere, no remote flight left behind
    for r in sim.routers:
        st = r.stats()
        assert st["in_flight"] == 0 and st["remote_in_flight"] == 0
        assert all(w["active_requests"] == 0 and w["decode_blocks"] == 0 and w["prefill_tokens"] == 0
                   for w in st["workers"])


def test_approximate_mode_prediction_accuracy(reqs):
    cfg = SimConfig(workers=4, rate_scale=1.0)
    exact = simulate(reqs, cfg).extra["prediction"]
    approx = simulate(reqs, dataclasses.replace(cfg, approximate=True)).extra["prediction"]
    assert exact["exact"] > 0.95
    # predicted from decisions alone: close, with errors in both directions, and never absurd
    assert 0.5 < approx["exact"] <= 1.0
    assert approx["predicted_blocks"] > 0.5 * approx["hit_blocks"]


def test_bad_replica_settings():
    for bad in ({"router_replicas": 0}, {"replica_sync": "gossip"}, {"sync_delay_s": -1.0}, {"approx_ttl_s": 0.0}):
        with pytest.raises(SimConfigError):
            dataclasses.replace(SimConfig(), **bad).validate()


def test_prediction_accuracy_follows_the_vllm_last_block_rule():
    """With ``vllm_last_block`` a fully cached prompt hits one block less; the router's prediction is
    compared with the same cap (as the proxy compares it with vLLM's report), so a repeated prompt
    predicted in full is exact, not over by one block."""
    from kvroute.traces import Request

    reqs = [Request(i, 10.0 * i, 4 * 512, 2, (1, 2, 3, 4)) for i in range(6)]
    for last in (False, True):
        p = simulate(reqs, SimConfig(workers=2, vllm_last_block=last)).extra["prediction"]
        assert p["exact"] == 1.0 and p["over"] == 0.0, (last, p)
