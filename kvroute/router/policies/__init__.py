"""The routing policies, registered by name in :data:`POLICIES`.

* ``kvroute``      -- ours: fleet-aware TTFT cost model (:mod:`.kvroute_cost`).
* ``dynamo``       -- NVIDIA Dynamo's default KV-router logit (:mod:`.dynamo`).
* ``sglang``       -- SGLang router's cache_aware thresholds (:mod:`.sglang`).
* ``llmd``         -- llm-d's weighted scorers (:mod:`.llmd`).
* ``preble``       -- Preble's exploit/explore rule (:mod:`.preble`).
* ``round_robin``, ``least_loaded``, ``power_of_two`` -- cache-blind baselines (:mod:`.baselines`).

:data:`VARIANTS` holds named older variants of the peers (``llmd_v0``,
``sglang_first``, ``preble_v0``): usable by name wherever a policy name is
taken, but not part of ``all``.
"""
from __future__ import annotations

from ..policy import Policy
from .baselines import LeastLoadedPolicy, NoWeights, PowerOfTwoPolicy, RoundRobinPolicy
from .dynamo import DynamoPolicy, DynamoWeights
from .kvroute_cost import KVRoutePolicy, KVRouteWeights
from .llmd import LLMDPolicy, LLMDv0Policy, LLMDWeights
from .preble import PreblePolicy, Preblev0Policy, PrebleWeights
from .sglang import SGLangFirstPolicy, SGLangPolicy, SGLangWeights

#: Policy classes by registry name; ``POLICIES[name](weights)`` builds one.
POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        KVRoutePolicy, DynamoPolicy, SGLangPolicy, LLMDPolicy, PreblePolicy,
        RoundRobinPolicy, LeastLoadedPolicy, PowerOfTwoPolicy,
    )
}

#: Named older variants of peers, by name (not in ``POLICIES``, so not in ``all``).
VARIANTS: dict[str, type[Policy]] = {cls.name: cls for cls in (LLMDv0Policy, SGLangFirstPolicy, Preblev0Policy)}


def policy_class(name: str) -> type[Policy] | None:
    """The policy class registered under ``name`` in :data:`POLICIES` or :data:`VARIANTS`, else None."""
    return POLICIES.get(name) or VARIANTS.get(name)


__all__ = [
    "VARIANTS", "policy_class",
    "POLICIES", "Policy", "KVRoutePolicy", "KVRouteWeights", "DynamoPolicy", "DynamoWeights", "SGLangPolicy",
    "SGLangWeights", "LLMDPolicy", "LLMDWeights", "PreblePolicy", "PrebleWeights", "RoundRobinPolicy",
    "LeastLoadedPolicy", "PowerOfTwoPolicy", "NoWeights",
]
