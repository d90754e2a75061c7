"""``kvroute sim`` and ``kvroute tune`` from the command line (click's runner, small workloads)."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from kvroute.cli import main
from kvroute.router import POLICIES as ROUTING

JSON_KEYS = {"routing", "eviction", "ttft_mean_s", "ttft_p50_s", "ttft_p99_s", "throughput_tok_s",
             "prefix_hit_ratio", "gpu_hit_ratio", "host_hit_ratio"}


def _run(args):
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    return res


def test_sim_json_contract_and_all_routing_policies():
    res = _run(["sim", "--trace", "conversation", "--limit", "200", "--workers", "4", "--routing", "all",
                "--eviction", "lru", "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert list(doc) == ["results"]
    rows = doc["results"]
    assert [r["routing"] for r in rows] == list(ROUTING)
    for r in rows:
        assert JSON_KEYS <= set(r)
        assert r["eviction"] == "lru"
        assert 0.0 <= r["prefix_hit_ratio"] <= 1.0
        assert r["prefix_hit_ratio"] == pytest.approx(r["gpu_hit_ratio"] + r["host_hit_ratio"])
        assert r["completed"] == 200


def test_sim_gpu_admission_is_off_unless_asked():
    """The simulated GPU tier takes every block, as an engine's pool does; --gpu-admission lets the
    policy refuse (adaptive's admission then changes the outcome)."""
    from kvroute.sim.engine import SimConfig, SimConfigError

    assert SimConfig().gpu_admission is False
    with pytest.raises(SimConfigError):
        SimConfig(gpu_admission="no").validate()
    args = ["sim", "--trace", "conversation", "--limit", "1500", "--workers", "2", "--routing", "kvroute",
            "--eviction", "adaptive", "--gpu-blocks", "300", "--host-blocks", "0", "--json", "--no-progress"]
    off, on = (json.loads(_run(a).stdout)["results"][0] for a in (args, args + ["--gpu-admission"]))
    assert off["gpu_hit_ratio"] != on["gpu_hit_ratio"]
    assert off["extra"]["cache_stats"]["refused"] == 0 < on["extra"]["cache_stats"]["refused"]
    assert "eviction_leaders" not in off["extra"]  # one tier: no duel


def test_sim_reports_cache_counters_and_the_duel_leaders():
    res = _run(["sim", "--trace", "conversation", "--limit", "200", "--workers", "2", "--routing", "kvroute",
                "--eviction", "adaptive,lru", "--json", "--no-progress"])
    ad, lru = json.loads(res.stdout)["results"]
    for r in (ad, lru):
        st = r["extra"]["cache_stats"]
        assert st["requests"] == 200 and st["gpu_hits"] + st["host_hits"] <= st["blocks"]
        assert (st["gpu_hits"] + st["host_hits"]) / st["blocks"] == pytest.approx(r["prefix_hit_ratio"], abs=0.02)
    assert sum(ad["extra"]["eviction_leaders"].values()) == 2 and "eviction_leaders" not in lru["extra"]


def test_sim_table_csv_json_and_plots(tmp_path):
    out = tmp_path / "out"
    res = _run(["sim", "--trace", "gen:shared_system_prompt:n_requests=150", "--workers", "3",
                "--routing", "kvroute,round_robin", "--eviction", "lru,lfu", "--gpu-blocks", "40",
                "--host-blocks", "40", "--rate-scale", "2", "--out", str(out), "--sweep", "0.5,1",
                "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "kvroute" in res.stdout and "round_robin" in res.stdout and "ttft_mean" in res.stdout
    lines = (out / "results.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 and lines[0].startswith("routing,eviction,")
    doc = json.loads((out / "results.json").read_text())
    assert len(doc["results"]) == 4 and doc["meta"]["workers"] == 3
    assert set(doc["hit_vs_capacity"]) == {"kvroute/lru", "kvroute/lfu"}
    assert [x[0] for x in doc["hit_vs_capacity"]["kvroute/lru"]] == [20, 40]
    pytest.importorskip("matplotlib")
    for png in ("ttft_cdf.png", "hit_vs_capacity.png", "load_balance.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_sim_disaggregated_and_preset_and_cost_override():
    res = _run(["sim", "--limit", "100", "--workers", "4", "--prefill-workers", "2", "--routing", "kvroute",
                "--eviction", "lru", "--preset", "llama-3.1-70b-h200", "--cost", "prefill_mfu=0.4", "--json",
                "--no-progress"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)["results"]
    assert row["extra"]["preset"] == "llama-3.1-70b-h200" and row["extra"]["prefill_workers"] == 2


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--routing", "nope"], "unknown routing policy"),
        (["--eviction", "nope"], "unknown eviction policy"),
        (["--trace", "/no/such/file.jsonl"], "no such trace"),
        (["--preset", "gpt-9"], "unknown preset"),
        (["--cost", "bogus=1"], "unknown cost constant"),
        (["--workers", "0"], "at least one worker"),
        (["--block-tokens", "0"], "block_tokens"),
        (["--cost", "n_layers=inf"], "finite"),
        (["--cost", "prefill_mfu=nan"], "finite"),
        (["--limit", "-1"], "--limit"),
        (["--max-blocks", "-1"], "--max-blocks"),
        (["--out", "OUT", "--sweep", "nan"], "--sweep"),
        (["--rate-scale", "nan"], "rate_scale"),
        (["--event-lag", "nan"], "event_lag_s"),
    ],
)
def test_sim_bad_input_is_a_clean_error(args, fragment, tmp_path):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    res = _run(["sim", "--limit", "10", "--no-progress", "--eviction", "lru"] + args)
    assert res.exit_code != 0
    assert fragment in res.output


def test_bad_trace_line_reports_its_number(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}\n{"oops"\n')
    res = _run(["sim", "--trace", str(p), "--eviction", "lru", "--no-progress"])
    assert res.exit_code != 0 and ":2:" in res.output


def test_tune_writes_a_config_that_sim_loads(tmp_path):
    cfg = tmp_path / "best.json"
    res = _run(["tune", "--trace", "conversation", "--limit", "150", "--workers", "2", "--policy", "dynamo",
                "--budget", "4", "--gpu-blocks", "60", "--host-blocks", "0", "--rate-scale", "3",
                "-o", str(cfg), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(cfg.read_text())
    assert doc["kind"] == "routing" and doc["policy"] == "dynamo"
    assert set(doc["params"]) >= {"prefill_load_scale", "host_credit"}
    assert len(doc["evaluations"]) == 4
    assert doc["score"] <= doc["default_score"]
    assert doc["score"] == min(v for _, v in doc["evaluations"])
    res = _run(["sim", "--limit", "150", "--workers", "2", "--routing", "dynamo", "--eviction", "lru",
                "--gpu-blocks", "60", "--host-blocks", "0", "--rate-scale", "3", "--config", str(cfg),
                "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)["results"]
    assert row["ttft_mean_s"] == pytest.approx(doc["score"])


def test_tune_eviction_policy_and_errors(tmp_path):
    cfg = tmp_path / "lrfu.json"
    res = _run(["tune", "--limit", "100", "--workers", "2", "--policy", "lrfu", "--budget", "3",
                "--gpu-blocks", "40", "--host-blocks", "0", "--objective", "prefix_hit_ratio", "-o", str(cfg)])
    assert res.exit_code == 0, res.output
    doc = json.loads(cfg.read_text())
    assert doc["kind"] == "eviction" and "lam" in doc["params"]
    assert doc["score"] >= doc["default_score"]
    bad = _run(["tune", "--limit", "10", "--policy", "nope", "-o", str(tmp_path / "x.json")])
    assert bad.exit_code != 0 and "unknown policy" in bad.output
    bad = _run(["tune", "--limit", "10", "--policy", "dynamo", "--objective", "nope", "-o", str(tmp_path / "x.json")])
    assert bad.exit_code != 0 and "unknown objective" in bad.output
    (tmp_path / "junk.json").write_text("[1]")
    bad = _run(["sim", "--limit", "10", "--eviction", "lru", "--config", str(tmp_path / "junk.json"), "--no-progress"])
    assert bad.exit_code != 0 and "not a kvroute tune configuration" in bad.output
    for objective in ("extra", "per_worker_requests"):  # Summary fields that are not numbers
        bad = _run(["tune", "--limit", "10", "--workers", "1", "--policy", "dynamo", "--objective", objective,
                    "--budget", "1", "-o", str(tmp_path / "x.json")])
        assert bad.exit_code != 0 and "unknown objective" in bad.output
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe{")
    bad = _run(["sim", "--limit", "10", "--eviction", "lru", "--config", str(tmp_path / "binary.json"), "--no-progress"])
    assert bad.exit_code != 0 and "cannot read configuration" in bad.output


@pytest.mark.parametrize("doc, fragment", [
    ({"kind": "eviction", "policy": "lru", "params": {"bogus": 1}}, "eviction 'lru'"),
    ({"kind": "eviction", "policy": "lrfu", "params": {"lam": "x"}}, "eviction 'lrfu'"),
    ({"kind": "routing", "policy": "kvroute", "params": {"bogus": 1}}, "routing 'kvroute'"),
])
def test_config_with_parameters_the_policy_lacks_is_a_clean_error(tmp_path, doc, fragment):
    p = tmp_path / "c.json"
    p.write_text(json.dumps(doc))
    res = _run(["sim", "--limit", "10", "--workers", "1", "--routing", "kvroute", "--eviction", doc["policy"]
                if doc["kind"] == "eviction" else "lru", "--no-progress", "--config", str(p)])
    assert res.exit_code != 0 and fragment in res.output


def test_eviction_all_skips_the_oracle_on_a_cluster():
    res = _run(["sim", "--limit", "60", "--workers", "2", "--routing", "round_robin", "--eviction", "all",
                "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    names = [r["eviction"] for r in json.loads(res.stdout)["results"]]
    from kvroute.eviction import POLICIES as EVICTION

    assert names == [e for e in EVICTION if e != "belady"]  # every registered policy, the oracle aside
    res = _run(["sim", "--limit", "60", "--workers", "1", "--routing", "round_robin", "--eviction", "all",
                "--json", "--no-progress"])
    assert [r["eviction"] for r in json.loads(res.stdout)["results"]] == list(EVICTION)


def test_search_space_covers_weights_dataclasses():
    from kvroute.eviction import POLICIES as EVICTION
    from kvroute.sim.tune import TuneError, search_space

    kind, space = search_space("kvroute")
    assert kind == "routing" and "prefill_s_per_token" in space
    assert search_space("round_robin") == ("routing", {})
    assert search_space("lrfu") == ("eviction", {"lam": 0.01})
    if "adaptive" in EVICTION:  # its parameters live in a weights dataclass taken as keyword overrides
        kind, space = search_space("adaptive")
        assert kind == "eviction" and space
        assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in space.values())
    with pytest.raises(TuneError):
        search_space("belady")
