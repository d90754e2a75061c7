"""Block hashing: chaining, namespaces, input types, determinism across processes."""
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from kvroute import InvalidTokensError, block_hashes
from kvroute.kvindex.hashing import ROOT_SEED, block_hash_list, chain_hashes, tokens_to_bytes

tokens = st.lists(st.integers(0, 2**32 - 1), max_size=80)


def test_partial_last_block_is_dropped():
    assert len(block_hashes(list(range(47)), 16)) == 2
    assert len(block_hashes(list(range(48)), 16)) == 3
    assert block_hashes([], 16).dtype == np.uint64


@given(tokens, tokens, st.sampled_from([1, 2, 4, 16]))
@settings(max_examples=200)
def test_equal_hash_iff_equal_prefix(a, b, bs):
    ha, hb = block_hash_list(a, bs), block_hash_list(b, bs)
    for i in range(min(len(ha), len(hb))):
        same_prefix = a[: (i + 1) * bs] == b[: (i + 1) * bs]
        assert (ha[i] == hb[i]) == same_prefix


def test_each_hash_depends_on_every_earlier_token():
    base = list(range(64))
    h = block_hash_list(base, 16)
    for pos in range(64):
        mutated = list(base)
        mutated[pos] += 1000
        hm = block_hash_list(mutated, 16)
        blk = pos // 16
        assert hm[:blk] == h[:blk]
        assert all(x != y for x, y in zip(hm[blk:], h[blk:]))


def test_input_types_agree():
    toks = [5, 9, 100000, 3] * 8
    ref = block_hashes(toks, 4)
    assert (block_hashes(np.array(toks, dtype=np.int64), 4) == ref).all()
    assert (block_hashes(np.array(toks, dtype=np.uint32), 4) == ref).all()
    assert (block_hashes(tuple(toks), 4) == ref).all()
    torch = pytest.importorskip("torch")
    assert (block_hashes(torch.tensor(toks), 4) == ref).all()


def test_namespaces_separate():
    toks = list(range(64))
    plain = block_hash_list(toks, 16)
    lora = block_hash_list(toks, 16, lora_name="adapter-a")
    lora_b = block_hash_list(toks, 16, lora_name="adapter-b")
    salt = block_hash_list(toks, 16, cache_salt="tenant-1")
    mm = block_hash_list(toks, 16, mm_hashes=["img-abc"])
    variants = [plain, lora, lora_b, salt, mm]
    for i in range(len(variants)):
        for j in range(i + 1, len(variants)):
            assert not set(variants[i]) & set(variants[j])
    # deterministic for equal keys
    assert block_hash_list(toks, 16, lora_name="adapter-a") == lora


def test_mm_placeholder_joins_overlapping_blocks_only():
    toks = list(range(64))
    plain = block_hash_list(toks, 16)
    img = block_hash_list(toks, 16, mm_hashes=[("img", 20, 8)])  # tokens 20..27 -> block 1
    assert img[0] == plain[0]
    assert img[1] != plain[1] and img[2] != plain[2]
    assert block_hash_list(toks, 16, mm_hashes=[("img", np.int64(20), np.int32(8))]) == img
    for bad in [("img", "20", 8), ("img", 20, 0), ("img", -1, 8), ("img", 2.5, 8)]:
        with pytest.raises(InvalidTokensError):
            block_hash_list(toks, 16, mm_hashes=[bad])


@pytest.mark.parametrize("bad", [[-1, 2], [2**32], ["a"], [1.5, 2.0]])
def test_invalid_tokens(bad):
    with pytest.raises(InvalidTokensError):
        block_hashes(bad * 8, 2)


def test_invalid_numpy_tokens():
    with pytest.raises(InvalidTokensError):
        block_hashes(np.array([-3, 4, 5, 6]), 2)
    with pytest.raises(InvalidTokensError):
        block_hashes(np.ones((2, 4), dtype=np.int64), 2)
    with pytest.raises(InvalidTokensError):
        block_hashes(np.ones(8, dtype=np.float32), 2)


def test_chain_hashes_continues_a_chain():
    data = tokens_to_bytes(list(range(64)))
    whole = chain_hashes(data, 16)
    tail = chain_hashes(data[32 * 4 :], 16, seed=whole[1])
    assert tail == whole[2:]
    assert chain_hashes(data, 16, seed=ROOT_SEED) == whole


def test_same_hashes_in_every_process():
    code = "from kvroute import block_hashes; print(list(map(int, block_hashes(list(range(100)), 16, lora_name='x'))))"
    outs = set()
    for seed in ("0", "1", "12345", "random"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        outs.add(subprocess.check_output([sys.executable, "-c", code], env=env, text=True).strip())
    assert len(outs) == 1
    assert outs.pop() == str(list(map(int, block_hashes(list(range(100)), 16, lora_name="x"))))


def test_known_vector():
    """Pin the scheme: a change here breaks every snapshot and every peer's index."""
    assert int(block_hashes(list(range(16)), 16)[0]) == chain_hashes(tokens_to_bytes(list(range(16))), 16)[0]
    import xxhash

    expect = xxhash.xxh3_64_intdigest(np.arange(16, dtype="<u4").tobytes(), ROOT_SEED)
    assert int(block_hashes(list(range(16)), 16)[0]) == expect
