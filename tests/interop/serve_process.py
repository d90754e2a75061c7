"""Real ``vllm serve`` (OpenAI server) processes for the proxy's interop tests and ``bench/real_cluster.py``.

:class:`ServeProcess` starts vLLM's OpenAI server from the interop venv
(``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` console script
of the CPU wheel looks for a distribution named ``vllm`` and fails) with prefix
caching, ``--enable-prompt-tokens-details`` and KV events on a PUB + replay
port pair, its Prometheus ``/metrics`` on (vLLM's ``--disable-log-stats`` would
also drop the load gauges the proxy scrapes), and waits for ``/v1/models`` with a poll (no fixed sleeps).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any


class ServeError(AssertionError):
    """The server died or did not answer in time (message ends with its log tail)."""


class ServeProcess:
    """One ``vllm serve`` process; :meth:`start` then :meth:`wait_ready`."""

    def __init__(self, python: str, model: str, *, port: int, events_port: int, replay_port: int,
                 block_size: int = 32, max_model_len: int = 2048, served_name: str = "tiny",
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None,
                 kv_cache_gib: int = 1, threads: int | None = 1) -> None:
        self.python, self.model = python, model
        self.port, self.events_port, self.replay_port = port, events_port, replay_port
        self.block_size = block_size
        self.served_name = served_name
        kv = {"enable_kv_cache_events": True, "publisher": "zmq", "endpoint": f"tcp://*:{events_port}",
              "replay_endpoint": f"tcp://*:{replay_port}", "topic": ""}
        self.args = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
                     "--port", str(port), "--served-model-name", served_name, "--block-size", str(block_size),
                     "--enable-prefix-caching", "--enable-prompt-tokens-details", "--max-model-len",
                     str(max_model_len), "--kv-events-config", json.dumps(kv),
                     "--uvicorn-log-level", "warning", *(extra_args or [])]
        self.env = dict(os.environ)
        self.env.update({"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "TOKENIZERS_PARALLELISM": "false",
                         "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"})
        if threads is not None:
            self.env.update({"OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind"})
        self.env.update(env or {})
        self.proc: subprocess.Popen | None = None
        self.log = tempfile.NamedTemporaryFile(prefix=f"vllm-serve-{port}-", suffix=".log", delete=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def events(self) -> str:
        return f"tcp://127.0.0.1:{self.events_port}"

    @property
    def replay(self) -> str:
        return f"tcp://127.0.0.1:{self.replay_port}"

    def engine_arg(self, name: str) -> str:
        """The proxy's ``--engine`` value for this server."""
        return f"{name}={self.url},{self.events},{self.replay}"

    def start(self) -> "ServeProcess":
        self.proc = subprocess.Popen(self.args, stdout=self.log, stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        return self

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ready(self, timeout: float = 240.0) -> "ServeProcess":
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.alive():
                raise ServeError(f"vllm serve on {self.port} exited ({self.proc and self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/v1/models", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise ServeError(f"vllm serve on {self.port} not ready after {timeout} s:\n{self.tail()}")

    def kill(self) -> None:
        """SIGKILL the whole process group (the API server and its engine core), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()

    def tail(self, n: int = 4000) -> str:
        try:
            with open(self.log.name, "rb") as f:
                return f.read()[-n:].decode("utf-8", "replace")
        except OSError:
            return ""

    def post(self, path: str, body: dict[str, Any], timeout: float = 60) -> Any:
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())
