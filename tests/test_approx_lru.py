"""The approximate table's per-slot LRU (``kvroute.router.approx._SlotLRU``) against ``OrderedDict``,
the structure it replaced (issue 17, item 9: one OrderedDict of 65,536 churning entries took 5-7 ms
to rebuild under the router's lock; the bucketed LRU never rebuilds more than one small table).
Hypothesis drives both through the operations the table uses, with buckets down to one entry so
bucket boundaries are crossed all the time; then ``ApproxPrefixes`` with its masks split in shards
is checked against its invariants under the same kind of churn.
"""
from __future__ import annotations

from collections import OrderedDict

from hypothesis import given, settings
from hypothesis import strategies as st

from kvroute.router.approx import ApproxPrefixes, _SlotLRU

OPS = st.lists(st.tuples(st.sampled_from(["set", "touch", "pop", "del", "update"]), st.integers(0, 40)),
               max_size=300)


@settings(max_examples=150, deadline=None)
@given(bucket=st.sampled_from([1, 2, 3, 5, 1024]), ops=OPS)
def test_slot_lru_is_an_ordered_dict(bucket, ops):
    old = _SlotLRU.BUCKET
    _SlotLRU.BUCKET = bucket
    try:
        a, b = _SlotLRU(), OrderedDict()
        for step, (op, h) in enumerate(ops):
            if op == "set":  # the table's insert: move an existing key to the end, then set
                if h in b:
                    b.move_to_end(h)
                    a.move_to_end(h)
                b[h] = step
                a[h] = step
            elif op == "touch" and h in b:
                b.move_to_end(h)
                a.move_to_end(h)
            elif op == "pop" and b:
                assert a.popitem(last=False) == b.popitem(last=False)
            elif op == "del" and h in b:
                del b[h]
                del a[h]
            elif op == "update" and h in b:  # in place, order kept
                b[h] = -step
                a[h] = -step
            assert len(a) == len(b) and bool(a) == bool(b) and (h in a) == (h in b)
            assert list(a.items()) == list(b.items()) and list(a) == list(b)
            if b:
                assert a.first() == next(iter(b)) and a.last_value() == b[next(reversed(b))]
                assert all(a[k] == v for k, v in b.items())
            assert sum(len(x) for x in a._buckets) == len(b) and all(a._buckets)  # no empty bucket kept
    finally:
        _SlotLRU.BUCKET = old


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2000), st.integers(1, 300), st.integers(1, 9)),
                    max_size=25))
def test_approx_table_with_sharded_masks_keeps_its_invariants(ops):
    a = ApproxPrefixes(ttl_s=5.0)
    now = 0.0
    for slot, start, n, cap in ops:
        now += 0.5
        a.add(slot, list(range(start, start + n)), now, capacity=cap * 20)
        a.check_invariants()
        got = a.match(list(range(start, start + n)), now)
        if n <= cap * 20:  # the whole chain was just added: the slot matches all of it
            assert got[slot] == n
        else:  # the bound evicted the chain's own root first
            assert slot not in got
    a.expire(now + 10)
    a.check_invariants()
    assert len(a) == 0 and not a.match([1, 2], now + 10)
