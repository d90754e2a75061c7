"""A real vLLM engine in a child process, and kvroute's side of it, for the interop tests.

* :class:`EngineProcess` -- ``engine_driver.py`` under the interop venv's python.
* :class:`Follower` -- one :class:`~kvroute.kvindex.KVIndex` fed by one
  :class:`~kvroute.adapters.subscriber.KVEventSubscriber`, with the batch counts
  each engine reported, so a test can wait for exactly the events it caused.

The engine never runs in the test process: :class:`EngineProcess` starts
``tests/interop/engine_driver.py`` under the interop venv's python
(``KVROUTE_VLLM_PYTHON``, exported by ``.ci/run`` from ``.ci/setup_vllm``) and
talks to it over the driver's JSON-lines protocol.  The tests themselves use
kvroute from this process, as a router would.

Skips (with the reason) when ``KVROUTE_VLLM_PYTHON`` is unset, not executable,
cannot import vllm, or the tiny model (``KVROUTE_VLLM_MODEL``, default
``<venv>-model`` as ``.ci/setup_vllm`` builds it) is missing.
"""

from __future__ import annotations

import json
import os
import random
import select
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from kvroute.adapters.subscriber import KVEventSubscriber
from kvroute.kvindex import KVIndex


DRIVER = Path(__file__).with_name("engine_driver.py")
#: Seconds an engine may take to start (about 30-40 s on 2 cores).
START_TIMEOUT_S = float(os.environ.get("KVROUTE_VLLM_START_TIMEOUT_S", 300.0))
#: Seconds one request may take (a few hundred tokens: ~0.05 s).
REQUEST_TIMEOUT_S = 60.0


#: Ports free_port() has handed out in this process (never handed out twice).
_HANDED_OUT: set[int] = set()


def _ephemeral_low() -> int:
    """Lowest port of the kernel's ephemeral range (ports the OS hands to bind(0) and connect())."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port nobody listens on right now, on any interface (engines bind ``tcp://*:port``).

    Picked below the ephemeral range, so that engines starting at the same time cannot take it for their
    own auto-assigned sockets before the engine it is meant for binds it (a bind(0) port came from that
    range, and a CI run lost an engine to "Address already in use"), and never the same port twice."""
    low = _ephemeral_low()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    with socket.socket() as s:  # fall back on the kernel's choice
        s.bind(("", 0))
        port = s.getsockname()[1]
    _HANDED_OUT.add(port)
    return port


def vllm_env_or_reason() -> tuple[str, str] | str:
    """(python, model dir) of the interop venv, or the reason it is unusable."""
    py = os.environ.get("KVROUTE_VLLM_PYTHON")
    if not py:
        return "KVROUTE_VLLM_PYTHON is not set (run .ci/setup_vllm and export its output)"
    if not os.access(py, os.X_OK):
        return f"KVROUTE_VLLM_PYTHON={py} is not an executable"
    venv = Path(py).parent.parent  # <venv>/bin/python (not resolved: the venv's python is a symlink)
    model = os.environ.get("KVROUTE_VLLM_MODEL") or f"{venv}-model"
    if not Path(model, "config.json").is_file():
        return f"tiny model not found at {model} (set KVROUTE_VLLM_MODEL or rerun .ci/setup_vllm)"
    probe = subprocess.run([py, "-c", "import importlib.util as u, sys; sys.exit(u.find_spec('vllm') is None)"],
                           capture_output=True, timeout=60)
    if probe.returncode != 0:
        return f"{py} cannot find vllm"
    return py, model


class EngineError(AssertionError):
    """The engine process died or did not answer in time (message ends with its log tail)."""


