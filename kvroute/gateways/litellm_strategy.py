"""LiteLLM drop-in: :class:`KVRouteStrategy`, a custom routing strategy plus the callbacks that release load.

LiteLLM's ``Router`` (checked against litellm 1.110.2; the interface is
``litellm.types.router.CustomRoutingStrategyBase``) asks a custom strategy for
every pick: ``async_get_available_deployment(model, messages, input,
specific_deployment, request_kwargs)`` (and the sync twin for ``completion``),
which returns one element of the router's model list.  It is installed with
``router.set_custom_routing_strategy(strategy)`` (1.110 also names it
``register_plugin``).  LiteLLM tells nothing back to a strategy, so the load
is released by a ``CustomLogger`` in ``litellm.callbacks``, whose success and
failure events carry the request's metadata; :meth:`KVRouteStrategy.install`
does both.

Mapping: one kvroute :class:`Router` per model group (each group is its own
fleet of caches), one kvroute worker per deployment (``model_info.id``), one
decision per pick.  The pick stamps ``metadata["kvroute_request_id"]`` on the
request so that the callbacks find it.  A second pick for a request that
already carries a live id is LiteLLM's retry or fallback: the earlier attempt
failed, so it is released and its deployment is left out of this pick (the
retry goes to the next-best deployment).

Tokenization must be the engine's (a prefix is only shared if the token ids
are): ``tokenize`` is any callable ``messages -> token ids`` (given
``tools=`` too when it accepts that keyword), or an object with
``encode_chat(messages, tools=None)`` and ``encode_prompt(text)``.
:meth:`KVRouteStrategy.from_pretrained` builds one from a local Hugging Face
model directory the way vLLM does (chat template rendered to text with the
generation prompt, then encoded without special tokens; text prompts encoded
with them) -- never downloading.

Not supported, and why: ``prefill_done`` (LiteLLM reports no first token to a
router strategy; prefill load is released at the end), streams a client
abandons (LiteLLM may fire no event: the router's ``request_ttl_s`` releases
them, default 600 s), embeddings (``input``: no KV cache to reuse; routed with
no cache credit by their text when ``encode_prompt`` is given, else to the
least-loaded deployment).
"""
from __future__ import annotations

import inspect
import itertools
import logging
import os
import uuid
import weakref
from typing import Any, Callable, Hashable, Sequence

from litellm.integrations.custom_logger import CustomLogger
from litellm.types.router import CustomRoutingStrategyBase

from ..router import Router
from .flights import GatewayRouting, track

log = logging.getLogger(__name__)

#: Metadata keys the strategy stamps on a request.
RID_KEY = "kvroute_request_id"
PICKED_KEY = "kvroute_deployment"
FAILED_KEY = "kvroute_failed_deployments"


