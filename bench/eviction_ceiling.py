"""Where adaptive's remaining misses come from: how good a reuse predictor must be to close the gap.

    python bench/eviction_ceiling.py [--trace conversation] [--capacity 0.05] [--json]

Every run below is one GPU-only cache at the given share of the trace's unique
blocks, driven request by request like ``bench/eviction_quality.py``.  Besides
LRU, the shipped ``adaptive`` and the offline optimum (``belady``), it runs the
*same* learned-density policy with only its request classes changed (its
``_request_class`` hook), so the figures isolate what better knowledge of the
future would be worth to it:

* ``oracle``: class = whether the request's prompt is continued by a later
  request (its next turn); perfect knowledge of *whether*, none of *when*.
* ``noisy AUC x``: class = a score ``continued + N(0, sigma)`` cut into
  ``--classes`` quantiles; ``sigma`` sets the predictor's AUC.  This traces the
  hit ratio as a function of predictor quality.
* ``fitted``: needs scikit-learn.  A gradient-boosted classifier of
  continuation, with out-of-fold predictions (5 folds) cut into quantiles.  Its
  features are the ones known when a request arrives: turn depth, new blocks,
  prompt blocks, fill of the last block, and the gaps to the previous turn and
  the one before it.  It is fitted on the trace itself, so it bounds what online
  learning from these features can reach from above.
* ``fitted (+ response length)``: the same with the request's output length
  added, which an engine knows when the request finishes, before its blocks
  become eviction candidates.

A request's *parent* is the request that last held the deepest block of its
prompt seen before, unless that block starts more than two distinct
continuations (a shared prefix such as a system prompt).  The policy's own
turn depth is close to this but narrower: it counts a turn only when that
block ended (or was next to the end of) an earlier prompt, and only while the
block is in its ghost table.  ``continued`` is having a child.

The AUCs are computed from ranks (Mann-Whitney), weighted by request.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from kvroute import traces  # noqa: E402
from kvroute.eviction import TieredCache  # noqa: E402
from kvroute.eviction.policies.adaptive import Adaptive  # noqa: E402
from kvroute.eviction.replay import Request, capacity_blocks, replay, unique_blocks  # noqa: E402


class LabelledAdaptive(Adaptive):
    """``adaptive`` whose request class is given per request (in replay order) instead of learned features."""

    def __init__(self, labels: list[int], nclass: int, **kw) -> None:
        super().__init__(max_turn_class=nclass, new_block_edges=(), duel=False, **kw)
        #: Class of each request, in the order the replay serves them.
        self.labels = labels
        self._i = 0

    def _request_class(self, keys, now, depth, new_blocks) -> int:
        c = self.labels[self._i]
        self._i += 1
        return c


def structure(rows: list, block_tokens: int = 512) -> dict:
    """Parent, depth, continuation and arrival features of every request."""
    n = len(rows)
    owner: dict = {}
    succ: dict = defaultdict(set)
    parent = np.full(n, -1)
    depth = np.ones(n, dtype=int)
    new = np.zeros(n, dtype=int)
    for i, r in enumerate(rows):
        h = r.hash_ids
        m = 0
        while m < len(h) and h[m] in owner:
            m += 1
        new[i] = len(h) - m
        if m and len(succ[h[m - 1]]) <= 2:
            p = owner[h[m - 1]]
            parent[i] = p
            depth[i] = depth[p] + 1
        for a, b in zip(h, h[1:]):
            if len(succ[a]) < 3:
                succ[a].add(b)
        for b in h:
            owner[b] = i
    ts = np.array([r.arrival_s for r in rows])
    cont = np.zeros(n, dtype=int)
    cont[parent[parent >= 0]] = 1
    gap1 = np.where(parent >= 0, ts - ts[np.maximum(parent, 0)], np.nan)
    pp = np.where(parent >= 0, parent[np.maximum(parent, 0)], -1)
    gap2 = np.where(pp >= 0, ts[np.maximum(parent, 0)] - ts[np.maximum(pp, 0)], np.nan)
    blocks = np.array([len(r.hash_ids) for r in rows])
    fill = np.array([r.input_length % block_tokens for r in rows])
    feats = np.column_stack([depth, new, blocks, fill, gap1, gap2]).astype(float)
    output = np.array([float(r.output_length) for r in rows])
    return {"parent": parent, "depth": depth, "continued": cont, "features": feats, "blocks": blocks,
            "output": output}


def auc(score: np.ndarray, y: np.ndarray) -> float:
    """Area under the ROC curve from ranks (ties share their mean rank)."""
    order = np.argsort(score, kind="mergesort")
    s = score[order]
    ranks = np.empty(len(s))
    i = 0
    while i < len(s):
        j = i
        while j + 1 < len(s) and s[j + 1] == s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = y == 1
    npos, nneg = pos.sum(), (~pos).sum()
    return float((ranks[pos].sum() - npos * (npos + 1) / 2) / (npos * nneg))


def cut(score: np.ndarray, k: int) -> list[int]:
    """Quantile classes 0..k-1 of a score (ties fall in one class)."""
    edges = np.quantile(score, np.linspace(0, 1, k + 1)[1:-1])
    return [int(c) for c in np.searchsorted(edges, score, side="right")]


def run_labelled(reqs: list[Request], cap: int, labels: list[int], k: int) -> float:
    pol = LabelledAdaptive(labels, k)
    c = TieredCache(cap, 0, pol)
    for r in reqs:
        t = c.start_request(r.keys, r.ts)
        c.finish_request(t, r.ts)
    st = c.stats()
    return st["gpu_hits"] / max(1, st["blocks"])


def fitted_scores(info: dict, seed: int, response: bool = False) -> np.ndarray | None:
    """Out-of-fold continuation scores from the arrival features (and the response length)."""
    try:
        from sklearn.ensemble import HistGradientBoostingClassifier
        from sklearn.model_selection import cross_val_predict
    except ImportError:
        return None
    clf = HistGradientBoostingClassifier(max_iter=200, learning_rate=0.05, random_state=seed)
    x = np.column_stack([info["features"], info["output"]]) if response else info["features"]
    return cross_val_predict(clf, x, info["continued"], cv=5, method="predict_proba")[:, 1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trace", default="conversation", help="path, or a bundled trace name")
    ap.add_argument("--capacity", type=float, default=0.05, help="share of the trace's unique blocks")
    ap.add_argument("--classes", type=int, default=6, help="quantile classes of a predictor's score")
    ap.add_argument("--sigmas", default="0.25,0.5,0.75,1.0,1.5,2.5", help="noise levels of the noisy oracles")
    ap.add_argument("--block-tokens", type=int, default=512, help="tokens per block of the trace (Mooncake: 512)")
    ap.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)

    t0 = time.perf_counter()
    rows = traces.load_trace(a.trace, limit=a.limit)
    reqs = [Request(r.arrival_s, r.hash_ids) for r in rows]
    cap = capacity_blocks(a.capacity, unique_blocks(reqs))
    info = structure(rows, a.block_tokens)
    y = info["continued"]
    out: dict = {"trace": a.trace, "capacity": a.capacity, "blocks": cap, "requests": len(reqs),
                 "continued_share": round(float(y.mean()), 4),
                 "continued_by_depth": {int(d): round(float(y[info["depth"] == d].mean()), 3)
                                        for d in range(1, 9) if (info["depth"] == d).sum() >= 20},
                 "rows": []}

    def add(name: str, hit: float, a_uc: float | None = None) -> None:
        out["rows"].append({"name": name, "auc": None if a_uc is None else round(a_uc, 3), "prefix_hit_ratio": round(hit, 4)})
        if not a.json:
            print(f"  {name:<27} auc {'-' if a_uc is None else f'{a_uc:.3f}':>5}   hit {hit:.4f}", flush=True)

    if not a.json:
        print(f"{a.trace}: {len(reqs)} requests, capacity {a.capacity:g} = {cap} blocks; "
              f"{out['continued_share']:.1%} of requests continued; by depth {out['continued_by_depth']}")
    for name in ("lru", "adaptive", "belady"):
        add(name, replay(reqs, cap, name)["prefix_hit_ratio"])
    depth_auc = auc(info["depth"].astype(float), y)
    out["depth_auc"] = round(depth_auc, 3)
    add("oracle (continued)", run_labelled(reqs, cap, [int(v) for v in y], 2), 1.0)
    rng = np.random.default_rng(a.seed)
    for sigma in (float(s) for s in a.sigmas.split(",")):
        score = y + rng.normal(0.0, sigma, len(y))
        add(f"noisy sigma={sigma:g}", run_labelled(reqs, cap, cut(score, a.classes), a.classes), auc(score, y))
    fs = fitted_scores(info, a.seed)
    if fs is None:
        out["fitted"] = "scikit-learn not installed (pip install scikit-learn)"
        if not a.json:
            print("  fitted: skipped, scikit-learn is not installed")
    else:
        add("fitted (arrival features)", run_labelled(reqs, cap, cut(fs, a.classes), a.classes), auc(fs, y))
        fr = fitted_scores(info, a.seed, response=True)
        add("fitted (+ response length)", run_labelled(reqs, cap, cut(fr, a.classes), a.classes), auc(fr, y))
    lru = out["rows"][0]["prefix_hit_ratio"]
    bel = out["rows"][2]["prefix_hit_ratio"]
    for r in out["rows"]:
        r["gap_closed"] = round((r["prefix_hit_ratio"] - lru) / (bel - lru), 3) if bel > lru else None
    # the AUC a predictor needs for half the LRU-Belady gap, interpolated along the noisy oracles
    noisy = sorted((r["auc"], r["prefix_hit_ratio"]) for r in out["rows"] if r["name"].startswith("noisy"))
    goal = lru + (bel - lru) / 2
    need = None
    for (a0, h0), (a1, h1) in zip(noisy, noisy[1:]):
        if h0 < goal <= h1:
            need = a0 + (goal - h0) * (a1 - a0) / (h1 - h0)
            break
    out["goal_half_gap"] = round(goal, 4)
    out["auc_needed_for_goal"] = None if need is None else round(need, 3)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    if a.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"turn depth alone ranks continuation with AUC {depth_auc:.3f}; half the LRU-Belady gap ({goal:.4f}) needs "
              f"AUC {'n/a' if need is None else f'{need:.3f}'}; {out['seconds']} s")
        for r in out["rows"]:
            if r["gap_closed"] is not None and not math.isnan(r["gap_closed"]):
                print(f"  {r['name']:<27} closes {r['gap_closed']:.0%} of the gap")
    return 0


if __name__ == "__main__":
    sys.exit(main())
