"""Ray Serve drop-in: :class:`KVRouteRequestRouter`, a ``RequestRouter`` that ranks replicas by kvroute.

Ray Serve (>= 2.46; checked against ray 2.60.0,
``python/ray/serve/_private/request_router/request_router.py``) lets a
deployment name its request router in ``RequestRouterConfig``.  The router
lives in every process that holds a handle to the deployment (the HTTP proxy,
a driver, an upstream deployment); Serve calls, on that process's router loop:

* ``initialize_state(**request_router_kwargs)`` once (kwargs must be JSON);
* ``update_replicas(replicas)`` whenever the replica set changes;
* ``choose_replicas(candidate_replicas, pending_request)`` for each routing
  attempt -- repeatedly for one request while every rank it returned is full
  (the answer is a list of ranks; Serve takes, inside the first rank with
  room, the replica with the shortest queue);
* ``on_request_routed(pending_request, replica_id, result)`` after a replica
  accepted the request (only with Serve's rejection protocol, i.e. strict
  ``max_ongoing_requests``);
* ``on_request_completed(replica_id, internal_request_id)`` exactly once per
  dispatched request, on success and on error.

Mapping: one kvroute worker per replica (``replica_id.unique_id``); one
kvroute decision per ``internal_request_id`` (:class:`GatewayRouting`); ranks
``[[best], [second], ...]`` by the policy's cost, so a full best replica
falls through to the next-cheapest one, not to a random one; load released in
``on_request_completed``.

Where the prompt's token ids come from: ``token_ids_from``, the dotted path
``"package.module:function"`` of a ``function(pending_request) -> token ids
| None`` (Serve needs JSON kwargs, so no callable object can be passed); the
default, :func:`default_token_ids`, reads a ``prompt_token_ids`` or
``token_ids`` key of the first dict argument (or keyword argument of that
name).  A request without token ids is left to Serve (all replicas in one rank,
shortest queue wins) and counted as ``unroutable``.

The index: ``approximate=True`` (default) records each completed prompt on the
replica that served it; for the exact path run a ``KVEventSubscriber`` on
``router.index`` (every instance is reachable through :func:`live_routers`).

Not supported: ``prefill_done`` (Serve reports no first token; prefill load is
released at completion), requests cancelled before dispatch (Serve calls no
hook: their load is released by the router's ``request_ttl_s``, default 600 s).
"""
from __future__ import annotations

import importlib
import logging
from typing import Any, Callable, List, Optional, Sequence

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from ..router import NoHealthyWorkerError, Router
from .flights import GatewayRouting, track, tracked

log = logging.getLogger(__name__)

#: ``track`` kind of the instances (Serve pickles this module by value: keep no state here).
_KIND = "ray_serve"


def live_routers() -> list["KVRouteRequestRouter"]:
    """Every :class:`KVRouteRequestRouter` initialised in this process (for metrics, tests, event feeds).

    Serve unpickles the router class from a by-value copy of this module, so an
    instance is not an ``isinstance`` of the class imported here.
    """
    return [r for r in tracked(_KIND) if getattr(r, "routing", None) is not None]


def default_token_ids(pending_request: PendingRequest) -> Optional[Sequence[int]]:
    """``prompt_token_ids`` / ``token_ids`` of the first dict argument or of the keyword arguments."""
    for key in ("prompt_token_ids", "token_ids"):
        v = pending_request.kwargs.get(key)
        if v is not None:
            return v
    for a in pending_request.args:
        if isinstance(a, dict):
            for key in ("prompt_token_ids", "token_ids"):
                v = a.get(key)
                if v is not None:
                    return v
            return None
    return None


def _load_callable(path: str) -> Callable[[PendingRequest], Optional[Sequence[int]]]:
    mod, sep, attr = path.partition(":")
    if not sep or not mod or not attr:
        raise ValueError(f"token_ids_from must look like 'package.module:function', got {path!r}")
    fn = getattr(importlib.import_module(mod), attr)
    if not callable(fn):
        raise TypeError(f"{path!r} is not callable")
    return fn


class KVRouteRequestRouter(RequestRouter):
    """Rank a deployment's replicas by kvroute's cost model (module docstring).

    ``request_router_kwargs`` (all optional): ``block_size`` (16; the engines'),
    ``policy`` ("kvroute" or any name in :data:`kvroute.router.POLICIES`),
    ``weights`` (dict of that policy's weights), ``approximate`` (True),
    ``approx_capacity_blocks`` (100000 per replica), ``request_ttl_s`` (600),
    ``token_ids_from`` (dotted path, see module docstring), ``seed`` (0).
    """

    def initialize_state(self, block_size: int = 16, policy: str = "kvroute", weights: dict | None = None,
                         approximate: bool = True, approx_capacity_blocks: int | None = 100_000,
                         request_ttl_s: float | None = 600.0, token_ids_from: str | None = None,
                         seed: int = 0, **unknown: Any) -> None:
        if unknown:
            raise TypeError(f"unknown request_router_kwargs for KVRouteRequestRouter: {sorted(unknown)}")
        #: The gateway state: ``routing.router`` is the kvroute Router (its ``index`` takes KV events).
        self.routing = GatewayRouting(
            Router([], block_size, policy=policy, weights=weights, seed=seed, request_ttl_s=request_ttl_s),
            approximate=approximate, approx_capacity_blocks=approx_capacity_blocks)
        self._token_ids = _load_callable(token_ids_from) if token_ids_from else default_token_ids
        # Replicas known to this router (by unique id), for forget() when one leaves.
        self._known: set[str] = set()
        track(_KIND, self)
        for r in self.curr_replicas.values():  # replicas may have arrived before initialize_state
            self._known.add(r.replica_id.unique_id)
        if self._known:
            self.routing.sync(self._known)

    # ------------------------------------------------------------------ pool
    def update_replicas(self, replicas: List[RunningReplica]) -> None:
        super().update_replicas(replicas)
        routing = getattr(self, "routing", None)
        if routing is None:
            return
        now = {r.replica_id.unique_id for r in replicas}
        for gone in self._known - now:
            routing.forget(gone)
        self._known = now
        routing.sync(now)

    # --------------------------------------------------------------- routing
    async def choose_replicas(self, candidate_replicas: List[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> List[List[RunningReplica]]:
        if not candidate_replicas:
            return []
        routing = getattr(self, "routing", None)
        tokens = None
        if routing is not None and pending_request is not None:
            try:
                tokens = self._token_ids(pending_request)
            except Exception:  # a user extractor failing must not stop routing
                log.exception("token_ids_from failed; leaving the request to Serve")
        if routing is None or tokens is None or len(tokens) == 0:
            if routing is not None:
                routing.stats.unroutable += 1
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        try:
            ranked = routing.route(pending_request.metadata.internal_request_id, tokens, by_id)
        except NoHealthyWorkerError:
            return [candidate_replicas]
        return [[by_id[w]] for w in ranked]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        routing = getattr(self, "routing", None)
        if routing is not None:
            routing.served_by(pending_request.metadata.internal_request_id, replica_id.unique_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        routing = getattr(self, "routing", None)
        if routing is not None:
            # Serve does not say whether it succeeded; a request that reached
            # completion on a replica ran its prefill there, so it is recorded.
            routing.release(internal_request_id, success=True, served_by=replica_id.unique_id)
