"""``kvroute serve``: the routing sidecar (configuration file + flags).

On start it prints one JSON line ``{"event": "ready", "address": ..., "http_port": ...,
"restored": ..., "index_entries": ...}`` on stdout (scripts and tests wait for it);
on SIGTERM/SIGINT it saves the index snapshot and exits 0.
"""
from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from .config import SidecarConfig, parse_worker
from ..kvindex import SnapshotError
from .errors import ConfigError


_DEFAULTS = SidecarConfig()


def _d(name: str) -> str:
    """`` [default: X]`` for a config field: flags default to None (= the config file's value, else this)."""
    v = getattr(_DEFAULTS, name)
    return f" [default: {v if v != '' else 'none'}]"


@click.command("serve")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False),
              help="TOML or JSON config file; flags override its values.")
@click.option("--bind", help="ZMQ ROUTER endpoint for routing requests." + _d("bind"))
@click.option("--stream-bind", help="Also answer the stream transport (length-prefixed msgpack, no ZMQ I/O thread) "
                                    "on unix:///PATH or tcp://HOST:PORT (docs/protocol.md)." + _d("stream_bind"))
@click.option("--http-port", type=int, help="Port of /metrics and /health (0 = off, -1 = any free port)." + _d("http_port"))
@click.option("--http-host", help="Interface of the HTTP endpoint." + _d("http_host"))
@click.option("--block-size", type=int, help="Tokens per KV block (must match the engines)." + _d("block_size"))
@click.option("--policy", help="Routing policy: kvroute, dynamo, sglang, llmd, preble, round_robin, least_loaded, "
                               "power_of_two." + _d("policy"))
@click.option("--weight", "weights", multiple=True, metavar="NAME=VALUE", help="Override one policy weight (repeatable).")
@click.option("--snapshot", help="Index snapshot path: restored on start, written on shutdown." + _d("snapshot"))
@click.option("--seed", type=int, help="Seed of tie-breaking." + _d("seed"))
@click.option("--pending-ttl", "pending_ttl_s", type=float, help="Seconds a routed prompt counts as pending." + _d("pending_ttl_s"))
@click.option("--request-ttl", "request_ttl_s", type=float,
              help="Seconds after which a request whose finish never came is released (0 = never)." + _d("request_ttl_s"))
@click.option("--health-silence", "health_silence_s", type=float,
              help="Seconds a worker routed to may stay silent before /health reports it." + _d("health_silence_s"))
@click.option("--health-connect-grace", "health_connect_grace_s", type=float,
              help="Seconds an event endpoint may stay unconnected before /health reports it." + _d("health_connect_grace_s"))
@click.option("--worker", "workers", multiple=True, metavar="ID=ENDPOINT[,REPLAY]",
              help="A worker and its KV-event endpoint (repeatable; adds to the config's workers).")
@click.option("--approximate", type=click.Choice(["auto", "all", "off"]),
              help="Predict caches from routing decisions: auto (workers without events, stale streams), all, off.")
@click.option("--sync-url", help="Replica sync channel, redis://host:port/db (Redis or Valkey); several replicas share it.")
@click.option("--sync-stream", help="Stream key of the replica sync channel (default kvroute:sync).")
@click.option("--replica-name", help="This replica's name on the sync channel (default: its bound address).")
@click.option("--log-level", help="DEBUG, INFO, WARNING ..." + _d("log_level"))
def serve(config_path: str | None, weights: tuple[str, ...], workers: tuple[str, ...], **flags: Any) -> None:
    """Run the KV-aware routing sidecar (see docs/protocol.md)."""
    try:
        cfg = SidecarConfig.from_file(config_path) if config_path else SidecarConfig()
        for k, v in flags.items():
            if v is not None:
                setattr(cfg, k, v)
        for item in weights:
            name, sep, val = item.partition("=")
            if not sep:
                raise ConfigError(f"--weight wants NAME=VALUE, got {item!r}")
            cfg.weights[name] = json.loads(val)
        cfg.workers.extend(parse_worker(w) for w in workers)
        cfg.validate()
    except (ConfigError, ValueError) as exc:
        raise click.UsageError(str(exc)) from exc
    logging.basicConfig(level=getattr(logging, str(cfg.log_level).upper(), logging.INFO), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .server import SidecarServer

    try:
        srv = SidecarServer(cfg).start()
    except Exception as exc:
        raise click.ClickException(f"cannot start: {exc}") from exc
    srv.install_signal_handlers()
    click.echo(json.dumps({"event": "ready", "address": srv.address, "http_port": srv.http.port if srv.http else None,
                           **({"stream_address": srv.stream_address} if srv.stream is not None else {}), "restored": srv.restored, "index_entries": len(srv.router.index),
                           **({"sync": srv.sync_ready()} if srv.sync is not None else {})}), nl=True)
    sys.stdout.flush()
    try:
        srv.serve_forever()
    finally:
        try:
            srv.close()
        except (OSError, SnapshotError) as exc:  # e.g. the snapshot's directory went away while serving
            raise click.ClickException(f"could not save the snapshot {cfg.snapshot!r}: {exc}") from None
