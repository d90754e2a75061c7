"""The big-payload decoder (kvroute/sidecar/decode.py) against the reference (``msgpack.unpackb``).

A 2**21-item ``token_ids`` array decoded by msgpack held the GIL ~0.15 s and the service's bool
check another ~0.03 s: every other client of the sidecar waited (issue 17, item 9).  The array
path hands such arrays to the compiled core.  Checked here, with the threshold lowered so small
generated payloads take it: same map as the reference whenever the service would accept the
arrays; a BadRequestError whenever it would refuse them; nothing but BadRequestError on fuzzed
and truncated payloads; and the same decision through ``Service.handle``.
"""
from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.kvindex import BACKEND
from kvroute.router import Router
from kvroute.sidecar import decode
from kvroute.sidecar.errors import BadRequestError
from kvroute.sidecar.service import Service

pytestmark = pytest.mark.skipif(BACKEND != "native", reason="the array path needs the compiled core")


@pytest.fixture(autouse=True)
def array_path_for_all(monkeypatch):
    monkeypatch.setattr(decode, "ARRAY_DECODE_BYTES", 0)


def reference_verdict(field: str, items: list) -> bool:
    """Whether the service accepts ``items`` as ``field`` on the reference path."""
    hi = (1 << 32) if field == "token_ids" else (1 << 64)
    return all(type(x) is int and 0 <= x < hi for x in items)


ints = st.one_of(st.integers(0, 127), st.integers(0, 1 << 16), st.integers(0, (1 << 32) - 1),
                 st.integers(0, (1 << 64) - 1), st.integers(-(1 << 63), -1))
items = st.lists(st.one_of(ints, ints, ints, st.booleans(), st.floats(allow_nan=False), st.none(), st.text(max_size=3)),
                 max_size=40)
others = st.dictionaries(st.sampled_from(["op", "id", "request_id", "num_tokens", "costs", "lora_name", "x"]),
                         st.one_of(st.integers(-5, 1 << 40), st.text(max_size=5), st.booleans(), st.none(),
                                   st.binary(max_size=8), st.lists(st.integers(0, 9), max_size=4),
                                   st.dictionaries(st.text(max_size=2), st.integers(0, 3), max_size=2)),
                         max_size=5)


@settings(max_examples=400, deadline=None)
@given(field=st.sampled_from(["token_ids", "hashes"]), arr=items, rest=others, first=st.booleans())
def test_array_path_equals_reference(field, arr, rest, first):
    req = ({field: arr} | rest) if first else (rest | {field: arr})
    payload = msgpack.packb(req, use_bin_type=True)
    ref = decode._reference(payload)
    if not reference_verdict(field, arr):
        with pytest.raises(BadRequestError):
            decode.unpack_request(payload)
        return
    got = decode.unpack_request(payload)
    assert decode.unpack_request(memoryview(payload)).keys() == got.keys()
    assert isinstance(got[field], np.ndarray)
    assert got[field].dtype == (np.uint32 if field == "token_ids" else np.uint64)
    assert got[field].tolist() == ref[field]
    assert {k: v for k, v in got.items() if k != field} == {k: v for k, v in ref.items() if k != field}


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), cut=st.integers(0, 400))
def test_fuzzed_payloads_give_bad_request_or_the_reference_map(data, cut):
    base = msgpack.packb({"op": "route", "request_id": 1, "token_ids": list(range(60)), "x": [1, [2]]})
    for payload in (data, base[:cut] + data, base[:cut]):
        if not payload:
            continue
        try:
            ref = decode._reference(payload)
        except BadRequestError:
            ref = BadRequestError
        try:
            got = decode.unpack_request(payload)
        except BadRequestError:
            continue  # refused (the reference may take it when it is not a map: the service refuses that too)
        assert ref is not BadRequestError and isinstance(ref, dict)
        assert got.keys() == ref.keys()
        for k in got:
            v = got[k]
            assert (v.tolist() if isinstance(v, np.ndarray) else v) == ref[k]


def test_bytes_prompts_and_limits():
    toks = np.arange(70_000, dtype="<u4")
    payload = msgpack.packb({"op": "route", "token_ids": toks.tobytes(), "n": [1, 2]}, use_bin_type=True)
    got = decode.unpack_request(payload)
    assert got == {"op": "route", "token_ids": toks.tobytes(), "n": [1, 2]}
    # the server hands a big message over as a memoryview: the prompt comes back as a view of it, not a copy
    view = decode.unpack_request(memoryview(payload))
    assert isinstance(view["token_ids"], memoryview) and view["token_ids"].obj is payload
    assert view == got
    too_long = msgpack.packb({"op": "route", "token_ids": [1] * (decode.MAX_TOKENS + 1)})
    with pytest.raises(BadRequestError, match="max_array_len"):
        decode.unpack_request(too_long)
    nested = msgpack.packb({"op": "ping", "x": {"y": list(range(70_000))}})
    with pytest.raises(BadRequestError, match="nested data"):
        decode.unpack_request(nested)
    with pytest.raises(BadRequestError, match="msgpack map"):
        decode.unpack_request(msgpack.packb(list(range(10))))


def test_service_routes_an_int_array_like_bytes():
    toks = np.random.default_rng(3).integers(0, 50_000, 100_000).astype("<u4")
    out = []
    for body in (toks.tolist(), toks.tobytes()):
        svc = Service(Router(["a", "b", "c"], 16, seed=1))
        svc.router.route(toks[:32_000], request_id="warm")  # something cached somewhere
        rep = msgpack.unpackb(svc.handle(msgpack.packb({"op": "route", "request_id": "r", "token_ids": body},
                                                       use_bin_type=True)))
        assert rep["ok"], rep
        out.append(rep["result"])
    assert out[0] == out[1]
    svc = Service(Router(["a"], 16))
    bad = toks.tolist()
    bad[77_000] = True
    rep = msgpack.unpackb(svc.handle(msgpack.packb({"op": "route", "request_id": "r", "token_ids": bad})))
    assert rep["error"] == {"type": "BadRequest", "message": "'token_ids' must be ints, not booleans"}
    hs = list(range(1, 5_000))
    rep = msgpack.unpackb(svc.handle(msgpack.packb({"op": "route", "request_id": "h", "hashes": hs,
                                                   "num_tokens": 16 * len(hs)})))
    assert rep["ok"] and rep["result"]["num_tokens"] == 16 * len(hs)
    assert svc.router.in_flight() == 1
