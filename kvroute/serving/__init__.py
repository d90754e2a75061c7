"""The serving path: kvroute in front of real engines (top floor; nothing below imports it).

Parts:

* :mod:`.tokenize` -- :class:`EngineTokenizer`, the token ids a vLLM engine computes
  for an OpenAI request (chat template, tools, special tokens).
* :mod:`.engines`  -- :class:`EnginePool`, the engines behind the proxy: their
  URLs and event endpoints, consecutive failures, health probes, load scraping.
* :mod:`.sse`      -- server-sent-event framing for pass-through streams.
* :mod:`.proxy`    -- :class:`Proxy`, the aiohttp application: parse, tokenize,
  route, forward, stream back, release load on every exit path.
* :mod:`.metrics`  -- the proxy's Prometheus metrics (prediction error histogram...).
* :mod:`.cli`      -- ``kvroute proxy``.
"""
from .errors import BadRequestError, ModelNotFoundError, NoEngineError, ServingError, UnsupportedContentError
from .tokenize import EngineTokenizer

__all__ = ["EngineTokenizer", "ServingError", "BadRequestError", "ModelNotFoundError", "NoEngineError",
           "UnsupportedContentError"]
