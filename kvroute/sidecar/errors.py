"""Typed errors of the sidecar and the wire names of every error reply.

An error reply carries ``{"type": NAME, "message": ...}``; :data:`ERROR_TYPES`
maps each kvroute exception class to its NAME (the client maps it back).
"""
from __future__ import annotations

from ..kvindex.errors import InvalidTokensError, KVRouteError, SnapshotError, UnknownWorkerError
from ..router.errors import (
    DuplicateRequestError,
    NoHealthyWorkerError,
    UnknownPolicyError,
    UnknownRequestError,
)


class SidecarError(KVRouteError):
    """Base of the sidecar's own errors."""


class BadRequestError(SidecarError, ValueError):
    """A request that is not valid msgpack, not a map, or has missing/ill-typed fields."""


class UnknownOpError(SidecarError, ValueError):
    """A request naming an operation the server does not have."""


class ConfigError(SidecarError, ValueError):
    """A bad configuration file or flag."""


class RemoteError(SidecarError):
    """Client side: the server answered an error of a type this client does not know."""

    def __init__(self, type_: str, message: str) -> None:
        super().__init__(f"{type_}: {message}")
        #: The wire name of the error.
        self.type = type_


class SidecarTimeoutError(SidecarError, TimeoutError):
    """Client side: no reply within the timeout."""


#: Exception class -> wire name, most specific first.
ERROR_TYPES: list[tuple[type[BaseException], str]] = [
    (BadRequestError, "BadRequest"),
    (UnknownOpError, "UnknownOp"),
    (NoHealthyWorkerError, "NoHealthyWorker"),
    (UnknownRequestError, "UnknownRequest"),
    (DuplicateRequestError, "DuplicateRequest"),
    (UnknownWorkerError, "UnknownWorker"),
    (UnknownPolicyError, "UnknownPolicy"),
    (InvalidTokensError, "InvalidTokens"),
    (SnapshotError, "Snapshot"),
    (ConfigError, "Config"),
]

#: Wire name -> exception class (client side).
ERROR_CLASSES: dict[str, type[BaseException]] = {name: cls for cls, name in ERROR_TYPES}


def wire_name(exc: BaseException) -> str:
    """The wire name of an exception (``"Internal"`` for anything unexpected, ``"BadRequest"`` for other bad input)."""
    for cls, name in ERROR_TYPES:
        if isinstance(exc, cls):
            return name
    if isinstance(exc, (ValueError, TypeError, KeyError)):
        return "BadRequest"
    return "Internal"
