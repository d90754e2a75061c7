"""``kvroute proxy`` command line: help, and clear errors for bad engine specs."""
from __future__ import annotations

import http.server
import json
import threading

import pytest
from click.testing import CliRunner

from kvroute.cli import main
from kvroute.serving.engines import EngineSpec


def test_help_lists_options() -> None:
    out = CliRunner().invoke(main, ["proxy", "--help"])
    assert out.exit_code == 0
    for opt in ("--engine", "--block-size", "--policy", "--scrape-interval", "--fail-threshold", "--tokenizer"):
        assert opt in out.output


@pytest.mark.parametrize("spec", ["e0", "e0=", "=http://h:1", "e0=ftp://h:1", "e0=http://h:99999",
                                  "e0=http://h:1,udp://h:2", "e0=http://h:1,tcp://a:1,tcp://a:2,tcp://a:3"])
def test_bad_engine_specs_are_usage_errors(spec: str) -> None:
    out = CliRunner().invoke(main, ["proxy", "--engine", spec])
    assert out.exit_code == 2 and "--engine" in out.output


def test_engine_spec_forms() -> None:
    assert EngineSpec.parse("e0=http://h:8000/v1/") == EngineSpec("e0", "http://h:8000")
    s = EngineSpec.parse("e1=http://h:8000,tcp://h:5557,tcp://h:5558")
    assert (s.events, s.replay) == ("tcp://h:5557", "tcp://h:5558")


class _Engine(threading.Thread):
    """An engine's /v1/models and /metrics, served from a thread (``build`` fetches them synchronously)."""

    def __init__(self, block_size: int, num_gpu_blocks: int) -> None:
        super().__init__(daemon=True)
        metrics = (f'vllm:cache_config_info{{block_size="{block_size}",engine="0",'
                   f'num_gpu_blocks="{num_gpu_blocks}"}} 1.0\n').encode()
        models = json.dumps({"data": [{"id": "tiny", "root": "/nonexistent", "max_model_len": 4096}]}).encode()

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = models if self.path == "/v1/models" else metrics
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def run(self) -> None:
        self.server.serve_forever()


def test_build_reads_kv_pools_and_refuses_a_block_size_mismatch(tokenizer_dir: object) -> None:
    from kvroute.serving.cli import build

    e0, e1 = _Engine(16, 700), _Engine(16, 900)
    for e in (e0, e1):
        e.start()
    try:
        runner = build([EngineSpec("e0", e0.url), EngineSpec("e1", e1.url)], tokenizer=str(tokenizer_dir),
                       block_size=16, approximate="all", approx_ttl=5.0)
        r = runner.proxy.router
        assert {w["worker"]: w["capacity_blocks"] for w in r.stats()["workers"]} == {"e0": 700, "e1": 900}
        assert set(r.approximate_workers()) == {"e0", "e1"} and r._approx.ttl_s == 5.0
        with pytest.raises(ValueError, match="KV blocks of 16 tokens but --block-size is 32"):
            build([EngineSpec("e0", e0.url)], tokenizer=str(tokenizer_dir), block_size=32)
    finally:
        for e in (e0, e1):
            e.server.shutdown()
