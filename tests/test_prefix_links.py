"""PrefixLinks (kvroute.eviction.prefix_links): a Hypothesis stateful test against a
dict-based reference model, unit tests of the orphan rule, and the rule seen through
the GPU plugin's free queue (no vLLM needed)."""
from __future__ import annotations

from types import SimpleNamespace as Block

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from kvroute.adapters.vllm_plugin import PolicyFreeQueue
from kvroute.eviction import make_policy
from kvroute.eviction.prefix_links import PrefixLinkError, PrefixLinks
from kvroute.kvindex.errors import KVRouteError

KEYS = 8


class Model:
    """Reference: resident keys, each with the parent key it remembers (linear scans)."""

    def __init__(self) -> None:
        self.rp: dict[int, int | None] = {}  # resident key -> remembered parent

    def kids(self, k: int) -> set[int]:
        return {c for c, p in self.rp.items() if p == k}

    def parent(self, k: int) -> int | None:
        p = self.rp[k]
        return p if p in self.rp else None

    def _set(self, k: int, p: int | None) -> int | None:
        was_leaf = not self.kids(p) if p is not None else False
        self.rp[k] = p
        return p if p is not None and p in self.rp and was_leaf else None

    def add(self, k: int, p: int | None) -> int | None:
        self.rp[k] = None
        return self._set(k, p)

    def link(self, k: int, p: int) -> int | None | str:
        old = self.rp[k]
        if old == p:
            return None
        if old is not None and old in self.rp:
            return "error"
        return self._set(k, p)

    def unlink(self, k: int) -> int | None:
        p = self.rp.pop(k)
        return p if p is not None and p in self.rp and not self.kids(p) else None


class LinksMachine(RuleBasedStateMachine):
    """Parents are always smaller keys (as chained hashes: no cycles)."""

    def __init__(self) -> None:
        super().__init__()
        self.links = PrefixLinks()
        self.model = Model()

    @rule(k=st.integers(0, KEYS - 1), p=st.one_of(st.none(), st.integers(0, KEYS - 1)))
    def add(self, k: int, p: int | None) -> None:
        if p is not None and p >= k:
            p = None
        if k in self.model.rp:
            with pytest.raises(PrefixLinkError):
                self.links.add(k, p)
            return
        assert self.links.add(k, p) == self.model.add(k, p)

    @rule(k=st.integers(0, KEYS - 1), p=st.integers(0, KEYS - 1))
    def link(self, k: int, p: int) -> None:
        if p >= k:
            return
        if k not in self.model.rp:
            with pytest.raises(PrefixLinkError):
                self.links.link(k, p)
            return
        want = self.model.link(k, p)
        if want == "error":
            with pytest.raises(PrefixLinkError):
                self.links.link(k, p)
        else:
            assert self.links.link(k, p) == want

    @rule(k=st.integers(0, KEYS - 1))
    def unlink(self, k: int) -> None:
        if k not in self.model.rp:
            with pytest.raises(PrefixLinkError):
                self.links.unlink(k)
            return
        assert self.links.unlink(k) == self.model.unlink(k)

    @rule(data=st.data())
    def clear_sometimes(self, data: st.DataObject) -> None:
        if data.draw(st.integers(0, 9)) == 0:
            self.links.clear()
            self.model.rp.clear()

    @invariant()
    def agrees_with_the_model(self) -> None:
        self.links.check_invariants()
        m = self.model
        assert len(self.links) == len(m.rp)
        for k in range(KEYS):
            assert (k in self.links) == (k in m.rp)
            assert self.links.is_leaf(k) == (not m.kids(k))
            assert set(self.links.children(k)) == m.kids(k)
            if k in m.rp:
                assert self.links.parent(k) == m.parent(k)
            else:
                with pytest.raises(PrefixLinkError):
                    self.links.parent(k)
        # memory: only resident keys and the keys they remember are kept
        assert set(self.links._children) <= {p for p in m.rp.values() if p is not None}


LinksMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestPrefixLinksStateful = LinksMachine.TestCase


# ---------------------------------------------------------------- orphan rule
def chain(links: PrefixLinks, *keys: str) -> None:
    prev = None
    for k in keys:
        links.add(k, prev)
        prev = k


def test_children_of_a_departed_parent_stay_resident_without_a_parent() -> None:
    links = PrefixLinks()
    chain(links, "a", "b", "c")
    assert links.unlink("b") == "a"  # b was a's only child: a is a leaf now
    assert links.is_leaf("a")
    assert "c" in links and links.parent("c") is None
    assert not links.is_leaf("b")  # c still names b
    links.check_invariants()


def test_unlink_returns_the_parent_only_when_it_just_became_a_leaf() -> None:
    links = PrefixLinks()
    links.add("a")
    links.add("b", "a")
    links.add("b2", "a")
    assert links.unlink("b") is None  # a still has b2
    assert links.unlink("b2") == "a"
    assert links.unlink("a") is None  # a root
    assert len(links) == 0 and links._children == {}
    links.check_invariants()


