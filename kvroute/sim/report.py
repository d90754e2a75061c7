"""Results out: the terminal comparison table, CSV and JSON files, PNG plots.

* :func:`table` -- a fixed-width comparison table (best mean/p99 TTFT marked ``*``).
* :func:`json_doc` -- ``{"results": [summary dicts]}`` (the ``--json`` contract).
* :func:`write_outputs` -- ``results.csv``, ``results.json`` and, when matplotlib
  is installed, ``ttft_cdf.png`` (TTFT CDF per policy pair),
  ``hit_vs_capacity.png`` (prefix hit ratio against GPU capacity) and
  ``load_balance.png`` (requests per worker) into a folder.
"""
from __future__ import annotations

import csv
import json
import math
import os
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .metrics import Summary

_FMT = {
    "ttft_mean_s": "{:.3f}", "ttft_p50_s": "{:.3f}", "ttft_p90_s": "{:.3f}", "ttft_p99_s": "{:.3f}",
    "e2e_mean_s": "{:.2f}", "tpot_mean_s": "{:.4f}", "throughput_tok_s": "{:.0f}", "prefix_hit_ratio": "{:.4f}",
    "gpu_hit_ratio": "{:.4f}", "host_hit_ratio": "{:.4f}", "load_max_over_mean": "{:.2f}",
    "router_us_mean": "{:.1f}", "wall_s": "{:.1f}",
}
_HEAD = {
    "ttft_mean_s": "ttft_mean", "ttft_p50_s": "p50", "ttft_p90_s": "p90", "ttft_p99_s": "p99",
    "e2e_mean_s": "e2e_mean", "tpot_mean_s": "tpot", "throughput_tok_s": "out_tok/s", "prefix_hit_ratio": "hit",
    "gpu_hit_ratio": "gpu_hit", "host_hit_ratio": "host_hit", "load_max_over_mean": "max/mean",
    "router_us_mean": "router_us", "wall_s": "wall_s",
}


