"""The proxy's Prometheus metrics (one registry per proxy, so tests can run several).

Who writes: :class:`~kvroute.serving.proxy.Proxy` only.  Who reads: ``/metrics``.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Buckets of the prediction error (engine-reported minus predicted cached tokens).
PREDICTION_ERROR_BUCKETS = (-8192, -2048, -512, -128, -32, -1, 0, 1, 32, 128, 512, 2048, 8192)


class ProxyMetrics:
    """Counters and histograms of the serving path; see each field's help text."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        #: Requests answered, by endpoint and HTTP status.
        self.requests = Counter("kvroute_proxy_requests", "Requests answered", ["endpoint", "status"], registry=r)
        #: Requests retried on the next-best engine after a failure before the first byte.
        self.retries = Counter("kvroute_proxy_retries", "Requests retried on another engine", registry=r)
        #: Engine failures seen, by engine and reason.
        self.engine_failures = Counter("kvroute_proxy_engine_failures", "Engine failures", ["engine", "reason"], registry=r)
        #: Requests routed, by engine.
        self.routed = Counter("kvroute_proxy_routed", "Requests routed", ["engine"], registry=r)
        #: Time to first token as the client sees it through the proxy.
        self.ttft = Histogram("kvroute_proxy_ttft_seconds", "Time to first token through the proxy", registry=r,
                              buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        #: Proxy work before the request leaves for the engine (parse, tokenize, route).
        self.overhead = Histogram("kvroute_proxy_overhead_seconds", "Parse + tokenize + route time", registry=r,
                                  buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05, 0.25))
        #: Engine-reported cached tokens minus the router's prediction (confirmed part, capped as vLLM caps it).
        self.prediction_error = Histogram("kvroute_proxy_prediction_error_tokens",
                                          "Engine-reported cached tokens minus predicted", registry=r,
                                          buckets=PREDICTION_ERROR_BUCKETS)
        #: Requests whose prediction could be checked / was exact.
        self.prediction_checked = Counter("kvroute_proxy_prediction_checked", "Predictions checked", registry=r)
        self.prediction_exact = Counter("kvroute_proxy_prediction_exact", "Predictions equal to the engine's report", registry=r)
        #: Requests predicted to hit more cached tokens than the engine reported (the costly error: the router
        #: credited a cache the engine did not have).
        self.prediction_over = Counter("kvroute_proxy_prediction_over", "Predictions above the engine's report",
                                       registry=r)
        #: Responses whose usage.prompt_tokens differs from the proxy's own count (tokenizer drift).
        self.prompt_token_mismatch = Counter("kvroute_proxy_prompt_token_mismatch",
                                             "Engine prompt_tokens != proxy's token count", registry=r)
        #: Requests in flight through the proxy.
        self.in_flight = Gauge("kvroute_proxy_in_flight", "Requests in flight", registry=r)
        #: Healthy engines.
        self.healthy_engines = Gauge("kvroute_proxy_healthy_engines", "Engines taking requests", registry=r)
        #: Load scrapes that failed, by engine.
        self.scrape_failures = Counter("kvroute_proxy_scrape_failures", "Failed /metrics scrapes", ["engine"], registry=r)
        #: Client disconnects before the response ended.
        self.client_disconnects = Counter("kvroute_proxy_client_disconnects", "Clients gone before the end", registry=r)
