"""A new user's first hour (issue 17, item 11): plots, table, CLI and trace errors."""
from __future__ import annotations

import logging
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from kvroute.sim.metrics import Summary
from kvroute.sim.report import capacity_figure, load_figure, table, ttft_figure
from kvroute.sim.workloads import from_spec
from kvroute.traces import TraceError, load_trace

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _check_figure(fig, n_series):
    fig.canvas.draw()
    ax = fig.axes[0]
    lines = [ln for ln in ax.get_lines() if ln.get_label() and not ln.get_label().startswith("_")]
    if lines:
        styles = {(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in lines}
        assert len(styles) == n_series, "two series drawn alike"
    leg = ax.get_legend()
    assert leg is not None and len(leg.get_texts()) == n_series
    r = fig.canvas.get_renderer()
    assert leg.get_window_extent(r).x0 >= ax.get_window_extent(r).x1, "legend over the data"
    lo, hi = ax.get_xlim()
    labels = [t.get_text() for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi]
    assert len(labels) >= 2 and all(labels), f"empty x ticks: {labels}"
    plt.close(fig)


def test_plots_keep_16_series_apart_with_legends_outside_and_labelled_ticks():
    rng = np.random.default_rng(0)
    n = 16
    ttfts = {f"policy{i}/lru": rng.uniform(0.2, 0.9, 40) for i in range(n)}  # inside one decade on a log axis
    _check_figure(ttft_figure(ttfts), n)
    curve = {f"policy{i}/lru": [(100, 0.1 + i / 100), (300, 0.2 + i / 100), (800, 0.3 + i / 100)] for i in range(n)}
    _check_figure(capacity_figure(curve), n)
    results = [Summary(f"r{i}", "lru", per_worker_requests=[10 + i, 20, 30, 40]) for i in range(n)]
    fig = load_figure(results)
    fig.canvas.draw()
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["0", "1", "2", "3"]  # one tick per worker
    r = fig.canvas.get_renderer()
    assert ax.get_legend().get_window_extent(r).x0 >= ax.get_window_extent(r).x1
    plt.close(fig)


def test_table_explains_its_star():
    a = Summary("kvroute", "lru", requests=10, ttft_mean_s=0.5, ttft_p99_s=1.0)
    b = Summary("dynamo", "lru", requests=10, ttft_mean_s=0.7, ttft_p99_s=2.0)
    out = table([a, b])
    assert "0.500*" in out and out.splitlines()[-1].startswith("* lowest TTFT")


def test_generator_parameters_and_empty_traces_give_clean_errors(tmp_path):
    with pytest.raises(TraceError, match="unknown parameter foo.*takes: n_requests"):
        from_spec("gen:shared_system_prompt:foo=1")
    p = tmp_path / "empty.jsonl"
    p.write_text("\n\n")
    with pytest.raises(TraceError, match="no requests"):
        load_trace(p)


def test_out_of_order_timestamps_are_reported(tmp_path, caplog):
    p = tmp_path / "t.jsonl"
    p.write_text("\n".join('{"timestamp": %d, "input_length": 8, "output_length": 1, "hash_ids": [1]}' % t
                           for t in (5, 2, 9, 3)) + "\n")
    with caplog.at_level(logging.WARNING, logger="kvroute.traces"):
        reqs = load_trace(p)
    assert [r.arrival_s for r in reqs] == [0.002, 0.003, 0.005, 0.009]
    assert any("2 of 4 requests" in r.getMessage() and "line 2" in r.getMessage() for r in caplog.records)


def test_serve_help_shows_defaults_and_python_m_kvroute_works():
    from kvroute.sidecar.cli import serve

    out = CliRunner().invoke(serve, ["--help"]).output
    for d in ("[default: tcp://127.0.0.1:5600]", "[default: 9600]", "[default: 16]", "[default: kvroute]"):
        assert d in " ".join(out.split()), d
    res = subprocess.run([sys.executable, "-m", "kvroute", "--help"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "serve" in res.stdout and "sim" in res.stdout


def test_readme_and_docs_agree_on_the_http_port_and_show_the_demo():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text() + (root / "docs" / "protocol.md").read_text()
    ports = set(re.findall(r"--http-port (\d+)", text)) | set(re.findall(r"HOST:(\d+)/metrics", text))
    assert ports == {"9600"}, ports
    assert "kvroute demo" in (root / "README.md").read_text()
