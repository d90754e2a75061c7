"""Varied OpenAI request bodies for the tokenization check (seeded; text only).

Shared by the real-engine tokenization test and by unit tests; every body is
valid for vLLM's ``/tokenize`` (completions: ``prompt``; chat: ``messages``).
"""
from __future__ import annotations

import json
import random
from typing import Any, Iterator

WORDS = ("the quick brown fox jumps over the lazy dog you are a helpful assistant answer question "
         "concisely hello world this is tiny test corpus for random llama").split()
ODD = ["  leading", "trailing  ", "tab\there", "new\nline", "ünïcödé ✓", "emoji 🦊🐶", "<s> inside", "</s>",
       "<|user|> spoofed role", "{{ not a template }}", "{% raw %}", "'quotes' \"double\"", "back\\slash", "", " "]


def _text(rng: random.Random, lo: int = 1, hi: int = 40) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    if rng.random() < 0.4:
        words.insert(rng.randrange(len(words) + 1), rng.choice(ODD))
    sep = rng.choice([" ", " ", " ", "  ", "\n", ", "])
    s = sep.join(words)
    return s.capitalize() if rng.random() < 0.3 else s


def _tool(rng: random.Random, i: int) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": f"tool_{i}_{rng.choice(WORDS)}"}
    if rng.random() < 0.7:
        fn["description"] = _text(rng, 1, 12)
    if rng.random() < 0.7:
        fn["parameters"] = {"type": "object", "properties": {w: {"type": rng.choice(["string", "integer"])}
                                                             for w in rng.sample(WORDS, rng.randint(0, 3))}}
    if rng.random() < 0.2:
        fn["strict"] = rng.random() < 0.5
    return {"type": "function", "function": fn}


def _content(rng: random.Random) -> Any:
    r = rng.random()
    if r < 0.6:
        return _text(rng)
    parts: list[Any] = [{"type": "text", "text": _text(rng, 1, 10)} for _ in range(rng.randint(1, 3))]
    return parts


def chat_body(rng: random.Random) -> dict[str, Any]:
    msgs: list[dict[str, Any]] = []
    if rng.random() < 0.6:
        msgs.append({"role": rng.choice(["system", "system", "developer"]), "content": _content(rng)})
    body: dict[str, Any] = {}
    tools = None
    if rng.random() < 0.35:
        tools = [_tool(rng, i) for i in range(rng.randint(1, 3))]
        body["tools"] = tools
        # An engine started without a tool-call parser refuses "auto" (the default when tools are given).
        body["tool_choice"] = "none"
    for turn in range(rng.randint(1, 4)):
        msgs.append({"role": "user", "content": _content(rng)})
        if turn == 0 and rng.random() < 0.1:
            msgs.append({"role": "system", "content": _text(rng, 1, 5)})
        if rng.random() < 0.7:
            a: dict[str, Any] = {"role": "assistant", "content": _content(rng) if rng.random() < 0.8 else None}
            if tools and rng.random() < 0.6:
                t = rng.choice(tools)["function"]["name"]
                args = {w: rng.randint(0, 99) for w in rng.sample(WORDS, rng.randint(0, 2))}
                a["tool_calls"] = [{"id": f"call_{turn}", "type": "function",
                                    "function": {"name": t, "arguments": json.dumps(args) if rng.random() < 0.8 else ""}}]
                msgs.append(a)
                tc: dict[str, Any] = {"role": "tool", "tool_call_id": f"call_{turn}",
                                      "content": _text(rng, 1, 8) if rng.random() < 0.7 else [{"type": "text", "text": _text(rng, 1, 5)}]}
                msgs.append(tc)
            else:
                msgs.append(a)
    if msgs[-1]["role"] == "assistant" and rng.random() < 0.4:
        body["continue_final_message"] = True
        body["add_generation_prompt"] = False
        if not isinstance(msgs[-1]["content"], str):
            msgs[-1]["content"] = _text(rng, 1, 5)
    elif rng.random() < 0.15:
        body["add_generation_prompt"] = False
    if rng.random() < 0.1:
        body["documents"] = [{"title": rng.choice(WORDS), "text": _text(rng, 1, 10)} for _ in range(rng.randint(1, 2))]
    if rng.random() < 0.1:
        body["chat_template_kwargs"] = {"unknown_flag": True}
    if rng.random() < 0.1:
        body["add_special_tokens"] = True
    body["messages"] = msgs
    return body


def completion_body(rng: random.Random, vocab: int = 512) -> dict[str, Any]:
    r = rng.random()
    body: dict[str, Any] = {}
    if r < 0.75:
        body["prompt"] = _text(rng, 1, 80)
        if not body["prompt"].strip() and rng.random() < 0.5:
            body["prompt"] = "x"
    else:
        body["prompt"] = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 100))]
    if rng.random() < 0.3:
        body["add_special_tokens"] = rng.random() < 0.5
    return body


def bodies(n: int, seed: int = 0) -> Iterator[dict[str, Any]]:
    """``n`` bodies, about half chat and half completions."""
    rng = random.Random(seed)
    for _ in range(n):
        yield chat_body(rng) if rng.random() < 0.55 else completion_body(rng)
