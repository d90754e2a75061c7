"""Routing on real engines: ``kvroute proxy`` in front of N real vLLM (CPU) servers, a trace slice replayed.

What it does, in one run:

1. builds (or reuses) the interop venv (``KVROUTE_VLLM_PYTHON`` or ``.ci/setup_vllm``)
   and a random-weight Llama sized so that prefill dominates (``--hidden``,
   ``--layers``; the default's prefill costs are printed and reported);
2. starts N ``vllm serve`` engines (block 32, prefix caching, KV events, a
   fixed KV capacity of ``--gpu-blocks`` blocks each, one thread each);
3. calibrates, on every engine at once (as they run in the replay): the time of a
   fully cached long prompt (the fixed cost ``o`` of a request), uncached prefills of
   several lengths and decode steps at two batch sizes over short and long contexts, and
   fits the simulator's :class:`CostModel` to them (``prefill = o + a n + b n^2``:
   ``gpu_flops * prefill_mfu = 2 P / a``, an effective ``d_model = b F_eff / (2 L)``;
   ``decode_step = o_d + c * batch + k * context tokens``);
4. measures the proxy's own overhead: the same fresh 64-token streaming
   requests sent alternately to engine 0 directly and through a proxy that
   knows only engine 0 (p50 of TTFT, both ways);
5. replays a slice of a bundled trace (default: the first 1,000 requests of the agentic
   coding sessions; each trace block = ``--block-tokens`` tokens drawn from the block id,
   prompts cut to their first ``--max-blocks`` blocks (the sessions' system, tools and
   first turns: what a CPU engine can prefill), outputs at ``--max-output`` tokens,
   arrival times compressed to last ``--duration`` seconds) through
   ``kvroute proxy --policy P`` for each policy, engines' caches reset in between,
   streaming with usage: TTFT mean / p50 / p99, prefix hit ratio (engine-reported
   cached tokens / prompt tokens), output throughput, and the proxy's prediction
   check (share of requests whose prediction equals the engine's cached tokens);
6. runs the same requests through ``kvroute sim`` with the fitted cost model,
   the engines' capacity, batch and chunk sizes, and reports the simulator's
   TTFT next to the real one.

Usage: python bench/real_cluster.py [--json] [--engines 2] [--trace agentic] [--requests 1000] [--duration 240] [--policies kvroute,dynamo,round_robin,least_loaded]
Prints a table, or with ``--json`` the contract document
``{"results": [{"routing", "ttft_mean_s", "ttft_p99_s", "prefix_hit_ratio", "sim_ttft_mean_s", ...}],
"prediction_exact_share": x, ...}``.  Takes about 20 minutes on 2 cores with the defaults.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests" / "interop"))

from engine_process import free_port  # noqa: E402
from serve_process import ServeProcess  # noqa: E402

VLLM_BLOCK = 32
#: The proxy scrapes every engine's /metrics this often; the simulator's routers see loads as old.
SCRAPE_INTERVAL_S = 0.5
#: Token ids are drawn from [10, VOCAB) (set from the model's config: the trained vocabulary is small).
VOCAB = 350


def log(*a: Any) -> None:
    print(*a, file=sys.stderr, flush=True)


# ------------------------------------------------------------------ environment
def vllm_python() -> str:
    py = os.environ.get("KVROUTE_VLLM_PYTHON")
    if py:
        return py
    out = subprocess.run([str(ROOT / ".ci" / "setup_vllm")], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"no vLLM environment: {out.stderr[-2000:]}")
    return out.stdout.strip()


def bench_model(py: str, hidden: int, layers: int) -> str:
    venv = Path(py).parent.parent
    heads = max(1, hidden // 32)
    kv = max(1, heads // 2)
    out = Path(f"{venv}-bench-model-h{hidden}-l{layers}")
    if not (out / "config.json").is_file():
        log(f"building the bench model at {out}")
        subprocess.run([py, str(ROOT / "tests" / "interop" / "make_tiny_llama.py"), str(out), str(hidden), str(layers),
                        str(heads), str(kv), str(hidden * 2)], check=True)
    return str(out)


# --------------------------------------------------------------------- workload
def load_slice(trace: str, start: int, count: int, block_tokens: int, max_blocks: int, max_output: int,
               vocab: int = 512) -> tuple[list[Any], list[list[int]]]:
    """The trace slice as simulator requests (arrivals from 0) and as token-id prompts (one list a request)."""
    from dataclasses import replace

    import gzip

    from kvroute.traces import load_trace, parse_lines, reshape

    if str(trace).endswith(".gz"):
        with gzip.open(trace, "rt") as f:
            reqs = parse_lines(f.read().splitlines(), source=str(trace), limit=start + count)[start:start + count]
    else:
        reqs = load_trace(trace, limit=start + count)[start:start + count]
    reqs = reshape(reqs, block_tokens=block_tokens, max_blocks=max_blocks)
    t0 = reqs[0].arrival_s
    reqs = [replace(r, request_id=i, arrival_s=r.arrival_s - t0, output_length=max(2, min(r.output_length, max_output)))
            for i, r in enumerate(reqs)]
    blocks: dict[int, list[int]] = {}
    prompts = []
    for r in reqs:
        ids: list[int] = []
        for h in r.hash_ids:
            if h not in blocks:
                rng = random.Random(h * 7919 + 1)
                blocks[h] = [rng.randrange(10, vocab) for _ in range(block_tokens)]
            ids += blocks[h]
        prompts.append(ids)
    return reqs, prompts


def resolve_named_trace(name: str) -> str:
    """A bundled trace by name (``agentic`` is the gzipped agentic coding sessions) or a path."""
    from kvroute.traces import TraceError, resolve_trace

    data = ROOT / "kvroute" / "data"
    if name == "agentic":
        for p in (data / "agentic_coding_dev.jsonl.gz", ROOT.parent / "shared" / "traces" / "agentic_coding_dev.jsonl.gz"):
            if p.is_file():
                return str(p)
        raise SystemExit("the agentic trace is not bundled in this checkout")
    try:
        return resolve_trace(name)
    except TraceError:
        if Path(name).is_file():
            return name
        raise


# ------------------------------------------------------------------ HTTP helpers
def post(url: str, body: dict[str, Any], timeout: float = 600) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


async def stream_one(session: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """Send one streaming completion; TTFT at the first data event, usage from the last."""
    t0 = time.perf_counter()
    first = None
    usage = None
    status = 0
    engine = predicted = None
    try:
        async with session.post(url, json=body) as r:
            status = r.status
            engine = r.headers.get("x-kvroute-engine")
            predicted = r.headers.get("x-kvroute-predicted-cached-tokens")
            buf = b""
            async for chunk in r.content.iter_any():
                if first is None:
                    first = time.perf_counter()
                buf += chunk
                while b"\n\n" in buf:
                    ev, buf = buf.split(b"\n\n", 1)
                    if b'"usage"' in ev and ev.startswith(b"data: {"):
                        doc = json.loads(ev[6:])
                        if doc.get("usage"):
                            usage = doc["usage"]
    except Exception as exc:  # a failed request is reported, not fatal
        return {"status": -1, "error": repr(exc), "t0": t0}
    end = time.perf_counter()
    return {"status": status, "ttft": (first or end) - t0, "e2e": end - t0, "usage": usage, "t0": t0, "end": end,
            "engine": engine, "predicted": int(predicted) if predicted is not None else None}


async def replay(url: str, prompts: list[list[int]], reqs: list[Any], rate_scale: float) -> list[dict[str, Any]]:
    import aiohttp

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600)) as s:
        start = time.perf_counter() + 0.2
        async def one(i: int) -> dict[str, Any]:
            delay = start + reqs[i].arrival_s / rate_scale - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = {"model": "tiny", "prompt": prompts[i], "max_tokens": reqs[i].output_length, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
            res = await stream_one(s, url + "/v1/completions", body)
            res["sent_s"] = res["t0"] - start
            return res
        return list(await asyncio.gather(*(one(i) for i in range(len(prompts)))))


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    def is_ok(r: dict[str, Any]) -> bool:
        return r["status"] == 200 and bool(r.get("usage"))

    ok = [r for r in results if is_ok(r)]
    ttft = sorted(r["ttft"] for r in ok)
    prompt = sum(r["usage"]["prompt_tokens"] for r in ok)
    cached = sum((r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens") or 0 for r in ok)
    out_tok = sum(r["usage"]["completion_tokens"] for r in ok)
    span = max(r["end"] for r in ok) - min(r["t0"] for r in ok) if ok else float("nan")

    def pct(p: float) -> float:
        return ttft[min(len(ttft) - 1, int(round(p * (len(ttft) - 1))))] if ttft else float("nan")

    failed: dict[str, int] = {}
    for r in results:
        if not is_ok(r):
            key = str(r.get("error") or r["status"])[:80]
            failed[key] = failed.get(key, 0) + 1
    return {"requests": len(results), "ok": len(ok), "failed": failed, "ttft_mean_s": statistics.fmean(ttft) if ttft else float("nan"),
            "ttft_p50_s": pct(0.5), "ttft_p99_s": pct(0.99), "prefix_hit_ratio": cached / prompt if prompt else 0.0,
            "throughput_tok_s": out_tok / span if span else 0.0,
            "e2e_mean_s": statistics.fmean(r["e2e"] for r in ok) if ok else float("nan")}


# ---------------------------------------------------------------------- proxy
class Proxy:
    def __init__(self, engines: list[ServeProcess], policy: str, weights: dict[str, float],
                 approximate: bool = False) -> None:
        args = [sys.executable, "-m", "kvroute.cli", "proxy", "--block-size", str(VLLM_BLOCK), "--port", "0",
                "--policy", policy, "--scrape-interval", str(SCRAPE_INTERVAL_S), "--log-level", "WARNING"]
        for k, v in weights.items():
            args += ["--weight", f"{k}={v!r}"]
        for i, e in enumerate(engines):
            # approximate: the proxy is given no KV-event endpoints, so it predicts from its own decisions
            args += ["--engine", f"e{i}={e.url}" if approximate else e.engine_arg(f"e{i}")]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env=dict(os.environ, PYTHONPATH=str(ROOT)))
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit("proxy did not start")
        self.url = f"http://127.0.0.1:{json.loads(line)['port']}"

    def health(self) -> dict[str, Any]:
        try:
            return get(self.url + "/health")
        except urllib.error.HTTPError as exc:  # 503 carries the same document
            return json.loads(exc.read())

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ----------------------------------------------------------------- calibration
def fit_cost(engines: list[ServeProcess], model_dir: str, gpu_blocks: int) -> tuple[Any, dict[str, Any]]:
    """Fit the simulator's CostModel to the engines (see the module docstring).

    Every engine is timed at once, as they run in the replay (they share the machine's cores), and
    the median over engines and repetitions is fitted."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from kvroute.sim.cost import CostModel

    cfg = json.loads(Path(model_dir, "config.json").read_text())
    L, d, inter, vocab = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kvh, hd = cfg["num_key_value_heads"], cfg.get("head_dim") or d // cfg["num_attention_heads"]
    P = L * (4 * d * d * (1 + kvh * hd / d) / 2 + 3 * d * inter) + 2 * vocab * d  # q,o + k,v + MLP + embeddings
    rng = random.Random(99)
    sizes = (256, 1024, 2048, 3072, 4096)
    ns, ts = [], []

    def time_prefills(engine: ServeProcess, n: int, seed: int) -> list[float]:
        r = random.Random(seed)
        out = []
        for _ in range(3):
            ids = [r.randrange(10, VOCAB) for _ in range(n)]
            t0 = time.perf_counter()
            post(engine.url + "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 1})
            out.append(time.perf_counter() - t0)
        return out

    with ThreadPoolExecutor(len(engines)) as ex:
        for n in sizes:
            samples = [t for ts_ in ex.map(lambda ie: time_prefills(ie[1], n, 1000 * n + ie[0]), enumerate(engines))
                       for t in ts_]
            ns.append(n)
            ts.append(statistics.median(samples))  # a noisy machine: the median over engines and repetitions
    # The fixed part: a long prompt sent again is all cached (one block recomputed), so its time is the
    # request's handling (HTTP, JSON of its ids, block hashing, scheduling, sampling) -- measured, not fitted.
    def time_cached(engine: ServeProcess, seed: int) -> list[float]:
        r = random.Random(seed)
        ids = [r.randrange(10, VOCAB) for _ in range(sizes[-1])]
        out = []
        for i in range(6):
            t0 = time.perf_counter()
            post(engine.url + "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 1})
            if i:
                out.append(time.perf_counter() - t0)
        return out

    with ThreadPoolExecutor(len(engines)) as ex:  # the sizing rule: an 8,192-token context (8,191 + 1 sampled)
        t8192 = statistics.median(t for ts_ in ex.map(lambda ie: time_prefills(ie[1], 8191, 555 + ie[0]), enumerate(engines))
                                  for t in ts_)
    with ThreadPoolExecutor(len(engines)) as ex:
        o = statistics.median(t for ts_ in ex.map(lambda ie: time_cached(ie[1], 77 + ie[0]), enumerate(engines))
                              for t in ts_)
    # t - o = a n + b n^2 with both coefficients >= 0 (drop a term whose free fit goes negative)
    terms = [1, 2]
    y = np.array([max(0.0, t - o) for t in ts])
    while True:
        A = np.array([[float(n) ** k for k in terms] for n in ns])
        coef = np.linalg.lstsq(A, y, rcond=None)[0]
        if all(c >= 0 for c in coef) or len(terms) == 1:
            break
        terms.pop(int(np.argmin(coef)))
    full = dict(zip(terms, coef))
    a, b = (max(0.0, float(full.get(k, 0.0))) for k in (1, 2))
    a = max(a, 1e-9)
    f_eff = 2 * P / a
    d_eff = max(1.0, b * f_eff / (2 * L))
    # decode: one step per token after the first, at batch 1 and 4 and contexts of 64 and 4,096 tokens (the
    # prompts prefilled first, so the streams decode over a cached context); median over the streams of both
    # engines and two rounds; fit step = o_d + c b + k (b ctx) by least squares
    grid = []
    for batch in (1, 4):
        for ctx in (64, sizes[-1]):
            per = []
            for _ in range(2):
                prompts = [[rng.randrange(10, VOCAB) for _ in range(ctx)] for _ in range(batch)]
                for e in engines:
                    for ids in prompts:
                        post(e.url + "/v1/completions", {"model": "tiny", "prompt": ids, "max_tokens": 1})

                async def run() -> list[dict[str, Any]]:
                    import aiohttp

                    async with aiohttp.ClientSession() as s:
                        bodies = [{"model": "tiny", "prompt": ids, "max_tokens": 33, "ignore_eos": True,
                                   "stream": True} for ids in prompts]
                        return list(await asyncio.gather(*(stream_one(s, e.url + "/v1/completions", x)
                                                           for e in engines for x in bodies)))
                per += [(r["e2e"] - r["ttft"]) / 32 for r in asyncio.run(run())]
            grid.append((batch, ctx, statistics.median(per)))
    A = np.array([[1.0, nb, nb * ctx] for nb, ctx, _ in grid])
    od, c, k = (max(0.0, float(x)) for x in np.linalg.lstsq(A, np.array([t for _, _, t in grid]), rcond=None)[0])
    c = max(c, 1e-6)
    base = CostModel()
    cost = base.with_overrides({
        "name": "vllm-cpu-fitted", "params": float(P), "n_layers": L, "d_model": int(round(d_eff)),
        "kv_bytes_per_token": L * kvh * hd * 2 * 2, "gpu_flops": f_eff, "prefill_mfu": 1.0,
        "prefill_overhead_s": max(0.0, float(o)), "decode_overhead_s": od, "decode_mfu": 2 * P / (f_eff * c),
        "decode_ctx_token_s": k,
        "hbm_bytes_per_s": 1e15, "decode_bw_efficiency": 1.0,
    })
    fit = {"params": P, "prefill_overhead_s": float(o), "prefill_s_per_token": float(a), "prefill_s_per_token2": float(b),
           "f_eff_flops": f_eff, "d_model_eff": d_eff, "decode_overhead_s": od, "decode_s_per_sequence": c,
           "decode_s_per_context_token": k, "decode_samples": [[nb, ctx, round(t, 5)] for nb, ctx, t in grid],
           "samples": list(zip(ns, [round(t, 4) for t in ts])),
           "prefill_8192_s_extrapolated": float(o + a * 8192 + b * 8192 * 8192),
           "prefill_8192_s_measured": t8192}
    return cost, fit


def proxy_overhead(engine: ServeProcess, n: int = 100) -> dict[str, Any]:
    """p50 TTFT of fresh 64-token streams, direct vs through a proxy that knows only this engine."""
    p = Proxy([engine], "kvroute", {})
    rng = random.Random(5)
    try:
        async def run() -> tuple[list[float], list[float]]:
            import aiohttp

            direct, via = [], []
            async with aiohttp.ClientSession() as s:
                for i in range(2 * n):
                    body = {"model": "tiny", "prompt": [rng.randrange(10, VOCAB) for _ in range(64)], "max_tokens": 1,
                            "stream": True}
                    url = engine.url if i % 2 == 0 else p.url
                    r = await stream_one(s, url + "/v1/completions", body)
                    (direct if i % 2 == 0 else via).append(r["ttft"])
            return direct, via
        direct, via = asyncio.run(run())
    finally:
        p.stop()
    return {"direct_ttft_p50_s": statistics.median(direct), "proxy_ttft_p50_s": statistics.median(via),
            "added_p50_ms": 1000 * (statistics.median(via) - statistics.median(direct)), "samples": n,
            "load_average": os.getloadavg()[0]}


def dump_requests(path: str, policy: str, reqs: list[Any], res: list[dict[str, Any]], rec: Any) -> None:
    """Append one line per request: the real run's measurements beside the simulator's for the same request."""
    with open(path, "a") as f:
        for i, (q, r) in enumerate(zip(reqs, res)):
            u = r.get("usage") or {}
            f.write(json.dumps({
                "routing": policy, "i": i, "arrival_s": q.arrival_s, "sent_s": r.get("sent_s"), "status": r["status"],
                "ttft_s": r.get("ttft"), "e2e_s": r.get("e2e"), "prompt_tokens": u.get("prompt_tokens"),
                "cached_tokens": (u.get("prompt_tokens_details") or {}).get("cached_tokens"),
                "engine": r.get("engine"), "predicted": r.get("predicted"),
                "sim_ttft_s": float(rec.first_token[i] - rec.arrival[i]), "sim_worker": int(rec.worker[i]),
                "sim_hit_blocks": int(rec.gpu_hit[i] + rec.host_hit[i])}) + "\n")


# ---------------------------------------------------------------------- main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--engines", type=int, default=2)
    ap.add_argument("--trace", default="agentic",
                    help="conversation, synthetic, agentic (the bundled agentic coding sessions) or a path (.jsonl[.gz]).")
    ap.add_argument("--start", type=int, default=0, help="First request of the slice.")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--block-tokens", type=int, default=64, help="Tokens per trace block (hash id).")
    ap.add_argument("--max-blocks", type=int, default=64, help="Trace blocks per prompt at most.")
    ap.add_argument("--max-output", type=int, default=8)
    ap.add_argument("--rate-scale", type=float, default=None,
                    help="Divide arrival times by this (default: whatever makes the slice last --duration seconds).")
    ap.add_argument("--duration", type=float, default=240.0)
    ap.add_argument("--gpu-blocks", type=int, default=2000, help="KV blocks (of 32 tokens) per engine.")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--policies", default="kvroute,dynamo,round_robin,least_loaded")
    ap.add_argument("--max-batched-tokens", type=int, default=4096)
    ap.add_argument("--engine-processes", choices=("core", "vllm"), default="core",
                    help="core: the model runs inside each engine's engine-core process (the uni executor, which "
                         "vLLM's CPU platform keeps only with VLLM_ENABLE_V1_MULTIPROCESSING=0): an API server and "
                         "an engine core per engine; vllm: vLLM's default API server + engine core + worker, whose "
                         "idle worker busy-polls its queue for 1 s after every step (on a few shared cores it "
                         "competes with the other engines' compute).")
    ap.add_argument("--approximate", action="store_true",
                    help="Give the proxy no KV-event endpoints: it predicts the engines' caches from its own "
                         "decisions (approximate mode); the prediction figures then measure that mode.")
    ap.add_argument("--dump", default=None, help="Write per-request records (real and simulated) to this .jsonl file.")
    args = ap.parse_args()

    from kvroute.sim.engine import SimConfig, simulate
    py = vllm_python()
    model = bench_model(py, args.hidden, args.layers)
    trace = resolve_named_trace(args.trace)
    global VOCAB
    VOCAB = json.loads(Path(model, "config.json").read_text())["vocab_size"]
    reqs, prompts = load_slice(trace, args.start, args.requests, args.block_tokens, args.max_blocks, args.max_output,
                               vocab=VOCAB)
    max_len = max(len(p) for p in prompts) + args.max_output + 64
    if args.rate_scale is None:
        args.rate_scale = max(1e-9, reqs[-1].arrival_s / args.duration)
    log(f"slice: {len(reqs)} requests over {reqs[-1].arrival_s / args.rate_scale:.0f} s, prompts up to {max_len} tokens")
    extra = ["--num-gpu-blocks-override", str(args.gpu_blocks), "--max-num-batched-tokens", str(args.max_batched_tokens),
             "--max-num-seqs", "64", "--enforce-eager"]
    env = {"VLLM_SERVER_DEV_MODE": "1"}
    if args.engine_processes == "core":
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        extra += ["--distributed-executor-backend", "uni"]
    engines = [ServeProcess(py, model, port=free_port(), events_port=free_port(), replay_port=free_port(),
                            block_size=VLLM_BLOCK, max_model_len=max(8192, max_len), extra_args=extra,
                            env=env).start() for _ in range(args.engines)]
    doc: dict[str, Any] = {"config": vars(args), "results": []}
    try:
        for e in engines:
            e.wait_ready(600)
        log("engines ready; calibrating")
        cost, fit = fit_cost(engines, model, args.gpu_blocks)
        doc["fit"] = fit
        log(f"fit: {json.dumps(fit)[:400]}")
        doc["overhead"] = proxy_overhead(engines[0])
        log(f"proxy overhead: {doc['overhead']}")
        from kvroute.sim.engine import calibrated_router_params

        checked = exact = 0
        for policy in args.policies.split(","):
            for e in engines:
                post(e.url + "/reset_prefix_cache", {})
            weights = calibrated_router_params(policy, cost)
            p = Proxy(engines, policy, weights, approximate=args.approximate)
            try:
                t0 = time.perf_counter()
                res = asyncio.run(replay(p.url, prompts, reqs, args.rate_scale))
                row = {"routing": policy, **summarize(res), "wall_s": time.perf_counter() - t0}
                h = p.health()
                row["prediction_checked"], row["prediction_exact"] = h["prediction_checked"], h["prediction_exact"]
                for k in ("prediction_over", "predicted_cached_tokens", "reported_cached_tokens"):
                    row[k] = h[k]
                row["engine_failures"] = {e["name"]: [e["failures_total"], e["reason"]] for e in h["engines"]}
                checked += h["prediction_checked"]
                exact += h["prediction_exact"]
            finally:
                p.stop()
            scfg = SimConfig(workers=args.engines, routing=policy, eviction="lru",
                             gpu_blocks=args.gpu_blocks * VLLM_BLOCK // args.block_tokens, host_blocks=0,
                             block_tokens=args.block_tokens, rate_scale=args.rate_scale, cost=cost,
                             vllm_last_block=True, chunked_prefill_tokens=args.max_batched_tokens, max_batch=64,
                             load_report_period_s=SCRAPE_INTERVAL_S, approximate=args.approximate)
            sim = simulate(reqs, scfg)
            if args.dump:
                dump_requests(args.dump, policy, reqs, res, sim.records)
            row["sim_ttft_mean_s"] = sim.ttft_mean_s
            row["sim_ttft_p99_s"] = sim.ttft_p99_s
            row["sim_prefix_hit_ratio"] = sim.prefix_hit_ratio
            row["sim_prediction"] = sim.extra.get("prediction")
            row["sim_ttft_error"] = (sim.ttft_mean_s - row["ttft_mean_s"]) / row["ttft_mean_s"]
            doc["results"].append(row)
            log(f"{policy}: {json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})}")
        doc["prediction_exact_share"] = exact / checked if checked else 0.0
    finally:
        for e in engines:
            e.stop()
    real_rank = [r["routing"] for r in sorted(doc["results"], key=lambda r: r["ttft_mean_s"])]
    sim_rank = [r["routing"] for r in sorted(doc["results"], key=lambda r: r["sim_ttft_mean_s"])]
    doc["ranking_real"], doc["ranking_sim"] = real_rank, sim_rank
    doc["load_average"] = os.getloadavg()
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        print(f"{'routing':<14}{'ttft_mean':>10}{'p50':>8}{'p99':>8}{'hit':>8}{'tok/s':>8}{'sim_mean':>10}{'sim_err':>9}")
        for r in doc["results"]:
            print(f"{r['routing']:<14}{r['ttft_mean_s']:>10.3f}{r['ttft_p50_s']:>8.3f}{r['ttft_p99_s']:>8.3f}"
                  f"{r['prefix_hit_ratio']:>8.3f}{r['throughput_tok_s']:>8.1f}{r['sim_ttft_mean_s']:>10.3f}"
                  f"{r['sim_ttft_error']:>+9.1%}")
        print(f"prediction exact: {doc['prediction_exact_share']:.4f}; proxy adds {doc['overhead']['added_p50_ms']:.2f} ms p50; "
              f"ranking real {real_rank}, sim {sim_rank}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
