"""Drive a real vLLM engine (CPU build) from a line protocol, for the interop tests.

Runs under the interop venv's python (``KVROUTE_VLLM_PYTHON``, built by
``.ci/setup_vllm``), never under the test process's python: only this file and
the other ``tests/interop`` helper scripts import vllm.

Parts:

* :func:`build_llm` -- ``vllm.LLM`` on the tiny model with prefix caching,
  ``block_size`` 32, a capped GPU cache (``num_gpu_blocks_override``) and the
  ZMQ KV-event publisher bound on the given ports.  The engine core runs in
  this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so the driver can count
  the batches the scheduler hands its publisher.
* :class:`PublishCounter` -- wraps the scheduler's publisher ``publish``; the
  n-th batch published gets seq ``n - 1`` on the wire (vLLM's ZMQ publisher
  numbers batches from 0 in publish order).  ``update_from_output`` publishes a
  step's events *before* it builds that step's outputs, so once ``generate``
  returns, every batch caused by the request has been counted.  A test then
  waits until its own subscriber has seen that seq: no sleeps.
* :func:`serve` -- the protocol.  One JSON object per stdin line, one per
  stdout line:

  - ``{"prompt": [token ids], "max_tokens": 1}`` ->
    ``{"num_cached_tokens": n, "num_prompt_tokens": m, "last_seq": s}``
    (``last_seq`` is -1 while nothing was published);
  - ``{"prompt": [...], "cache_salt": s}`` sends the prompt with vLLM's cache salt;
  - ``{"prompt": [...], "now": t}`` also passes ``extra_args={"kvroute_now": t}``
    (the clock of kvroute's GPU eviction plugin, see ``kvroute.adapters.vllm_plugin``);
  - ``{"cmd": "replay", "trace": name_or_path, "limit": n, "block_tokens": 32, "max_blocks": k}``
    -> ``{"requests": n, "prompt_blocks": ..., "cached_blocks": ..., "seconds": ...}``:
    replays a Mooncake-format trace's prefix structure one request at a time,
    each hash id a fixed block of ``block_tokens`` tokens (seeded by the id),
    ``max_tokens=1``, the request's trace time as its ``kvroute_now``, each
    request cut to its first ``max_blocks`` blocks when given;
  - ``{"cmd": "cached"}`` -> ``{"hashes": [...]}``: the engine hashes (event form;
    bytes as hex strings) of every block now in the GPU prefix cache (vLLM 0.32 internals);
  - ``{"cmd": "orphan"}`` (kvroute's GPU plugin on): picks a free cached block with a cached child,
    evicts it from the prefix cache through vLLM's ``BlockPool.evict_blocks`` (as a KV connector does)
    and reports ``{"evicted": true, "children": n, "linked_after": [...]}``: for each child, whether
    the plugin's prefix links still name the evicted parent as resident (they must not: the link sleeps);
  - ``{"cmd": "orphan_state"}`` -> for the block ``orphan`` evicted: ``{"resident": bool, "is_leaf":
    bool, "children_linked": [bool per child still resident]}`` (the orphan rule: once vLLM caches that
    hash again, the children are linked to it and it is no leaf);
  - ``{"cmd": "reset"}`` -> ``{"reset": true|false, "last_seq": s}``
    (``reset_prefix_cache``: vLLM publishes ``AllBlocksCleared`` with the next step);
  - end of input -> the process exits 0 at once (``os._exit``: the engine core
    runs in this process and holds no child processes; vLLM's orderly teardown
    takes several seconds and tests start and stop engines often).

  The first line written is ``{"ready": true, "load_s": ..., "vllm": version,
  "num_gpu_blocks": ..., "gpu_eviction": ...}`` once the engine is up.  Logs
  go to stderr.

usage: python engine_driver.py --model DIR --port P --replay-port R [--num-gpu-blocks N]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BLOCK_SIZE = 32


class PublishCounter:
    """Counts the batches a scheduler hands its KV-event publisher."""

    def __init__(self, publisher) -> None:
        #: The wrapped publisher (vLLM's ZmqEventPublisher); only ``publish`` is wrapped.
        self.publisher = publisher
        #: Batches published so far; the last one went out with seq ``count - 1``.
        self.count = 0
        inner = publisher.publish

        def publish(batch):
            inner(batch)
            self.count += 1

        publisher.publish = publish

    @property
    def last_seq(self) -> int:
        return self.count - 1


def find_scheduler(llm):
    """The engine core's scheduler of an in-process ``vllm.LLM`` (vLLM 0.32 layout)."""
    client = llm.llm_engine.engine_core
    core = getattr(client, "engine_core", None)
    if core is None:
        raise RuntimeError(
            "engine core is not in this process; set VLLM_ENABLE_V1_MULTIPROCESSING=0 "
            f"(client is {type(client).__name__})"
        )
    return core.scheduler


