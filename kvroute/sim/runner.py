"""Running many simulations: every (routing, eviction) pair, and capacity sweeps.

``tuned`` maps ``("routing", name)`` or ``("eviction", name)`` to parameters
loaded from ``kvroute tune`` output (see :func:`kvroute.sim.tune.load_configs`);
they apply whenever that policy runs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .engine import SimConfig, Simulation, simulate
from .metrics import Summary
from ..traces import Request

#: (total, description) -> a tqdm-like object with update()/close(), or None.
ProgressFactory = Callable[[int, str], Any]


def configure(base: SimConfig, routing: str, eviction: str,
              tuned: Mapping[tuple[str, str], dict[str, Any]] | None = None, **changes: Any) -> SimConfig:
    """``base`` with the policies (and their tuned parameters) set."""
    tuned = tuned or {}
    return dataclasses.replace(
        base, routing=routing, eviction=eviction,
        router_params=dict(tuned.get(("routing", routing), base.router_params if routing == base.routing else {})),
        eviction_params=dict(tuned.get(("eviction", eviction), base.eviction_params if eviction == base.eviction else {})),
        **changes,
    )


def run_one(requests: Sequence[Request], cfg: SimConfig, progress: ProgressFactory | None = None,
            desc: str = "") -> tuple[Summary, np.ndarray]:
    """One simulation: its summary and its TTFT samples."""
    bar = progress(len(requests), desc or f"{cfg.routing}/{cfg.eviction}") if progress else None
    try:
        s = simulate(requests, cfg, progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    return s, _ttft(s.records)  # type: ignore[attr-defined]


def _ttft(rec: Any) -> np.ndarray:
    done = ~np.isnan(rec.finish)
    return (rec.first_token - rec.arrival)[done]


def run_matrix(requests: Sequence[Request], base: SimConfig, routings: Sequence[str], evictions: Sequence[str], *,
               tuned: Mapping[tuple[str, str], dict[str, Any]] | None = None,
               progress: ProgressFactory | None = None) -> tuple[list[Summary], dict[str, np.ndarray]]:
    """Every routing x eviction pair on one workload; returns summaries and TTFTs by ``routing/eviction``."""
    results: list[Summary] = []
    ttfts: dict[str, np.ndarray] = {}
    for r in routings:
        for e in evictions:
            s, t = run_one(requests, configure(base, r, e, tuned), progress)
            results.append(s)
            ttfts[f"{r}/{e}"] = t
    return results, ttfts


def sweep_capacity(requests: Sequence[Request], base: SimConfig, routing: str, evictions: Sequence[str],
                   factors: Sequence[float], *, tuned: Mapping[tuple[str, str], dict[str, Any]] | None = None,
                   progress: ProgressFactory | None = None) -> dict[str, list[tuple[int, float]]]:
    """Prefix hit ratio against capacity per eviction policy.

    Each factor scales both tiers (GPU and host blocks per worker); the curve's
    x value is the GPU blocks per worker.
    """
    g0 = base.resolved_gpu_blocks()
    h0 = base.resolved_host_blocks()
    out: dict[str, list[tuple[int, float]]] = {}
    for e in evictions:
        pts = []
        for f in factors:
            g = max(1, int(round(g0 * f)))
            h = int(round(h0 * f))
            s, _ = run_one(requests, configure(base, routing, e, tuned, gpu_blocks=g, host_blocks=h), progress,
                           desc=f"{routing}/{e} x{f:g} capacity")
            pts.append((g, s.prefix_hit_ratio))
        out[f"{routing}/{e}"] = pts
    return out


__all__ = ["configure", "run_matrix", "run_one", "sweep_capacity", "Simulation"]
