"""HostBlockStore on CPU tensors (skipped when torch is absent); one GPU case, skipped without CUDA."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from kvroute.eviction.host_store import HostBlockStore, HostStoreError, HostStoreFullError  # noqa: E402


def make(n=4, shape=(2, 3, 4)):
    bb = 2 * 3 * 4 * 2  # float16
    return HostBlockStore(shape, torch.float16, capacity_bytes=n * bb + bb // 2, pin_memory=False)


def test_capacity_rounds_down_to_whole_blocks():
    s = make(4)
    assert s.num_blocks == 4 and s.capacity_bytes == 4 * s.block_bytes and s.free_blocks() == 4
    with pytest.raises(HostStoreError):
        HostBlockStore((2, 2), torch.float32, capacity_bytes=8)


def test_put_get_roundtrip_and_overwrite():
    s = make()
    a = torch.randn(2, 3, 4).half()
    s.put(11, a)
    assert torch.equal(s.get(11), a)
    b = torch.randn(2, 3, 4).half()
    slot = s.slot_of(11)
    assert s.put(11, b) == slot and len(s) == 1
    out = torch.empty(2, 3, 4, dtype=torch.float16)
    assert torch.equal(s.get(11, out), b) and torch.equal(out, b)
    got = s.get(11)
    got.zero_()  # a copy, not a view of the pool
    assert torch.equal(s.get(11), b)
    s.check_invariants()


def test_batch_copies_and_full_store():
    s = make(3)
    x = torch.randn(3, 2, 3, 4).half()
    s.put_many([1, 2, 3], x)
    assert torch.equal(s.get_many([3, 1]), x[[2, 0]])
    with pytest.raises(HostStoreFullError):
        s.put(4, x[0])
    assert s.remove([2, 99]) == 1
    s.put(4, x[0])
    assert torch.equal(s.get(4), x[0]) and set(s.block_ids()) == {1, 3, 4}
    s.check_invariants()
    s.clear()
    assert len(s) == 0 and s.free_blocks() == 3


def test_bad_inputs_are_typed_errors():
    s = make()
    with pytest.raises(HostStoreError):
        s.put(1, torch.zeros(3, 3, 4, dtype=torch.float16))
    with pytest.raises(HostStoreError):
        s.put(1, torch.zeros(2, 3, 4, dtype=torch.float32))
    with pytest.raises(HostStoreError):
        s.get(42)
    with pytest.raises(HostStoreError):
        HostBlockStore((0, 3), torch.float16, capacity_bytes=1 << 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_put_many_from_the_gpu_non_blocking_lands_every_byte():
    # An asynchronous device-to-host copy into a temporary followed by a CPU index_copy_ read the
    # temporary before it was filled (4 of 5 trials wrong on an H200 before the fix).
    shape = (2, 32, 16, 8, 128)
    n = 64
    s = HostBlockStore(shape, torch.float16, capacity_bytes=n * 2 * 32 * 16 * 8 * 128 * 2, pin_memory=True)
    for trial in range(3):
        src = torch.randn((n, *shape), dtype=torch.float16, device="cuda") * (trial + 1)
        torch.cuda.synchronize()
        s.put_many(list(range(n)), src, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(s.get_many(list(range(n))), src.cpu())