class EngineProcess:
    """A real vLLM engine behind ``engine_driver.py``; one request at a time."""

    def __init__(self, python: str, model: str, *, port: int, replay_port: int, num_gpu_blocks: int,
                 extra_env: dict[str, str] | None = None, max_model_len: int = 2048) -> None:
        #: PUB and replay ports the engine binds (on every interface, as ``tcp://*:P``).
        self.port, self.replay_port = port, replay_port
        self.log = tempfile.NamedTemporaryFile(prefix="vllm-engine-", suffix=".log", delete=False)
        env = dict(os.environ)
        env.pop("KVROUTE_VLLM_GPU_EVICTION", None)
        env.update(extra_env or {})
        self.proc = subprocess.Popen(
            [python, str(DRIVER), "--model", model, "--port", str(port), "--replay-port", str(replay_port),
             "--num-gpu-blocks", str(num_gpu_blocks), "--max-model-len", str(max_model_len)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, env=env,
        )
        #: The driver's ready line (load_s, vllm version, num_gpu_blocks, gpu_eviction).
        self.info: dict[str, Any] = {}

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    @property
    def replay_endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.replay_port}"

    def log_tail(self, n: int = 40) -> str:
        try:
            lines = Path(self.log.name).read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise EngineError(f"engine did not answer within {timeout:.0f} s\n{self.log_tail()}")
            ready, _, _ = select.select([self.proc.stdout], [], [], min(left, 1.0))
            if ready:
                line = self.proc.stdout.readline()
                if not line:
                    raise EngineError(f"engine exited (rc={self.proc.wait()})\n{self.log_tail()}")
                return json.loads(line)
            if self.proc.poll() is not None:
                raise EngineError(f"engine exited (rc={self.proc.returncode})\n{self.log_tail()}")

    def wait_ready(self) -> dict[str, Any]:
        self.info = self._read(START_TIMEOUT_S)
        assert self.info.get("ready"), self.info
        return self.info

    def call(self, msg: dict[str, Any], timeout: float = REQUEST_TIMEOUT_S) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        return self._read(timeout)

    def generate(self, prompt: list[int], max_tokens: int = 1, cache_salt: str | None = None) -> dict[str, Any]:
        """Run one request; returns num_cached_tokens, num_prompt_tokens, last_seq."""
        msg: dict[str, Any] = {"prompt": list(prompt), "max_tokens": max_tokens}
        if cache_salt is not None:
            msg["cache_salt"] = cache_salt
        return self.call(msg)

    def cached_hashes(self) -> list[int | bytes]:
        """Engine hashes (as its events name them) of every block in the engine's GPU prefix cache."""
        return [bytes.fromhex(h) if isinstance(h, str) else h for h in self.call({"cmd": "cached"})["hashes"]]

    def reset_prefix_cache(self) -> dict[str, Any]:
        return self.call({"cmd": "reset"})

    def close_input(self) -> None:
        """Close stdin: the driver shuts the engine down and exits (see :meth:`stop`)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass

    def stop(self, timeout: float = 60.0) -> int:
        """Close stdin (the driver shuts the engine down) and wait; kill if it hangs."""
        if self.proc.poll() is None:
            self.close_input()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if not self.log.closed:
            self.log.close()
            os.unlink(self.log.name)
        return self.proc.returncode


# ------------------------------------------------------------------ kvroute's side
#: Tokens per block in every interop engine.
BS = 32
#: GPU cache of the engine in blocks (one is vLLM's null block): small enough to evict often.
NUM_GPU_BLOCKS = 24
#: Seconds the subscriber may lag behind a finished request.
SYNC_TIMEOUT_S = 30.0
VOCAB = range(3, 259)  # the tiny model has 3 special tokens, 256 byte tokens, then merges


def predicted_cached(index: KVIndex, worker: Any, prompt: list[int], cache_salt: str | None = None) -> int:
    """Tokens the engine will report cached for ``prompt``, by kvroute's index."""
    ov = index.match_tokens(prompt, BS, cache_salt=cache_salt).get(worker)
    blocks = ov.total if ov is not None else 0
    return min(blocks, (len(prompt) - 1) // BS) * BS


class Follower:
    """kvroute's side of a fleet: one index, one subscriber, batches expected per worker."""

    def __init__(self, *workers: str) -> None:
        self.workers = workers
        self.worker = workers[0]  # the single-engine test's worker
        self.index = KVIndex(block_size=BS)
        self.sub = KVEventSubscriber(self.index)
        #: {worker: batches published by its earlier engine lifetimes} (seq restarts at 0).
        self.published_before = dict.fromkeys(workers, 0)
        #: {worker: batches published by the current lifetime} (last_seq + 1 of its latest reply).
        self.published_now = dict.fromkeys(workers, 0)
        #: One record per request: worker, prompt length, predicted and reported cached tokens.
        self.log: list[dict[str, Any]] = []

    def follow(self, eng: EngineProcess, worker: str | None = None) -> None:
        self.sub.add_worker(worker or self.worker, eng.endpoint, eng.replay_endpoint)

    def applied(self, worker: str) -> int:
        return self.sub.metrics()["workers"][worker]["batches"]

    def sync(self, worker: str, timeout: float = SYNC_TIMEOUT_S) -> bool:
        """Poll until every batch the worker's engine published has been applied."""
        want = self.published_before[worker] + self.published_now[worker]
        deadline = time.monotonic() + timeout
        while self.applied(worker) < want:
            if time.monotonic() > deadline:
                return False
            self.sub.poll(100)
        return True

    def request(self, eng: EngineProcess, prompt: list[int], tag: str, *, worker: str | None = None,
                predicted: int | None = None, sync_timeout: float = SYNC_TIMEOUT_S,
                cache_salt: str | None = None) -> dict:
        """Send ``prompt`` to ``eng``; ``predicted`` defaults to the index's prediction."""
        worker = worker or self.worker
        pred = predicted_cached(self.index, worker, prompt, cache_salt) if predicted is None else predicted
        r = eng.generate(prompt, cache_salt=cache_salt)
        assert r["num_prompt_tokens"] == len(prompt)
        self.published_now[worker] = r["last_seq"] + 1
        rec = {"tag": tag, "worker": worker, "n": len(prompt), "predicted": pred, "reported": r["num_cached_tokens"]}
        self.log.append(rec)
        rec["synced"] = self.sync(worker, sync_timeout)
        return rec

    def new_lifetime(self, worker: str | None = None) -> None:
        worker = worker or self.worker
        self.published_before[worker] += self.published_now[worker]
        self.published_now[worker] = 0

    def close(self) -> None:
        self.sub.close()


def start_and_sync(f: Follower, eng: EngineProcess, rng: random.Random, worker: str | None = None) -> None:
    """Wait for the engine, then send unique probes until the subscriber is in step.

    A SUB socket may join after the engine's first batch went out; the next
    batch then opens a gap that the subscriber fills from the replay endpoint.
    """
    eng.wait_ready()
    for attempt in range(3):
        rec = f.request(eng, [rng.choice(VOCAB) for _ in range(40)], f"probe{attempt}", worker=worker, sync_timeout=2.0)
        rec["probe"] = True  # may legitimately miss its batch (slow joiner); the next probe replays it
        if rec["synced"]:
            return
    raise AssertionError(f"subscriber never caught up with the engine: {f.sub.metrics()}")


