"""The proxy against fake vLLM HTTP engines: lifecycle of load, retries, health, errors, pass-through."""
from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from conftest import harness

LONG = "the quick brown fox jumps over the lazy dog " * 8


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def wait_for(cond: Any, timeout: float = 5.0) -> None:
    """Poll ``cond`` (the proxy releases load in its own task); fails after ``timeout``."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.01)


def test_completion_forwards_body_untouched_and_releases_load(engine_tokenizer: Any) -> None:
    async def go() -> None:
        async with harness(engine_tokenizer) as h:
            raw = json.dumps({"model": "tiny", "prompt": LONG, "max_tokens": 3, "some_future_field": {"x": [1, 2]},
                              "priority": 5}).encode()
            st, doc = await h.post("/v1/completions", raw=raw)
            assert st == 200 and doc["usage"]["prompt_tokens"] > 16
            got = [b for e in h.engines.values() for b in e.bodies]
            assert got == [raw]  # byte for byte
            assert h.proxy.router.in_flight() == 0
            # the same prompt again: predicted and reported agree (fake engine has no events: both from its cache)
            st, doc = await h.post("/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 3})
            assert st == 200 and h.proxy.router.in_flight() == 0
    run(go())


def test_chat_stream_passes_events_and_strips_injected_usage(engine_tokenizer: Any) -> None:
    async def go() -> None:
        async with harness(engine_tokenizer) as h:
            body = {"model": "tiny", "messages": [{"role": "user", "content": LONG}], "max_tokens": 4, "stream": True}
            st, text = await h.post("/v1/chat/completions", body)
            assert st == 200
            events = [e for e in text.split(b"\n\n") if e]
            assert events[-1] == b"data: [DONE]"
            docs = [json.loads(e[6:]) for e in events[:-1]]
            assert len(docs) == 5 and all(d["choices"] for d in docs)  # role + 4 tokens, no usage event
            sent = [json.loads(b) for e in h.engines.values() for b in e.bodies]
            assert sent[0]["stream_options"] == {"include_usage": True}
            assert h.proxy.checked == 1 and h.proxy.router.in_flight() == 0
            # a client that asks for usage gets it, and its body is forwarded as is
            body["stream_options"] = {"include_usage": True}
            st, text = await h.post("/v1/chat/completions", body)
            docs = [json.loads(e[6:]) for e in text.split(b"\n\n") if e and e != b"data: [DONE]"]
            assert docs[-1]["choices"] == [] and docs[-1]["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
            assert h.proxy.checked == 2
    run(go())


@pytest.mark.parametrize("raw,status,param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "model"),
    (json.dumps({"model": "tiny", "prompt": "x", "stream": "yes"}).encode(), 400, "stream"),
    (json.dumps({"model": "tiny", "prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": []}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": [1, "a"]}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny"}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "x", "add_special_tokens": "no"}).encode(), 400, "add_special_tokens"),
    (json.dumps({"model": "tiny", "prompt": "hello " * 5000}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "x", "stream": True, "stream_options": 3}).encode(), 400, "stream_options"),
])
def test_bad_completions_get_openai_errors_and_keep_no_load(engine_tokenizer: Any, raw: bytes, status: int,
                                                            param: str | None) -> None:
    async def go() -> None:
        async with harness(engine_tokenizer) as h:
            st, doc = await h.post("/v1/completions", raw=raw)
            assert st == status
            assert set(doc["error"]) == {"message", "type", "param", "code"} and doc["error"]["param"] == param
            assert h.proxy.router.in_flight() == 0
            assert not any(e.bodies for e in h.engines.values())
    run(go())


@pytest.mark.parametrize("messages,extra,param", [
    ("hi", {}, "messages"),
    ([], {}, "messages"),
    ([{"role": "wizard", "content": "x"}], {}, "messages"),
    ([{"role": "user", "content": 3}], {}, "messages"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}], {}, "messages"),
    ([{"role": "user", "content": "x"}], {"add_generation_prompt": True, "continue_final_message": True},
     "continue_final_message"),
    ([{"role": "user", "content": "x"}], {"chat_template": "{{ 1 }}"}, "chat_template"),
    ([{"role": "user", "content": "x"}], {"chat_template_kwargs": {"tokenize": False}}, "chat_template_kwargs"),
    ([{"role": "user", "content": "x"}], {"tools": [{"type": "function"}]}, "tools"),
])
def test_bad_chats_get_openai_errors(engine_tokenizer: Any, messages: Any, extra: dict, param: str) -> None:
    async def go() -> None:
        async with harness(engine_tokenizer) as h:
            st, doc = await h.post("/v1/chat/completions", {"model": "tiny", "messages": messages, **extra})
            assert st == 400 and doc["error"]["param"] == param, doc
            assert h.proxy.router.in_flight() == 0
    run(go())


def test_unsupported_content_can_be_routed_without_cache_credit(engine_tokenizer: Any) -> None:
    async def go() -> None:
        async with harness(engine_tokenizer, unsupported_content="route") as h:
            msg = [{"role": "user", "content": [{"type": "text", "text": "look"},
                                                 {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
            # the fake engine cannot tokenize images either; any answer proves the proxy forwarded it
            h.engines["e0"].status = h.engines["e1"].status = 200
            st, _ = await h.post("/v1/chat/completions", {"model": "tiny", "messages": msg})
            assert st == 200 and h.proxy.router.in_flight() == 0
            assert h.proxy.checked == 0
    run(go())


def test_refused_engine_retried_once_on_next_best_then_unhealthy(engine_tokenizer: Any) -> None:
    async def go() -> None:
        async with harness(engine_tokenizer, live=1, dead=1, policy="round_robin", fail_threshold=2) as h:
            for _ in range(6):
                st, doc = await h.post("/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 2})
                assert st == 200, doc
            assert len(h.engines["e0"].bodies) == 6
            hd = h.proxy.pool.health["d0"]
            assert hd.unhealthy and hd.failures_total == 2 and hd.reason == "refused"
            assert "d0" not in h.proxy.router.healthy_workers()
            assert h.proxy.router.in_flight() == 0
            health = h.proxy.health_doc()
            assert health["status"] == "degraded" and any("d0" in r for r in health["reasons"])
    run(go())


def test_5xx_before_first_byte_retried_and_probe_brings_engine_back(engine_tokenizer: Any) -> None:
    async def go() -> None:
        async with harness(engine_tokenizer, live=2, policy="round_robin", fail_threshold=3) as h:
            h.engines["e0"].status = 500
            for _ in range(6):
                st, _ = await h.post("/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 2})
                assert st == 200
            assert h.proxy.pool.health["e0"].unhealthy
            h.engines["e0"].healthy = False
            await h.proxy.pool.probe_once(h.proxy._session)
            assert h.proxy.pool.health["e0"].unhealthy  # /health still failing
            h.engines["e0"].status = None
            h.engines["e0"].healthy = True
            await h.proxy.pool.probe_once(h.proxy._session)
            assert not h.proxy.pool.health["e0"].unhealthy and "e0" in h.proxy.router.healthy_workers()
            before = len(h.engines["e0"].bodies)
            for _ in range(4):
                await h.post("/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 2})
            assert len(h.engines["e0"].bodies) > before  # back in use
    run(go())


def test_4xx_from_engine_passes_through_and_is_not_a_failure(engine_tokenizer: Any) -> None:
    async def go() -> None:
        async with harness(engine_tokenizer, live=1) as h:
            h.engines["e0"].status = 422
            st, doc = await h.post("/v1/completions", {"model": "tiny", "prompt": LONG})
            assert st == 422 and doc["error"]["message"] == "injected"
            assert h.proxy.pool.health["e0"].consecutive_failures == 0 and h.proxy.router.in_flight() == 0
    run(go())


def test_no_engine_gives_503_with_openai_body(engine_tokenizer: Any) -> None:
    async def go() -> None:
        async with harness(engine_tokenizer, live=0, dead=2, fail_threshold=1) as h:
            st, doc = await h.post("/v1/completions", {"model": "tiny", "prompt": LONG})
            assert st == 503 and doc["error"]["type"] == "service_unavailable"
            st, doc = await h.post("/v1/completions", {"model": "tiny", "prompt": LONG})
            assert st == 503 and "no engine" in doc["error"]["message"]
            assert h.proxy.router.in_flight() == 0
            async with h.client.get(h.url + "/health") as r:
                assert r.status == 503 and (await r.json())["status"] == "down"
    run(go())


def test_client_disconnect_mid_stream_releases_load_and_aborts_engine(engine_tokenizer: Any) -> None:
    async def go() -> None:
        async with harness(engine_tokenizer, live=1) as h:
            eng = h.engines["e0"]
            eng.token_delay_s = 0.05
            body = {"model": "tiny", "prompt": LONG, "max_tokens": 200, "stream": True}
            async with h.client.post(h.url + "/v1/completions", json=body) as r:
                first = await r.content.readline()
                assert first.startswith(b"data: ")
                assert h.proxy.router.in_flight() == 1
                st = h.proxy.router.worker_state("e0")
                assert st.prefill_tokens == 0  # prefill_done at the first event
                r.close()
            await wait_for(lambda: h.proxy.router.in_flight() == 0)
            await wait_for(lambda: eng.disconnects == 1)
            assert h.proxy.router.worker_state("e0").active_requests == 0
    run(go())


def test_engine_reset_mid_stream_ends_stream_with_error_and_releases(engine_tokenizer: Any) -> None:
    async def go() -> None:
        async with harness(engine_tokenizer, live=1) as h:
            h.engines["e0"].reset_after = 2
            st, text = await h.post("/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 8, "stream": True})
            assert st == 200
            events = [e for e in text.split(b"\n\n") if e]
            assert len(events) == 4 and b'"error"' in events[2] and events[3] == b"data: [DONE]"
            assert h.proxy.router.in_flight() == 0
            assert h.proxy.pool.health["e0"].failures_total == 1
    run(go())


def test_timeout_before_first_byte_retries_elsewhere(engine_tokenizer: Any) -> None:
    async def go() -> None:
        async with harness(engine_tokenizer, live=2, policy="round_robin", read_timeout_s=0.3) as h:
            h.engines["e0"].stall_s = 5
            st, _ = await h.post("/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 2})
            assert st == 200
            assert h.proxy.pool.health["e0"].reason == "timeout" or len(h.engines["e1"].bodies) == 1
            assert h.proxy.router.in_flight() == 0
    run(go())


def test_session_hints_reach_the_policy(engine_tokenizer: Any) -> None:
    from kvroute.router.policies import POLICIES

    seen: list[Any] = []
    base = POLICIES["round_robin"]

    class Spy(base):  # type: ignore[misc, valid-type]
        def choose(self, req: Any, fleet: Any) -> Any:
            seen.append(req.hints)
            return super().choose(req, fleet)

    async def go() -> None:
        async with harness(engine_tokenizer, live=1, policy=Spy()) as h:
            await h.post("/v1/completions", {"model": "tiny", "prompt": LONG, "user": "alice"},
                         headers={"x-session-id": "s-42"})
            await h.post("/v1/completions", {"model": "tiny", "prompt": LONG})
            assert seen[0].session_id == "s-42" and seen[0].user == "alice"
            assert seen[1].session_id is None and seen[1].user is None
            assert "x-session-id" not in {k.lower() for k in h.engines["e0"].headers[0]}
    run(go())


def test_scrape_feeds_router_load(engine_tokenizer: Any) -> None:
    async def go() -> None:
        async with harness(engine_tokenizer, live=2, dead=1) as h:
            errors: list[str] = []
            await h.proxy.pool.scrape_once(h.proxy._session, errors.append)
            s = h.proxy.router.worker_state("e0")
            assert (s.reported_waiting, s.reported_running, s.reported_kv_usage) == (2, 0, 0.25)
            assert errors == ["d0"]
    run(go())


def test_engine_without_load_gauges_is_a_scrape_failure_shown_in_health(engine_tokenizer: Any) -> None:
    """vLLM with --disable-log-stats serves /metrics without its gauges: the proxy must not look sighted."""
    async def go() -> None:
        async with harness(engine_tokenizer, live=2) as h:
            h.engines["e1"].load_gauges = False
            errors: list[str] = []
            await h.proxy.pool.scrape_once(h.proxy._session, errors.append)
            assert errors == ["e1"]
            assert h.proxy.router.worker_state("e1").reported_running is None
            doc = h.proxy.health_doc()
            e1 = next(e for e in doc["engines"] if e["name"] == "e1")
            assert "vllm:num_requests" in e1["load_scrape_error"]
            assert doc["status"] == "degraded" and any(r.startswith("e1: load not scraped") for r in doc["reasons"])
            h.engines["e1"].load_gauges = True
            await h.proxy.pool.scrape_once(h.proxy._session, errors.append)
            doc = h.proxy.health_doc()
            assert next(e for e in doc["engines"] if e["name"] == "e1")["load_scrape_error"] is None, doc
            assert not any("load not scraped" in r for r in doc["reasons"])  # (fake engines have no KV events:
            # "degraded" stays for that reason)
    run(go())


def test_models_health_metrics_endpoints(engine_tokenizer: Any) -> None:
    async def go() -> None:
        async with harness(engine_tokenizer) as h:
            async with h.client.get(h.url + "/v1/models") as r:
                assert [m["id"] for m in (await r.json())["data"]] == ["tiny"]
            async with h.client.get(h.url + "/health") as r:
                doc = await r.json()
                # no KV events configured: routing works, predictions rest on decisions only -> degraded
                assert r.status == 200 and doc["status"] == "degraded"
            await h.post("/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 2})
            async with h.client.get(h.url + "/metrics") as r:
                text = await r.text()
            assert "kvroute_proxy_prediction_error_tokens_bucket" in text
            assert 'kvroute_proxy_requests_total{endpoint="completions",status="200"} 1.0' in text
    run(go())


def test_blind_engine_is_reported_and_its_cache_not_credited(engine_tokenizer: Any) -> None:
    """An engine whose KV-event endpoint never connects: /health names it and the router stops crediting it."""
    import time

    from conftest import closed_port
    from kvroute.adapters.subscriber import KVEventSubscriber
    from kvroute.router import Router
    from kvroute.serving.engines import EnginePool, EngineSpec
    from kvroute.serving.proxy import Proxy, ProxyConfig
    from kvroute.sidecar.health import HealthConfig

    router = Router(["e0"], 16)
    events = KVEventSubscriber(router.index, lock=router.lock)
    events.add_worker("e0", f"tcp://127.0.0.1:{closed_port()}")
    events.start()
    try:
        spec = EngineSpec("e0", "http://127.0.0.1:1", events="tcp://127.0.0.1:1")
        proxy = Proxy(router, engine_tokenizer, EnginePool(router, [spec]), ProxyConfig(served_models=("tiny",)),
                      events=events, health_config=HealthConfig(connect_grace_s=0.0))
        deadline = time.monotonic() + 5
        while "never_connected" not in proxy.health_doc()["engines"][0]["index_reasons"]:
            assert time.monotonic() < deadline, proxy.health_doc()
            time.sleep(0.05)
        doc = proxy.health_doc()
        assert doc["status"] == "degraded" and any("never_connected" in r for r in doc["reasons"])
        assert router.cache_credited("e0") is False
    finally:
        events.close()


def test_last_engine_in_rotation_is_never_ejected(engine_tokenizer: Any) -> None:
    async def go() -> None:
        async with harness(engine_tokenizer, live=2, policy="round_robin", fail_threshold=1) as h:
            h.engines["e0"].status = h.engines["e1"].status = 500
            for _ in range(4):
                st, doc = await h.post("/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 2})
                assert st == 503
            hs = h.proxy.pool.health
            assert sum(x.unhealthy for x in hs.values()) == 1  # one left in rotation (panic rule)
            h.engines["e0"].status = h.engines["e1"].status = None
            st, _ = await h.post("/v1/completions", {"model": "tiny", "prompt": LONG, "max_tokens": 2})
            assert st == 200 and h.proxy.router.in_flight() == 0
    run(go())


def test_responses_name_the_engine_and_the_predicted_cached_tokens(engine_tokenizer: Any) -> None:
    """``x-kvroute-engine`` / ``x-kvroute-predicted-cached-tokens`` on streamed and whole answers."""
    async def go() -> None:
        async with harness(engine_tokenizer) as h:
            names = set(h.engines)
            seen = []
            for stream in (False, True, True):
                body = {"model": "tiny", "prompt": LONG, "max_tokens": 2, "stream": stream}
                async with h.client.post(h.url + "/v1/completions", json=body) as r:
                    await r.read()
                    assert r.status == 200
                    seen.append((r.headers["x-kvroute-engine"], int(r.headers["x-kvroute-predicted-cached-tokens"])))
            assert {e for e, _ in seen} <= names
            assert seen[0][1] == 0  # a cold cache: nothing predicted
            # the fake engines publish no events, so only the router's own in-flight prefixes could credit;
            # every prediction is a whole number of blocks no longer than the prompt
            assert all(p % 16 == 0 and p >= 0 for _, p in seen)
            assert h.proxy.router.in_flight() == 0
    run(go())


def _grow(prompt: str, k: int) -> str:
    return prompt + " " + " ".join(f"turn{k} word{j}" for j in range(24))


def test_engines_without_events_are_predicted_from_decisions(engine_tokenizer: Any) -> None:
    """Approximate mode (issue 13): engines publishing no KV events get their caches predicted from the
    proxy's own decisions; sessions that grow turn by turn are then predicted exactly.  With it off, only
    prompts in flight are predicted, so every later turn is under-predicted."""
    async def go(mode: str) -> tuple[int, int, dict[str, Any]]:
        async with harness(engine_tokenizer, approximate=mode) as h:
            for sid in range(4):
                prompt = f"session {sid}: " + LONG
                for k in range(4):
                    prompt = _grow(prompt, k)
                    st, _ = await h.post("/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 2},
                                         headers={"x-session-id": f"s{sid}"})
                    assert st == 200
            doc = h.proxy.health_doc()
            return h.proxy.checked, h.proxy.exact, doc

    checked, exact, doc = run(go("auto"))
    assert checked == 16 and exact == 16, doc["recent_mispredictions"]
    assert all(e["approximate"] for e in doc["engines"])
    assert any("approximate mode" in r for r in doc["reasons"])
    checked, exact, doc = run(go("off"))
    assert checked == 16 and exact < 16 and not any(e["approximate"] for e in doc["engines"])
    assert any("only prompts in flight" in r for r in doc["reasons"])


def test_follow_stream_health_switches_approximate_mode() -> None:
    """``approximate = auto``: no stream or a stale one -> approximate; a fresh stream -> the index alone."""
    from kvroute.router import Router
    from kvroute.sidecar.health import follow_stream_health

    r = Router(["a", "b", ("c", 0), ("c", 1)], 16)
    made = follow_stream_health(r, stale=set(), with_events={"a", "c"})
    assert made == [("b", True)] and r.approximate_workers() == ["b"]
    follow_stream_health(r, stale={"a", "c"}, with_events={"a", "c"})
    assert set(r.approximate_workers()) == {"a", "b", ("c", 0), ("c", 1)}
    made = follow_stream_health(r, stale=set(), with_events={"a", "b", "c"})
    assert set(made) == {("a", False), ("b", False), (("c", 0), False), (("c", 1), False)}
    assert r.approximate_workers() == []


def test_scrape_reads_the_engines_kv_pool() -> None:
    from kvroute.serving.engines import engine_block_size, parse_vllm_load

    text = ('vllm:num_requests_waiting{engine="0",model_name="m"} 1.0\n'
            'vllm:cache_config_info{block_size="32",engine="0",num_gpu_blocks="2000"} 1.0\n'
            'vllm:cache_config_info{block_size="32",engine="1",num_gpu_blocks="1500"} 1.0\n')
    assert parse_vllm_load(text) == {"waiting": 1, "capacity_blocks": 3500}
    assert engine_block_size(text) == 32
    assert engine_block_size('vllm:cache_config_info{block_size="None",engine="0"} 1.0\n') is None
