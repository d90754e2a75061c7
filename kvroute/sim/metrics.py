"""Per-request records of a simulation and the summary computed from them.

:class:`Records` is filled by the engine (:mod:`kvroute.sim.engine`) only, one
slot per request, in numpy arrays; :func:`summarize` turns it into a
:class:`Summary` (a flat dataclass: the row of a results table, the object of
``--json``).  Times are simulated seconds; ``router_us_*`` is real CPU time
spent in the router per decision.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Records:
    """What happened to each request.  Written by the engine; read by :func:`summarize` and plots."""

    def __init__(self, n: int, n_workers: int) -> None:
        nan = np.full(n, np.nan)
        #: Arrival time (after rate scaling).
        self.arrival = nan.copy()
        #: Time the first token was produced (end of prefill).
        self.first_token = nan.copy()
        #: Time the last token was produced.
        self.finish = nan.copy()
        #: Worker that ran the prefill (index), -1 until routed.
        self.worker = np.full(n, -1, dtype=np.int32)
        #: Decode worker (== worker when aggregated).
        self.decode_worker = np.full(n, -1, dtype=np.int32)
        #: Prompt blocks (hash ids) of the request.
        self.blocks = np.zeros(n, dtype=np.int64)
        #: Blocks served from the GPU cache / reloaded from host (counted per the engine's rule).
        self.gpu_hit = np.zeros(n, dtype=np.int64)
        self.host_hit = np.zeros(n, dtype=np.int64)
        #: Prompt tokens and generated tokens.
        self.input_tokens = np.zeros(n, dtype=np.int64)
        self.output_tokens = np.zeros(n, dtype=np.int64)
        #: Tokens the router predicted cached on the chosen worker.
        self.predicted_cached = np.zeros(n, dtype=np.int64)
        #: Router CPU time of the decision (thread CPU clock), nanoseconds.
        self.router_ns = np.zeros(n, dtype=np.int64)
        #: How many times each request finished (conservation check: all ones).
        self.finished_count = np.zeros(n, dtype=np.int32)
        #: Simulated seconds each worker spent in prefill / decode steps / reload.
        self.busy_prefill = np.zeros(n_workers)
        self.busy_decode = np.zeros(n_workers)
        #: Requests dropped because they can never fit a worker's GPU cache.
        self.dropped = 0


@dataclass
class Summary:
    """One row of results: a (routing, eviction) pair on one workload."""

    routing: str
    eviction: str
    requests: int = 0
    completed: int = 0
    dropped: int = 0
    ttft_mean_s: float = float("nan")
    ttft_p50_s: float = float("nan")
    ttft_p90_s: float = float("nan")
    ttft_p99_s: float = float("nan")
    e2e_mean_s: float = float("nan")
    e2e_p50_s: float = float("nan")
    e2e_p99_s: float = float("nan")
    #: Time per output token after the first ((finish - first token) / (output - 1)), requests with >1 token.
    tpot_mean_s: float = float("nan")
    tpot_p99_s: float = float("nan")
    #: Generated tokens per simulated second over the run (first arrival to last finish).
    throughput_tok_s: float = 0.0
    #: Prompt + generated tokens per simulated second.
    total_tok_s: float = 0.0
    #: Share of prompt blocks served from cache (any tier), from the GPU, reloaded from host.
    prefix_hit_ratio: float = 0.0
    gpu_hit_ratio: float = 0.0
    host_hit_ratio: float = 0.0
    #: Router's predicted cached tokens / prompt tokens (compare with prefix_hit_ratio).
    predicted_hit_ratio: float = 0.0
    #: Busiest worker's requests over the mean (1.0 = perfect balance), and the coefficient of variation.
    load_max_over_mean: float = float("nan")
    load_cv: float = float("nan")
    #: Busiest worker's prefill seconds over the mean.
    prefill_busy_max_over_mean: float = float("nan")
    #: Router CPU time per decision, microseconds.
    router_us_mean: float = 0.0
    router_us_p99: float = 0.0
    #: Simulated span (s) and wall-clock seconds the simulation took.
    makespan_s: float = 0.0
    wall_s: float = 0.0
    workers: int = 0
    #: Requests per worker (list), for the load-balance plot.
    per_worker_requests: list[int] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k, v in list(d.items()):
            if isinstance(v, float) and v != v:
                d[k] = None  # NaN is not JSON
        return d

    #: Columns of the terminal table and the CSV (the rest is in the JSON).
    TABLE = (
        "routing", "eviction", "ttft_mean_s", "ttft_p50_s", "ttft_p90_s", "ttft_p99_s", "e2e_mean_s", "tpot_mean_s",
        "throughput_tok_s", "prefix_hit_ratio", "gpu_hit_ratio", "host_hit_ratio", "load_max_over_mean",
        "router_us_mean", "wall_s",
    )


def _pct(a: np.ndarray, q: float) -> float:
    return float(np.percentile(a, q)) if a.size else float("nan")


def summarize(rec: Records, routing: str, eviction: str, *, wall_s: float = 0.0, n_workers: int = 0,
              prefill_pool: int = 0) -> Summary:
    """Aggregate per-request records into a :class:`Summary`.

    Load balance is measured over the workers that take routed prompts: all of
    them, or the first ``prefill_pool`` when pools are disaggregated.
    """
    done = ~np.isnan(rec.finish)
    ttft = (rec.first_token - rec.arrival)[done]
    e2e = (rec.finish - rec.arrival)[done]
    blocks = int(rec.blocks[done].sum())
    gpu = int(rec.gpu_hit[done].sum())
    host = int(rec.host_hit[done].sum())
    span = float(np.nanmax(rec.finish) - np.nanmin(rec.arrival)) if done.any() else 0.0
    out_tok = int(rec.output_tokens[done].sum())
    in_tok = int(rec.input_tokens[done].sum())
    pool = prefill_pool or n_workers
    per = np.bincount(rec.worker[rec.worker >= 0], minlength=n_workers)[:pool] if n_workers else np.zeros(0)
    routed = rec.router_ns[rec.worker >= 0] / 1e3
    s = Summary(routing, eviction)
    s.requests = int(rec.arrival.size)
    s.completed = int(done.sum())
    s.dropped = int(rec.dropped)
    if ttft.size:
        s.ttft_mean_s = float(ttft.mean())
        s.ttft_p50_s = _pct(ttft, 50)
        s.ttft_p90_s = _pct(ttft, 90)
        s.ttft_p99_s = _pct(ttft, 99)
        s.e2e_mean_s = float(e2e.mean())
        s.e2e_p50_s = _pct(e2e, 50)
        s.e2e_p99_s = _pct(e2e, 99)
    multi = done & (rec.output_tokens > 1)
    if multi.any():
        tpot = (rec.finish - rec.first_token)[multi] / (rec.output_tokens[multi] - 1)
        s.tpot_mean_s = float(tpot.mean())
        s.tpot_p99_s = _pct(tpot, 99)
    if span > 0:
        s.throughput_tok_s = out_tok / span
        s.total_tok_s = (out_tok + in_tok) / span
    if blocks:
        s.prefix_hit_ratio = (gpu + host) / blocks
        s.gpu_hit_ratio = gpu / blocks
        s.host_hit_ratio = host / blocks
    if in_tok:
        s.predicted_hit_ratio = float(rec.predicted_cached[done].sum()) / in_tok
    if per.size and per.mean() > 0:
        s.load_max_over_mean = float(per.max() / per.mean())
        s.load_cv = float(per.std() / per.mean())
    pb = rec.busy_prefill[:pool] if pool else rec.busy_prefill
    if pb.size and pb.mean() > 0:
        s.prefill_busy_max_over_mean = float(pb.max() / pb.mean())
    if routed.size:
        s.router_us_mean = float(routed.mean())
        s.router_us_p99 = _pct(routed, 99)
    s.makespan_s = span
    s.wall_s = wall_s
    s.workers = n_workers
    s.per_worker_requests = [int(x) for x in per]
    return s
