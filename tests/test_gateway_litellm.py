"""LiteLLM drop-in: a real litellm.Router, KVRouteStrategy installed, fake OpenAI backends on 127.0.0.1.

Needs the ``litellm`` extra (``pip install -e ".[litellm]"``); skipped with a reason otherwise.
"""
from __future__ import annotations

import asyncio
import os
import time

import pytest

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no network fetch at import
litellm = pytest.importorskip("litellm", reason="the LiteLLM drop-in test needs the 'litellm' extra: pip install -e '.[litellm]'")
pytest.importorskip("transformers", reason="the LiteLLM drop-in test needs transformers (in the 'litellm' extra)")
web = pytest.importorskip("aiohttp.web", reason="the fake backends need aiohttp (in the 'litellm' extra)")

from kvroute.gateways.litellm_strategy import HFTokenizer, KVRouteStrategy  # noqa: E402
from kvroute.kvindex.hashing import block_hash_list  # noqa: E402

BLOCK = 4
MODEL = "tiny"


def _make_tokenizer(out) -> None:
    """A byte-level BPE trained here (no download) with a chat template, saved as a model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["you are a helpful assistant. answer the question concisely. " * 3,
                             "the quick brown fox jumps over the lazy dog"] * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    fast.save_pretrained(str(out))


class Backend:
    """A fake OpenAI-compatible engine: answers chat completions with its own name."""

    def __init__(self, name: str, *, fail: bool = False, delay_s: float = 0.0) -> None:
        self.name, self.fail, self.delay_s = name, fail, delay_s
        self.requests = 0
        self.port = 0
        self._runner = None

    async def _chat(self, request):
        body = await request.json()
        self.requests += 1
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        if self.fail:
            return web.json_response({"error": {"message": f"{self.name} is down", "type": "server_error"}}, status=500)
        return web.json_response({
            "id": f"cmpl-{self.requests}", "object": "chat.completion", "created": 1, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": self.name}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._chat)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)  # a free port
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        await self._runner.cleanup()


async def _poll(cond, timeout_s: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _deployment(b: Backend) -> dict:
    return {"model_name": MODEL, "litellm_params": {"model": f"openai/{MODEL}", "api_key": "x",
                                                    "api_base": f"http://127.0.0.1:{b.port}/v1"},
            "model_info": {"id": b.name}}


@pytest.fixture
def tokenizer_dir(tmp_path):
    _make_tokenizer(tmp_path / "tok")
    return tmp_path / "tok"


def _run(coro):
    return asyncio.run(coro)


def _conversation(fam: int, turns: int) -> list[dict]:
    msgs = [{"role": "system", "content": f"you are assistant number {fam}. " + "answer the question concisely. " * 3}]
    for t in range(turns):
        msgs += [{"role": "user", "content": f"question {t} about the quick brown fox"},
                 {"role": "assistant", "content": f"answer {t}: the lazy dog"}]
    return msgs + [{"role": "user", "content": "and now?"}]


def test_hf_tokenizer_renders_the_template_like_vllm(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = HFTokenizer(tokenizer_dir)
    ref = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    msgs = _conversation(0, 1)
    text = ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<s><system>") and text.endswith("<assistant>")
    assert tok.encode_chat(msgs) == ref.encode(text, add_special_tokens=False)
    assert tok.encode_prompt("hello") == ref.encode("hello")


def test_shared_prefixes_stick_and_load_is_released(tokenizer_dir):
    async def main():
        backends = [Backend("a", delay_s=0.3), Backend("b", delay_s=0.3)]
        for b in backends:
            await b.start()
        router = litellm.Router(model_list=[_deployment(b) for b in backends], num_retries=0)
        strat = KVRouteStrategy.from_pretrained(router, tokenizer_dir, block_size=BLOCK).install()
        try:
            first = {}
            for fam in range(4):
                r = await router.acompletion(model=MODEL, messages=_conversation(fam, 0))
                first[fam] = r.choices[0].message.content
            await _poll(lambda: strat.in_flight() == 0, what="first answers released")
            g = strat.groups[MODEL]
            # each family's prompt is credited (approximate index) to the backend that answered it
            tok = HFTokenizer(tokenizer_dir)
            for fam in range(4):
                ids = tok.encode_chat(_conversation(fam, 0))
                held = {w: ov.total for w, ov in g.router.index.match(block_hash_list(ids, BLOCK)).items() if ov.total}
                # the whole prompt on the backend that answered; at most the shared system-prompt head elsewhere
                assert held.pop(first[fam]) == len(ids) // BLOCK, (fam, held)
                assert all(n < len(ids) // BLOCK for n in held.values()), (fam, held)
            # follow-up turns of each conversation, concurrently: they stick to their backend
            calls = [router.acompletion(model=MODEL, messages=_conversation(fam, turns))
                     for turns in (1, 2) for fam in range(4)]
            tasks = [asyncio.ensure_future(c) for c in calls]
            await _poll(lambda: strat.in_flight() > 0, what="requests in flight")
            assert g.router.in_flight() == strat.in_flight() > 0
            got = [r.choices[0].message.content for r in await asyncio.wait_for(asyncio.gather(*tasks), 60)]
            expect = [first[fam] for turns in (1, 2) for fam in range(4)]
            assert got == expect
            await _poll(lambda: strat.in_flight() == 0 and g.router.in_flight() == 0, what="load released")
            for w in g.router.workers():
                s = g.router.worker_state(w)
                assert (s.active_requests, s.prefill_tokens, s.decode_blocks) == (0, 0, 0)
            assert g.stats.succeeded == 12 and g.stats.failed == 0 and g.stats.unroutable == 0
            assert {b.name for b in backends} >= set(first.values())
        finally:
            strat.uninstall()
            for b in backends:
                await b.stop()

    _run(main())


def test_failed_backend_releases_load_and_the_retry_goes_elsewhere(tokenizer_dir):
    async def main():
        good, bad = Backend("good"), Backend("bad", fail=True)
        for b in (good, bad):
            await b.start()
        router = litellm.Router(model_list=[_deployment(good), _deployment(bad)], num_retries=1,
                                retry_after=0, allowed_fails=100)
        strat = KVRouteStrategy.from_pretrained(router, tokenizer_dir, block_size=BLOCK).install()
        try:
            msgs = _conversation(7, 2)
            ids = HFTokenizer(tokenizer_dir).encode_chat(msgs)
            g = strat._group(MODEL)
            g.sync(["good", "bad"])
            with g.router.lock:  # a KV event: "bad" holds the whole prompt, so kvroute picks it first
                g.router.index.store("bad", block_hash_list(ids, BLOCK))
            r = await router.acompletion(model=MODEL, messages=msgs)
            assert r.choices[0].message.content == "good"
            assert bad.requests >= 1 and good.requests == 1
            await _poll(lambda: strat.in_flight() == 0 and g.router.in_flight() == 0, what="load released")
            assert g.stats.failed >= 1 and g.stats.succeeded == 1
            # without retries the failure itself releases the load
            router0 = litellm.Router(model_list=[_deployment(bad)], num_retries=0)
            s0 = KVRouteStrategy.from_pretrained(router0, tokenizer_dir, block_size=BLOCK).install()
            try:
                with pytest.raises(Exception):
                    await router0.acompletion(model=MODEL, messages=msgs)
                await _poll(lambda: s0.in_flight() == 0, what="failed request released")
                assert s0.groups[MODEL].stats.failed == 1
            finally:
                s0.uninstall()
        finally:
            strat.uninstall()
            for b in (good, bad):
                await b.stop()

    _run(main())


def test_sync_completion_path(tokenizer_dir):
    async def serve_and_call():
        b = Backend("only")
        await b.start()
        router = litellm.Router(model_list=[_deployment(b)], num_retries=0)
        strat = KVRouteStrategy.from_pretrained(router, tokenizer_dir, block_size=BLOCK).install()
        try:
            r = await asyncio.to_thread(router.completion, model=MODEL, messages=_conversation(1, 0))
            assert r.choices[0].message.content == "only"
            await _poll(lambda: strat.in_flight() == 0, what="sync request released")
            assert strat.groups[MODEL].stats.succeeded == 1
        finally:
            strat.uninstall()
            await b.stop()

    _run(serve_and_call())
