"""Trace loading, validation, reshaping and the workload generators of kvroute.sim."""
from __future__ import annotations


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.kvindex.errors import KVRouteError
from kvroute.traces import (
    Request,
    TraceError,
    ideal_hit_ratio,
    load_trace,
    parse_lines,
    reshape,
    write_trace,
)
from kvroute.sim.workloads import GENERATORS, from_spec


def test_bundled_conversation_trace_matches_its_provenance_note():
    reqs = load_trace("conversation")
    assert len(reqs) == 12031
    assert sum(len(r.hash_ids) for r in reqs) == 288_500
    assert len({h for r in reqs for h in r.hash_ids}) == 182_790
    assert ideal_hit_ratio(reqs) == pytest.approx(0.366, abs=5e-4)
    assert reqs[-1].arrival_s == pytest.approx(3537.0, abs=1.0)
    assert [r.request_id for r in reqs] == list(range(len(reqs)))
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(reqs, reqs[1:]))


def test_bundled_synthetic_trace_and_limit():
    reqs = load_trace("synthetic")
    assert len(reqs) == 3993
    assert ideal_hit_ratio(reqs) == pytest.approx(0.640, abs=5e-4)
    assert len(load_trace("synthetic", limit=10)) == 10


GOOD = '{"timestamp": 5, "input_length": 600, "output_length": 3, "hash_ids": [1, 2]}'


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"timestamp": -1, "input_length": 1, "output_length": 1, "hash_ids": [1]}', "timestamp"),
        ('{"timestamp": "x", "input_length": 1, "output_length": 1, "hash_ids": [1]}', "timestamp"),
        ('{"timestamp": 1, "output_length": 1, "hash_ids": [1]}', "input_length"),
        ('{"timestamp": 1, "input_length": 0, "output_length": 1, "hash_ids": [1]}', "input_length"),
        ('{"timestamp": 1, "input_length": 5, "output_length": -2, "hash_ids": [1]}', "output_length"),
        ('{"timestamp": 1, "input_length": 5, "output_length": 2, "hash_ids": []}', "hash_ids"),
        ('{"timestamp": 1, "input_length": 5, "output_length": 2, "hash_ids": [1, -3]}', "hash id"),
        ('{"timestamp": 1, "input_length": 5, "output_length": 2, "hash_ids": [1, "a"]}', "hash id"),
        ('{"timestamp": 1, "input_length": 5, "output_length": 2, "hash_ids": [true]}', "hash id"),
        ('{"timestamp": Infinity, "input_length": 1, "output_length": 1, "hash_ids": [1]}', "timestamp"),
        ('{"timestamp": NaN, "input_length": 1, "output_length": 1, "hash_ids": [1]}', "timestamp"),
    ],
)
def test_bad_line_raises_typed_error_with_its_line_number(tmp_path, bad, fragment):
    p = tmp_path / "t.jsonl"
    p.write_text(GOOD + "\n\n" + GOOD + "\n" + bad + "\n" + GOOD + "\n")
    with pytest.raises(TraceError) as ei:
        load_trace(p)
    assert ei.value.line == 4
    assert isinstance(ei.value, KVRouteError)
    assert fragment in str(ei.value)
    assert ":4:" in str(ei.value)


def test_missing_trace_is_a_typed_error(tmp_path):
    with pytest.raises(TraceError, match="no such trace"):
        load_trace(tmp_path / "nope.jsonl")


def test_trace_that_is_not_utf8_is_a_typed_error(tmp_path):
    p = tmp_path / "t.jsonl"
    p.write_bytes(GOOD.encode() + b"\n\xff\xfe\n")
    with pytest.raises(TraceError, match="UTF-8"):
        load_trace(p)


def test_unsorted_trace_is_sorted_stably_and_renumbered(tmp_path):
    lines = [
        '{"timestamp": 2000, "input_length": 10, "output_length": 1, "hash_ids": [7]}',
        '{"timestamp": 1000, "input_length": 20, "output_length": 1, "hash_ids": [8]}',
        '{"timestamp": 1000, "input_length": 30, "output_length": 1, "hash_ids": [9]}',
    ]
    reqs = parse_lines(lines)
    assert [r.hash_ids for r in reqs] == [(8,), (9,), (7,)]
    assert [r.request_id for r in reqs] == [0, 1, 2]
    assert reqs[0].arrival_s == 1.0


