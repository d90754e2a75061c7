"""The one base error of kvroute and the typed errors of the ground floor.

Every error kvroute raises on bad input derives from :class:`KVRouteError`, so
a caller can catch one type.  Subsystems (adapters, router, sidecar) subclass
it; they live here only when the ground floor itself raises them.
"""
from __future__ import annotations


class KVRouteError(Exception):
    """Base class of every error kvroute raises deliberately."""


class SnapshotError(KVRouteError):
    """A snapshot file is missing, truncated, corrupted or of an unknown version."""


class UnknownWorkerError(KVRouteError, KeyError):
    """An operation named a worker the index does not know."""

    def __str__(self) -> str:  # KeyError quotes its argument; keep the message readable
        return str(self.args[0]) if self.args else "unknown worker"


class InvalidTokensError(KVRouteError, ValueError):
    """Token ids that cannot be hashed (negative, above 2**32 - 1, not integers)."""


class InvalidHashError(KVRouteError, ValueError):
    """A block hash that is not an unsigned 64-bit integer (content hash) or an int/bytes (engine hash)."""
