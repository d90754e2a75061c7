"""``kvroute proxy``: an OpenAI-compatible front that tokenizes, routes and streams to real engines.

One request's path (:meth:`Proxy._generate`):

1. parse the JSON body (400 on anything malformed), check the model (404);
2. tokenize it exactly as the engine will (:class:`EngineTokenizer`; 400 on
   content it cannot reproduce, or routed without cache credit when
   ``unsupported_content="route"``);
3. ``Router.route`` with the session hints (``x-session-id`` header, ``user``);
4. forward the body untouched (except ``stream_options.include_usage``, added
   so the engine reports its cached tokens; the extra usage event is then
   dropped from the client's stream) to the chosen engine;
5. refused / reset / timeout / 5xx before the first byte: release the load,
   count the failure, route again without that engine (once);
6. stream the engine's events through one by one; ``Router.prefill_done`` at
   the first event, ``Router.finish`` when the response ends, the client goes
   away, the engine fails mid-stream or the request times out -- every path
   goes through one ``finally``;
7. compare the engine's ``usage.prompt_tokens_details.cached_tokens`` with the
   prediction (the index-confirmed part, capped at ``(n - 1) // block`` blocks
   because vLLM always recomputes a prompt's last token) and its
   ``prompt_tokens`` with the proxy's own count.

Engines without KV events (and, with ``approximate="auto"``, engines whose event
stream went stale) are in approximate mode: the router predicts their caches from
its own decisions, each routed prompt's blocks kept for ``--approx-ttl`` seconds
and at most the engine's KV pool (``vllm:cache_config_info`` on its
``/metrics``, read at start and by each load scrape).  ``/health`` counts
over-predictions apart (``prediction_over``): they are the costly error.

Concurrency: one asyncio loop; the router is called under its lock (each call
is microseconds); tokenization of long prompts runs in a thread so that a
100k-token chat does not stall other streams.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import ClientError, ClientSession, ClientTimeout, TCPConnector, web
from aiohttp.client_exceptions import ClientConnectorError, ClientOSError, ClientPayloadError, ServerDisconnectedError
from prometheus_client import generate_latest

from ..router import Router
from ..router.errors import NoHealthyWorkerError, UnknownRequestError
from ..router.types import RouteHints
from ..sidecar.config import APPROXIMATE_MODES
from ..sidecar.health import REASONS, HealthMonitor, follow_stream_health
from .engines import EnginePool, EngineSpec
from .errors import (BadRequestError, EngineFailedError, ModelNotFoundError, NoEngineError, ServingError,
                     UnsupportedContentError)
from .metrics import ProxyMetrics
from .sse import SSESplitter, error_event, event_json
from .tokenize import EngineTokenizer

log = logging.getLogger("kvroute.serving")

#: Tokenize in a worker thread above this many characters of text (short ones run inline: cheaper).
INLINE_TOKENIZE_CHARS = 16_384
#: Hop-by-hop and proxy-owned headers never forwarded to the engine.
_DROP_HEADERS = frozenset({"host", "content-length", "connection", "keep-alive", "transfer-encoding", "te",
                           "upgrade", "proxy-connection", "accept-encoding", "x-session-id"})


@dataclass
class ProxyConfig:
    """Tunables of :class:`Proxy` (the CLI's flags)."""

    #: Model names clients may ask for (the engines' served names); the first is the default.
    served_models: tuple[str, ...]
    #: Engine context length (prompts over it get 400); None: not checked by the proxy.
    max_model_len: int | None = None
    #: Seconds to connect to an engine before the try counts as failed.
    connect_timeout_s: float = 5.0
    #: Seconds without a byte from the engine (before or during the stream) before giving up.
    read_timeout_s: float = 600.0
    #: Seconds a whole request may take.
    request_timeout_s: float = 3600.0
    #: "reject" (400) or "route" (without cache credit) for content the proxy cannot tokenize.
    unsupported_content: str = "reject"
    #: Add stream_options.include_usage to streams so cached tokens can be checked (dropped from the client's stream).
    check_streams: bool = True
    #: Predict an engine's cache from the proxy's own decisions (approximate mode): "auto" for engines
    #: without KV events and while an engine's stream is stale, "all" for every engine, "off" never.
    approximate: str = "auto"

    def __post_init__(self) -> None:
        if not self.served_models:
            raise ValueError("at least one served model name is needed")
        if self.unsupported_content not in ("reject", "route"):
            raise ValueError("unsupported_content must be 'reject' or 'route'")
        if self.approximate not in APPROXIMATE_MODES:
            raise ValueError(f"approximate must be one of {APPROXIMATE_MODES}, got {self.approximate!r}")


class _Req:
    """One request's bookkeeping inside the proxy (local to its handler)."""

    __slots__ = ("rid", "ids", "n_tokens", "decision", "checkable", "t0", "first_at", "routed")

    def __init__(self, rid: str, ids: list[int] | None, checkable: bool, t0: float) -> None:
        self.rid = rid
        #: Token ids routed (None: routed without cache credit).
        self.ids = ids
        self.n_tokens = len(ids) if ids else 0
        self.decision: Any = None
        #: Whether the engine's cached-token report can be compared with the prediction.
        self.checkable = checkable
        self.t0 = t0
        self.first_at: float | None = None
        #: Whether the router holds load for this request now.
        self.routed = False


class Proxy:
    """The aiohttp application and everything it owns; see the module docstring."""

    def __init__(self, router: Router, tokenizer: EngineTokenizer, pool: EnginePool, config: ProxyConfig,
                 *, events: Any = None, metrics: ProxyMetrics | None = None, health_config: Any = None) -> None:
        self.router = router
        self.tokenizer = tokenizer
        self.pool = pool
        self.config = config
        #: The KV-event subscriber (None when no engine publishes events); read for /health.
        self.events = events
        #: Per-engine reasons the index is blind (never connected, silent while routed to, block-size
        #: mismatch, unverified, stale); it also stops crediting a blind engine's cache in the router.
        self.monitor = HealthMonitor(router, events, health_config) if events is not None else None
        for spec in pool.specs:  # approximate mode from the start (auto: engines without events)
            if config.approximate == "all" or (config.approximate == "auto" and spec.events is None):
                router.set_approximate(spec.name)
        self.metrics = metrics or ProxyMetrics()
        self.pool.on_failure = lambda name, reason: self.metrics.engine_failures.labels(name, reason).inc()
        self._ids = itertools.count()
        self._prefix = f"kvr-{os.getpid()}-{int(time.time())}"
        self._session: ClientSession | None = None
        self._tasks: list[asyncio.Task] = []
        #: Prediction check totals (also in /metrics), for tests and the bench.
        self.checked = 0
        self.exact = 0
        #: Checked requests predicted above the engine's report, and the checked requests' predicted and
        #: reported cached tokens (sums).
        self.over = 0
        self.predicted_tokens = 0
        self.reported_tokens = 0
        #: Last few mispredictions (request id, engine, predicted, reported), shown in /health.
        self.mismatches: list[tuple[str, str, int, int]] = []

    # -------------------------------------------------------------- app
    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_page)
        app.on_startup.append(self._startup)
        app.on_cleanup.append(self._cleanup)
        return app

    async def _startup(self, app: web.Application) -> None:
        # Idle connections are dropped after 3 s: uvicorn (vLLM's server) closes them after 5 s, and a request
        # sent on a connection the server is closing fails with "server disconnected" -- a false engine failure.
        self._session = ClientSession(connector=TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=3.0),
                                      auto_decompress=False)
        self._tasks.append(asyncio.create_task(self.pool.probe_loop(self._session)))
        if self.pool.scrape_interval_s:
            self._tasks.append(asyncio.create_task(self.pool.scrape_loop(
                self._session, lambda name: self.metrics.scrape_failures.labels(name).inc())))
        self.metrics.healthy_engines.set(len(self.router.healthy_workers()))
        if self.monitor is not None:
            self._tasks.append(asyncio.create_task(self._monitor_loop()))

    async def _monitor_loop(self) -> None:
        assert self.monitor is not None
        while True:
            await asyncio.sleep(self.monitor.config.check_interval_s)
            self.monitor.check()
            if self.config.approximate == "auto":
                follow_stream_health(self.router, {str(w) for w in self.events.stale_workers()},
                                     {s.name for s in self.pool.specs if s.events is not None})

    async def _cleanup(self, app: web.Application) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self._session is not None:
            await self._session.close()

    # -------------------------------------------------------- endpoints
    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "/v1/completions", chat=False)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._generate(request, "/v1/chat/completions", chat=True)

    async def models(self, request: web.Request) -> web.Response:
        data = [{"id": m, "object": "model", "owned_by": "kvroute", "max_model_len": self.config.max_model_len}
                for m in self.config.served_models]
        return web.json_response({"object": "list", "data": data})

    async def health(self, request: web.Request) -> web.Response:
        doc = self.health_doc()
        return web.json_response(doc, status=200 if doc["status"] != "down" else 503)

    def health_doc(self) -> dict[str, Any]:
        stale = {str(w) for w in self.events.stale_workers()} if self.events is not None else set()
        em = self.events.metrics() if self.events is not None else {}
        streams = em.get("workers", {})
        lag = em.get("lag_seconds") or {}
        engines = []
        for spec in self.pool.specs:
            h = self.pool.health[spec.name]
            st = streams.get(spec.name) or {}
            engines.append({"name": spec.name, "url": spec.url,
                            # kept in rotation by the panic rule but failing: not healthy either
                            "healthy": not h.unhealthy and h.consecutive_failures < self.pool.fail_threshold,
                            "consecutive_failures": h.consecutive_failures, "failures_total": h.failures_total,
                            "reason": h.reason or None,
                            "events": spec.events is not None, "events_stale": spec.name in stale,
                            "event_batches": st.get("batches", 0), "events_replaying": bool(st.get("replaying")),
                            "load_scrape_error": h.scrape_error or None})
        approx = {str(w) for w in self.router.approximate_workers()}
        for e in engines:
            e["approximate"] = e["name"] in approx
        healthy = [e for e in engines if e["healthy"]]
        blind = self.monitor.check() if self.monitor is not None else {}
        for e in engines:
            e["index_reasons"] = blind.get(e["name"], [])
        reasons = [f"{e['name']}: unhealthy ({e['reason']})" for e in engines if not e["healthy"]]
        reasons += [f"{e['name']}: {r} ({REASONS[r][1]})" for e in engines for r in e["index_reasons"]]
        reasons += [f"{e['name']}: no KV events configured (" + (
                        "approximate mode: its cache is predicted from routing decisions)" if e["approximate"] else
                        "only prompts in flight are predicted)") for e in engines if not e["events"]]
        reasons += [f"{e['name']}: load not scraped ({e['load_scrape_error']}); the router counts its own "
                    "requests only" for e in engines if e["load_scrape_error"]]
        status = "down" if not healthy else ("degraded" if reasons else "ok")
        return {"status": status, "reasons": reasons, "engines": engines, "in_flight": self.router.in_flight(),
                "prediction_checked": self.checked, "prediction_exact": self.exact, "prediction_over": self.over,
                "predicted_cached_tokens": self.predicted_tokens, "reported_cached_tokens": self.reported_tokens,
                "event_lag_s": {"mean": lag["sum"] / lag["count"] if lag.get("count") else None, "max": lag.get("max")},
                "recent_mispredictions": [{"request_id": r, "engine": w, "predicted": p, "reported": c}
                                          for r, w, p, c in self.mismatches[-10:]]}

    async def metrics_page(self, request: web.Request) -> web.Response:
        self.metrics.healthy_engines.set(len(self.router.healthy_workers()))
        self.metrics.in_flight.set(self.router.in_flight())
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    # -------------------------------------------------------- the path
    async def _generate(self, request: web.Request, path: str, *, chat: bool) -> web.StreamResponse:
        t0 = time.perf_counter()
        endpoint = "chat" if chat else "completions"
        req: _Req | None = None
        try:
            body, raw = await self._parse(request)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise BadRequestError("'stream' must be a boolean", param="stream")
            req = await self._tokenize(body, chat, t0)
            payload, injected = self._payload(body, raw, stream)
            resp = await self._forward(request, path, body, payload, req, stream=stream, injected=injected)
            self.metrics.requests.labels(endpoint, str(resp.status)).inc()
            return resp
        except ServingError as exc:
            self.metrics.requests.labels(endpoint, str(exc.status)).inc()
            return web.json_response(exc.body(), status=exc.status)
        except asyncio.CancelledError:
            self.metrics.client_disconnects.inc()
            raise
        finally:
            if req is not None and req.routed:
                self._release(req)

    async def _parse(self, request: web.Request) -> tuple[dict[str, Any], bytes]:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise BadRequestError(f"the body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise BadRequestError("the body must be a JSON object")
        model = body.get("model")
        if model is not None and model not in self.config.served_models:
            raise ModelNotFoundError(f"The model `{model}` does not exist.", param="model", code="model_not_found")
        return body, raw

    async def _tokenize(self, body: dict[str, Any], chat: bool, t0: float) -> _Req:
        rid = f"{self._prefix}-{next(self._ids)}"
        tok = self.tokenizer
        try:
            if chat:
                size = sum(len(m.get("content") or "") if isinstance(m, dict) and isinstance(m.get("content"), str)
                           else 256 for m in body.get("messages") or [])
                fn = tok.encode_chat
            else:
                p = body.get("prompt")
                size = len(p) if isinstance(p, str) else 0
                fn = tok.encode_completion
            if size > INLINE_TOKENIZE_CHARS:
                out = await asyncio.get_running_loop().run_in_executor(None, fn, body)
            else:
                out = fn(body)
        except UnsupportedContentError:
            if self.config.unsupported_content == "reject":
                raise
            return _Req(rid, None, False, t0)
        if chat:
            return _Req(rid, out, True, t0)
        # A batch of prompts goes to one engine: routed by its first prompt, prediction not checked.
        return _Req(rid, out[0], len(out) == 1, t0)

    def _payload(self, body: dict[str, Any], raw: bytes, stream: bool) -> tuple[bytes, bool]:
        """The bytes sent to the engine: the client's own unless usage must be asked for."""
        if not (stream and self.config.check_streams):
            return raw, False
        so = body.get("stream_options")
        if so is not None and not isinstance(so, dict):
            raise BadRequestError("'stream_options' must be an object", param="stream_options")
        if so and so.get("include_usage") is True:
            return raw, False
        new = dict(body, stream_options=dict(so or {}, include_usage=True))
        return json.dumps(new).encode(), True

    def _route(self, req: _Req, body: dict[str, Any], hints: RouteHints, exclude: set[str]) -> EngineSpec:
        try:
            if req.ids:
                d = self.router.route(req.ids, request_id=req.rid, hints=hints, exclude=exclude,
                                      cache_salt=body.get("cache_salt") if isinstance(body.get("cache_salt"), str) else None)
            else:
                d = self.router.route_hashes([], num_tokens=0, request_id=req.rid, hints=hints, exclude=exclude)
        except NoHealthyWorkerError as exc:
            raise NoEngineError(f"no engine can take the request: {exc}", code="no_healthy_engine") from exc
        req.decision = d
        req.routed = True
        if self.monitor is not None:
            self.monitor.note_routed(d.worker)
        self.metrics.routed.labels(str(d.worker)).inc()
        return self.pool[d.worker]

    def _release(self, req: _Req) -> None:
        if req.routed:
            req.routed = False
            with contextlib.suppress(UnknownRequestError):
                self.router.finish(req.rid)

    async def _forward(self, request: web.Request, path: str, body: dict[str, Any], payload: bytes, req: _Req,
                       *, stream: bool, injected: bool) -> web.StreamResponse:
        assert self._session is not None
        sid = request.headers.get("x-session-id")
        user = body.get("user") if isinstance(body.get("user"), str) else None
        hints = RouteHints(session_id=sid, user=user)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROP_HEADERS}
        headers["Content-Type"] = "application/json"
        timeout = ClientTimeout(total=self.config.request_timeout_s, sock_connect=self.config.connect_timeout_s,
                                sock_read=self.config.read_timeout_s)
        exclude: set[str] = set()
        last_error = ""
        for attempt in range(2):
            spec = self._route(req, body, hints, exclude)
            if attempt == 0:
                self.metrics.overhead.observe(time.perf_counter() - req.t0)
            else:
                self.metrics.retries.inc()
            try:
                upstream = await self._session.post(spec.url + path, data=payload, headers=headers, timeout=timeout)
            except (ClientConnectorError, ServerDisconnectedError, ClientOSError, asyncio.TimeoutError) as exc:
                last_error = f"{spec.name}: {type(exc).__name__}: {exc}"
                self._engine_failed(req, spec, _reason(exc), exclude)
                continue
            if upstream.status >= 500:
                text = (await upstream.read())[:500].decode("utf-8", "replace")
                upstream.release()
                last_error = f"{spec.name}: HTTP {upstream.status}: {text}"
                self._engine_failed(req, spec, f"http_{upstream.status}", exclude)
                continue
            self.pool.record_success(spec.name)
            try:
                if upstream.status >= 400 or not stream:
                    return await self._whole(request, upstream, req, spec)
                return await self._stream(request, upstream, req, spec, injected)
            finally:
                if upstream.content.at_eof():
                    upstream.release()  # keep the connection for the next request
                else:
                    upstream.close()  # client gone or engine failed: the engine sees the disconnect and aborts
        raise NoEngineError(f"the engines failed the request before answering ({last_error})",
                            code="engine_unavailable")

    def _engine_failed(self, req: _Req, spec: EngineSpec, reason: str, exclude: set[str]) -> None:
        self._release(req)
        exclude.add(spec.name)
        self.pool.record_failure(spec.name, reason)

    @staticmethod
    def _routing_headers(req: _Req, spec: EngineSpec) -> dict[str, str]:
        """Which engine served the request and the cached prefix the router predicted there (tokens)."""
        d = req.decision
        return {"x-kvroute-engine": spec.name,
                "x-kvroute-predicted-cached-tokens": str(int(d.predicted_cached_tokens) if d is not None else 0)}

    async def _whole(self, request: web.Request, upstream: Any, req: _Req, spec: EngineSpec) -> web.Response:
        data = await upstream.read()
        now = time.perf_counter()
        self.metrics.ttft.observe(now - req.t0)
        if upstream.status < 400:
            with contextlib.suppress(ValueError, AttributeError, TypeError):
                self._check(req, json.loads(data).get("usage"))
        ct = upstream.headers.get("Content-Type", "application/json")
        return web.Response(body=data, status=upstream.status,
                            headers={"Content-Type": ct, **self._routing_headers(req, spec)})

    async def _stream(self, request: web.Request, upstream: Any, req: _Req, spec: EngineSpec,
                      injected: bool) -> web.StreamResponse:
        resp = web.StreamResponse(status=upstream.status, headers={
            "Content-Type": upstream.headers.get("Content-Type", "text/event-stream"),
            "Cache-Control": "no-cache", "X-Accel-Buffering": "no", **self._routing_headers(req, spec)})
        await resp.prepare(request)
        split = SSESplitter()
        try:
            async for chunk in upstream.content.iter_any():
                for ev in split.feed(chunk):
                    if req.first_at is None:
                        self._first_token(req)
                    if b'"usage"' in ev:
                        doc = event_json(ev)
                        if isinstance(doc, dict) and doc.get("usage"):
                            self._check(req, doc["usage"])
                            if injected and not doc.get("choices"):
                                continue  # the usage event the client did not ask for
                    await resp.write(ev)
            rest = split.flush()
            if rest:
                await resp.write(rest)
        except (ClientPayloadError, ServerDisconnectedError, ClientOSError, asyncio.TimeoutError, ClientError) as exc:
            # The engine failed mid-stream: the client has bytes already, so no retry; end the stream with an error.
            self.pool.record_failure(spec.name, "mid_stream_" + _reason(exc))
            log.warning("engine %s failed request %s mid-stream: %s", spec.name, req.rid, exc)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await resp.write(error_event(EngineFailedError(f"engine {spec.name} failed mid-stream: {type(exc).__name__}")))
        except (ConnectionResetError, ConnectionError):
            self.metrics.client_disconnects.inc()
            return resp
        with contextlib.suppress(ConnectionError, RuntimeError):
            await resp.write_eof()
        return resp

    def _first_token(self, req: _Req) -> None:
        req.first_at = time.perf_counter()
        self.metrics.ttft.observe(req.first_at - req.t0)
        if req.routed:
            with contextlib.suppress(UnknownRequestError):
                self.router.prefill_done(req.rid)

    def _check(self, req: _Req, usage: Any) -> None:
        """Compare the engine's cached-token report with the prediction (see the module docstring)."""
        if not isinstance(usage, dict) or req.decision is None or not req.ids:
            return
        pt = usage.get("prompt_tokens")
        if isinstance(pt, int) and req.checkable and pt != req.n_tokens:
            self.metrics.prompt_token_mismatch.inc()
        details = usage.get("prompt_tokens_details")
        cached = details.get("cached_tokens") if isinstance(details, dict) else None
        if not isinstance(cached, int) or not req.checkable:
            return
        predicted = predicted_engine_cached(req.decision, req.n_tokens, self.router.block_size)
        self.metrics.prediction_error.observe(cached - predicted)
        self.metrics.prediction_checked.inc()
        self.checked += 1
        self.predicted_tokens += predicted
        self.reported_tokens += cached
        if predicted > cached:
            self.metrics.prediction_over.inc()
            self.over += 1
        if cached == predicted:
            self.metrics.prediction_exact.inc()
            self.exact += 1
        else:
            self.mismatches = (self.mismatches + [(req.rid, str(req.decision.worker), predicted, cached)])[-50:]


def predicted_engine_cached(decision: Any, n_tokens: int, block_size: int) -> int:
    """Cached tokens vLLM will report for a prompt the router predicted ``decision`` for.

    Only the index-confirmed part counts (speculative prefixes are other
    requests still computing), and vLLM recomputes at least the last token, so
    at most ``(n_tokens - 1) // block_size`` blocks are reported.
    """
    confirmed = (decision.predicted_cached_tokens - decision.predicted_pending_tokens) // block_size
    return min(confirmed, max(0, n_tokens - 1) // block_size) * block_size


def _reason(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timeout"
    if isinstance(exc, ClientConnectorError):
        return "refused"
    if isinstance(exc, (ServerDisconnectedError, ClientPayloadError)):
        return "reset"
    return type(exc).__name__.lower()
