"""Plain value types of the router: worker state, the policy's view of a request, decisions.

Who touches what:

* :class:`WorkerState` -- owned and mutated by :class:`kvroute.router.Router` only
  (routing, ``prefill_done``/``finish``, ``update_load``); policies read it.
* :class:`Candidate`, :class:`RouteRequest`, :class:`FleetView` -- built fresh by the
  router for each decision and handed to a policy; policies never mutate them.
* :class:`Choice` -- what a policy returns; :class:`Decision` -- what the router returns.
* :class:`FlightRecord` -- a decision's load, as the router tells its observers (replica sync).
"""
from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from typing import Any, Hashable, NamedTuple, Sequence

WorkerId = Hashable


class WorkerStatus(enum.Enum):
    """Whether a worker takes new requests."""

    #: Takes new requests.
    HEALTHY = "healthy"
    #: Finishes what it has, takes nothing new (being taken out of service).
    DRAINING = "draining"
    #: Takes nothing new; its in-flight requests are still tracked until finished.
    UNHEALTHY = "unhealthy"


class Role(enum.Enum):
    """A worker's pool.  ``BOTH`` is an aggregated worker (prefill and decode)."""

    BOTH = "both"
    PREFILL = "prefill"
    DECODE = "decode"

    @classmethod
    def parse(cls, value: "Role | str") -> "Role":
        if isinstance(value, Role):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"unknown worker role {value!r}; expected both, prefill or decode") from None


class WorkerState:
    """Everything the router knows about one worker's load.  Mutated by the Router only."""

    __slots__ = (
        "id", "order", "role", "status", "prefill_tokens", "prefill_requests", "decode_blocks",
        "active_requests", "routed_total", "reported_waiting", "reported_running",
        "reported_kv_usage", "reported_queue_tokens", "reported_at", "capacity_blocks", "active_blocks",
    )

    def __init__(self, wid: WorkerId, order: int, role: Role, capacity_blocks: int | None = None) -> None:
        #: The worker's id (as given by the user; also its id in the KVIndex).
        self.id = wid
        #: Registration order (0 = first registered); "the first worker" for peers that use list order.
        self.order = order
        #: Which pool the worker belongs to.
        self.role = role
        #: Whether it takes new requests.
        self.status = WorkerStatus.HEALTHY
        #: Router-tracked: prompt tokens booked as prefill load by the requests routed here whose prefill is
        #: not done -- what the policy's ``booked_prefill_tokens`` said (default: the uncached tokens).
        self.prefill_tokens = 0
        #: Router-tracked: number of those requests.
        self.prefill_requests = 0
        #: Router-tracked: KV blocks of the prompts of requests routed here and not finished.
        self.decode_blocks = 0
        #: Router-tracked, only for a policy with ``tracks_active_blocks``: *distinct* prompt blocks of the
        #: requests routed here and not finished (shared prefixes counted once); 0 otherwise.
        self.active_blocks = 0
        #: Router-tracked: requests routed here and not finished.
        self.active_requests = 0
        #: Router-tracked: requests ever routed here (fair-share tie-breaking).
        self.routed_total = 0
        #: Worker-reported: waiting (queued) requests, or None if never reported.
        self.reported_waiting: int | None = None
        #: Worker-reported: running requests, or None.
        self.reported_running: int | None = None
        #: Worker-reported: fraction of its GPU KV cache in use (0..1), or None.
        self.reported_kv_usage: float | None = None
        #: Worker-reported: prompt tokens waiting for prefill, or None.
        self.reported_queue_tokens: int | None = None
        #: Router clock time of the last report, or None.
        self.reported_at: float | None = None
        #: GPU KV capacity in blocks, when known (configured or reported).
        self.capacity_blocks = capacity_blocks

    @property
    def accepting(self) -> bool:
        return self.status is WorkerStatus.HEALTHY

    def kv_usage(self) -> float | None:
        """Reported KV usage, else the router's estimate (decode blocks / capacity), else None."""
        if self.reported_kv_usage is not None:
            return self.reported_kv_usage
        if self.capacity_blocks:
            return min(1.0, self.decode_blocks / self.capacity_blocks)
        return None

    def queue_requests(self) -> int:
        """Requests queued or in flight: the larger of the router's count and the worker's report."""
        rep = (self.reported_waiting or 0) + (self.reported_running or 0)
        return max(self.active_requests, rep)

    def to_dict(self) -> dict[str, Any]:
        return {
            "worker": self.id, "role": self.role.value, "status": self.status.value,
            "prefill_tokens": self.prefill_tokens, "prefill_requests": self.prefill_requests,
            "decode_blocks": self.decode_blocks, "active_blocks": self.active_blocks,
            "active_requests": self.active_requests,
            "routed_total": self.routed_total, "reported_waiting": self.reported_waiting,
            "reported_running": self.reported_running, "reported_kv_usage": self.reported_kv_usage,
            "reported_queue_tokens": self.reported_queue_tokens, "capacity_blocks": self.capacity_blocks,
        }


