"""A tiny Ray Serve deployment for tests/test_gateway_ray.py: it answers with the replica that served it.

Importable by Ray's worker processes (the test puts tests/ and the repository
root on their PYTHONPATH), so the deployment is pickled by reference.
"""
from __future__ import annotations

import asyncio

from ray import serve


@serve.deployment(num_replicas=2, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=16)
class Echo:
    """Returns ``{"replica": <unique id>, "n_tokens": ...}`` after an optional ``sleep_s``."""

    async def __call__(self, request: dict) -> dict:
        if request.get("sleep_s"):
            await asyncio.sleep(request["sleep_s"])
        return {"replica": serve.get_replica_context().replica_id.unique_id,
                "n_tokens": len(request.get("prompt_token_ids") or ())}
