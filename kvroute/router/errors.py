"""Typed errors of the router (all derive from :class:`kvroute.KVRouteError`)."""
from __future__ import annotations

from ..kvindex.errors import KVRouteError, UnknownWorkerError

__all__ = [
    "RouterError", "NoHealthyWorkerError", "UnknownRequestError", "DuplicateRequestError",
    "UnknownPolicyError", "UnknownWorkerError", "PromptLengthError",
]


class RouterError(KVRouteError):
    """Base of every error the router raises deliberately."""


class NoHealthyWorkerError(RouterError):
    """No worker can take the request (all drained, unhealthy or removed; or an empty pool)."""


class UnknownRequestError(RouterError, KeyError):
    """``prefill_done``/``finish`` named a request the router is not tracking."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown request"


class DuplicateRequestError(RouterError, ValueError):
    """``route`` was called twice with the same live ``request_id``."""


class UnknownPolicyError(RouterError, ValueError):
    """A policy name not in :data:`kvroute.router.POLICIES`."""


class PromptLengthError(RouterError, ValueError):
    """A prompt longer than the router's ``max_prompt_tokens``, or a ``num_tokens`` that is not an int in
    ``[0, max_prompt_tokens]`` (it would book that many tokens of prefill load on a worker)."""
