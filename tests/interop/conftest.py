"""Fixtures of the real-vLLM interop tests: ``vllm_env`` (skips with the reason when
the interop venv is unusable) and ``start_engine`` (engines stopped at teardown).
The engine process itself lives in ``engine_process.py``."""

from __future__ import annotations

from typing import Any, Iterator

import pytest

from engine_process import EngineProcess, vllm_env_or_reason


@pytest.fixture(scope="session")
def vllm_env() -> tuple[str, str]:
    env = vllm_env_or_reason()
    if isinstance(env, str):
        pytest.skip(env)
    return env


@pytest.fixture
def start_engine(vllm_env: tuple[str, str]) -> Iterator[Any]:
    """``start_engine(port=..., replay_port=..., num_gpu_blocks=..., extra_env=...)`` ->
    a started :class:`EngineProcess` (not yet waited for); all are stopped at teardown."""
    py, model = vllm_env
    engines: list[EngineProcess] = []

    def start(**kw: Any) -> EngineProcess:
        eng = EngineProcess(py, model, **kw)
        engines.append(eng)
        return eng

    yield start
    for eng in engines:  # let them all shut down at once
        eng.close_input()
    for eng in engines:
        eng.stop()
