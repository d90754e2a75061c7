"""A real Redis server for the replica-sync tests (Debian's ``redis-server``; `.ci/run` installs it).

* :func:`shared_url` -- the server `.ci/run` started (``KVROUTE_TEST_REDIS_URL``); tests use a
  fresh stream key each, so they never see each other's batches.
* :class:`RedisProcess` -- a private server on a free port, for tests that stop and restart it.

Tests skip with the reason when no server binary or URL is available (outside CI).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid

import pytest

redis = pytest.importorskip("redis", reason="redis-py not installed (pip install 'kvroute[sync]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stream_key() -> str:
    return f"kvroute:test:{uuid.uuid4().hex}"


def shared_url() -> str:
    """The CI server's URL, else a local server's default port, else skip."""
    url = os.environ.get("KVROUTE_TEST_REDIS_URL", "")
    if not url:
        pytest.skip("no Redis server for the sync tests: set KVROUTE_TEST_REDIS_URL (.ci/run starts one)")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except Exception as exc:
        pytest.skip(f"Redis at {url} not answering: {exc}")
    return url


class RedisProcess:
    """``redis-server`` on 127.0.0.1:port without persistence; stop() and start() it again at will."""

    def __init__(self, port: int | None = None) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            pytest.skip("redis-server not installed (apt-get install redis-server; .ci/run does)")
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 10.0) -> "RedisProcess":
        self.proc = subprocess.Popen([self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                                      "--appendonly", "no", "--protected-mode", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                r.ping()
                return self
            except redis.exceptions.ConnectionError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("redis-server did not start")
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None
