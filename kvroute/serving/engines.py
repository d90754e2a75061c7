"""The engines behind the proxy: where they are, whether they answer, how loaded they say they are.

* :class:`EngineSpec`  -- one engine's OpenAI base URL and KV-event endpoints
  (parsed from ``NAME=URL[,EVENTS[,REPLAY]]``).
* :class:`EngineHealth` -- consecutive failures and the unhealthy mark of one
  engine; mutated only by :class:`EnginePool`.
* :class:`EnginePool`  -- the failure rule (``fail_threshold`` failures in a row
  take an engine out of the router's rotation; a probe of ``/health`` every
  ``probe_interval_s`` brings it back), and the optional scrape of each
  engine's Prometheus ``/metrics`` into ``Router.update_load``.

Failures are counted only for what says the engine is unwell (refused, reset,
timeout, 5xx); a 4xx is the client's fault and counts as a success.  The last
engine in rotation is never taken out (a panic rule: failures everywhere at
once are more often overload than a dead fleet).
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable
from urllib.parse import urlparse

from ..router import Router

log = logging.getLogger("kvroute.serving")

#: vLLM Prometheus gauges read by the load scrape (summed over their label sets).
WAITING_METRIC = "vllm:num_requests_waiting"
RUNNING_METRIC = "vllm:num_requests_running"
KV_USAGE_METRICS = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
#: vLLM's info gauge of its cache config; labels carry ``num_gpu_blocks`` and ``block_size``.
CACHE_CONFIG_METRIC = "vllm:cache_config_info"


@dataclass(frozen=True)
class EngineSpec:
    """One engine: its id in the router, its HTTP base URL and its KV-event endpoints."""

    #: Worker id in the router and the index.
    name: str
    #: OpenAI-compatible base URL, e.g. ``http://10.0.0.1:8000`` (no trailing slash, no ``/v1``).
    url: str
    #: ZMQ PUB endpoint of its KV events (None: no events; the router sees only its own decisions).
    events: str | None = None
    #: ZMQ replay endpoint (None: gaps cannot be replayed).
    replay: str | None = None

    @classmethod
    def parse(cls, text: str) -> "EngineSpec":
        """``NAME=URL[,EVENTS[,REPLAY]]``, e.g. ``e0=http://h:8000,tcp://h:5557,tcp://h:5558``."""
        name, sep, rest = text.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"--engine wants NAME=URL[,EVENTS[,REPLAY]], got {text!r}")
        parts = [p.strip() for p in rest.split(",")]
        if len(parts) > 3:
            raise ValueError(f"--engine {text!r}: at most URL, EVENTS and REPLAY")
        url = parts[0].rstrip("/")
        if url.endswith("/v1"):
            url = url[:-3]
        u = urlparse(url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"--engine {text!r}: the URL must be http(s)://host:port")
        try:
            u.port
        except ValueError as exc:
            raise ValueError(f"--engine {text!r}: bad port: {exc}") from exc
        events = parts[1] if len(parts) > 1 and parts[1] else None
        replay = parts[2] if len(parts) > 2 and parts[2] else None
        for ep in (events, replay):
            if ep is not None and not ep.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(f"--engine {text!r}: event endpoints are ZMQ addresses (tcp://host:port)")
        return cls(name.strip(), url, events, replay)


@dataclass
class EngineHealth:
    """Failure bookkeeping of one engine (mutated only by :class:`EnginePool`)."""

    #: Failures since the last success.
    consecutive_failures: int = 0
    #: Out of rotation until a probe succeeds.
    unhealthy: bool = False
    #: Why it was taken out (last failure's reason).
    reason: str = ""
    #: Monotonic time of the last failure / success (None: never).
    last_failure_at: float | None = None
    last_success_at: float | None = None
    #: Monotonic time of the last successful load scrape.
    last_scrape_at: float | None = None
    #: Why the latest load scrape failed ("": it succeeded, or none ran yet); shown in /health.
    scrape_error: str = ""
    #: Totals, for /health.
    failures_total: int = 0


