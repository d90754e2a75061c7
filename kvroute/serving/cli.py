"""``kvroute proxy``: start the OpenAI-compatible front against running engines.

On start it asks every engine's ``/v1/models`` for its served model names, its
context length and the model's path (``root``), loads that model's tokenizer
locally (``--tokenizer`` overrides), subscribes to the engines' KV events, then
prints one JSON line ``{"event": "ready", "port": ...}`` on stdout and serves
until SIGTERM/SIGINT.
"""
from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from typing import Any

import click

from .engines import EngineSpec

log = logging.getLogger("kvroute.serving")


def fetch_models(url: str, timeout_s: float) -> list[dict[str, Any]]:
    """An engine's ``/v1/models`` entries, retried until ``timeout_s`` (engines take a while to start)."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                return list(json.loads(r.read()).get("data") or [])
        except (urllib.error.URLError, OSError, ValueError) as exc:
            if time.monotonic() >= deadline:
                raise click.ClickException(f"engine {url} did not answer /v1/models: {exc}") from exc
            time.sleep(0.5)


@click.command("proxy")
@click.option("--engine", "engines", multiple=True, required=True, metavar="NAME=URL[,EVENTS[,REPLAY]]",
              help="An engine: its OpenAI base URL and, optionally, its KV-event and replay ZMQ endpoints "
                   "(repeatable), e.g. e0=http://10.0.0.1:8000,tcp://10.0.0.1:5557,tcp://10.0.0.1:5558.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8080, show_default=True, type=int, help="Port to listen on (0: any free port).")
@click.option("--block-size", default=16, show_default=True, type=int, help="Tokens per KV block (must match the engines).")
@click.option("--policy", default="kvroute", show_default=True,
              help="Routing policy: kvroute, dynamo, sglang, llmd, preble, round_robin, least_loaded, power_of_two.")
@click.option("--weight", "weights", multiple=True, metavar="NAME=VALUE", help="Override one policy weight (repeatable).")
@click.option("--tokenizer", default=None,
              help="Tokenizer directory or HF model id (default: the engines' model path from /v1/models).")
@click.option("--allow-download", is_flag=True, help="Let the tokenizer be downloaded from the hub if it is not local.")
@click.option("--served-model-name", "served", multiple=True,
              help="Model names clients may ask for (default: the engines' /v1/models ids).")
@click.option("--max-model-len", type=int, default=None, help="Context length (default: from the engines).")
@click.option("--fail-threshold", default=3, show_default=True, type=int,
              help="Consecutive failures that take an engine out of rotation.")
@click.option("--probe-interval", default=2.0, show_default=True, type=float,
              help="Seconds between health probes of an unhealthy engine.")
@click.option("--scrape-interval", default=0.0, show_default=True, type=float,
              help="Seconds between scrapes of the engines' /metrics into the router's load (0: off).")
@click.option("--connect-timeout", default=5.0, show_default=True, type=float, help="Seconds to connect to an engine.")
@click.option("--read-timeout", default=600.0, show_default=True, type=float,
              help="Seconds without a byte from the engine before the request fails.")
@click.option("--request-ttl", default=3600.0, show_default=True, type=float,
              help="Seconds after which the router releases a request it never saw finish.")
@click.option("--unsupported-content", type=click.Choice(["reject", "route"]), default="reject", show_default=True,
              help="Content the proxy cannot tokenize (images...): 400, or route without cache credit.")
@click.option("--exclude-tools-when-tool-choice-none", is_flag=True,
              help="Mirror of the engines' flag of the same name (tools not rendered when tool_choice is none).")
@click.option("--startup-timeout", default=300.0, show_default=True, type=float,
              help="Seconds to wait for the engines' /v1/models at start.")
@click.option("--approximate", type=click.Choice(["auto", "all", "off"]), default="auto", show_default=True,
              help="Predict an engine's cache from the proxy's own decisions: auto (engines without KV events, and "
                   "while an engine's event stream is stale), all engines, or off.")
@click.option("--approx-ttl", default=600.0, show_default=True, type=float,
              help="Seconds an approximate-mode prediction lives after the decision that last routed it.")
@click.option("--approx-capacity", default=0, show_default=True, type=int,
              help="Predicted blocks kept per approximate-mode engine (0: the engine's KV pool as its /metrics "
                   "reports it, else 65,536).")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of tie-breaking.")
@click.option("--log-level", default="INFO", show_default=True)
def proxy(engines: tuple[str, ...], weights: tuple[str, ...], served: tuple[str, ...], **o: Any) -> None:
    """OpenAI-compatible front: tokenize as the engine does, route by KV-cache overlap and load, stream back."""
    logging.basicConfig(level=getattr(logging, str(o["log_level"]).upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        specs = [EngineSpec.parse(e) for e in engines]
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    w: dict[str, Any] = {}
    for item in weights:
        name, sep, val = item.partition("=")
        if not sep:
            raise click.UsageError(f"--weight wants NAME=VALUE, got {item!r}")
        w[name] = json.loads(val)
    try:
        runner = build(specs, weights=w or None, served=served, **{k: v for k, v in o.items() if k != "log_level"})
    except (ValueError, OSError) as exc:
        raise click.ClickException(str(exc)) from exc
    runner.run()


class ProxyRunner:
    """A built proxy plus its event subscriber; :meth:`run` serves until a signal."""

    def __init__(self, proxy: Any, host: str, port: int, events: Any) -> None:
        self.proxy = proxy
        self.host = host
        self.port = port
        self.events = events

    def run(self) -> None:
        from aiohttp import web

        async def main() -> None:
            runner = web.AppRunner(self.proxy.app(), handler_cancellation=True, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, self.host, self.port, backlog=1024, reuse_address=True)
            await site.start()
            port = runner.addresses[0][1] if runner.addresses else self.port
            print(json.dumps({"event": "ready", "port": port, "engines": [s.name for s in self.proxy.pool.specs],
                              "models": list(self.proxy.config.served_models)}), flush=True)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            import signal

            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            await runner.cleanup()

        try:
            asyncio.run(main())
        finally:
            if self.events is not None:
                self.events.close()


def fetch_metrics(url: str, timeout_s: float = 5.0) -> str | None:
    """An engine's ``/metrics`` page, None if it does not answer."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=timeout_s) as r:
            return r.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError, ValueError):
        return None


