"""The routing policies, registered by name in :data:`POLICIES`.

* ``kvroute``      -- ours: fleet-aware TTFT cost model (:mod:`.kvroute_cost`).
* ``dynamo``       -- NVIDIA Dynamo's default KV-router logit (:mod:`.dynamo`).
* ``sglang``       -- SGLang router's cache_aware thresholds (:mod:`.sglang`).
* ``llmd``         -- llm-d's weighted scorers (:mod:`.llmd`).
* ``preble``       -- Preble's exploit/explore rule (:mod:`.preble`).
* ``round_robin``, ``least_loaded``, ``power_of_two`` -- cache-blind baselines (:mod:`.baselines`).
"""
from __future__ import annotations

from ..policy import Policy
from .baselines import LeastLoadedPolicy, NoWeights, PowerOfTwoPolicy, RoundRobinPolicy
from .dynamo import DynamoPolicy, DynamoWeights
from .kvroute_cost import KVRoutePolicy, KVRouteWeights
from .llmd import LLMDPolicy, LLMDWeights
from .preble import PreblePolicy, PrebleWeights
from .sglang import SGLangPolicy, SGLangWeights

#: Policy classes by registry name; ``POLICIES[name](weights)`` builds one.
POLICIES: dict[str, type[Policy]] = {
    cls.name: cls
    for cls in (
        KVRoutePolicy, DynamoPolicy, SGLangPolicy, LLMDPolicy, PreblePolicy,
        RoundRobinPolicy, LeastLoadedPolicy, PowerOfTwoPolicy,
    )
}

__all__ = [
    "POLICIES", "Policy", "KVRoutePolicy", "KVRouteWeights", "DynamoPolicy", "DynamoWeights", "SGLangPolicy",
    "SGLangWeights", "LLMDPolicy", "LLMDWeights", "PreblePolicy", "PrebleWeights", "RoundRobinPolicy",
    "LeastLoadedPolicy", "PowerOfTwoPolicy", "NoWeights",
]