@dataclass
class EnginePool:
    """The engines, their failure rule and their probes (see the module docstring)."""

    router: Router
    specs: list[EngineSpec]
    #: Consecutive failures that take an engine out of rotation.
    fail_threshold: int = 3
    #: Seconds between probes of an unhealthy engine's ``/health``.
    probe_interval_s: float = 2.0
    #: Seconds between load scrapes of every engine's ``/metrics`` (None or 0: off).
    scrape_interval_s: float | None = None
    clock: Callable[[], float] = time.monotonic
    on_failure: Callable[[str, str], None] | None = None
    health: dict[str, EngineHealth] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.fail_threshold < 1:
            raise ValueError("fail_threshold must be >= 1")
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"engine names must be unique, got {names}")
        self._by_name = {s.name: s for s in self.specs}
        for s in self.specs:
            self.health.setdefault(s.name, EngineHealth())

    def __getitem__(self, name: str) -> EngineSpec:
        return self._by_name[name]

    def __iter__(self) -> Iterable[EngineSpec]:
        return iter(self.specs)

    # ------------------------------------------------------------- failures
    def record_success(self, name: str) -> None:
        h = self.health[name]
        h.consecutive_failures = 0
        h.last_success_at = self.clock()

    def record_failure(self, name: str, reason: str) -> bool:
        """Count a failure; True when it takes the engine out of rotation now."""
        h = self.health[name]
        h.consecutive_failures += 1
        h.failures_total += 1
        h.last_failure_at = self.clock()
        h.reason = reason
        if self.on_failure is not None:
            self.on_failure(name, reason)
        if not h.unhealthy and h.consecutive_failures >= self.fail_threshold:
            if not any(not x.unhealthy for n, x in self.health.items() if n != name):
                # Panic rule (Envoy's, at its simplest): the last engine in rotation stays in. Failures
                # everywhere at once mean overload more often than a dead fleet, and ejecting the last
                # engine turns an overload into an outage; its requests fail (or succeed) on their own.
                h.reason = reason + " (last engine in rotation: kept)"
                return False
            h.unhealthy = True
            self.router.mark_unhealthy(name)
            log.warning("engine %s marked unhealthy after %d failures in a row (%s)", name,
                        h.consecutive_failures, reason)
            return True
        return False

    def mark_recovered(self, name: str) -> None:
        h = self.health[name]
        if h.unhealthy:
            log.warning("engine %s answers its health probe again: back in rotation", name)
        h.unhealthy = False
        h.consecutive_failures = 0
        h.reason = ""
        self.router.mark_healthy(name)

    # --------------------------------------------------------------- probes
    async def probe_once(self, session: Any) -> None:
        """Probe every unhealthy engine's ``/health`` once; 200 brings it back."""
        import aiohttp

        for spec in self.specs:
            if not self.health[spec.name].unhealthy:
                continue
            try:
                async with session.get(spec.url + "/health", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    ok = r.status == 200
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
                ok = False
            if ok:
                self.mark_recovered(spec.name)

    async def probe_loop(self, session: Any) -> None:
        while True:
            await asyncio.sleep(self.probe_interval_s)
            await self.probe_once(session)

    # --------------------------------------------------------------- scrape
    async def scrape_once(self, session: Any, on_error: Callable[[str], None] | None = None) -> None:
        """Read every engine's ``/metrics`` and feed waiting/running/KV usage to the router."""
        import aiohttp

        for spec in self.specs:
            h = self.health[spec.name]
            try:
                async with session.get(spec.url + "/metrics", timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status != 200:
                        raise aiohttp.ClientError(f"HTTP {r.status}")
                    text = await r.text()
                load = parse_vllm_load(text)
                if "waiting" not in load and "running" not in load:
                    raise ValueError(f"no {WAITING_METRIC} / {RUNNING_METRIC} on /metrics (an engine started "
                                     "with --disable-log-stats publishes none)")
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
                if not h.scrape_error:
                    log.warning("load scrape of %s failed: %s", spec.name, exc)
                h.scrape_error = str(exc) or type(exc).__name__
                if on_error is not None:
                    on_error(spec.name)
                continue
            self.router.update_load(spec.name, **load)
            h.last_scrape_at = self.clock()
            h.scrape_error = ""

    async def scrape_loop(self, session: Any, on_error: Callable[[str], None] | None = None) -> None:
        if not self.scrape_interval_s:
            return
        while True:
            await self.scrape_once(session, on_error)
            await asyncio.sleep(self.scrape_interval_s)


def engine_block_size(text: str) -> int | None:
    """The block size an engine's ``/metrics`` page reports (``vllm:cache_config_info``), None if absent."""
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == CACHE_CONFIG_METRIC and str(s.labels.get("block_size", "")).isdigit():
                return int(s.labels["block_size"])
    return None


def parse_vllm_load(text: str) -> dict[str, Any]:
    """``{"waiting", "running", "kv_usage", "capacity_blocks"}`` from a vLLM ``/metrics`` page (missing ones
    left out).  ``capacity_blocks``: the KV blocks of the engine's GPU pool, summed over its data-parallel
    ranks (``vllm:cache_config_info``'s ``num_gpu_blocks`` label)."""
    from prometheus_client.parser import text_string_to_metric_families

    sums: dict[str, float] = {}
    capacity = 0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name in (WAITING_METRIC, RUNNING_METRIC, *KV_USAGE_METRICS):
                sums[s.name] = sums.get(s.name, 0.0) + float(s.value)
            elif s.name == CACHE_CONFIG_METRIC:
                blocks = str(s.labels.get("num_gpu_blocks", ""))
                if blocks.isdigit():
                    capacity += int(blocks)
    out: dict[str, Any] = {}
    if capacity:
        out["capacity_blocks"] = capacity
    if WAITING_METRIC in sums:
        out["waiting"] = max(0, int(round(sums[WAITING_METRIC])))
    if RUNNING_METRIC in sums:
        out["running"] = max(0, int(round(sums[RUNNING_METRIC])))
    for name in KV_USAGE_METRICS:
        if name in sums:
            out["kv_usage"] = min(1.0, max(0.0, sums[name]))
            break
    return out