def build(specs: list[EngineSpec], *, weights: Any = None, served: tuple[str, ...] = (), tokenizer: str | None = None,
          allow_download: bool = False, max_model_len: int | None = None, block_size: int = 16,
          policy: str = "kvroute", fail_threshold: int = 3, probe_interval: float = 2.0,
          scrape_interval: float = 0.0, connect_timeout: float = 5.0, read_timeout: float = 600.0,
          request_ttl: float = 3600.0, unsupported_content: str = "reject",
          exclude_tools_when_tool_choice_none: bool = False, startup_timeout: float = 300.0, seed: int = 0,
          approximate: str = "auto", approx_ttl: float = 600.0, approx_capacity: int = 0,
          host: str = "127.0.0.1", port: int = 8080) -> ProxyRunner:
    """Everything ``kvroute proxy`` starts, wired (see the module docstring)."""
    from ..adapters.subscriber import KVEventSubscriber
    from ..router import Router
    from .engines import EnginePool, engine_block_size, parse_vllm_load
    from .proxy import Proxy, ProxyConfig
    from .tokenize import EngineTokenizer

    cards = fetch_models(specs[0].url, startup_timeout)
    if not cards:
        raise ValueError(f"engine {specs[0].name} serves no model")
    names = tuple(served) or tuple(c["id"] for c in cards)
    mml = max_model_len or cards[0].get("max_model_len")
    source = tokenizer or cards[0].get("root") or cards[0]["id"]
    tok = EngineTokenizer.from_pretrained(source, allow_download=allow_download, max_model_len=mml,
                                          exclude_tools_when_tool_choice_none=exclude_tools_when_tool_choice_none)
    lock = threading.RLock()
    if not approx_ttl > 0 or approx_capacity < 0:
        raise ValueError("--approx-ttl must be > 0 and --approx-capacity >= 0")
    router = Router([s.name for s in specs], block_size, policy=policy, weights=weights, seed=seed, lock=lock,
                    request_ttl_s=request_ttl or None, approx_ttl_s=approx_ttl,
                    approx_capacity_blocks=approx_capacity or None)
    for s in specs:  # each engine's KV pool (approximate mode's bound; occupancy) and block size, once at start
        text = fetch_metrics(s.url)
        if text is None:
            log.warning("engine %s: /metrics did not answer; its KV pool size is unknown", s.name)
            continue
        try:
            bs = engine_block_size(text)
            cap = parse_vllm_load(text).get("capacity_blocks")
        except ValueError as exc:  # not a Prometheus page
            log.warning("engine %s: /metrics unreadable (%s); its KV pool size is unknown", s.name, exc)
            continue
        if bs is not None and bs != block_size:
            raise ValueError(f"engine {s.name} runs KV blocks of {bs} tokens but --block-size is {block_size}: "
                             "every hash would differ from the engine's")
        if cap:
            router.add_worker(s.name, capacity_blocks=cap)
    events = None
    if any(s.events for s in specs):
        events = KVEventSubscriber(router.index, lock=lock)
        for s in specs:
            if s.events:
                events.add_worker(s.name, s.events, replay_endpoint=s.replay)
        events.start()
    pool = EnginePool(router, specs, fail_threshold=fail_threshold, probe_interval_s=probe_interval,
                      scrape_interval_s=scrape_interval or None)
    cfg = ProxyConfig(served_models=names, max_model_len=mml, connect_timeout_s=connect_timeout,
                      read_timeout_s=read_timeout, unsupported_content=unsupported_content, approximate=approximate)
    return ProxyRunner(Proxy(router, tok, pool, cfg, events=events), host, port, events)
