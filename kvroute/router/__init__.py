"""Worker selection on top of the exact KV index.

Map of the parts (this package imports only :mod:`kvroute.kvindex`):

* :mod:`.router`   -- :class:`Router`: index + speculative prefixes + load + policy.
* :mod:`.types`    -- :class:`Decision`, :class:`WorkerState`, :class:`Candidate`, ...
* :mod:`.policy`   -- the :class:`Policy` interface and tie-breaking helpers.
* :mod:`.policies` -- ``kvroute`` (ours) and the peers, registered in :data:`POLICIES`.
* :mod:`.pending`  -- speculative prefixes with a TTL, kept apart from the index.
* :mod:`.approx`   -- approximate mode: a predicted cache fed by decisions (TTL, per-worker bound).
* :mod:`.disagg`   -- decode-worker choice for prefill/decode pools.
* :mod:`.errors`   -- typed errors (``NoHealthyWorkerError``, ...).
"""
from .disagg import DecodeWeights
from .errors import (
    DuplicateRequestError,
    NoHealthyWorkerError,
    PromptLengthError,
    RouterError,
    UnknownPolicyError,
    UnknownRequestError,
    UnknownWorkerError,
)
from .pending import PendingPrefixes
from .policies import (
    POLICIES,
    DynamoWeights,
    KVRouteWeights,
    LLMDWeights,
    PrebleWeights,
    SGLangWeights,
)
from .policy import Policy
from .router import DEFAULT_MAX_PROMPT_TOKENS, DEFAULT_PENDING_TTL_S, Router
from .approx import DEFAULT_APPROX_TTL_S, ApproxPrefixes
from .types import (Candidate, Choice, Decision, FleetView, FlightRecord, Role, RouteHints, RouteRequest, WorkerState,
                    WorkerStatus)

__all__ = [
    "Router", "Decision", "POLICIES", "Policy", "KVRouteWeights", "DynamoWeights", "SGLangWeights",
    "LLMDWeights", "PrebleWeights", "DecodeWeights", "PendingPrefixes", "Candidate", "Choice", "FleetView",
    "RouteRequest", "RouteHints", "Role", "WorkerState", "WorkerStatus", "RouterError", "NoHealthyWorkerError",
    "UnknownRequestError", "DuplicateRequestError", "UnknownPolicyError", "UnknownWorkerError",
    "PromptLengthError", "DEFAULT_PENDING_TTL_S", "DEFAULT_MAX_PROMPT_TOKENS", "ApproxPrefixes", "DEFAULT_APPROX_TTL_S", "FlightRecord",
]
