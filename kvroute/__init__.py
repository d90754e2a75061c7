"""kvroute: KV-cache-aware routing and workload-aware prefix eviction for LLM fleets.

Map of the packages (each floor imports only the floors below it):

* :mod:`kvroute.kvindex`  -- ground floor: chained block hashing, engine-neutral
  KV events, the exact multi-worker multi-tier :class:`KVIndex`.
* :mod:`kvroute.router`   -- worker selection policies on top of the index.
* :mod:`kvroute.eviction` -- eviction policies and the two-tier cache.
* :mod:`kvroute.adapters` -- engines (vLLM, SGLang) to and from the core.
* :mod:`kvroute.sim`, :mod:`kvroute.sidecar`, :mod:`kvroute.cli` -- the top
  floor that wires the rest.
"""
from __future__ import annotations

from typing import Any

from .kvindex import (
    ContentHash,
    EngineHash,
    InvalidHashError,
    InvalidTokensError,
    KVIndex,
    KVRouteError,
    Overlap,
    SnapshotError,
    Tier,
    UnknownWorkerError,
    block_hashes,
)

__version__ = "0.1.0"

_LAZY = {
    "Router": ("kvroute.router", "Router"),
    "Decision": ("kvroute.router", "Decision"),
    "TieredCache": ("kvroute.eviction", "TieredCache"),
}


def __getattr__(name: str) -> Any:  # lazy: keep `import kvroute` light and free of cycles
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(mod), attr)
    raise AttributeError(f"module 'kvroute' has no attribute {name!r}")


__all__ = [
    "ContentHash", "EngineHash", "InvalidHashError", "InvalidTokensError", "KVIndex", "KVRouteError", "Overlap",
    "SnapshotError", "Tier", "UnknownWorkerError", "block_hashes", "Router", "Decision", "TieredCache",
    "__version__",
]