def build_llm(args):
    from vllm import LLM

    blocks = args.num_gpu_blocks
    # One block of the pool is vLLM's null block: N blocks hold (N - 1) * 32 tokens.
    max_len = min(args.max_model_len, (blocks - 1) * BLOCK_SIZE) if blocks else args.max_model_len
    return LLM(
        model=args.model,
        dtype="bfloat16",
        max_model_len=max_len,
        enable_prefix_caching=True,
        block_size=BLOCK_SIZE,
        max_num_seqs=4,
        num_gpu_blocks_override=blocks or None,
        seed=0,
        kv_events_config={
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": f"tcp://*:{args.port}",
            "replay_endpoint": f"tcp://*:{args.replay_port}",
            "topic": args.topic,
        },
    )


def block_tokens(hash_id: int, n: int) -> list[int]:
    """The fixed tokens standing for one trace hash id (ids 3..258 of the tiny vocabulary)."""
    import random

    rng = random.Random(hash_id * 1_000_003 + 17)
    return [rng.randrange(3, 259) for _ in range(n)]


def replay(llm, msg) -> dict:
    """Replay a trace's prefix structure through the engine (see the protocol above)."""
    from vllm import SamplingParams

    from kvroute.eviction.replay import load_trace

    bt = int(msg.get("block_tokens", BLOCK_SIZE))
    reqs = load_trace(msg["trace"], msg.get("limit"))
    cut = msg.get("max_blocks")
    stride = int(msg.get("stride") or 1)
    if stride > 1:  # coarser blocks: every stride-th id stands for its stride blocks (still prefix-chained)
        reqs = [type(r)(r.ts, r.keys[stride - 1::stride] or r.keys[:1], r.output_length) for r in reqs]
    cache: dict[int, list[int]] = {}
    prompt_blocks = cached_blocks = 0
    t0 = time.time()
    for r in reqs:
        toks: list[int] = []
        keys = r.keys[:cut] if cut else r.keys
        for h in keys:
            b = cache.get(h)
            if b is None:
                b = cache[h] = block_tokens(h, bt)
            toks.extend(b)
        sp = SamplingParams(max_tokens=1, temperature=0.0, extra_args={"kvroute_now": r.ts})
        res = llm.generate([{"prompt_token_ids": toks}], sp, use_tqdm=False)[0]
        prompt_blocks += len(keys)
        cached_blocks += int(res.num_cached_tokens or 0) // bt
    return {"requests": len(reqs), "prompt_blocks": prompt_blocks, "cached_blocks": cached_blocks,
            "seconds": round(time.time() - t0, 2)}


def orphan(pool, probe: dict) -> dict:
    """Evict one free cached block that has a cached child, through vLLM's own ``evict_blocks``."""
    q = pool.free_block_queue
    links = getattr(q, "links", None)
    if links is None:
        return {"evicted": False, "reason": "the kvroute plugin is not installed"}
    for key, block in list(q._block_of.items()):
        kids = list(links.children(key))
        if kids and block.ref_cnt == 0:
            probe.clear()
            probe.update(key=key, children=kids)
            pool.evict_blocks({block.block_id})
            return {"evicted": key not in links, "children": len(kids),
                    "children_resident": sum(c in links for c in kids),
                    "linked_after": [links.parent(c) is not None for c in kids if c in links]}
    return {"evicted": False, "reason": "no free cached block with a cached child"}


