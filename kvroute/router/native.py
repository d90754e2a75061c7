"""Plumbing of the compiled route: ``Router.route`` as one call into the core per request.

When the index is the compiled :class:`kvroute.kvindex.native.NativeKVIndex` and the policy is
exactly :class:`~kvroute.router.policies.kvroute_cost.KVRoutePolicy` (its weights dataclass
unchanged), the router keeps a :class:`RouterCore` (C++, ``kvroute.kvindex._kvcore``) that holds

* the speculative-prefix table (:class:`NativePending` gives it the interface of
  :class:`~kvroute.router.pending.PendingPrefixes`, the reference);
* a mirror of every worker's load numbers, written by the router at each change
  (``Router._sync``), and the prefill pool in order;
* the kvroute cost model, the same arithmetic in the same order as ``ttfts_fast`` and
  ``KVRoutePolicy.choose``; the wait-for-KV-room term comes from the Python side
  (``KVRoutePolicy.room_waits`` over the router's active-block table), one number per
  candidate added to its cost in the core (a differential test, tests/test_native_route.py, checks same
  worker, same costs, same reason on random fleets: a formula change in the Python policy
  fails it until the core follows).

A prompt is hashed by one call outside the router's lock (GIL released on long prompts) and
routed by one call under it; ties the cost model leaves are broken by the router's seeded
``random.Random``, exactly as the Python path does.  Any other policy or index uses the
Python path (``route_hashes``), with this table when the core is in use.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

from ..kvindex.backend import core as _core

#: The extension module (None when the reference runs).
core = _core
from .policies.kvroute_cost import KVRoutePolicy, KVRouteWeights

#: Decision reasons by the core's reason code.
REASONS = (
    "cold: least cost (fair share on ties)",
    "min-cost: best cached",
    "replicate: load outweighs cache",
    "replicate: hot-prefix relief",
)
_FIELDS = frozenset(f.name for f in dataclasses.fields(KVRouteWeights))
_KNOWN = frozenset({
    "prefill_s_per_token", "host_reload_s_per_token", "disk_reload_s_per_token", "decode_s_per_token",
    "decode_weight", "reported_request_tokens", "fleet_weight", "fleet_pressure_cap", "relief_ratio",
    "kv_high", "kv_weight", "fleet_pressure_floor", "queued_request_floor_tokens",
    # computed on the Python side (KVRoutePolicy.room_waits) and passed to each route call
    "kv_room", "hold_window_s",
})


def make_core(index: Any, policy: Any, ttl_s: float, clock: Callable[[], float], block_size: int) -> Any:
    """A RouterCore when the compiled route applies (see the module docstring), else None."""
    if _core is None or getattr(index, "backend", None) != "native":
        return None
    if type(policy) is not KVRoutePolicy or type(policy.weights) is not KVRouteWeights or _FIELDS != _KNOWN:
        return None
    rc = _core.RouterCore(index._core, float(ttl_s), float(clock()), block_size)
    rc.set_weights(dataclasses.asdict(policy.weights))
    return rc


class NativePending:
    """:class:`~kvroute.router.pending.PendingPrefixes`' interface over the core's table."""

    def __init__(self, rc: Any, clock: Callable[[], float]) -> None:
        self._rc = rc
        self._clock = clock
        #: Minimum lifetime of an entry, seconds (maximum: twice this); 0 disables the table.
        self.ttl_s = rc.ttl_s

    def __len__(self) -> int:
        return self._rc.pending_len()

    def expire(self, now: float | None = None) -> None:
        self._rc.pending_expire(self._clock() if now is None else now)

    def reap(self) -> int:
        """Free the generations :meth:`expire` dropped (call it without the router's lock held)."""
        return self._rc.pending_reap()

    def dead_len(self) -> int:
        """Entries of dropped generations not freed yet."""
        return self._rc.pending_dead_len()

    def add(self, slot: int, hashes: Any) -> None:
        if not len(hashes) or self.ttl_s == 0:
            return
        self._rc.pending_add(slot, hashes, self._clock())

    def chain(self, hashes: Any) -> Any:
        """``hashes`` in the form :meth:`add_range` takes (converted once per chain, not per chunk)."""
        return hashes if isinstance(hashes, _core.Hashes) else _core.as_hashes(hashes)

    def add_range(self, slot: int, hashes: Any, start: int, stop: int) -> int:
        """As :meth:`PendingPrefixes.add_range` (a long chain: pass it through :meth:`chain` once)."""
        return self._rc.pending_add_range(slot, self.chain(hashes), start, stop, self._clock())

    def forget(self, slot: int) -> None:
        self._rc.pending_forget(slot)

    def match(self, hashes: Any) -> dict[int, int]:
        if not len(hashes):
            return {}
        return self._rc.pending_match(hashes, self._clock())

    def check_invariants(self) -> None:
        err = self._rc.pending_check()
        assert not err, err


def is_hashes(obj: Any) -> bool:
    """Whether ``obj`` is the core's immutable chain of hashes (``Hashes``)."""
    return _core is not None and isinstance(obj, _core.Hashes)


class NativeActive:
    """:class:`~kvroute.router.active.ActiveBlocks`' interface over the core's ``ActiveTable`` (the router uses
    it beside the compiled route; ``tests/test_native_route.py`` compares the two).  Hashes: a list, an array or
    the core's ``Hashes`` object (no conversion)."""

    __slots__ = ("_t",)

    def __init__(self) -> None:
        self._t = _core.ActiveTable()

    def distinct(self, slot: int) -> int:
        return self._t.distinct(slot)

    def add(self, slot: int, hashes: Any) -> int:
        return self._t.add(slot, hashes)

    def remove(self, slot: int, hashes: Any) -> int:
        return self._t.remove(slot, hashes)

    def forget(self, slot: int) -> None:
        self._t.forget(slot)

    def match(self, hashes: Any) -> dict[int, int]:
        if not len(hashes):
            return {}
        return self._t.match(hashes)

    def check_invariants(self) -> None:
        err = self._t.check()
        assert not err, err
