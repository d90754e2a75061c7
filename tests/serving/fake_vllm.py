"""A vLLM-like OpenAI HTTP server for proxy tests (aiohttp, on 127.0.0.1).

It answers ``/v1/models``, ``/health``, ``/metrics``, ``/v1/completions`` and
``/v1/chat/completions`` (streamed or not) the way vLLM 0.32 does where the
proxy looks: a role chunk then one chunk per token, a usage-only final chunk
when ``stream_options.include_usage`` is set, ``usage.prompt_tokens_details.
cached_tokens`` from a true prefix cache of full blocks (capped at
``(n - 1) // block`` blocks, as vLLM recomputes the last token).

Knobs (attributes, set by the test between requests): ``status`` (answer every
generation with this HTTP status), ``reset_after`` (drop the connection after
this many stream events), ``stall_s`` (wait before answering), ``token_delay_s``.
It records every body it received (``bodies``, raw bytes) and how many streams
ended because the client went away (``disconnects``).
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from kvroute.serving.tokenize import EngineTokenizer


class FakeVLLM:
    def __init__(self, tokenizer: EngineTokenizer, *, model: str = "tiny", block_size: int = 16,
                 max_model_len: int = 4096) -> None:
        self.tok = tokenizer
        self.model = model
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.cache: set[tuple[int, ...]] = set()
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.status: int | None = None
        self.reset_after: int | None = None
        self.stall_s = 0.0
        self.token_delay_s = 0.0
        self.disconnects = 0
        self.running = 0
        self.healthy = True
        #: Publish the vLLM load gauges on /metrics (False: as vLLM started with --disable-log-stats).
        self.load_gauges = True
        #: KV blocks the engine reports on /metrics (``vllm:cache_config_info``); its cache never evicts.
        self.num_gpu_blocks = 4096

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)
        return app

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model",
                                                              "root": "/nonexistent", "max_model_len": self.max_model_len}]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.healthy else 503)

    async def _metrics(self, request: web.Request) -> web.Response:
        if not self.load_gauges:
            return web.Response(text='python_gc_objects_collected_total{generation="0"} 1.0\n')
        text = (f'vllm:num_requests_running{{engine="0",model_name="{self.model}"}} {float(self.running)}\n'
                f'vllm:num_requests_waiting{{engine="0",model_name="{self.model}"}} 2.0\n'
                f'vllm:kv_cache_usage_perc{{engine="0",model_name="{self.model}"}} 0.25\n'
                f'vllm:cache_config_info{{block_size="{self.block_size}",engine="0",'
                f'num_gpu_blocks="{self.num_gpu_blocks}",prefix_caching_hash_algo="sha256"}} 1.0\n')
        return web.Response(text=text)

    def cached_tokens(self, ids: list[int]) -> int:
        bs = self.block_size
        n = 0
        limit = max(0, len(ids) - 1) // bs
        while n < limit and tuple(ids[: (n + 1) * bs]) in self.cache:
            n += 1
        for k in range(1, len(ids) // bs + 1):
            self.cache.add(tuple(ids[: k * bs]))
        return n * bs

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, chat=True)

    async def _generate(self, request: web.Request, *, chat: bool) -> web.StreamResponse:
        raw = await request.read()
        self.bodies.append(raw)
        self.headers.append(dict(request.headers))
        if self.stall_s:
            await asyncio.sleep(self.stall_s)
        if self.status is not None:
            return web.json_response({"error": {"message": "injected", "type": "x", "code": self.status}},
                                     status=self.status)
        body = json.loads(raw)
        ids = self.tok.encode_chat(body) if chat else self.tok.encode_completion(body)[0]
        cached = self.cached_tokens(ids)
        n_out = int(body.get("max_tokens") or 4)
        usage = {"prompt_tokens": len(ids), "completion_tokens": n_out, "total_tokens": len(ids) + n_out,
                 "prompt_tokens_details": {"cached_tokens": cached}}
        obj = "chat.completion" if chat else "text_completion"
        if not body.get("stream"):
            choice = ({"index": 0, "message": {"role": "assistant", "content": "x" * n_out}, "finish_reason": "length"}
                      if chat else {"index": 0, "text": "x" * n_out, "finish_reason": "length"})
            return web.json_response({"id": "r", "object": obj, "model": self.model, "choices": [choice], "usage": usage})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        self.running += 1
        sent = 0
        try:
            events = []
            if chat:
                events.append({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
            for i in range(n_out):
                d = {"index": 0, "delta": {"content": "x"}} if chat else {"index": 0, "text": "x"}
                events.append({"choices": [d]})
            so = body.get("stream_options") or {}
            if so.get("include_usage"):
                events.append({"choices": [], "usage": usage})
            for ev in events:
                if self.reset_after is not None and sent >= self.reset_after:
                    request.transport.close()
                    return resp
                await resp.write(b"data: " + json.dumps(dict(ev, id="r", object=obj + ".chunk")).encode() + b"\n\n")
                sent += 1
                if self.token_delay_s:
                    await asyncio.sleep(self.token_delay_s)
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.disconnects += 1
            raise
        finally:
            self.running -= 1
        return resp
