"""Prometheus metrics and the HTTP ``/metrics`` + ``/health`` endpoint of the sidecar.

Exported (prefix ``kvroute_``):

* ``requests_total{op,outcome}`` -- every request and its outcome (``ok`` or an error type).
* ``decision_latency_seconds`` -- histogram of the server-side time of a ``route``.
* ``decisions_total{worker}`` -- decisions per worker.
* ``predicted_cached_tokens_total`` / ``prompt_tokens_total`` and the gauge
  ``predicted_hit_ratio`` (their ratio): the hit the router predicts for the worker it chose.
* ``index_entries``, ``index_blocks``, ``index_bytes_estimate``, ``pending_entries``.
* ``workers{status}``, ``worker_in_flight{worker}``, ``worker_prefill_tokens{worker}``, ``stale_workers``.
* ``events_*`` -- every numeric counter of the KV-event subscriber's ``metrics()``
  (batches, gaps, replays, resyncs, decode errors, orphans, lag ...); its
  per-worker figures as ``events_worker_*{worker}`` (next_seq, stale, batches ...).

Who touches what: the request loop calls ``observe_*``; scrapes read the router
and the subscriber under the router's lock.
"""
from __future__ import annotations

import errno
import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from ..router import Decision, Router
from .errors import ConfigError

log = logging.getLogger("kvroute.sidecar")

_LATENCY_BUCKETS = (5e-5, 1e-4, 2e-4, 3e-4, 5e-4, 7.5e-4, 1e-3, 1.5e-3, 2e-3, 3e-3, 5e-3, 1e-2, 2.5e-2, 0.1)
_NAME_RE = re.compile(r"[^a-zA-Z0-9_]")


class Metrics:
    """The sidecar's Prometheus registry (module docstring lists the series)."""

    def __init__(self, router: Router, events: Any = None) -> None:
        self.router = router
        self.events = events
        #: Replica sync (a kvroute.sync.SyncRunner), set by the server when configured; read at scrape time.
        self.sync: Any = None
        #: A private registry, so several servers in one process do not collide.
        self.registry = CollectorRegistry()
        self.requests = Counter("kvroute_requests", "Requests by op and outcome", ["op", "outcome"], registry=self.registry)
        self.latency = Histogram("kvroute_decision_latency_seconds", "Server-side time of a route request",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.decisions = Counter("kvroute_decisions", "Routing decisions per worker", ["worker"], registry=self.registry)
        self.cached = Counter("kvroute_predicted_cached_tokens", "Predicted cached prompt tokens on the chosen worker",
                              registry=self.registry)
        self.prompt = Counter("kvroute_prompt_tokens", "Prompt tokens routed", registry=self.registry)
        self._decision_children: dict[Any, Any] = {}
        #: (op, outcome) -> its ``requests_total`` child (written by the request threads; a lost race adds
        #: the same child twice, harmlessly).
        self._request_children: dict[tuple[str, str], Any] = {}
        #: The sidecar's :class:`~kvroute.sidecar.health.HealthMonitor` (its last reasons are exported), or None.
        self.monitor: Any = None
        self.registry.register(_StateCollector(self))

    def index_stats(self) -> dict[str, Any]:
        """``KVIndex.stats()`` (O(workers), read under the routing lock)."""
        with self.router.lock:
            return self.router.index.stats()

    def observe_decision(self, d: Decision) -> None:
        child = self._decision_children.get(d.worker)
        if child is None:
            child = self._decision_children[d.worker] = self.decisions.labels(worker=str(d.worker))
        child.inc()
        self.cached.inc(d.predicted_cached_tokens)
        self.prompt.inc(d.num_tokens)

    def forget_worker(self, worker: Any) -> None:
        """Drop a removed worker's ``decisions_total`` series, so label values stay bounded by live workers."""
        if self._decision_children.pop(worker, None) is not None:
            self.decisions.remove(str(worker))

    def observe_request(self, op: str, outcome: str, seconds: float) -> None:
        # the labelled child is looked up once per (op, outcome): ``labels()`` costs a few us per call, on
        # every request (ops are the service's names or "?", outcomes ``ok`` or an error type: bounded)
        child = self._request_children.get((op, outcome))
        if child is None:
            child = self._request_children[(op, outcome)] = self.requests.labels(op=op, outcome=outcome)
        child.inc()
        if op == "route" and outcome == "ok":
            self.latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector:
    """Gauges read at scrape time from the router, the index and the event subscriber."""

    def __init__(self, m: Metrics) -> None:
        self.m = m

    def describe(self) -> Iterable[Any]:
        return []

    def collect(self) -> Iterable[Any]:
        r = self.m.router
        st = r.stats()
        with r.lock:
            entries = len(r.index)
        ix = self.m.index_stats()
        ratio = GaugeMetricFamily("kvroute_predicted_hit_ratio", "Predicted cached / prompt tokens of routed requests")
        ratio.add_metric([], st["predicted_hit_ratio"])
        yield ratio
        g = GaugeMetricFamily("kvroute_index_entries", "(block, worker, tier) entries in the index")
        g.add_metric([], float(entries))
        yield g
        for name, key, doc in (("kvroute_index_blocks", "blocks", "Distinct blocks in the index"),
                               ("kvroute_index_bytes_estimate", "bytes_estimate",
                                "Estimated index memory")):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], float(ix[key]))
            yield g
        g = GaugeMetricFamily("kvroute_pending_entries", "Speculative (block, worker) entries awaiting events")
        g.add_metric([], float(st["pending_entries"]))
        yield g
        by_status: dict[str, int] = {"healthy": 0, "draining": 0, "unhealthy": 0}
        inflight = GaugeMetricFamily("kvroute_worker_in_flight", "Requests routed and not finished", labels=["worker"])
        pre = GaugeMetricFamily("kvroute_worker_prefill_tokens", "Predicted uncached tokens awaiting prefill", labels=["worker"])
        for w in st["workers"]:
            by_status[w["status"]] = by_status.get(w["status"], 0) + 1
            inflight.add_metric([str(w["worker"])], w["active_requests"])
            pre.add_metric([str(w["worker"])], w["prefill_tokens"])
        ws = GaugeMetricFamily("kvroute_workers", "Workers by status", labels=["status"])
        for k, v in by_status.items():
            ws.add_metric([k], v)
        yield ws
        yield inflight
        yield pre
        ev = self.m.events
        stale = GaugeMetricFamily("kvroute_stale_workers", "Workers whose index is known wrong until events rebuild it")
        stale.add_metric([], float(len(ev.stale_workers())) if ev is not None else 0.0)
        yield stale
        if self.m.monitor is not None:
            bad = GaugeMetricFamily("kvroute_worker_health_reason",
                                    "1 per (worker, reason) that makes /health degraded", labels=["worker", "reason"])
            for w, rs in self.m.monitor.reasons().items():
                for reason in rs:
                    bad.add_metric([str(w), reason], 1.0)
            yield bad
        if ev is not None:
            try:
                yield from _flatten_events(ev.metrics())
            except Exception:  # a scrape never breaks the server
                log.exception("reading subscriber metrics failed")
        if self.m.sync is not None:
            yield from _sync_gauges(self.m.sync.stats(), st)


