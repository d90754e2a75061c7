"""The simulator's cost model against hand-computed times on tiny cases."""
from __future__ import annotations

import dataclasses

import pytest

from kvroute.kvindex.errors import KVRouteError
from kvroute.sim.cost import PRESETS, CostModel, CostModelError, get_preset, parse_overrides

# A toy worker whose numbers are easy to do by hand.
TOY = CostModel(
    name="toy", params=1e9, n_layers=2, d_model=4, kv_bytes_per_token=1000, weight_bytes_per_param=2.0,
    tp=1, gpu_flops=1e12, hbm_bytes_per_s=1e12, hbm_bytes=10e9, gpu_memory_utilization=0.5,
    prefill_mfu=1.0, decode_bw_efficiency=1.0, decode_mfu=1.0, prefill_overhead_s=0.0,
    decode_overhead_s=0.0, pcie_bytes_per_s=1e9, kv_transfer_bytes_per_s=1e8, kv_transfer_latency_s=0.0,
    host_kv_bytes=1e6,
)


def test_prefill_by_hand():
    # 10 new tokens, nothing cached: 2*1e9*10 weight FLOPs + 4*2*4*(1+...+10)=1760 attention FLOPs
    assert TOY.prefill_s(10) == pytest.approx((2e10 + 1760) / 1e12)
    # 10 new after 5 cached: positions 6..15 -> sum = 10*5 + 55 = 105
    assert TOY.prefill_s(10, 5) == pytest.approx((2e10 + 4 * 2 * 4 * 105) / 1e12)
    assert TOY.prefill_s(0, 100) == 0.0
    # overhead, MFU and tensor parallelism scale as documented
    m = TOY.with_overrides({"prefill_overhead_s": 0.01, "prefill_mfu": 0.5, "tp": 2})
    assert m.prefill_s(10) == pytest.approx(0.01 + (2e10 + 1760) / (2 * 1e12 * 0.5))


def test_reload_transfer_decode_by_hand():
    assert TOY.reload_s(500) == pytest.approx(500 * 1000 / 1e9)
    assert TOY.reload_s(0) == 0.0
    assert TOY.transfer_s(100) == pytest.approx(100 * 1000 / 1e8)
    # decode: memory-bound (2 GB of weights + 1000 tokens x 1000 B) over 1 TB/s
    assert TOY.decode_step_s(1, 1000) == pytest.approx((2e9 + 1e6) / 1e12)
    # compute-bound at a huge batch: 2*1e9*5000 FLOPs over 1e12
    assert TOY.decode_step_s(5000, 0) == pytest.approx(2e9 * 5000 / 1e12)
    assert TOY.decode_step_s(0, 0) == 0.0


def test_capacity_by_hand():
    # 10 GB * 0.5 - 2 GB of weights = 3 GB; blocks of 4 tokens x 1000 B
    assert TOY.gpu_blocks(4) == 750_000
    assert TOY.host_blocks(4) == 250


def test_presets_from_public_specs():
    p = get_preset("llama-3.1-8b-h100")
    assert p.kv_bytes_per_token == 128 * 1024
    assert 2 * p.params == pytest.approx(16e9, rel=0.01)  # 16 GFLOP per token
    assert get_preset("llama-3.1-70b-h200").kv_bytes_per_token == 320 * 1024
    assert get_preset("8b/h200").hbm_bytes_per_s == 4.8e12
    # reloading from host costs about a tenth of recomputing (BRIEF section 6), order of magnitude
    ratio = p.reload_s(8192) / p.prefill_s(8192)
    assert 0.03 < ratio < 0.3
    for m in PRESETS.values():
        m.validate()
        assert m.gpu_blocks(512) > 100  # the model fits with room for KV


def test_overrides_are_typed_and_checked():
    m = get_preset("llama-3.1-8b-h100").with_overrides(parse_overrides(["prefill_mfu=0.4", "tp=2"]))
    assert m.prefill_mfu == 0.4 and m.tp == 2 and isinstance(m.tp, int)
    with pytest.raises(CostModelError):
        m.with_overrides({"nope": 1})
    with pytest.raises(CostModelError):
        m.with_overrides({"prefill_mfu": "x"})
    with pytest.raises(CostModelError):
        m.with_overrides({"prefill_mfu": 0})
    with pytest.raises(CostModelError):
        parse_overrides(["novalue"])
    # non-finite values and fractional counts are refused (were OverflowError / NaN times)
    for key, bad in (("n_layers", "inf"), ("hbm_bytes", "inf"), ("prefill_mfu", "nan"), ("tp", "1.5"),
                     ("prefill_overhead_s", "-inf")):
        with pytest.raises(CostModelError):
            m.with_overrides({key: bad})
    assert m.with_overrides({"tp": "2.0"}).tp == 2 and m.with_overrides({"name": "x"}).name == "x"
    with pytest.raises(KVRouteError):
        get_preset("gpt-5")
    assert dataclasses.asdict(m) == m.to_dict()


def test_chunked_step_by_hand():
    # 10 prompt tokens after 5 in KV, plus 2 decodes holding 100 tokens: compute-bound
    flops = 2e9 * 12 + 4 * 2 * 4 * (10 * 5 + 55) + 4 * 2 * 4 * 100
    assert TOY.step_s(10, 5, 2, 100) == pytest.approx(flops / 1e12)
    # memory-bound when the compute is tiny: weights + (100 + 5) tokens of KV over 1 TB/s
    slow = TOY.with_overrides({"gpu_flops": 1e15})
    assert slow.step_s(1, 5, 1, 100) == pytest.approx((2e9 + 105 * 1000) / 1e12)
    assert TOY.step_s(0, 0, 0, 0) == 0.0
    # a chunk without decodes costs what prefilling it costs
    assert TOY.step_s(10, 5, 0, 0) == pytest.approx(TOY.prefill_s(10, 5))


def test_decode_context_term_by_hand():
    """``decode_ctx_token_s`` adds k x context tokens to every decode step and to a mixed step's decodes."""
    k = TOY.with_overrides({"decode_ctx_token_s": 2e-7})
    assert TOY.decode_ctx_token_s == 0.0
    assert k.decode_step_s(1, 1000) == pytest.approx((2e9 + 1e6) / 1e12 + 1000 * 2e-7)
    assert k.decode_step_s(0, 1000) == 0.0
    flops = 2e9 * 12 + 4 * 2 * 4 * (10 * 5 + 55) + 4 * 2 * 4 * 100
    assert k.step_s(10, 5, 2, 100) == pytest.approx(flops / 1e12 + 100 * 2e-7)
    # a chunk without decodes has no decode context to pay for
    assert k.step_s(10, 5, 0, 0) == pytest.approx(TOY.prefill_s(10, 5))
    with pytest.raises(CostModelError):
        TOY.with_overrides({"decode_ctx_token_s": -1})
