"""How long a routed request keeps its KV on a worker, estimated from the router's own counts.

Little's law (Little 1961; any stable queueing system): the mean time a request
spends in a system equals the mean number in it over the arrival rate,
``H = L / lambda``.  For the router, "in the system" is *routed and not yet
finished*: exactly the time its prompt's blocks count in the router's active
table, from the decision to ``finish``.  ``L`` is the router's in-flight count
(``WorkerState.active_requests`` summed over the pool, other replicas' synced
requests included) and ``lambda`` the rate of decisions (the pool's
``routed_total``, also counting other replicas' decisions), averaged with an
exponential window of ``window_s`` seconds and corrected for its start (an
exponential average that starts at 0 underestimates the rate for the first
windows; dividing by ``1 - exp(-elapsed / window_s)`` removes that bias).

The kvroute cost model uses ``H`` to price the wait for KV room
(:func:`kvroute.router.policies.kvroute_cost.kv_room_wait`).  Owned by one
policy instance; updated once per decision, before it, on both the Python and
the compiled route, so the two see the same sequence.
"""
from __future__ import annotations

import math


class HoldTime:
    """Little's-law estimate of the mean seconds a request stays routed and unfinished."""

    __slots__ = ("window_s", "_t0", "_last_t", "_last_n", "_rate")

    def __init__(self, window_s: float) -> None:
        if not window_s > 0:
            raise ValueError(f"hold_window_s must be > 0, got {window_s!r}")
        #: Averaging window of the decision rate, seconds (read-only).
        self.window_s = float(window_s)
        #: Time of the first observation (None: none yet), of the last, and the decision count then.
        self._t0: float | None = None
        self._last_t = 0.0
        self._last_n = 0
        #: Exponentially averaged decisions per second (not yet bias-corrected).
        self._rate = 0.0

    def update(self, now: float, routed: int, in_flight: int) -> float:
        """Observe the pool's decision count ``routed`` and ``in_flight`` requests at ``now``; the estimate
        of the mean hold time in seconds (0.0 until two observations with decisions between them)."""
        if self._t0 is None:
            self._t0 = self._last_t = now
            self._last_n = routed
            return 0.0
        dt = now - self._last_t
        if dt < 0:  # a clock that went back: keep the average, restart the interval
            dt = 0.0
        dn = routed - self._last_n
        if dn < 0:  # a worker (and its count) left the pool
            dn = 0
        self._rate = self._rate * math.exp(-dt / self.window_s) + dn / self.window_s
        self._last_t = now
        self._last_n = routed
        corr = 1.0 - math.exp(-(now - self._t0) / self.window_s)
        if corr <= 0.0 or self._rate <= 0.0:
            return 0.0
        return in_flight / (self._rate / corr)