class HFTokenizer:
    """The engine's tokenization from a local Hugging Face model directory (no download).

    A thin face over :class:`kvroute.serving.tokenize.EngineTokenizer`, which
    renders messages exactly as vLLM does (content normalisation, tool dumps,
    the chat template); the proxy and this strategy share it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        from ..serving.tokenize import EngineTokenizer

        #: The shared engine tokenizer (read-only).
        self.engine = EngineTokenizer.from_pretrained(path)
        #: The transformers tokenizer (read-only).
        self.tokenizer = self.engine.hf

    def encode_chat(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        body: dict[str, Any] = {"messages": messages}
        if tools:
            body["tools"] = tools
        return self.engine.encode_chat(body)

    def encode_prompt(self, text: str) -> list[int]:
        return self.engine.encode_completion({"prompt": text})[0]


def _chat_encoder(tokenize: Any) -> Callable[[list[dict], Any], Sequence[int]]:
    fn = getattr(tokenize, "encode_chat", None) or tokenize
    if not callable(fn):
        raise TypeError("tokenize must be a callable messages -> token ids or have encode_chat()")
    try:
        takes_tools = "tools" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        takes_tools = False
    if takes_tools:
        return lambda messages, tools: fn(messages, tools=tools)
    return lambda messages, tools: fn(messages)


#: Live strategies by the prefix of their request ids.  One callback serves them all:
#: LiteLLM keeps its own copies of ``litellm.callbacks`` and drops duplicates of one
#: class, so a callback per strategy could be the wrong one, or a stale one.
_OWNERS: "weakref.WeakValueDictionary[str, KVRouteStrategy]" = weakref.WeakValueDictionary()


class _ReleaseOnOutcome(CustomLogger):
    """``litellm.callbacks`` member: releases a pick's load on its success or failure event."""

    def _outcome(self, kwargs: dict, success: bool) -> None:
        lp = kwargs.get("litellm_params") or {}
        meta = lp.get("metadata") or kwargs.get("metadata") or {}
        rid = meta.get(RID_KEY) if isinstance(meta, dict) else None
        if not isinstance(rid, str):
            return
        owner = _OWNERS.get(rid.partition("-")[0])
        if owner is not None:
            info = lp.get("model_info") or {}
            owner.release(rid, success=success, served_by=info.get("id"))

    def log_success_event(self, kwargs, response_obj, start_time, end_time):  # noqa: D401 (LiteLLM's names)
        self._outcome(kwargs, True)

    def log_failure_event(self, kwargs, response_obj, start_time, end_time):
        self._outcome(kwargs, False)

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        self._outcome(kwargs, True)

    async def async_log_failure_event(self, kwargs, response_obj, start_time, end_time):
        self._outcome(kwargs, False)


_CALLBACK = _ReleaseOnOutcome()


