"""Adapters: translate engines' wire formats and hooks into kvroute's neutral types.

Map of the parts:

* :mod:`.vllm`       -- vLLM/SGLang KV-event payloads (msgpack) <-> ``EventBatch``:
  ``decode`` (strict, bounded; raises only ``DecodeError``) and ``encode``.
* :mod:`.subscriber` -- ``KVEventSubscriber``: ZMQ SUB sockets per worker and
  data-parallel rank, sequence tracking, gap replay, resync, metrics.
* ``vllm_plugin`` / ``vllm_cache_policy`` -- hooks loaded inside a vLLM process
  (the only modules allowed to import vllm).

Nothing here is imported eagerly beyond this docstring, so importing
``kvroute.adapters`` never pulls in vllm or torch.
"""