def test_a_re_added_parent_re_links_its_resident_children() -> None:
    links = PrefixLinks()
    chain(links, "a", "b", "c")
    links.unlink("b")
    assert links.add("b", "a") == "a"  # a stops being a leaf again
    assert not links.is_leaf("a") and links.parent("b") == "a"
    assert links.parent("c") == "b" and not links.is_leaf("b")  # c woke up under b
    assert links.children("b") == {"c"}
    assert links.unlink("c") == "b"  # b is offered once c goes
    links.check_invariants()


def test_add_returns_the_parent_when_it_stops_being_a_leaf() -> None:
    links = PrefixLinks()
    links.add("a")
    assert links.add("b", "a") == "a"
    assert links.add("b2", "a") is None  # a was not a leaf any more
    assert links.add("x", "absent") is None  # absent parent: remembered, nothing to report
    assert links.parent("x") is None and not links.is_leaf("absent")
    assert links.add("absent") is None and links.parent("x") == "absent"


def test_an_orphan_can_be_re_pointed_and_then_keeps_its_new_parent() -> None:
    links = PrefixLinks()
    chain(links, "a", "b")
    links.add("z")
    links.unlink("a")
    assert links.link("b", "z") == "z"  # z just stopped being a leaf
    assert links.is_leaf("a")  # b no longer remembers a
    links.add("a")
    assert links.parent("b") == "z" and links.is_leaf("a")
    assert links.link("b", "z") is None  # same parent: no-op
    with pytest.raises(PrefixLinkError):
        links.link("b", "a")  # first link wins while the parent is resident
    links.check_invariants()


def test_bad_calls_raise_typed_errors() -> None:
    links = PrefixLinks()
    links.add("a")
    for call in (lambda: links.add("a"), lambda: links.add("b", "b"), lambda: links.add(None),
                 lambda: links.unlink("nope"), lambda: links.parent("nope"), lambda: links.link("nope", "a"),
                 lambda: links.link("a", "a")):
        with pytest.raises(PrefixLinkError) as e:
            call()
        assert isinstance(e.value, KVRouteError)
    assert len(links) == 1
    links.check_invariants()


def test_clear_forgets_remembered_links() -> None:
    links = PrefixLinks()
    chain(links, "a", "b")
    links.unlink("a")
    links.clear()
    links.add("b")
    links.add("a")
    assert links.parent("b") is None and links.is_leaf("a")


def test_check_invariants_catches_corruption() -> None:
    links = PrefixLinks()
    chain(links, 1, 2, 3)
    links._children[2].discard(3)
    with pytest.raises(AssertionError):
        links.check_invariants()
    cyc = PrefixLinks()
    cyc.add(1)
    cyc.add(2, 1)
    cyc._parent[1] = 2
    cyc._children[2] = {1}
    with pytest.raises(AssertionError, match="cycle"):
        cyc.check_invariants()


# ------------------------------------------- the rule through the GPU free queue
class Recording:
    """An LRU policy that records which keys are candidates."""

    def __init__(self) -> None:
        self.inner, self.cands = make_policy("lru"), set()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def set_candidate(self, key, flag) -> None:
        (self.cands.add if flag else self.cands.discard)(key)
        self.inner.set_candidate(key, flag)

    def on_remove(self, key) -> None:
        self.cands.discard(key)
        self.inner.on_remove(key)


def serve(q: PolicyFreeQueue, rid: int, keys: list[str], hit: list[Block], now: float) -> list[Block]:
    """What vLLM does for one request whose first len(hit) blocks are cached hits."""
    q.begin(rid, keys, now)
    for b in hit:
        if b.ref_cnt == 0:
            q.remove(b)
        b.ref_cnt += 1
    q.on_hit(hit)
    new = q.popleft_n(len(keys) - len(hit))
    for b in new:
        b.block_hash, b.ref_cnt = None, 1
    blocks = hit + new
    for i in range(len(hit), len(keys)):
        blocks[i].block_hash = keys[i]
    q.on_cached(rid, blocks, len(hit), len(keys))
    for b in blocks:
        b.ref_cnt -= 1
    q.append_n(list(reversed(blocks)))
    return blocks


def test_gpu_queue_re_links_a_child_when_its_evicted_parent_is_re_cached() -> None:
    blocks = [Block(block_id=i, block_hash=None, ref_cnt=0) for i in range(8)]
    pol = Recording()
    q = PolicyFreeQueue(blocks, pol, 8)
    a, b = serve(q, 1, ["a", "b"], [], 0.0)
    assert pol.cands == {"b"}
    a.block_hash = None  # a connector evicts a's block behind the pool's back
    q.resync()
    assert q.links.parent("b") is None and "a" not in q.links
    (a2,) = serve(q, 2, ["a"], [], 1.0)  # a recomputed into a new block, under the same hash
    assert a2 is not a and q.links.children("a") == {"b"} and q.links.parent("b") == "a"
    assert pol.cands == {"b"}  # a is not offered while b (reachable through a again) is cached
    q.links.check_invariants()
    serve(q, 3, ["a", "b", "x"], [a2, b], 2.0)  # vLLM reaches b through the new a
    assert q.links.parent("x") == "b" and pol.cands == {"x"}
    q.links.check_invariants()
    assert q.stats["fallback_evictions"] == 0
