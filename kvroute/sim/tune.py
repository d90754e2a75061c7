"""``kvroute tune``: search one policy's parameters by simulation.

The search space is the policy's own parameters: the numeric fields of a
routing policy's weights dataclass (``kvroute.router.POLICIES[name].Weights``)
or the numeric keyword parameters of an eviction policy's constructor
(``kvroute.eviction.POLICIES[name]``), including the numeric fields of its
``weights`` dataclass when it takes them as keyword overrides.  The search is a seeded coordinate
descent with multiplicative steps (x0.5 / x2, then x0.7 / x1.4, ...; a zero
default tries small positive values), keeping a change only when the objective
improves; every evaluation is a full simulation of the workload.  Values a
policy refuses (its constructor raises) are skipped.

The result is a JSON document (:func:`tune_policy`) that ``kvroute sim
--config FILE`` loads with :func:`load_configs`::

    {"kind": "routing" | "eviction", "policy": name, "params": {...},
     "objective": "ttft_mean_s", "score": x, "default_score": y, "trace": ...,
     "evaluations": [[params, score], ...], "setup": {...}}
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
from typing import Any, Callable, Iterable, Sequence

from ..kvindex.errors import KVRouteError
from .engine import SimConfig
from .runner import configure, run_one
from ..traces import Request


class TuneError(KVRouteError, ValueError):
    """A policy that cannot be tuned, a bad objective or a bad configuration file."""


#: Objectives that are maximised (everything else is minimised).
MAXIMISE_SUFFIXES = ("hit_ratio", "tok_s")


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def search_space(policy: str) -> tuple[str, dict[str, Any]]:
    """``(kind, {param: default})`` of the numeric parameters of a routing or eviction policy."""
    from ..eviction import POLICIES as EVICTION
    from ..router import POLICIES as ROUTING

    if policy in ROUTING:
        W = ROUTING[policy].Weights
        if not dataclasses.is_dataclass(W):
            return "routing", {}
        return "routing", {f.name: getattr(W(), f.name) for f in dataclasses.fields(W) if _is_num(getattr(W(), f.name))}
    if policy in EVICTION:
        from ..eviction import make_policy

        if policy == "belady":
            raise TuneError("belady is an oracle: nothing to tune")
        pol = make_policy(policy)
        params = {}
        sig = inspect.signature(type(pol).__init__).parameters
        for name, p in sig.items():
            if name in ("self", "algorithm", "label") or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                continue
            if _is_num(p.default):
                params[name] = p.default
        # a policy that keeps its parameters in a weights dataclass and takes them as keyword overrides
        w = next((x for x in (getattr(pol, "weights", None), getattr(pol, "w", None)) if dataclasses.is_dataclass(x)), None)
        if w is not None and any(p.kind is p.VAR_KEYWORD for p in sig.values()):
            for f in dataclasses.fields(w):
                v = getattr(w, f.name)
                if _is_num(v):
                    params.setdefault(f.name, v)
        return "eviction", params
    raise TuneError(f"unknown policy {policy!r}: not in kvroute.router.POLICIES nor kvroute.eviction.POLICIES")


def _steps(v: float | int, round_no: int) -> list[float | int]:
    """Candidate values around ``v`` for a search round (0, 1, 2, ...)."""
    f = (2.0, 1.4, 1.15, 1.07)[min(round_no, 3)]
    if v == 0:
        cands = [0.1 / f, 1.0 / f] if isinstance(v, float) else [1, int(round(4 / f)) or 1]
    else:
        cands = [v / f, v * f]
    if isinstance(v, int):
        out = []
        for c in cands:
            c = int(round(c))
            if c == v:
                c = v + (1 if c >= v else -1)
            out.append(c)
        return [c for c in dict.fromkeys(out) if c != v]
    return cands


def tune_policy(
    requests: Sequence[Request],
    base: SimConfig,
    policy: str,
    *,
    objective: str = "ttft_mean_s",
    budget: int = 24,
    routing: str = "kvroute",
    eviction: str = "lru",
    trace: str = "",
    log: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Search ``policy``'s parameters on ``requests``; returns the JSON-able result document."""
    kind, space = search_space(policy)
    if kind == "routing" and base.calibrate_router:  # start from what the simulation would use
        from .engine import calibrated_router_params

        space.update({k: v for k, v in calibrated_router_params(policy, base.cost).items() if k in space})
    from .metrics import Summary

    if objective not in {f.name for f in dataclasses.fields(Summary)} \
            or objective in ("routing", "eviction", "per_worker_requests", "extra"):  # not numbers
        raise TuneError(f"unknown objective {objective!r}; use a numeric Summary field such as ttft_mean_s")
    sign = -1.0 if objective.endswith(MAXIMISE_SUFFIXES) else 1.0
    if budget < 1:
        raise TuneError("budget must be >= 1")
    r_name, e_name = (policy, eviction) if kind == "routing" else (routing, policy)
    evaluations: list[tuple[dict[str, Any], float]] = []

    def evaluate(params: dict[str, Any]) -> float | None:
        tuned = {(kind, policy): params}
        try:
            s, _ = run_one(requests, configure(base, r_name, e_name, tuned))
        except (TypeError, ValueError, KVRouteError) as exc:  # a value the policy refuses
            if log:
                log(f"  skip {params}: {exc}")
            return None
        v = getattr(s, objective)
        score = sign * v if v is not None and not math.isnan(v) else math.inf
        evaluations.append((dict(params), v))
        if log:
            diff = {k: x for k, x in params.items() if x != space[k]}
            log(f"  [{len(evaluations)}/{budget}] {objective}={v:.5g} {json.dumps(diff) if diff else '(defaults)'}")
        return score

    best = dict(space)
    best_score = evaluate(best)
    if best_score is None:
        raise TuneError(f"{policy}'s default parameters do not run")
    default_score = best_score
    round_no = 0
    while len(evaluations) < budget and space:
        improved = False
        for name in space:
            for cand in _steps(best[name], round_no):
                if len(evaluations) >= budget:
                    break
                trial = dict(best)
                trial[name] = cand
                sc = evaluate(trial)
                if sc is not None and sc < best_score:
                    best, best_score, improved = trial, sc, True
                    break
        if not improved:
            round_no += 1
            if round_no > 3:
                break
    changed = {k: v for k, v in best.items() if v != space[k]}
    return {
        "kind": kind,
        "policy": policy,
        "params": best,
        "changed": changed,
        "objective": objective,
        "score": sign * best_score,
        "default_score": sign * default_score,
        "trace": trace,
        "requests": len(requests),
        "setup": {"routing": r_name, "eviction": e_name, "workers": base.workers, "rate_scale": base.rate_scale,
                  "preset": base.cost.name, "gpu_blocks": base.resolved_gpu_blocks(),
                  "host_blocks": base.resolved_host_blocks(), "prefill_workers": base.prefill_workers},
        "evaluations": [[p, v] for p, v in evaluations],
    }


def load_configs(paths: Iterable[str]) -> dict[tuple[str, str], dict[str, Any]]:
    """Read ``kvroute tune`` outputs into ``{(kind, policy): params}`` for :func:`kvroute.sim.runner.configure`."""
    out: dict[tuple[str, str], dict[str, Any]] = {}
    for p in paths:
        try:
            with open(p, encoding="utf-8") as f:
                doc = json.load(f)
        except (OSError, ValueError) as exc:  # ValueError: bad JSON, or not UTF-8
            raise TuneError(f"cannot read configuration {p}: {exc}") from None
        if not isinstance(doc, dict) or doc.get("kind") not in ("routing", "eviction") \
                or not isinstance(doc.get("policy"), str) or not isinstance(doc.get("params"), dict):
            raise TuneError(f"{p} is not a kvroute tune configuration (needs kind, policy, params)")
        out[(doc["kind"], doc["policy"])] = doc["params"]
    return out
