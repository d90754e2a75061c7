"""The prefix-links orphan rule inside a real vLLM engine (CPU build 0.32, kvroute's GPU plugin on).

`kvroute.eviction.prefix_links.PrefixLinks` (the one parent/children structure of
``TieredCache`` and both vLLM adapters) decides: a resident block whose parent
leaves *remembers* its parent's key; while the parent is absent the link sleeps;
when a block with that key is cached again, the children are linked to it at
once and it is no leaf (not an eviction candidate) while they are resident.

Checked on the real engine: a free cached block with a cached child is evicted
through vLLM's own ``BlockPool.evict_blocks`` (what a KV connector calls), the
same prompt is sent again (vLLM recomputes the evicted block under the same
hash), and then

* the children are linked to the re-cached block and it is not a leaf (the rule);
* vLLM's next prefix lookup reaches the children through it again (the whole
  prompt but its last block is served from cache), which is why it must not be
  offered for eviction before them: a rule that made the orphans roots would let
  it go first and strand them again.
"""

from __future__ import annotations

import pytest

from engine_process import BS, free_port

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(600)]


@pytest.mark.parametrize("policy", ["adaptive"])  # the rule lives in the queue; lru passed too (one engine start each)
def test_orphans_relink_when_vllm_recaches_their_parent(start_engine, policy) -> None:
    eng = start_engine(port=free_port(), replay_port=free_port(), num_gpu_blocks=64, max_model_len=12 * BS,
                       extra_env={"KVROUTE_VLLM_GPU_EVICTION": policy})
    eng.wait_ready()
    prompt = [(7 * i) % 250 + 3 for i in range(6 * BS)]  # six full blocks
    assert eng.generate(prompt)["num_cached_tokens"] == 0
    assert eng.generate(prompt)["num_cached_tokens"] == 5 * BS  # vLLM recomputes the last block of a full hit
    ev = eng.call({"cmd": "orphan"})
    assert ev["evicted"] and ev["children"] >= 1 and ev["children_resident"] >= 1, ev
    assert ev["linked_after"] == [False] * ev["children_resident"], ev  # the parent is gone: the link sleeps
    gone = eng.call({"cmd": "orphan_state"})
    assert gone["resident"] is False
    eng.generate(prompt)  # the prefix lookup stops at the evicted block; vLLM caches its hash again
    st = eng.call({"cmd": "orphan_state"})
    assert st["resident"] is True and st["is_leaf"] is False, st
    assert st["children_linked"] and all(st["children_linked"]), st
    assert eng.generate(prompt)["num_cached_tokens"] == 5 * BS  # reached through the re-cached parent