class KVRouteStrategy(CustomRoutingStrategyBase):
    """Pick a LiteLLM deployment by kvroute's cost model (module docstring).

    ``litellm_router``: the ``litellm.Router`` whose model list is picked from.
    ``tokenize``/``encode_prompt``: the engine's tokenization (module docstring).
    The rest configures each model group's :class:`Router` and
    :class:`GatewayRouting` (``block_size`` must be the engines').
    """

    def __init__(self, litellm_router: Any, tokenize: Any, *, encode_prompt: Callable[[str], Sequence[int]] | None = None,
                 block_size: int = 16, policy: str = "kvroute", weights: Any = None, approximate: bool = True,
                 approx_capacity_blocks: int | None = 100_000, request_ttl_s: float | None = 600.0,
                 seed: int = 0) -> None:
        self._litellm = litellm_router
        self._encode_chat = _chat_encoder(tokenize)
        self._encode_prompt = encode_prompt or getattr(tokenize, "encode_prompt", None)
        self._router_args = dict(block_size=block_size, policy=policy, weights=weights, seed=seed,
                                 request_ttl_s=request_ttl_s)
        self._approx = dict(approximate=approximate, approx_capacity_blocks=approx_capacity_blocks)
        #: {model group: GatewayRouting}; a group's router is built at its first pick.
        self.groups: dict[str, GatewayRouting] = {}
        #: rid -> model group, for releases.
        self._group_of: dict[Hashable, str] = {}
        self._ids = itertools.count()
        self._prefix = uuid.uuid4().hex[:8]
        #: The CustomLogger that releases load (one per process, shared by every strategy).
        self.callback = _CALLBACK
        _OWNERS[self._prefix] = self
        track("litellm", self)

    @classmethod
    def from_pretrained(cls, litellm_router: Any, path: str | os.PathLike[str], **kwargs: Any) -> "KVRouteStrategy":
        """A strategy tokenizing with the model directory ``path`` (see :class:`HFTokenizer`)."""
        return cls(litellm_router, HFTokenizer(path), **kwargs)

    def install(self) -> "KVRouteStrategy":
        """Make this the router's strategy and add the release callback to ``litellm.callbacks``."""
        import litellm

        setter = getattr(self._litellm, "register_plugin", None) or self._litellm.set_custom_routing_strategy
        setter(self)
        if self.callback not in litellm.callbacks:
            litellm.callbacks.append(self.callback)
        return self

    def uninstall(self) -> None:
        """Stop releasing this strategy's picks; the shared callback goes when no strategy is left.

        LiteLLM has no call that removes a strategy from its router.
        """
        import litellm

        _OWNERS.pop(self._prefix, None)
        if not _OWNERS and self.callback in litellm.callbacks:
            litellm.callbacks.remove(self.callback)

    # --------------------------------------------------------------- picking
    def _deployments(self, model: str) -> list[dict]:
        reg = getattr(self._litellm, "registry", None)
        if callable(reg):
            return list(reg().deployments(model))
        return list(self._litellm.get_model_list(model_name=model) or [])

    def _tokens(self, messages: Any, input: Any, request_kwargs: dict) -> Sequence[int] | None:
        if messages:
            return self._encode_chat(messages, request_kwargs.get("tools"))
        prompt = request_kwargs.get("prompt", input)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return prompt
        if isinstance(prompt, str) and self._encode_prompt is not None:
            return self._encode_prompt(prompt)
        return None

    def _group(self, model: str) -> GatewayRouting:
        g = self.groups.get(model)
        if g is None:
            g = self.groups[model] = GatewayRouting(Router([], **self._router_args), **self._approx)
        return g

    def pick(self, model: str, messages: Any = None, input: Any = None, specific_deployment: bool | None = False,
             request_kwargs: dict | None = None) -> dict:
        """The deployment for one request (the body of both LiteLLM entry points)."""
        request_kwargs = request_kwargs if request_kwargs is not None else {}
        deps = self._deployments(model)
        if not deps:
            raise ValueError(f"no deployment of model group {model!r}")
        meta = request_kwargs.get("metadata")
        if not isinstance(meta, dict):
            meta = request_kwargs["metadata"] = {}
        failed = list(meta.get(FAILED_KEY) or [])
        prev = meta.get(RID_KEY)
        if prev is not None:  # a retry or fallback: the earlier attempt is over, and failed
            if meta.get(PICKED_KEY) is not None:
                failed.append(meta[PICKED_KEY])
            self.release(prev, success=False)
        by_id = {str(d.get("model_info", {}).get("id")): d for d in deps}
        cands = [w for w in by_id if w not in failed] or list(by_id)
        group = self._group(model)
        tokens = self._tokens(messages, input, request_kwargs)
        if tokens is None or len(tokens) == 0:
            group.stats.unroutable += 1
            tokens = []  # routed with no cache credit: by load alone
        rid = f"{self._prefix}-{next(self._ids)}"
        ranked = group.route(rid, tokens, cands)
        self._group_of[rid] = model
        meta[RID_KEY] = rid
        meta[PICKED_KEY] = ranked[0]
        meta[FAILED_KEY] = failed
        return by_id[ranked[0]]

    async def async_get_available_deployment(self, model: str, messages: Any = None, input: Any = None,
                                             specific_deployment: bool | None = False,
                                             request_kwargs: dict | None = None) -> dict:
        return self.pick(model, messages, input, specific_deployment, request_kwargs)

    def get_available_deployment(self, model: str, messages: Any = None, input: Any = None,
                                 specific_deployment: bool | None = False,
                                 request_kwargs: dict | None = None) -> dict:
        return self.pick(model, messages, input, specific_deployment, request_kwargs)

    # -------------------------------------------------------------- releases
    def release(self, rid: Hashable, *, success: bool, served_by: Hashable | None = None) -> bool:
        """Release one pick's load (idempotent); called by the callbacks."""
        model = self._group_of.pop(rid, None)
        g = self.groups.get(model) if model is not None else None
        if g is None:
            return False
        return g.release(rid, success=success, served_by=str(served_by) if served_by is not None else None)

    def in_flight(self) -> int:
        """Picks not yet released, over every model group."""
        return sum(g.in_flight() for g in self.groups.values())
