"""Measure kvroute's GPU eviction plugin against stock vLLM on a trace replay (a script, not a test).

usage (from the repository root, after .ci/setup_vllm):
    KVROUTE_VLLM_PYTHON=$(.ci/setup_vllm) python tests/interop/gpu_eviction_replay.py \
        [--requests 3000] [--share 0.05] [--max-blocks 0] [--policies adaptive,arc] [--trace T --stride K]

Starts one real engine per setup (stock vLLM, then one per kvroute policy via
``KVROUTE_VLLM_GPU_EVICTION``), each with ``num_gpu_blocks_override`` = share of
the replay's unique blocks (+1 null block), replays the first N requests of a
trace (default the bundled Mooncake conversation trace; each hash id a fixed
block of 32 tokens, cut to ``--max-blocks`` per request when > 0; ``--stride K``
keeps every K-th id of a prompt, each standing for K blocks, so the agentic
trace's 90k-token prompts fit a CPU engine) and prints, per setup, the block
hit ratio from vLLM's ``num_cached_tokens`` beside kvroute's offline replay of
the same policy (``kvroute.eviction.replay.replay``).  One engine at a time.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from engine_process import BS, EngineProcess, free_port, vllm_env_or_reason  # noqa: E402

from kvroute.adapters.vllm_plugin import ENV_POLICY  # noqa: E402
from kvroute.eviction.replay import Request, capacity_blocks, load_trace, replay, unique_blocks  # noqa: E402

TRACE = "mooncake_conversation.jsonl"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--share", type=float, default=0.05)
    ap.add_argument("--max-blocks", type=int, default=0)
    ap.add_argument("--policies", default="adaptive,arc")
    ap.add_argument("--trace", default=TRACE)
    ap.add_argument("--stride", type=int, default=1)
    a = ap.parse_args(argv)
    env = vllm_env_or_reason()
    if isinstance(env, str):
        print(env, file=sys.stderr)
        return 2
    py, model = env
    reqs = load_trace(a.trace, a.requests)
    if a.stride > 1:
        reqs = [Request(r.ts, r.keys[a.stride - 1::a.stride] or r.keys[:1], r.output_length) for r in reqs]
    if a.max_blocks:
        reqs = [Request(r.ts, r.keys[: a.max_blocks]) for r in reqs]
    cap = capacity_blocks(a.share, unique_blocks(reqs))
    longest = max(len(r.keys) for r in reqs)
    print(f"{a.requests} requests, {sum(len(r.keys) for r in reqs)} prompt blocks, capacity {cap} blocks", flush=True)
    print(f"{'setup':<10} {'vLLM hit ratio':>15} {'offline replay':>15} {'seconds':>8}", flush=True)
    for pol in ["stock", *[p for p in a.policies.split(",") if p]]:
        extra = {} if pol == "stock" else {ENV_POLICY: pol}
        eng = EngineProcess(py, model, port=free_port(), replay_port=free_port(), num_gpu_blocks=cap + 1,
                            max_model_len=(longest + 1) * BS, extra_env=extra)
        try:
            eng.wait_ready()
            r = eng.call({"cmd": "replay", "trace": a.trace, "limit": a.requests, "max_blocks": a.max_blocks or None,
                          "block_tokens": BS, "stride": a.stride}, timeout=3600)
        finally:
            eng.stop()
        offline = replay(reqs, cap, "lru" if pol == "stock" else pol)["prefix_hit_ratio"]
        print(f"{pol:<10} {r['cached_blocks'] / r['prompt_blocks']:>15.4f} {offline:>15.4f} {r['seconds']:>8.1f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
