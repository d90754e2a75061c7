"""Start ``kvroute serve`` as a child process and wait until it is ready.

The server prints one JSON line ``{"event": "ready", "address": ..., "http_port": ...}``
on stdout once it answers requests (see :mod:`kvroute.sidecar.cli`).  Used by the
end-to-end tests and ``bench/sidecar.py``; handy for users' own integration tests.
"""
from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from typing import Any, Sequence

from .errors import SidecarError


class SidecarStartError(SidecarError):
    """The server exited, or printed no ready line before the deadline."""


def spawn_serve(
    config_path: str,
    *,
    args: Sequence[str] = (),
    timeout_s: float = 60.0,
    log_level: str = "WARNING",
    env: dict[str, str] | None = None,
) -> tuple[subprocess.Popen, dict[str, Any]]:
    """Run ``kvroute serve --config CONFIG_PATH [ARGS]``; return the process and its ready line.

    On failure the process is killed and :class:`SidecarStartError` carries what it printed.
    """
    cmd = [sys.executable, "-m", "kvroute.cli", "serve", "--config", config_path, "--log-level", log_level, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ if env is None else env, PYTHONUNBUFFERED="1"))
    assert proc.stdout is not None and proc.stderr is not None
    buf = b""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            buf += chunk
            if b"\n" in buf:
                return proc, json.loads(buf.split(b"\n", 1)[0])
        if proc.poll() is not None:
            break
    proc.kill()
    proc.wait()
    raise SidecarStartError(f"kvroute serve did not start: stdout {buf!r} stderr {proc.stderr.read()[-2000:]!r}")