def _cell(key: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    f = _FMT.get(key)
    return f.format(v) if f else str(v)


def table(results: Sequence[Summary]) -> str:
    """The comparison table (seconds, ratios); ``*`` marks the lowest mean and p99 TTFT."""
    cols = Summary.TABLE
    best = {}
    for k in ("ttft_mean_s", "ttft_p99_s"):
        vals = [getattr(r, k) for r in results if not math.isnan(getattr(r, k))]
        best[k] = min(vals) if vals else None
    rows = []
    for r in results:
        row = []
        for k in cols:
            c = _cell(k, getattr(r, k))
            if k in best and best[k] is not None and getattr(r, k) == best[k] and len(results) > 1:
                c += "*"
            row.append(c)
        rows.append(row)
    head = [_HEAD.get(k, k) for k in cols]
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [line(head), line(["-" * w for w in widths])]
    out += [line(r) for r in rows]
    if any(c.endswith("*") for row in rows for c in row):
        out.append("* lowest TTFT in its column (mean, p99) among these runs")
    return "\n".join(out)


def json_doc(results: Iterable[Summary]) -> dict[str, Any]:
    """``{"results": [...]}``: every summary field (NaN as null)."""
    return {"results": [r.to_dict() for r in results]}


def write_csv(results: Sequence[Summary], path: str) -> None:
    if not results:
        return
    keys = [k for k in results[0].to_dict() if k not in ("per_worker_requests", "extra")]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(keys)
        for r in results:
            d = r.to_dict()
            w.writerow(["" if d[k] is None else d[k] for k in keys])


def write_outputs(
    out_dir: str,
    results: Sequence[Summary],
    ttfts: Mapping[str, np.ndarray],
    capacity_curve: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    *,
    title: str = "",
    meta: Mapping[str, Any] | None = None,
) -> list[str]:
    """Write CSV, JSON and plots into ``out_dir``; returns the paths written.

    ``ttfts`` maps a label (``routing/eviction``) to that run's TTFT samples;
    ``capacity_curve`` maps a label to ``[(gpu_blocks, prefix_hit_ratio), ...]``.
    """
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    p = os.path.join(out_dir, "results.csv")
    write_csv(results, p)
    paths.append(p)
    p = os.path.join(out_dir, "results.json")
    doc = json_doc(results)
    if meta:
        doc["meta"] = dict(meta)
    if capacity_curve:
        doc["hit_vs_capacity"] = {k: [list(x) for x in v] for k, v in capacity_curve.items()}
    with open(p, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    paths.append(p)
    paths += plot(out_dir, results, ttfts, capacity_curve, title=title)
    return paths


#: Line styles cycled once the colours run out: 10 colours x 4 dash patterns, each with its own marker,
#: keep 40 series apart (16+ policy pairs are common with ``--routing all --eviction all``).
_DASHES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*", "<", ">", "h")


def series_style(i: int) -> dict[str, Any]:
    """Matplotlib keyword arguments of the ``i``-th series: colour, dash pattern and marker together."""
    return {"color": f"C{i % 10}", "linestyle": _DASHES[(i // 10) % len(_DASHES)],
            "marker": _MARKERS[i % len(_MARKERS)]}


def _legend_outside(ax: Any, n: int) -> None:
    """Legend to the right of the axes, never over the data (saved with ``bbox_inches="tight"``)."""
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False,
              ncol=1 if n <= 20 else 2)


def _log_ticks(axis: Any, lo: float, hi: float) -> None:
    """Labelled ticks on a log axis whatever its span (a span inside one decade has no major tick)."""
    import matplotlib.ticker as mt

    if not (lo > 0 and hi > lo):
        return
    ticks = sorted({float(f"{t:.2g}") for t in np.geomspace(lo, hi, 5)})
    axis.set_major_locator(mt.FixedLocator(ticks))
    axis.set_major_formatter(mt.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(mt.NullFormatter())


def ttft_figure(ttfts: Mapping[str, np.ndarray], title: str = "") -> Any:
    """The TTFT CDF figure (one styled series per label)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4), dpi=80)
    lo, hi = math.inf, 0.0
    for i, (label, xs) in enumerate(ttfts.items()):
        xs = np.sort(np.asarray(xs, dtype=float))
        xs = xs[xs > 0]
        if xs.size:
            ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=label, lw=1.3, markevery=max(1, xs.size // 8),
                    markersize=4, **series_style(i))
            lo, hi = min(lo, xs[0]), max(hi, xs[-1])
    ax.set_xscale("log")
    _log_ticks(ax.xaxis, lo, hi)
    ax.set_xlabel("TTFT (s, log)")
    ax.set_ylabel("share of requests")
    ax.set_title(("TTFT CDF " + title).strip(), fontsize=10)
    ax.grid(alpha=0.3)
    _legend_outside(ax, len(ttfts))
    return fig


def capacity_figure(capacity_curve: Mapping[str, Sequence[tuple[int, float]]], title: str = "") -> Any:
    """Prefix hit ratio against GPU capacity, one styled series per label."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4), dpi=80)
    xs_all = []
    for i, (label, pts) in enumerate(capacity_curve.items()):
        pts = sorted(pts)
        xs_all += [x for x, _ in pts]
        ax.plot([x for x, _ in pts], [y for _, y in pts], label=label, lw=1.3, markersize=4, **series_style(i))
    ax.set_xscale("log")
    if xs_all:
        _log_ticks(ax.xaxis, min(xs_all), max(xs_all))
    ax.set_xlabel("GPU blocks per worker (host tier scaled alike; log)")
    ax.set_ylabel("prefix hit ratio")
    ax.set_title(("hit ratio vs capacity " + title).strip(), fontsize=10)
    ax.grid(alpha=0.3)
    _legend_outside(ax, len(capacity_curve))
    return fig


def load_figure(results: Sequence[Summary], title: str = "") -> Any:
    """Requests per worker, one bar group per worker (ticks on the workers), one styled bar set per run."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3), dpi=80)
    n = len(results)
    width = 0.8 / n
    n_workers = max(len(r.per_worker_requests) for r in results)
    hatches = ("", "//", "..", "xx")
    for j, r in enumerate(results):
        xs = np.arange(len(r.per_worker_requests)) + (j - (n - 1) / 2) * width
        ax.bar(xs, r.per_worker_requests, width=width, label=f"{r.routing}/{r.eviction}",
               color=f"C{j % 10}", hatch=hatches[(j // 10) % len(hatches)], edgecolor="white", linewidth=0.3)
    ax.set_xticks(np.arange(n_workers))
    ax.set_xticklabels([str(w) for w in range(n_workers)])
    ax.set_xlabel("worker")
    ax.set_ylabel("requests")
    ax.set_title(("load per worker " + title).strip(), fontsize=10)
    _legend_outside(ax, n)
    return fig


def plot(
    out_dir: str,
    results: Sequence[Summary],
    ttfts: Mapping[str, np.ndarray],
    capacity_curve: Mapping[str, Sequence[tuple[int, float]]] | None = None,
    *,
    title: str = "",
) -> list[str]:
    """PNG plots (skipped, returning [], when matplotlib is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    figs = [("ttft_cdf.png", ttft_figure(ttfts, title))]
    if capacity_curve:
        figs.append(("hit_vs_capacity.png", capacity_figure(capacity_curve, title)))
    if results and results[0].per_worker_requests:
        figs.append(("load_balance.png", load_figure(results, title)))
    paths = []
    for name, fig in figs:
        p = os.path.join(out_dir, name)
        fig.savefig(p, bbox_inches="tight")
        plt.close(fig)
        paths.append(p)
    return paths
