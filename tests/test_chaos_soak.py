"""The chaos soak of the KV-event path, 60 s in CI (``python tests/chaos_soak.py --seconds 600`` for 10 minutes).

See ``tests/chaos_soak.py``: 4 fake engines; drops, reorders, duplicates, engine restarts,
re-adds, snapshot restarts with valid / missing / garbage / foreign positions, replay timeouts
and overruns.  It fails on any index entry the engine does not hold, any over-predicted
prompt, a stream that never catches up, or an index unequal to the truth at the end.
"""
import os

import pytest

from chaos_soak import run

SECONDS = float(os.environ.get("KVROUTE_SOAK_SECONDS", "60"))


@pytest.mark.timeout(SECONDS * 3 + 120)
def test_chaos_soak_ends_exact():
    out = run(SECONDS, seed=int(os.environ.get("KVROUTE_SOAK_SEED", "0")), check_every_s=5.0)
    print(out)
    assert out["checkpoints"] >= 1 and out["checks_exact"] > 0
    sub = out["subscriber"]
    assert sub["block_copies_added"] == 0  # fake engines never hold two copies: any copy is a phantom
    # the faults did happen
    for k in ("dropped", "held", "duplicated", "engine_restarts", "re_adds", "replay_outages"):
        assert out[k] > 0, k
    assert any(k.startswith("snapshot_restarts_") for k in out)
    assert sub["gaps_closed"] > 0 and sub["restarts"] > 0