def _sync_gauges(doc: dict, router_stats: dict) -> Iterable[Any]:
    """``kvroute_sync_*``: connection, peers, other replicas' requests counted here, and every numeric
    counter of the replica sync (batches in/out, duplicates, malformed, gaps, lease expiries ...)."""
    g = GaugeMetricFamily("kvroute_sync_connected", "Whether the replica-sync channel answers (0: routing alone)")
    g.add_metric([], float(bool(doc.get("connected"))))
    yield g
    g = GaugeMetricFamily("kvroute_sync_peers", "Live peer replicas")
    g.add_metric([], float(len(doc.get("peers", {}))))
    yield g
    g = GaugeMetricFamily("kvroute_sync_remote_in_flight", "Requests of other replicas counted in this one's load")
    g.add_metric([], float(router_stats.get("remote_in_flight", 0)))
    yield g
    for k, v in doc.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            g = GaugeMetricFamily("kvroute_sync_" + _NAME_RE.sub("_", k), f"replica sync: {k}")
            g.add_metric([], float(v))
            yield g


def _flatten_events(doc: Any) -> Iterable[Any]:
    """Numeric leaves of the subscriber's metrics dict as ``kvroute_events_*`` gauges.

    ``{"gaps": 3}`` -> ``kvroute_events_gaps 3``; ``{"workers": {"w0": {"next_seq": 1}}}``
    -> ``kvroute_events_worker_next_seq{worker="w0"} 1``; nested dicts join their keys with ``_``.
    """
    fams: dict[str, GaugeMetricFamily] = {}

    def put(name: str, labels: dict[str, str], v: float) -> None:
        name = "kvroute_events_" + _NAME_RE.sub("_", name)
        fam = fams.get(name)
        keys = sorted(labels)
        if fam is None:
            fam = fams[name] = GaugeMetricFamily(name, "KV-event subscriber: " + name[15:], labels=keys)
        if list(fam._labelnames) != keys:  # type: ignore[attr-defined]
            return
        fam.add_metric([labels[k] for k in keys], v)

    def walk(prefix: str, node: Any, labels: dict[str, str]) -> None:
        if isinstance(node, bool):
            put(prefix, labels, float(node))
        elif isinstance(node, (int, float)):
            put(prefix, labels, float(node))
        elif isinstance(node, dict):
            if prefix == "workers":  # the subscriber's per-stream figures: one label per worker
                for wid, sub in node.items():
                    walk("worker", sub, {**labels, "worker": str(wid)})
                return
            for k, v in node.items():
                walk(f"{prefix}_{k}" if prefix else str(k), v, labels)

    walk("", doc, {})
    return list(fams.values())


class _Server(ThreadingHTTPServer):
    #: listen() backlog: a burst of scrapers / health probes must not wait for SYN retransmits
    #: (the library default, 5, made 45 of 300 quick connections wait 1 s).
    request_queue_size = 1024


class HTTPEndpoint:
    """``GET /metrics`` (Prometheus text) and ``GET /health`` (JSON; 503 when down) on a small thread."""

    def __init__(self, host: str, port: int, metrics: Metrics, health: Callable[[], dict]) -> None:
        m, h = metrics, health

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server API)
                if self.path.startswith("/metrics"):
                    body, code, ctype = m.render(), 200, "text/plain; version=0.0.4; charset=utf-8"
                elif self.path.startswith("/health"):
                    doc = h()
                    body = json.dumps(doc).encode()
                    code, ctype = (503 if doc["status"] == "down" else 200), "application/json"
                else:
                    body, code, ctype = b"not found\n", 404, "text/plain"
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt: str, *args: Any) -> None:
                log.debug("http: " + fmt, *args)

        try:
            self.httpd = _Server((host, port), Handler)
        except OSError as exc:
            what = "is busy" if exc.errno == errno.EADDRINUSE else "cannot be bound"
            raise ConfigError(f"HTTP port {port} on {host} {what} (--http-port; 0 = off, -1 = any free port): "
                              f"{exc.strerror or exc}") from None
        self.httpd.daemon_threads = True
        #: The bound port (useful with port 0).
        self.port = self.httpd.server_address[1]
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="kvroute-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