def cached_event_hashes(pool) -> list:
    """The engine hashes (as its events name them) of every block in the GPU prefix cache."""
    from vllm.v1.core.kv_cache_utils import get_block_hash, maybe_convert_block_hash

    hs = [maybe_convert_block_hash(get_block_hash(k)) for k in pool.cached_block_hash_to_block._cache]
    return [h.hex() if isinstance(h, bytes) else h for h in hs]  # JSON: bytes hashes as hex strings


def serve(args, out) -> int:
    import vllm
    from vllm import SamplingParams

    t0 = time.time()
    llm = build_llm(args)
    sched = find_scheduler(llm)
    counter = PublishCounter(sched.kv_event_publisher)
    pool = sched.kv_cache_manager.block_pool
    probe: dict = {}  # what the "orphan" command evicted, for "orphan_state"
    out.write(json.dumps({
        "ready": True,
        "load_s": round(time.time() - t0, 2),
        "vllm": vllm.__version__,
        "num_gpu_blocks": pool.num_gpu_blocks,
        "gpu_eviction": os.environ.get("KVROUTE_VLLM_GPU_EVICTION"),
        "free_queue": type(pool.free_block_queue).__name__,
        "last_seq": counter.last_seq,
    }) + "\n")
    out.flush()
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        msg = json.loads(line)
        if msg.get("cmd") == "replay":
            reply = replay(llm, msg)
            reply["last_seq"] = counter.last_seq
            q = pool.free_block_queue
            reply["eviction"] = q.snapshot() if hasattr(q, "snapshot") else {}
        elif msg.get("cmd") == "cached":
            reply = {"hashes": cached_event_hashes(pool), "last_seq": counter.last_seq}
        elif msg.get("cmd") == "orphan":
            reply = orphan(pool, probe)
        elif msg.get("cmd") == "orphan_state":
            q, key = pool.free_block_queue, probe.get("key")
            kids = [c for c in probe.get("children", ()) if c in q.links]
            reply = {"resident": key in q.links, "is_leaf": q.links.is_leaf(key) if key in q.links else None,
                     "children_linked": [q.links.parent(c) == key for c in kids]}
        elif msg.get("cmd") == "reset":
            ok = llm.reset_prefix_cache()
            reply = {"reset": bool(ok), "last_seq": counter.last_seq}
        else:
            extra = {"kvroute_now": float(msg["now"])} if "now" in msg else None
            sp = SamplingParams(max_tokens=int(msg.get("max_tokens", 1)), temperature=0.0, extra_args=extra)
            prompt = {"prompt_token_ids": list(msg["prompt"])}
            if msg.get("cache_salt") is not None:
                prompt["cache_salt"] = msg["cache_salt"]
            res = llm.generate([prompt], sp, use_tqdm=False)[0]
            reply = {
                "num_cached_tokens": int(res.num_cached_tokens or 0),
                "num_prompt_tokens": len(res.prompt_token_ids),
                "last_seq": counter.last_seq,
            }
        out.write(json.dumps(reply) + "\n")
        out.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--replay-port", type=int, required=True)
    ap.add_argument("--topic", default="")
    ap.add_argument("--num-gpu-blocks", type=int, default=0, help="num_gpu_blocks_override (0: engine default)")
    ap.add_argument("--max-model-len", type=int, default=1024)
    args = ap.parse_args(argv)
    # vLLM and its libraries print to stdout; keep the real stdout for the protocol
    # and point file descriptor 1 (and sys.stdout) at stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    return serve(args, proto)


if __name__ == "__main__":
    raise SystemExit(main())
