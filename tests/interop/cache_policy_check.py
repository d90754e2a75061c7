"""Drive vLLM's own CPU offload manager with kvroute's CachePolicy classes (runs in the interop venv).

usage: python cache_policy_check.py [N_REQUESTS] [MAX_BLOCKS] [CAPACITY_SHARE]

For each policy -- vLLM's built-in ``lru`` and ``arc``, and kvroute's classes
loaded the way the OffloadingConnector loads them (``cache_policy`` = class
name, ``cache_policy_module_path`` = ``kvroute.adapters.vllm_cache_policy``) --
a ``vllm.v1.kv_offload.cpu.manager.CPUOffloadingManager`` with events on serves
the prefix structure of the bundled Mooncake conversation trace as the
scheduler side of the connector does: look up the request's keys in order, load
the hit prefix (``prepare_load``/``complete_load``), store the rest
(``prepare_store``/``complete_store``), then ``on_request_finished``.  It checks
on every request that the manager's residency stays within capacity, that its
stored/removed events replay to exactly the resident set, and (for kvroute's
classes) the policy's own invariants; then an atomic-eviction probe: an
``evict`` that cannot be satisfied because of protected keys returns None and
changes nothing.  Prints one JSON object: per policy, hit ratio and counters.
"""

from __future__ import annotations

import json
import sys

from vllm.v1.kv_offload.base import LookupResult, ReqContext, make_offload_key
from vllm.v1.kv_offload.cpu.manager import CPUOffloadingManager

from kvroute.eviction.replay import Request, capacity_blocks, load_trace, unique_blocks

MODULE = "kvroute.adapters.vllm_cache_policy"
BLOCK_TOKENS = 32


def key_of(h: int):
    return make_offload_key(h.to_bytes(32, "big"), 0)


def run(policy: str, module: str | None, reqs: list[Request], cap: int) -> dict:
    mgr = CPUOffloadingManager(num_chunks=cap, cache_policy=policy, cache_policy_module_path=module, enable_events=True)
    resident: set = set()
    hits = blocks = 0
    for rid, r in enumerate(reqs):
        keys = [key_of(h) for h in r.keys]
        ctx = ReqContext(req_id=str(rid), kv_transfer_params={"kvroute_now": r.ts})
        for i, k in enumerate(keys):
            ctx.set_offload_key_position(k, (i + 1) * BLOCK_TOKENS)
        mgr.on_new_request(ctx)
        n_hit = 0
        while n_hit < len(keys) and mgr.lookup(keys[n_hit], ctx) == LookupResult.HIT:
            n_hit += 1
        if n_hit:
            mgr.prepare_load(keys[:n_hit], ctx)
            mgr.complete_load(keys[:n_hit], ctx)
        out = mgr.prepare_store(keys, ctx)
        if out is not None and out.keys_to_store:
            mgr.complete_store(out.keys_to_store, ctx)
        mgr.on_request_finished(ctx)
        for ev in mgr.take_events():
            (resident.difference_update if ev.removed else resident.update)(ev.keys)
        live = {k for k in set(keys) | resident if mgr._policy.get(k) is not None}
        assert live == resident, f"{policy}: events disagree with residency at request {rid}"
        assert len(resident) <= cap, f"{policy}: {len(resident)} chunks resident, capacity {cap}"
        hits += n_hit
        blocks += len(keys)
    pol = mgr._policy
    res = {"hit_ratio": hits / blocks, "hits": hits, "blocks": blocks, "resident": len(resident)}
    if hasattr(pol, "stats"):
        res["stats"] = dict(pol.stats)
        assert set(pol.chunks) == resident
        assert pol._cand <= set(pol._evictable), "a candidate that is not evictable"
        assert all(pol.links.is_leaf(k) for k in pol._cand), "a candidate with resident children"
        pol.links.check_invariants()
    return res


def atomic_probe(cap: int = 4) -> dict:
    """An unsatisfiable evict (every evictable key protected) returns None and changes nothing."""
    mgr = CPUOffloadingManager(num_chunks=cap, cache_policy="KVRouteAdaptive", cache_policy_module_path=MODULE)
    keys = [key_of(1000 + i) for i in range(cap)]
    ctx = ReqContext(req_id="p")
    mgr.on_new_request(ctx)
    out = mgr.prepare_store(keys, ctx)
    mgr.complete_store(out.keys_to_store, ctx)
    mgr.on_request_finished(ctx)
    pol = mgr._policy
    before = (dict(pol.chunks), set(pol._cand), set(pol._evictable))
    assert pol.evict(2, protected=set(keys)) is None
    assert (dict(pol.chunks), set(pol._cand), set(pol._evictable)) == before
    got = pol.evict(2, protected={keys[0]})
    assert got is not None and len(got) == 2 and keys[0] not in {k for k, _ in got}
    return {"atomic": True, "evicted_tail_first": [keys.index(k) for k, _ in got]}


def response_probe() -> dict:
    """A request's response blocks, registered and stored after its prompt's (vLLM hashes them as it
    generates), reach the policy when the request finishes: used once like the prompt, and the prompt's
    old last block is no longer the tail."""
    mgr = CPUOffloadingManager(num_chunks=16, cache_policy="KVRouteAdaptive", cache_policy_module_path=MODULE)
    prompt = [key_of(2000 + i) for i in range(3)]
    resp = [key_of(2100 + i) for i in range(2)]
    ctx = ReqContext(req_id="r", kv_transfer_params={"kvroute_now": 1.0})
    for i, k in enumerate(prompt):
        ctx.set_offload_key_position(k, (i + 1) * BLOCK_TOKENS)
    mgr.on_new_request(ctx)
    out = mgr.prepare_store(prompt, ctx)
    mgr.complete_store(out.keys_to_store, ctx)
    for i, k in enumerate(resp):  # generated later
        ctx.set_offload_key_position(k, (len(prompt) + i + 1) * BLOCK_TOKENS)
    out = mgr.prepare_store(resp, ctx)
    mgr.complete_store(out.keys_to_store, ctx)
    mgr.on_request_finished(ctx)
    pol = mgr._policy.policy
    return {"uses": [pol._meta[k][2] for k in prompt + resp],
            "tail": [pol._meta[k][1] // pol._nf % 2 for k in (prompt[-1], resp[-1])]}


def main(argv: list[str]) -> int:
    n = int(argv[1]) if len(argv) > 1 else 1000
    cut = int(argv[2]) if len(argv) > 2 else 16
    share = float(argv[3]) if len(argv) > 3 else 0.1
    reqs = [Request(r.ts, r.keys[:cut]) for r in load_trace("mooncake_conversation.jsonl", n)]
    cap = capacity_blocks(share, unique_blocks(reqs))
    out = {"requests": n, "max_blocks": cut, "capacity": cap}
    for name, module in [("lru", None), ("arc", None), ("KVRouteLRU", MODULE), ("KVRouteARC", MODULE),
                         ("KVRouteAdaptive", MODULE)]:
        out[name] = run(name, module, reqs, cap)
    out["probe"] = atomic_probe()
    out["response_probe"] = response_probe()
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
