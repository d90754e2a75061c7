"""Drop-ins for the gateways users already run (top floor: nothing in kvroute imports this package).

* :mod:`.flights`          -- :class:`GatewayRouting`: a Router kept in step with a
  gateway's pool and request lifecycle (shared by every drop-in).
* :mod:`.ray_serve`        -- :class:`KVRouteRequestRouter`, a Ray Serve
  ``RequestRouter`` (extra ``ray``).
* :mod:`.litellm_strategy` -- :class:`KVRouteStrategy`, a LiteLLM custom routing
  strategy with its success/failure callbacks (extra ``litellm``).

vLLM production-stack's router has no plug-in point for a policy; why, and what
its callbacks can and cannot do, is in docs/gateways.md.
"""
from .flights import GatewayRouting, GatewayStats

__all__ = ["GatewayRouting", "GatewayStats"]
