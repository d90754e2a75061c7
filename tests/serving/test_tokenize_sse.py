"""EngineTokenizer rules that the real-engine check cannot reach with one template, and SSE framing."""
from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from kvroute.serving.errors import BadRequestError, UnsupportedContentError
from kvroute.serving.sse import SSESplitter, event_data, event_json
from kvroute.serving.tokenize import EngineTokenizer, detect_content_format

OPENAI_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|>"
                   "{% if message['content'] is string %}{{ message['content'] }}"
                   "{% else %}{% for part in message['content'] %}[{{ part['type'] }}:{{ part['text'] }}]{% endfor %}"
                   "{% endif %}</s>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


@pytest.mark.parametrize("template,fmt", [
    (OPENAI_TEMPLATE, "openai"),
    ("{% for m in messages %}{{ m.content }}{% endfor %}", "string"),
    ("{% set loop_messages = messages %}{% for m in loop_messages %}{% for c in m.content %}{{ c.text }}{% endfor %}{% endfor %}", "openai"),
    ("{% for m in messages[1:] %}{% for c in m['content'] %}{{ c }}{% endfor %}{% endfor %}", "openai"),
    ("{% for m in messages %}{% set content = m.content %}{% for c in content %}{{ c }}{% endfor %}{% endfor %}", "openai"),
    ("{{ unclosed", "string"),
])
def test_content_format_detection(template: str, fmt: str) -> None:
    assert detect_content_format(template) == fmt


def _with_template(engine_tokenizer: EngineTokenizer, template: str) -> EngineTokenizer:
    import copy

    hf = copy.copy(engine_tokenizer.hf)
    hf.chat_template = template
    return EngineTokenizer(hf)


def test_openai_format_keeps_parts_as_dicts(engine_tokenizer: EngineTokenizer) -> None:
    tok = _with_template(engine_tokenizer, OPENAI_TEMPLATE)
    assert tok.content_format == "openai"
    ids = tok.encode_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, "b"]}]})
    text = tok.hf.decode(ids)
    assert "[text:a][text:b]" in text


def test_string_format_joins_parts_with_newlines(engine_tokenizer: EngineTokenizer) -> None:
    a = engine_tokenizer.encode_chat({"messages": [{"role": "user", "content": [{"type": "text", "text": "hello"},
                                                                                {"type": "text", "text": "world"}]}]})
    b = engine_tokenizer.encode_chat({"messages": [{"role": "user", "content": "hello\nworld"}]})
    assert a == b


def test_developer_becomes_system_first_when_template_has_no_developer_role(engine_tokenizer: EngineTokenizer) -> None:
    a = engine_tokenizer.encode_chat({"messages": [{"role": "user", "content": "hi"},
                                                   {"role": "developer", "content": "rules"}]})
    b = engine_tokenizer.encode_chat({"messages": [{"role": "system", "content": "rules"},
                                                   {"role": "user", "content": "hi"}]})
    assert a == b


def test_tool_call_arguments_string_parsed_like_vllm(engine_tokenizer: EngineTokenizer) -> None:
    def msgs(args: Any) -> dict:
        return {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
                "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": args}}]}]}
    assert engine_tokenizer.encode_chat(msgs('{"a": 1}')) == engine_tokenizer.encode_chat(msgs({"a": 1}))
    # malformed or non-object JSON become {} (vLLM keeps the conversation going)
    assert engine_tokenizer.encode_chat(msgs("{bad")) == engine_tokenizer.encode_chat(msgs({}))
    assert engine_tokenizer.encode_chat(msgs("[1]")) == engine_tokenizer.encode_chat(msgs(""))


def test_completion_prompt_forms(engine_tokenizer: EngineTokenizer) -> None:
    ids = engine_tokenizer.encode_completion({"prompt": "hello world"})[0]
    assert ids[0] == engine_tokenizer.hf.bos_token_id
    assert engine_tokenizer.encode_completion({"prompt": "hello world", "add_special_tokens": False})[0] == ids[1:]
    assert engine_tokenizer.encode_completion({"prompt": [5, 6, 7]}) == [[5, 6, 7]]
    assert engine_tokenizer.encode_completion({"prompt": ["a", [4]]})[1] == [4]
    assert engine_tokenizer.encode_completion({"prompt": "hello world", "truncate_prompt_tokens": 2})[0] == ids[-2:]
    with pytest.raises(BadRequestError):
        engine_tokenizer.encode_completion({"prompt": [True, False]})
    with pytest.raises(UnsupportedContentError):
        engine_tokenizer.encode_completion({"prompt": "x", "prompt_embeds": "AAAA"})


def test_media_parts_are_refused_with_a_clear_error(engine_tokenizer: EngineTokenizer) -> None:
    with pytest.raises(UnsupportedContentError, match="image_url"):
        engine_tokenizer.encode_chat({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]})


EVENTS = st.lists(st.dictionaries(st.sampled_from(["a", "b", "usage"]), st.integers(), max_size=3), max_size=8)


@given(EVENTS, st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=50), st.sampled_from([b"\n\n", b"\r\n\r\n"]))
@settings(max_examples=200, deadline=None)
def test_sse_splitter_cuts_whole_events_whatever_the_chunking(docs: list, cuts: list, sep: bytes) -> None:
    nl = sep[: len(sep) // 2]
    events = [b"data: " + json.dumps(d).encode() + sep for d in docs] + [b": comment" + sep, b"data: [DONE]" + sep]
    stream = b"".join(events)
    sp = SSESplitter()
    out: list[bytes] = []
    i = 0
    k = 0
    while i < len(stream):
        n = cuts[k % len(cuts)]
        out += sp.feed(stream[i:i + n])
        i += n
        k += 1
    assert sp.flush() == b""
    assert out == events
    assert [event_json(e) for e in out[:-2]] == docs
    assert event_data(out[-1]) == "[DONE]" and event_json(out[-1]) is None and event_data(out[-2]) is None
    assert nl in (b"\n", b"\r\n")
