"""A private ``redis-server`` for the benches that need a sync channel (Debian's redis-server)."""
from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from typing import Iterator


@contextlib.contextmanager
def private_redis(url: str | None = None, *, needed: bool = True) -> Iterator[str | None]:
    """Yield ``url`` if given; else start ``redis-server`` on a free 127.0.0.1 port (no persistence) and
    yield its URL, killing it afterwards; yield None when not ``needed``."""
    if url or not needed:
        yield url
        return
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("needs redis-server (apt-get install redis-server) or --sync-url")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:  # ready when it accepts a connection
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise SystemExit("redis-server did not start")
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait()
