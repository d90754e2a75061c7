"""The simulator's cost model: how long prefill, host reload, decode and KV transfer take.

Everything is a pure function of a :class:`CostModel` (a frozen dataclass whose
every constant is documented and overridable, e.g. ``--cost prefill_mfu=0.4``)
and of token counts.  Presets (:data:`PRESETS`) come from public specs
(BRIEF section 6):

* GPUs: H100 SXM 989 TFLOP/s dense bf16, 3.35 TB/s HBM, 80 GB;
  H200 989 TFLOP/s, 4.8 TB/s, 141 GB; PCIe Gen5 x16 about 55 GB/s host<->GPU.
* Models: Llama-3.1-8B (8.03e9 parameters, 32 layers, hidden 4096, 8 KV heads
  of 128: 128 KiB of KV per token); Llama-3.1-70B (70.6e9, 80 layers, hidden
  8192, 8 KV heads of 128: 320 KiB per token).

Formulas (``tp`` GPUs per worker share compute, HBM and PCIe evenly)::

    prefill(new n, cached c) = overhead + [2 P n + 4 L d (n c + n (n + 1) / 2)] / (tp F mfu)
    reload(h tokens)         = h kv / (tp pcie)                     (added, not overlapped)
    decode_step(b, ctx)      = overhead + max((2 P + ctx kv) / (tp B eff), 2 P b / (tp F mfu)) + ctx k
    mixed step (chunked)     = overhead + max(prefill FLOPs of the chunk + 2 P b + 4 L d ctx, at prefill_mfu;
                                              weights + KV read over HBM) + ctx k
    transfer(t tokens)       = t kv / link

``2 P`` FLOPs per token for the weights (one multiply-add per parameter),
``4 L d p`` for attention of a token at position ``p`` (QK^T and AV);
decode is bound by reading the weights and the batch's KV from HBM.  ``k``
(``decode_ctx_token_s``, 0 for the GPU presets) is a measured cost per context
token of each decode step, for engines whose decode attention is neither of
those bounds (vLLM's CPU paged attention: 0.26-0.36 us per token of context on
one core, ``bench/real_cluster.py`` fits it).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

from ..kvindex.errors import KVRouteError


class CostModelError(KVRouteError, ValueError):
    """An unknown preset or a bad cost override."""


@dataclass(frozen=True, slots=True)
class CostModel:
    """Constants of one worker (a model on ``tp`` GPUs).  Read-only; derive variants with :meth:`with_overrides`."""

    #: Preset name, for reports.
    name: str = "llama-3.1-8b-h100"
    #: Model parameters (count).
    params: float = 8.03e9
    #: Transformer layers.
    n_layers: int = 32
    #: Hidden size (query heads x head dim).
    d_model: int = 4096
    #: KV-cache bytes per token: layers x KV heads x head dim x 2 (K, V) x bytes per value.
    kv_bytes_per_token: int = 32 * 8 * 128 * 2 * 2
    #: Bytes per weight (bf16).
    weight_bytes_per_param: float = 2.0
    #: GPUs per worker (tensor parallel); compute, HBM bandwidth and PCIe scale with it.
    tp: int = 1
    #: Peak dense bf16 FLOP/s of one GPU.
    gpu_flops: float = 989e12
    #: HBM bandwidth of one GPU, bytes/s.
    hbm_bytes_per_s: float = 3.35e12
    #: HBM capacity of one GPU, bytes.
    hbm_bytes: float = 80e9
    #: Share of HBM the engine may use (vLLM's gpu_memory_utilization).
    gpu_memory_utilization: float = 0.9
    #: Model FLOPs utilisation reached by prefill (assumption; 0.4-0.6 is typical for long prompts).
    prefill_mfu: float = 0.5
    #: Share of HBM bandwidth reached by a decode step (assumption).
    decode_bw_efficiency: float = 0.7
    #: Model FLOPs utilisation of decode when it becomes compute-bound (large batches).
    decode_mfu: float = 0.5
    #: Fixed cost of one prefill (scheduling, kernel launches, sampling the first token), seconds.
    prefill_overhead_s: float = 0.002
    #: Fixed cost of one decode step, seconds.
    decode_overhead_s: float = 0.001
    #: Seconds per token of context per decoding sequence and step, added to the step (a fitted
    #: engine's decode attention; 0: the HBM bound above covers it).
    decode_ctx_token_s: float = 0.0
    #: Host<->GPU copy bandwidth per GPU (PCIe Gen5 x16 in practice), bytes/s.
    pcie_bytes_per_s: float = 55e9
    #: KV transfer bandwidth between a prefill and a decode worker (one 400 Gb/s NIC), bytes/s.
    kv_transfer_bytes_per_s: float = 50e9
    #: Fixed latency of one KV transfer (connection setup, metadata), seconds.
    kv_transfer_latency_s: float = 0.001
    #: Host memory for offloaded KV per worker, bytes (sizes the default host tier).
    host_kv_bytes: float = 4 * 80e9

    # ----------------------------------------------------------------- times
    def prefill_s(self, new_tokens: int, cached_tokens: int = 0) -> float:
        """Seconds to prefill ``new_tokens`` after ``cached_tokens`` already in KV."""
        if new_tokens <= 0:
            return 0.0
        n, c = float(new_tokens), float(cached_tokens)
        flops = 2.0 * self.params * n + 4.0 * self.n_layers * self.d_model * (n * c + n * (n + 1) / 2.0)
        return self.prefill_overhead_s + flops / (self.tp * self.gpu_flops * self.prefill_mfu)

    def reload_s(self, host_tokens: int) -> float:
        """Seconds to copy ``host_tokens`` of KV from host memory to the GPUs."""
        if host_tokens <= 0:
            return 0.0
        return host_tokens * self.kv_bytes_per_token / (self.tp * self.pcie_bytes_per_s)

    def decode_step_s(self, batch: int, context_tokens: int) -> float:
        """Seconds for one decode step of ``batch`` sequences holding ``context_tokens`` in total."""
        if batch <= 0:
            return 0.0
        mem = (self.params * self.weight_bytes_per_param + context_tokens * self.kv_bytes_per_token) / (
            self.tp * self.hbm_bytes_per_s * self.decode_bw_efficiency
        )
        compute = 2.0 * self.params * batch / (self.tp * self.gpu_flops * self.decode_mfu)
        return self.decode_overhead_s + max(mem, compute) + context_tokens * self.decode_ctx_token_s

    def step_s(self, prefill_tokens: int, prefill_ctx: int, batch: int, context_tokens: int) -> float:
        """Seconds for one chunked-prefill step: ``prefill_tokens`` of a prompt after ``prefill_ctx``
        tokens already in KV, plus one decode token for each of ``batch`` running sequences
        holding ``context_tokens`` in total.  Compute (weights for every token, attention of the
        chunk and of the decodes) at ``prefill_mfu``, or reading weights and KV, whichever is longer.
        """
        if prefill_tokens <= 0 and batch <= 0:
            return 0.0
        n, c = float(prefill_tokens), float(prefill_ctx)
        att = 4.0 * self.n_layers * self.d_model
        flops = 2.0 * self.params * (n + batch) + att * (n * c + n * (n + 1) / 2.0) + att * context_tokens
        compute = flops / (self.tp * self.gpu_flops * self.prefill_mfu)
        mem = (self.params * self.weight_bytes_per_param + (context_tokens + prefill_ctx) * self.kv_bytes_per_token) / (
            self.tp * self.hbm_bytes_per_s * self.decode_bw_efficiency
        )
        overhead = self.prefill_overhead_s if prefill_tokens > 0 else self.decode_overhead_s
        return overhead + max(compute, mem) + context_tokens * self.decode_ctx_token_s

    def transfer_s(self, tokens: int) -> float:
        """Seconds to move ``tokens`` of KV from a prefill worker to a decode worker."""
        if tokens <= 0:
            return 0.0
        return self.kv_transfer_latency_s + tokens * self.kv_bytes_per_token / self.kv_transfer_bytes_per_s

    # -------------------------------------------------------------- capacity
    def gpu_blocks(self, block_tokens: int) -> int:
        """KV blocks of ``block_tokens`` that fit on a worker's GPUs next to the weights."""
        free = self.tp * self.hbm_bytes * self.gpu_memory_utilization - self.params * self.weight_bytes_per_param
        return max(0, int(free // (block_tokens * self.kv_bytes_per_token)))

    def host_blocks(self, block_tokens: int) -> int:
        """KV blocks of ``block_tokens`` that fit in the worker's host tier."""
        return max(0, int(self.host_kv_bytes // (block_tokens * self.kv_bytes_per_token)))

    # ------------------------------------------------------------- overrides
    def with_overrides(self, overrides: Mapping[str, Any]) -> "CostModel":
        """A copy with some constants replaced; values are coerced to the field's type."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        kw: dict[str, Any] = {}
        for k, v in overrides.items():
            if k not in fields:
                raise CostModelError(f"unknown cost constant {k!r}; known: {', '.join(sorted(fields))}")
            cur = getattr(self, k)
            if isinstance(cur, str):
                kw[k] = str(v)
                continue
            try:
                x = float(v)
            except (TypeError, ValueError) as exc:
                raise CostModelError(f"bad value for {k}: {v!r} ({exc})") from None
            if not math.isfinite(x):
                raise CostModelError(f"bad value for {k}: {v!r} (must be a finite number)")
            if isinstance(cur, int):
                if not x.is_integer():
                    raise CostModelError(f"bad value for {k}: {v!r} (must be an integer)")
                x = int(x)
            kw[k] = x
        m = dataclasses.replace(self, **kw)
        m.validate()
        return m

    def validate(self) -> None:
        """Raise :class:`CostModelError` on a non-positive rate, size or share."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "name":
                continue
            if not math.isfinite(v):
                raise CostModelError(f"{f.name} must be a finite number, got {v}")
            if f.name.endswith("_s"):
                if v < 0:
                    raise CostModelError(f"{f.name} must be >= 0, got {v}")
            elif v <= 0:
                raise CostModelError(f"{f.name} must be > 0, got {v}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_H100 = dict(gpu_flops=989e12, hbm_bytes_per_s=3.35e12, hbm_bytes=80e9)
_H200 = dict(gpu_flops=989e12, hbm_bytes_per_s=4.8e12, hbm_bytes=141e9)
_L8B = dict(params=8.03e9, n_layers=32, d_model=4096, kv_bytes_per_token=32 * 8 * 128 * 2 * 2)
_L70B = dict(params=70.6e9, n_layers=80, d_model=8192, kv_bytes_per_token=80 * 8 * 128 * 2 * 2)

#: Preset name -> cost model.  70B runs tensor-parallel (4 x H100 or 2 x H200) to fit its 141 GB of weights.
PRESETS: dict[str, CostModel] = {
    "llama-3.1-8b-h100": CostModel("llama-3.1-8b-h100", **_L8B, **_H100, tp=1, host_kv_bytes=4 * 80e9),
    "llama-3.1-8b-h200": CostModel("llama-3.1-8b-h200", **_L8B, **_H200, tp=1, host_kv_bytes=4 * 141e9),
    "llama-3.1-70b-h100": CostModel("llama-3.1-70b-h100", **_L70B, **_H100, tp=4, host_kv_bytes=4 * 4 * 80e9),
    "llama-3.1-70b-h200": CostModel("llama-3.1-70b-h200", **_L70B, **_H200, tp=2, host_kv_bytes=4 * 2 * 141e9),
}

DEFAULT_PRESET = "llama-3.1-8b-h100"


def get_preset(name: str) -> CostModel:
    """The preset called ``name`` (also accepts ``llama-3.1-8b/h100`` and ``8b-h100`` spellings)."""
    key = name.strip().lower().replace("/", "-").replace("_", "-")
    if key in PRESETS:
        return PRESETS[key]
    if "llama-3.1-" + key in PRESETS:
        return PRESETS["llama-3.1-" + key]
    raise CostModelError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")


def parse_overrides(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``["k=v", ...]`` -> ``{k: v}`` (for ``--cost``)."""
    out = {}
    for it in items:
        if "=" not in it:
            raise CostModelError(f"a cost override is KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        out[k.strip()] = v.strip()
    return out