class Candidate:
    """One worker as a policy sees it for one request (read-only for policies).

    Overlaps are in blocks.  ``total`` is the prompt prefix the worker holds or
    will hold (index on any tier, or speculatively pending); ``gpu + host +
    disk + pending == total``; ``pending`` are blocks only a recent routing
    decision (not yet an engine event) says the worker holds.  ``active`` (only
    filled for a policy with ``tracks_active_blocks``) is the number of leading
    prompt blocks that unfinished requests on the worker already hold.
    """

    __slots__ = ("worker", "state", "total", "gpu", "host", "disk", "pending", "active")

    def __init__(self, state: WorkerState, total: int = 0, gpu: int = 0, host: int = 0, disk: int = 0,
                 pending: int = 0, active: int = 0) -> None:
        self.worker = state.id
        self.state = state
        self.total = total
        self.gpu = gpu
        self.host = host
        self.disk = disk
        self.pending = pending
        self.active = active

    @property
    def confirmed(self) -> int:
        """Blocks the index (engine events) confirms, on any tier."""
        return self.gpu + self.host + self.disk

    def __repr__(self) -> str:
        return (f"Candidate({self.worker!r}, total={self.total}, gpu={self.gpu}, host={self.host}, "
                f"disk={self.disk}, pending={self.pending})")


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """The request being routed."""

    #: The caller's id of the request (unique while in flight).
    request_id: Any
    #: Prompt length in tokens.
    num_tokens: int
    #: Full blocks of the prompt (``num_tokens // block_size``).
    num_blocks: int
    #: Tokens per KV block.
    block_size: int
    #: Client hints (session id, user, expected return), plain data; None when the caller gave none.
    hints: "RouteHints | None" = None


@dataclass(frozen=True, slots=True)
class RouteHints:
    """What a client says about a request beyond its prompt, passed as plain data.

    Set by the serving path (``x-session-id`` header, the OpenAI ``user`` field)
    or a library caller; policies may read it, and whoever wires the eviction
    side can hand it on (the router never interprets it itself).
    """

    #: The client's conversation/session id (``x-session-id``), if any.
    session_id: str | None = None
    #: The OpenAI ``user`` field, if any.
    user: str | None = None
    #: Seconds until the client expects to send this session's next request, if it said.
    expected_return_s: float | None = None


@dataclass(slots=True)
class FleetView:
    """What a policy may know about the whole pool it chooses from."""

    #: Candidates (accepting workers of the pool), in registration order.
    candidates: list[Candidate]
    #: Seeded random source for tie-breaking (owned by the router).
    rng: random.Random
    #: Router clock time of this decision.
    now: float
    #: Decisions by other router replicas that this router, on average, had not yet seen when it decided
    #: (measured by replica sync: :attr:`kvroute.router.Router.view_unseen`); 0 for one router.  The
    #: uncertainty of the view: a policy may treat costs within that much load as ties.
    unseen: float = 0.0


