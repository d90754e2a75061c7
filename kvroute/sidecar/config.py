"""Configuration of ``kvroute serve``: a TOML or JSON file, overridden by flags.

Example (TOML)::

    bind = "tcp://127.0.0.1:5600"      # ZMQ ROUTER socket for routing requests ("tcp://127.0.0.1:*": any port)
    stream_bind = "unix:///run/kvroute.sock"  # optional: the stream transport (or tcp://host:port); "" = off
    http_port = 9600                   # /metrics (Prometheus) and /health; 0 = off; -1 = any free port
    http_host = "127.0.0.1"
    block_size = 16
    policy = "kvroute"                 # any name in kvroute.router.POLICIES
    seed = 0
    pending_ttl_s = 2.0
    request_ttl_s = 3600.0             # release a request whose finish never came after this long; 0 = never
    snapshot = "kvroute-index.snap"    # restored on start, written on SIGTERM/SIGINT; "" = none
    approximate = "auto"               # predict caches from decisions: auto (no endpoint / stale) | all | off
    sync_url = "redis://127.0.0.1:6379/0"   # replica sync (several active-active replicas); "" = none
    replica_name = "router-a"          # this replica's name on the sync channel ("" = its bind address)
    [weights]                          # the policy's weights dataclass fields
    fleet_weight = 1.0
    [[workers]]
    id = "w0"
    endpoint = "tcp://10.0.0.1:5557"          # the engine's KV-event PUB endpoint ("" = no events)
    replay_endpoint = "tcp://10.0.0.1:5558"   # optional
    role = "both"                             # both | prefill | decode
    capacity_blocks = 4096                    # optional
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from typing import Any

from ..router.types import Role
from .errors import ConfigError

#: Values of ``approximate``.
APPROXIMATE_MODES = ("auto", "all", "off")


@dataclass
class WorkerConfig:
    """One engine worker."""

    #: The worker's id (str or int), as used in decisions and events.
    id: Any
    #: KV-event PUB endpoint to subscribe to; empty = no events for this worker.
    endpoint: str = ""
    #: Replay (ROUTER) endpoint of the publisher, if it has one.
    replay_endpoint: str = ""
    #: Pool: both | prefill | decode.
    role: str = "both"
    #: GPU KV capacity in blocks, if known.
    capacity_blocks: int | None = None
    #: ZMQ topic to subscribe to (vLLM default "").
    topic: str = ""
    #: Data-parallel ranks publishing on port + rank (1 = none).
    dp_size: int = 1


@dataclass
class SidecarConfig:
    """Everything ``kvroute serve`` needs (see the module docstring)."""

    #: ZMQ ROUTER endpoint answering routing requests (``tcp://host:*``: any free port).
    bind: str = "tcp://127.0.0.1:5600"
    #: The stream transport (length-prefixed msgpack, answered without ZMQ's I/O thread; docs/protocol.md):
    #: ``unix:///path`` or ``tcp://host:port`` (port 0: any free port); "" = off.  The ZMQ socket stays.
    stream_bind: str = ""
    #: Interface of ``/metrics`` and ``/health``.
    http_host: str = "127.0.0.1"
    #: Port of ``/metrics`` and ``/health``; 0 = off, -1 = any free port.
    http_port: int = 9600
    #: Tokens per KV block; must equal the engines'.
    block_size: int = 16
    #: A name in :data:`kvroute.router.POLICIES`.
    policy: str = "kvroute"
    #: Fields of that policy's weights dataclass to override.
    weights: dict[str, Any] = field(default_factory=dict)
    #: Seed of tie-breaking.
    seed: int = 0
    #: Lifetime of speculative (routed, unconfirmed) prefixes, seconds.
    pending_ttl_s: float = 2.0
    #: Seconds after a decision at which an unfinished request's load is released (0: never).
    request_ttl_s: float = 3600.0
    #: Index snapshot path, restored on start and written on shutdown ("" = none).
    snapshot: str = ""
    #: The engine workers.
    workers: list[WorkerConfig] = field(default_factory=list)
    #: Approximate mode (a cache predicted from routing decisions, docs/replicas.md): ``auto`` for workers
    #: without a KV-event endpoint and while a stream is stale; ``all``; ``off``.
    approximate: str = "auto"
    #: Lifetime of an approximate entry after the decision that last routed it, seconds.
    approx_ttl_s: float = 600.0
    #: Predicted blocks kept per approximate-mode worker; 0 = the worker's ``capacity_blocks`` (else 65,536).
    #: Set it to GPU + host blocks for engines that offload KV to host memory.
    approx_capacity_blocks: int = 0
    #: Replica sync channel (``redis://host:port/db``, Redis or Valkey); "" = this replica routes alone.
    sync_url: str = ""
    #: Stream key of the sync channel (replicas of one fleet share it).
    sync_stream: str = "kvroute:sync"
    #: This replica's name on the channel ("" = its bound address).
    replica_name: str = ""
    #: Silence after which a peer replica's in-flight load is released, and this replica's heartbeat period.
    sync_lease_s: float = 3.0
    sync_heartbeat_s: float = 0.5
    #: Longest wait at start for the peers' state before answering.
    sync_catch_up_s: float = 3.0
    #: Log level name.
    log_level: str = "INFO"
    #: A worker routed to whose event stream stays silent this long is reported (``/health`` reason ``silent``).
    health_silence_s: float = 30.0
    #: An event endpoint not connected this long is reported (``never_connected`` / ``disconnected``).
    health_connect_grace_s: float = 10.0

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> "SidecarConfig":
        path = os.fspath(path)
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        try:
            if path.endswith(".json"):
                doc = json.loads(raw)
            else:
                import tomllib

                doc = tomllib.loads(raw.decode())
        except Exception as exc:
            raise ConfigError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'TOML'}: {exc}") from exc
        return cls.from_dict(doc)

    @classmethod
    def from_dict(cls, doc: Any) -> "SidecarConfig":
        if not isinstance(doc, dict):
            raise ConfigError("config must be a table/object")
        known = {f.name for f in fields(cls)}
        extra = set(doc) - known
        if extra:
            raise ConfigError(f"unknown config keys: {sorted(extra)}")
        doc = dict(doc)
        workers = doc.pop("workers", [])
        cfg = cls(**doc)
        cfg.workers = [parse_worker(w) for w in workers]
        cfg.validate()
        return cfg

    def validate(self) -> None:
        if not isinstance(self.block_size, int) or self.block_size <= 0:
            raise ConfigError(f"block_size must be a positive int, got {self.block_size!r}")
        if not isinstance(self.http_port, int) or not -1 <= self.http_port < 65536:
            raise ConfigError(f"http_port must be -1 (any free port), 0 (off) or a port, got {self.http_port!r}")
        if isinstance(self.request_ttl_s, bool) or not isinstance(self.request_ttl_s, (int, float)) \
                or not self.request_ttl_s >= 0:
            raise ConfigError(f"request_ttl_s must be a number >= 0 (0: never), got {self.request_ttl_s!r}")
        for name in ("health_silence_s", "health_connect_grace_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"{name} must be a number > 0, got {v!r}")
        if not isinstance(self.weights, dict):
            raise ConfigError("weights must be a table")
        if self.approximate not in APPROXIMATE_MODES:
            raise ConfigError(f"approximate must be one of {APPROXIMATE_MODES}, got {self.approximate!r}")
        for name in ("approx_ttl_s", "sync_lease_s", "sync_heartbeat_s"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ConfigError(f"{name} must be a number > 0, got {v!r}")
        if type(self.approx_capacity_blocks) is not int or self.approx_capacity_blocks < 0:
            raise ConfigError(f"approx_capacity_blocks must be an int >= 0, got {self.approx_capacity_blocks!r}")
        if not self.sync_heartbeat_s < self.sync_lease_s:
            raise ConfigError("sync_heartbeat_s must be shorter than sync_lease_s")
        if self.sync_url and not self.sync_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(f"sync_url must be redis://host:port/db (Redis or Valkey), got {self.sync_url!r}")
        if not isinstance(self.stream_bind, str):
            raise ConfigError(f"stream_bind must be a string, got {self.stream_bind!r}")
        if self.stream_bind:
            from .stream import parse_stream_address

            parse_stream_address(self.stream_bind)
        ids = [w.id for w in self.workers]
        if len(ids) != len(set(ids)):
            raise ConfigError("worker ids must be unique")
        for w in self.workers:
            try:
                Role.parse(w.role)
            except ValueError as exc:
                raise ConfigError(f"worker {w.id!r}: {exc}") from None


def parse_worker(doc: Any) -> WorkerConfig:
    """A worker from a config table, or from a ``--worker`` flag ``ID=ENDPOINT[,REPLAY]``."""
    if isinstance(doc, str):
        wid, sep, rest = doc.partition("=")
        if not sep or not wid:
            raise ConfigError(f"--worker wants ID=ENDPOINT[,REPLAY_ENDPOINT], got {doc!r}")
        ep, _, replay = rest.partition(",")
        return WorkerConfig(id=wid, endpoint=ep, replay_endpoint=replay)
    if not isinstance(doc, dict) or "id" not in doc:
        raise ConfigError(f"a worker needs at least an id: {doc!r}")
    known = {f.name for f in fields(WorkerConfig)}
    extra = set(doc) - known
    if extra:
        raise ConfigError(f"worker {doc.get('id')!r}: unknown keys {sorted(extra)}")
    return WorkerConfig(**doc)