def test_reshape_cuts_and_resizes_blocks():
    r = Request(0, 0.0, 1000, 5, (1, 2, 3))
    (a,) = reshape([r], block_tokens=32, max_blocks=2)
    assert a.hash_ids == (1, 2) and a.input_length == 64
    (b,) = reshape([r], block_tokens=32)
    assert b.input_length == 96


def test_write_then_load_roundtrip(tmp_path):
    reqs = from_spec("gen:shared_system_prompt:n_requests=50")
    p = tmp_path / "g.jsonl"
    write_trace(reqs, p)
    back = load_trace(p)
    assert [(r.input_length, r.output_length, r.hash_ids) for r in back] == [
        (r.input_length, r.output_length, r.hash_ids) for r in reqs
    ]


def _prefix_chained(reqs):
    """No block id follows two different predecessors (the Mooncake property)."""
    pred = {}
    for r in reqs:
        prev = None
        for h in r.hash_ids:
            if pred.setdefault(h, prev) != prev:
                return False
            prev = h
    return True


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_generators_emit_sorted_prefix_chained_requests(name):
    reqs = GENERATORS[name](seed=3)
    assert reqs and _prefix_chained(reqs)
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(reqs, reqs[1:]))
    assert [r.request_id for r in reqs] == list(range(len(reqs)))
    for r in reqs:
        assert (len(r.hash_ids) - 1) * 512 < r.input_length <= len(r.hash_ids) * 512
    # they have reuse (that is their point; long_single_shot is the family with none) and are deterministic
    if name == "long_single_shot":
        assert ideal_hit_ratio(reqs) == 0.0
    else:
        assert ideal_hit_ratio(reqs) > 0.3
    assert GENERATORS[name](seed=3) == reqs


def test_sibling_bursts_arrive_within_100ms_with_one_prompt():
    reqs = GENERATORS["sibling_bursts"](n_bursts=30, seed=1)
    by = {}
    for r in reqs:
        by.setdefault(r.session, []).append(r)
    for group in by.values():
        assert 4 <= len(group) <= 16
        assert len({r.hash_ids for r in group}) == 1
        assert max(r.arrival_s for r in group) - min(r.arrival_s for r in group) <= 0.1


def test_agentic_trace_is_bundled_and_read_from_gzip():
    from kvroute.traces import BUNDLED_BLOCK_TOKENS, load_trace

    reqs = load_trace("agentic", limit=50)
    assert len(reqs) == 50 and BUNDLED_BLOCK_TOKENS["agentic"] == 64
    # 64-token blocks: the prompt covers its full blocks (a partial tail may have no hash id)
    assert all((len(r.hash_ids) - 1) * 64 < r.input_length < (len(r.hash_ids) + 1) * 64 for r in reqs)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 40), seed=st.integers(0, 10**6))
def test_multi_turn_turns_extend_their_history(n, seed):
    reqs = GENERATORS["multi_turn_chat"](n_sessions=n, seed=seed)
    by_session = {}
    for r in reqs:
        by_session.setdefault(r.session, []).append(r)
    for turns in by_session.values():
        for a, b in zip(turns, turns[1:]):
            assert b.hash_ids[: len(a.hash_ids)] == a.hash_ids


def test_from_spec_arguments_and_errors():
    reqs = from_spec("gen:agent_sessions:n_sessions=3,steps=2-2")
    assert len(reqs) == 6
    with pytest.raises(TraceError):
        from_spec("gen:nope")
    with pytest.raises(TraceError):
        from_spec("gen:agent_sessions:bogus=1")
    with pytest.raises(TraceError):
        from_spec("gen:agent_sessions:n_sessions")


@pytest.mark.parametrize("spec", [
    "gen:multi_turn_chat:n_sessions=2,turns=5-2",          # empty range
    "gen:multi_turn_chat:n_sessions=2,session_rate=0",     # zero rate
    "gen:shared_system_prompt:n_requests=2,n_prompts=0",   # nothing to choose from
    "gen:agent_sessions:n_sessions=2,block_tokens=0",
    "gen:agent_sessions:n_sessions=2,session_rate=-1",     # arrivals before the start
    "gen:shared_system_prompt:n_requests=2,system_blocks=0,user_blocks=0-0",  # prompts of no blocks
])
def test_from_spec_values_a_generator_cannot_use_are_typed_errors(spec):
    with pytest.raises(TraceError):
        from_spec(spec)
