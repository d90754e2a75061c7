"""The one small interface every routing policy implements, and shared helpers.

A policy is a small object built from its weights dataclass::

    class MyPolicy(Policy):
        name = "mine"
        Weights = MyWeights            # a dataclass; every field documented
        uses_pending = True            # whether speculative prefixes count as cached

        def choose(self, req: RouteRequest, fleet: FleetView) -> Choice: ...
        def on_routed(self, req, fleet, chosen: Candidate) -> None: ...   # optional

``choose`` must be a function of its arguments and of state the policy itself
keeps from ``on_routed`` (peers that remember their own decisions, like
round robin or Preble's load window); it never mutates the candidates.  Each
policy module also exposes a pure ``score(request, candidate, weights, ...)``
cost function so costs can be checked by hand.  The registry of policies by
name is :data:`kvroute.router.POLICIES`.
"""
from __future__ import annotations

import random
from typing import Any, Callable, ClassVar, Iterable, Sequence

from .types import Candidate, Choice, FleetView, RouteRequest

#: Relative tolerance under which two costs count as a tie.
TIE_REL = 1e-9


class Policy:
    """Base class of routing policies (see the module docstring)."""

    #: Registry name.
    name: ClassVar[str] = "?"
    #: The weights dataclass of this policy.
    Weights: ClassVar[type] = type(None)
    #: Whether overlaps include speculative (pending) blocks.
    uses_pending: ClassVar[bool] = True
    #: Whether the router keeps distinct active blocks per worker (``WorkerState.active_blocks``,
    #: ``Candidate.active``) for this policy; off by default (it costs a walk per request).
    tracks_active_blocks: ClassVar[bool] = False

    def __init__(self, weights: Any = None) -> None:
        if weights is None:
            weights = self.Weights()
        elif isinstance(weights, dict):
            weights = self.Weights(**weights)
        elif not isinstance(weights, self.Weights):
            raise TypeError(f"policy {self.name!r} takes {self.Weights.__name__} weights, not {type(weights).__name__}")
        #: The policy's weights (a dataclass instance); read-only once routing starts.
        self.weights = weights

    def choose(self, req: RouteRequest, fleet: FleetView) -> Choice:  # pragma: no cover - interface
        raise NotImplementedError

    def on_routed(self, req: RouteRequest, fleet: FleetView, chosen: Candidate) -> None:
        """Hook called after the router committed a decision of this policy."""

    def booked_prefill_tokens(self, req: RouteRequest, chosen: Candidate) -> int:
        """Prefill tokens the router books on the chosen worker until ``prefill_done``.

        Default: the prompt tokens the worker does not hold on any tier.  A peer
        that books differently (Dynamo books host and disk hits at a fraction)
        overrides it, so its own load figures follow its own rule.
        """
        return max(0, req.num_tokens - chosen.total * req.block_size)

    def wants_active_overlap(self, num_blocks: int, states: Sequence[Any]) -> bool:
        """Whether this decision needs ``Candidate.active`` (a walk of the active-block table); only asked of a
        policy with ``tracks_active_blocks``.  Default: always."""
        return True

    def forget_worker(self, worker: Any) -> None:
        """Hook called when a worker is removed."""


def argmin_tiebreak(
    cands: Sequence[Candidate],
    costs: Sequence[float],
    rng: random.Random,
    *,
    secondary: Callable[[Candidate], Any] | None = None,
) -> Candidate:
    """The lowest-cost candidate; ties (within :data:`TIE_REL`) by ``secondary`` (lower first), then seeded random."""
    best = min(costs)
    tol = abs(best) * TIE_REL + 1e-12
    tied = [c for c, v in zip(cands, costs) if v <= best + tol]
    if len(tied) > 1 and secondary is not None:
        keys = [secondary(c) for c in tied]
        k0 = min(keys)
        tied = [c for c, k in zip(tied, keys) if k == k0]
    if len(tied) == 1:
        return tied[0]
    return tied[rng.randrange(len(tied))]


def fair_share_key(c: Candidate) -> tuple[int, int]:
    """Secondary tie-break that spreads cold requests: fewest in flight, then fewest ever routed."""
    return (c.state.active_requests, c.state.routed_total)


def costs_dict(cands: Iterable[Candidate], costs: Iterable[float]) -> dict[Any, float]:
    return {c.worker: float(v) for c, v in zip(cands, costs)}
