"""``kvroute sim``: a trace-driven cluster simulator running kvroute's real router and caches.

Map of the parts (top floor: may import router, eviction, kvindex):

* :mod:`kvroute.traces` -- Mooncake JSONL traces (path or bundled name), :class:`Request`, :class:`TraceError` (shared with the eviction replay).
* :mod:`.workloads` -- generators: shared system prompt, multi-turn chat, agent sessions.
* :mod:`.cost`      -- :class:`CostModel` (prefill, host reload, decode step, KV transfer) and presets.
* :mod:`.engine`    -- the discrete-event :class:`Simulation`, :class:`SimConfig`, :func:`simulate`.
* :mod:`.metrics`   -- per-request :class:`Records` and the :class:`Summary` of a run.
* :mod:`.runner`    -- every (routing, eviction) pair; capacity sweeps.
* :mod:`.report`    -- terminal table, CSV/JSON, PNG plots.
* :mod:`.tune`      -- parameter search for a routing or eviction policy.
* :mod:`.cli`       -- the ``kvroute sim`` and ``kvroute tune`` commands.
"""
from __future__ import annotations

from .cost import PRESETS, CostModel, CostModelError, get_preset
from .metrics import Records, Summary, summarize
from ..traces import BUNDLED, Request, TraceError, ideal_hit_ratio, load_trace, reshape
from .workloads import GENERATORS, agent_sessions, multi_turn_chat, shared_system_prompt

__all__ = [
    "BUNDLED", "CostModel", "CostModelError", "GENERATORS", "PRESETS", "Records", "Request", "Summary",
    "TraceError", "agent_sessions", "get_preset", "ideal_hit_ratio", "load_trace", "multi_turn_chat",
    "reshape", "shared_system_prompt", "summarize", "SimConfig", "Simulation", "simulate",
]


def __getattr__(name: str):  # the engine imports router and eviction: load it on first use
    if name in ("SimConfig", "Simulation", "simulate"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'kvroute.sim' has no attribute {name!r}")