@dataclass(slots=True)
class Choice:
    """A policy's answer: the chosen worker, the cost of every candidate and why."""

    #: The chosen candidate's worker id.
    worker: WorkerId
    #: {worker: cost}; lower is better for every policy (score-maximising peers report -score).
    costs: dict[Any, float]
    #: Short human-readable why (becomes ``Decision.reason``).
    reason: str


@dataclass(slots=True)
class Decision:
    """The router's answer to :meth:`kvroute.router.Router.route`."""

    request_id: Any
    #: Where to send the request (the prefill worker when pools are disaggregated).
    worker: WorkerId
    #: Prompt tokens the chosen worker is predicted to have cached (all tiers, incl. pending).
    predicted_cached_tokens: int
    #: Of those, on the GPU; includes the speculative ``pending`` part.
    predicted_gpu_tokens: int
    #: Of those, in host memory (a reload, not a prefill).
    predicted_host_tokens: int
    #: Of those, on disk.
    predicted_disk_tokens: int
    #: Part of the GPU prediction that rests on routing decisions not yet confirmed by events.
    predicted_pending_tokens: int
    #: {worker: cost} of every candidate the policy considered (lower is better).
    costs: dict[Any, float]
    #: The policy's reason, e.g. ``"min-cost"``, ``"replicate: hot-prefix relief"``.
    reason: str
    #: Policy name.
    policy: str
    #: Prompt length in tokens (at least the full blocks routed).
    num_tokens: int
    #: With disaggregated pools: the prefill worker (== ``worker``) and the decode worker.
    prefill_worker: WorkerId | None = None
    decode_worker: WorkerId | None = None
    #: Decode-pool costs, when pools are disaggregated.
    decode_costs: dict[Any, float] = field(default_factory=dict)
    #: The client hints the request was routed with (None: none given).
    hints: RouteHints | None = None

    @property
    def predicted_by_tier(self) -> dict[str, int]:
        return {"gpu": self.predicted_gpu_tokens, "host": self.predicted_host_tokens, "disk": self.predicted_disk_tokens}

    def to_dict(self, costs: bool = True) -> dict[str, Any]:
        """The wire form (docs/protocol.md, ``route``); ``costs=False`` leaves the per-worker costs out."""
        out = {
            "request_id": self.request_id, "worker": self.worker,
            "predicted_cached_tokens": self.predicted_cached_tokens,
            "predicted_by_tier": self.predicted_by_tier,
            "predicted_pending_tokens": self.predicted_pending_tokens,
        }
        if costs:
            out["costs"] = [[w, c] for w, c in self.costs.items()]
        out.update(reason=self.reason, policy=self.policy, num_tokens=self.num_tokens,
                   prefill_worker=self.prefill_worker, decode_worker=self.decode_worker)
        return out


class FlightRecord(NamedTuple):
    """The load one decision adds, as :meth:`kvroute.router.Router.add_observer` reports it.

    Built by the router; observers (replica sync) read it and never mutate it.
    """

    #: The caller's request id.
    request_id: Any
    #: The (prefill) worker chosen.
    worker: WorkerId
    #: The decode worker when pools are disaggregated, else None.
    decode_worker: WorkerId | None
    #: Uncached prompt tokens added to the worker's prefill queue.
    prefill_tokens: int
    #: Prompt blocks added to the decode worker's KV.
    blocks: int
    #: Whether the prefill load still counts.
    prefill_open: bool
    #: Seconds until the router releases it unasked (``request_ttl_s``), or None.
    ttl_s: float | None
    #: The prompt's chained hashes when the decision added speculative or approximate entries or the router
    #: keeps an active-block table (replicas then count each other's active blocks), else ().
    hashes: Sequence[int] = ()
    #: Whether the chain went to the speculative (pending) table.
    pending: bool = False
    #: Whether the chain went to the approximate table (the worker is in approximate mode).
    approx: bool = False
