"""Fixtures of the serving tests: a locally trained tokenizer (the interop model's, without weights)
and a harness that runs fake engines + the proxy on 127.0.0.1 inside one asyncio loop."""
from __future__ import annotations

import socket
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import pytest

pytest.importorskip("aiohttp")
pytest.importorskip("transformers")

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "interop"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from make_tiny_llama import build_tokenizer

    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def engine_tokenizer(tokenizer_dir: Path) -> Any:
    from kvroute.serving.tokenize import EngineTokenizer

    return EngineTokenizer.from_pretrained(tokenizer_dir, max_model_len=4096)


def closed_port() -> int:
    """A port nothing listens on (bound then released; connections to it are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Harness:
    """Fake engines + proxy; ``client`` posts to the proxy."""

    def __init__(self) -> None:
        self.engines: dict[str, Any] = {}
        self.runners: list[Any] = []
        self.proxy: Any = None
        self.url = ""
        self.client: Any = None

    async def post(self, path: str, body: Any = None, *, raw: bytes | None = None, headers: dict | None = None) -> tuple[int, Any]:
        import json

        data = raw if raw is not None else json.dumps(body).encode()
        async with self.client.post(self.url + path, data=data,
                                    headers={"Content-Type": "application/json", **(headers or {})}) as r:
            text = await r.read()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, text


async def _serve(app: Any, **kw: Any) -> tuple[Any, int]:
    from aiohttp import web

    runner = web.AppRunner(app, access_log=None, **kw)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


@asynccontextmanager
async def harness(engine_tokenizer: Any, *, live: int = 2, dead: int = 0, policy: Any = "kvroute",
                  block_size: int = 16, **cfg: Any) -> AsyncIterator[Harness]:
    """``live`` fake engines e0..; ``dead`` refused ones d0..; the proxy in front of all of them."""
    import aiohttp

    from fake_vllm import FakeVLLM
    from kvroute.router import Router
    from kvroute.serving.engines import EnginePool, EngineSpec
    from kvroute.serving.proxy import Proxy, ProxyConfig

    h = Harness()
    specs = []
    for i in range(live):
        eng = FakeVLLM(engine_tokenizer, block_size=block_size)
        runner, port = await _serve(eng.app())
        h.runners.append(runner)
        h.engines[f"e{i}"] = eng
        specs.append(EngineSpec(f"e{i}", f"http://127.0.0.1:{port}"))
    for i in range(dead):
        specs.append(EngineSpec(f"d{i}", f"http://127.0.0.1:{closed_port()}"))
    pool_kw = {k: cfg.pop(k) for k in ("fail_threshold", "probe_interval_s", "scrape_interval_s") if k in cfg}
    router = Router([s.name for s in specs], block_size, policy=policy)
    pool = EnginePool(router, specs, **pool_kw)
    h.proxy = Proxy(router, engine_tokenizer, pool, ProxyConfig(served_models=("tiny",), max_model_len=4096, **cfg))
    runner, port = await _serve(h.proxy.app(), handler_cancellation=True)
    h.runners.append(runner)
    h.url = f"http://127.0.0.1:{port}"
    h.client = aiohttp.ClientSession()
    try:
        yield h
    finally:
        await h.client.close()
        for r in reversed(h.runners):
            await r.cleanup()
