"""Ray Serve drop-in: a real Serve app, two replicas, kvroute's RequestRouter choosing.

Needs the ``ray`` extra (``pip install -e ".[ray]"``); skipped with a reason otherwise.
One Ray session for the module (~20 s to start on 2 cores).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="the Ray Serve drop-in test needs the 'ray' extra: pip install -e '.[ray]'")
serve = pytest.importorskip("ray.serve", reason="needs ray[serve]: pip install -e '.[ray]'")

from kvroute.kvindex.hashing import block_hash_list  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 16


def _wait(cond, timeout_s: float = 20.0, what: str = "condition"):
    """Poll a real system's state until ``cond()`` holds (no fixed sleeps)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def app():
    from ray.serve.config import RequestRouterConfig

    # Ray's worker processes must import kvroute from this tree and the test app from tests/.
    env_path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = env_path
    sys.path.insert(0, str(ROOT / "tests"))
    from gateway_ray_app import Echo

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": env_path}})
    try:
        serve.start(proxy_location="Disabled")
        dep = Echo.options(request_router_config=RequestRouterConfig(
            request_router_class="kvroute.gateways.ray_serve.KVRouteRequestRouter",
            request_router_kwargs={"block_size": BLOCK, "approximate": True},
        ))
        handle = serve.run(dep.bind(), name="kvroute-test", route_prefix=None)
        yield handle
    finally:
        serve.shutdown()
        ray.shutdown()
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old


def _router():
    from kvroute.gateways.ray_serve import live_routers

    rs = live_routers()
    assert len(rs) == 1, rs
    return rs[0]


def _ask(handle, tokens, **extra):
    return handle.remote({"prompt_token_ids": list(tokens), **extra}).result(timeout_s=60)["replica"]


def _prefix(i: int, n_blocks: int = 4) -> list[int]:
    return [1000 * (i + 1) + t for t in range(n_blocks * BLOCK)]


def test_shared_prefixes_stick_to_the_replica_the_index_credits(app):
    first = {}
    for fam in range(4):
        first[fam] = _ask(app, _prefix(fam) + [7])
    r = _router()
    kv = r.routing.router
    _wait(lambda: r.routing.in_flight() == 0, what="the first requests' release")
    assert set(kv.workers()) == {rid.unique_id for rid in r.curr_replicas}
    for fam in range(4):
        hs = block_hash_list(_prefix(fam), BLOCK)
        holders = {w: ov.total for w, ov in kv.index.match(hs).items() if ov.total}
        # the approximate index credits exactly the replica that served the family's first request
        assert holders == {first[fam]: 4}, (fam, holders, first[fam])
    for rnd in range(3):
        for fam in range(4):
            got = _ask(app, _prefix(fam) + [50 + rnd, 60 + fam] * 9)
            assert got == first[fam], (fam, rnd)
    d = r.routing.stats
    assert d.routed >= 16 and d.unroutable == 0 and d.diverted == 0


def test_fake_kv_event_steers_a_new_prefix(app):
    r = _router()
    kv = r.routing.router
    new = [77_000 + t for t in range(6 * BLOCK)]
    hs = block_hash_list(new, BLOCK)
    for target in sorted(kv.workers()):
        with kv.lock:  # what a KVEventSubscriber does for a BlockStored event
            kv.index.store(target, hs)
        assert _ask(app, new + [3, 4, 5]) == target
        with kv.lock:
            kv.index.remove(target, hs)


def test_load_is_released_when_requests_finish(app):
    r = _router()
    kv = r.routing.router
    _wait(lambda: kv.in_flight() == 0, what="an idle router")
    toks = _prefix(9)
    resps = [app.remote({"prompt_token_ids": toks + [i], "sleep_s": 1.0}) for i in range(6)]
    _wait(lambda: kv.in_flight() > 0, what="requests in flight")
    busy = sum(kv.worker_state(w).active_requests for w in kv.workers())
    assert busy == kv.in_flight() > 0
    replicas = {x.result(timeout_s=60)["replica"] for x in resps}
    assert replicas <= set(kv.workers())
    _wait(lambda: kv.in_flight() == 0 and r.routing.in_flight() == 0, what="load released")
    for w in kv.workers():
        s = kv.worker_state(w)
        assert (s.active_requests, s.prefill_tokens, s.decode_blocks) == (0, 0, 0), s.to_dict()


def test_requests_without_token_ids_are_left_to_serve(app):
    r = _router()
    before = r.routing.stats.unroutable
    assert _ask(app, []) in set(r.routing.router.workers())
    assert r.routing.stats.unroutable > before
