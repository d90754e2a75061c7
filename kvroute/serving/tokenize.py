"""Token ids exactly as a vLLM engine computes them for an OpenAI request.

A router that hashes other ids than the engine caches predicts hits that never
happen (the most reported bug of KV-aware gateways: the chat template not
applied, only the first message hashed).  :class:`EngineTokenizer` reproduces
vLLM 0.32's request rendering with the model's own Hugging Face tokenizer and
chat template, for text:

* ``/v1/completions`` (``vllm/entrypoints/openai/completion``): a string prompt is
  tokenized with ``add_special_tokens`` (request field, default True); a list of
  token ids is taken as is.
* ``/v1/chat/completions`` (``vllm/renderers/chat_utils.py`` and ``hf.py``):
  messages are normalised as ``parse_chat_messages`` does (string content or
  text parts; parts joined by ``"\\n"`` for "string"-format templates, kept as
  ``{"type": "text", "text"}`` dicts for "openai"-format ones, the format
  detected from the template as ``_detect_content_format`` does); assistant
  ``tool_calls`` arguments parsed from JSON into dicts (``_postprocess_messages``);
  tool results' text parts joined; ``developer`` messages become ``system`` when
  the template has no developer role; tools are dumped as vLLM's pydantic
  models dump them (``description``/``parameters`` None when absent, ``strict``
  only when set); then ``apply_chat_template(tokenize=True)`` with
  ``add_generation_prompt`` (default True), ``continue_final_message``,
  ``documents``, ``reasoning_effort`` and ``chat_template_kwargs`` filtered to
  what the template or Hugging Face accept (``resolve_chat_template_kwargs``).

Not supported (documented in docs/serving.md): images, audio, video and file
parts raise :class:`UnsupportedContentError` (the proxy answers 400, or routes
without cache credit with ``--unsupported-content route``); request-supplied
``chat_template`` strings are refused (vLLM refuses them too unless started with
``--trust-request-chat-template``); ``prompt_embeds``.  Checked against a real
engine's ``/tokenize`` by ``tests/interop/test_proxy_tokenize.py``.

The tokenizer is loaded from a local directory or the local Hugging Face cache
only (``local_files_only=True``) unless ``allow_download`` is set.
"""
from __future__ import annotations

import json
import os
import threading
from functools import lru_cache
from typing import Any, Mapping

from .errors import BadRequestError, TokenizerNotFoundError, UnsupportedContentError

#: Message roles vLLM's OpenAI server accepts.
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
#: Content part types that carry text (``TEXT_PART_TYPES`` in vLLM's chat_utils).
TEXT_PART_TYPES = frozenset({"text", "input_text", "output_text", "refusal", "thinking"})
#: Part types the proxy cannot reproduce (multimodal placeholders depend on the engine's processor).
MEDIA_PART_TYPES = frozenset({"image_url", "input_image", "image_pil", "image_embeds", "audio_url",
                              "input_audio", "audio_embeds", "video_url", "file", "image", "audio", "video"})
#: chat_template_kwargs a request may not set (vLLM refuses them).
_FORBIDDEN_TEMPLATE_KWARGS = frozenset({"chat_template", "tokenize"})


def _need_bool(body: Mapping[str, Any], key: str, default: bool) -> bool:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise BadRequestError(f"'{key}' must be a boolean, got {type(v).__name__}", param=key)
    return v


def _is_token_list(v: Any) -> bool:
    return isinstance(v, list) and all(type(t) is int for t in v)


class EngineTokenizer:
    """The ids a vLLM engine computes for a request, from the model's own tokenizer.

    ``tokenizer``: a Hugging Face tokenizer (``PreTrainedTokenizerBase``).  Use
    :meth:`from_pretrained` to load one the way vLLM does.  Thread-safe: the
    Rust tokenizer is called under a lock (it is not re-entrant across threads).
    """

    def __init__(self, tokenizer: Any, *, max_model_len: int | None = None,
                 exclude_tools_when_tool_choice_none: bool = False) -> None:
        #: The Hugging Face tokenizer (read-only after construction).
        self.hf = tokenizer
        #: Mirror of the engine's ``--exclude-tools-when-tool-choice-none`` (tools not rendered then).
        self.exclude_tools_when_tool_choice_none = exclude_tools_when_tool_choice_none
        #: The engine's context length, when known (prompts over it are refused).
        self.max_model_len = max_model_len
        #: The model's chat template (None: chat requests are refused).
        self.chat_template: str | None = getattr(tokenizer, "chat_template", None)
        if isinstance(self.chat_template, dict):  # named templates: vLLM uses "default"
            self.chat_template = self.chat_template.get("default")
        #: "string" or "openai": how message content reaches the template.
        self.content_format = detect_content_format(self.chat_template) if self.chat_template else "string"
        #: Whether the template knows the ``developer`` role.
        self.developer_role = bool(self.chat_template) and (
            '"developer"' in self.chat_template or "'developer'" in self.chat_template)
        self._template_vars = template_variables(self.chat_template) if self.chat_template else frozenset()
        self._lock = threading.Lock()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, allow_download: bool = False,
                        max_model_len: int | None = None, revision: str | None = None,
                        exclude_tools_when_tool_choice_none: bool = False) -> "EngineTokenizer":
        """Load a model's tokenizer from a local directory or the local HF cache (no network unless asked)."""
        try:
            from transformers import AutoTokenizer
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ImportError("the serving path needs transformers: pip install 'kvroute[proxy]'") from exc
        try:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=not allow_download, revision=revision)
        except (OSError, ValueError) as exc:
            where = "locally" if not allow_download else "locally or on the hub"
            raise TokenizerNotFoundError(f"no tokenizer for {str(path)!r} found {where}: {exc}") from exc
        return cls(tok, max_model_len=max_model_len,
                   exclude_tools_when_tool_choice_none=exclude_tools_when_tool_choice_none)

    # ------------------------------------------------------------ completions
    def encode_completion(self, body: Mapping[str, Any]) -> list[list[int]]:
        """The prompts of a ``/v1/completions`` body as the engine tokenizes them (one list per prompt)."""
        if "prompt" not in body or body["prompt"] is None:
            raise BadRequestError("'prompt' is required", param="prompt")
        if body.get("prompt_embeds") is not None:
            raise UnsupportedContentError("prompt_embeds are not supported by the proxy", param="prompt_embeds")
        add_special = _need_bool(body, "add_special_tokens", True)
        prompt = body["prompt"]
        if isinstance(prompt, str):
            prompts: list[Any] = [prompt]
        elif _is_token_list(prompt) and prompt:
            prompts = [prompt]
        elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or (_is_token_list(p) and p) for p in prompt):
            prompts = prompt
        else:
            raise BadRequestError("'prompt' must be a string, a list of strings, a non-empty list of token ids "
                                  "or a list of such lists", param="prompt")
        out = []
        for p in prompts:
            ids = self.encode_text(p, add_special_tokens=add_special) if isinstance(p, str) else list(p)
            self._check_ids(ids, "prompt")
            out.append(self._truncate(ids, body))
        return out

    def encode_text(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        with self._lock:
            return list(self.hf(text, add_special_tokens=add_special_tokens)["input_ids"])

    # ------------------------------------------------------------------- chat
    def encode_chat(self, body: Mapping[str, Any]) -> list[int]:
        """The prompt ids of a ``/v1/chat/completions`` body (or a ``/tokenize`` messages body)."""
        if self.chat_template is None:
            raise BadRequestError("the model has no chat template; use /v1/completions", param="messages")
        if body.get("chat_template") is not None:
            raise BadRequestError("request-supplied chat templates are not accepted by the proxy", param="chat_template")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequestError("'messages' must be a non-empty list", param="messages")
        add_gen = _need_bool(body, "add_generation_prompt", True)
        cont = _need_bool(body, "continue_final_message", False)
        if add_gen and cont:
            raise BadRequestError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
                                  param="continue_final_message")
        conversation = [m for msg in messages for m in self._parse_message(msg)]
        _postprocess_tool_calls(conversation)
        if not self.developer_role and any(m["role"] == "developer" for m in conversation):
            conversation = _consolidate_system(_developer_to_system(conversation))
        tools = _tool_dicts(body.get("tools"))
        if tools is not None and body.get("tool_choice") == "none" and self.exclude_tools_when_tool_choice_none:
            tools = None
        kwargs: dict[str, Any] = dict(add_generation_prompt=add_gen, continue_final_message=cont,
                                      documents=body.get("documents"), reasoning_effort=body.get("reasoning_effort"))
        user_kwargs = body.get("chat_template_kwargs") or {}
        if not isinstance(user_kwargs, dict):
            raise BadRequestError("'chat_template_kwargs' must be an object", param="chat_template_kwargs")
        if _FORBIDDEN_TEMPLATE_KWARGS & user_kwargs.keys():
            raise BadRequestError(f"Found unexpected chat template kwargs from request: "
                                  f"{set(_FORBIDDEN_TEMPLATE_KWARGS & user_kwargs.keys())}", param="chat_template_kwargs")
        if body.get("reasoning_effort") is not None and "enable_thinking" not in user_kwargs:
            kwargs["enable_thinking"] = body["reasoning_effort"] != "none"
        kwargs = {**user_kwargs, **kwargs}
        accepted = self._template_vars | _hf_chat_params()
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        kwargs.pop("tools", None)
        try:
            with self._lock:
                ids = self.hf.apply_chat_template(conversation, tools=tools, chat_template=self.chat_template,
                                                  tokenize=True, return_dict=False, **kwargs)
        except Exception as exc:  # templates raise on input they reject: vLLM answers 400 with the reason
            raise BadRequestError(f"chat template rejected the request: {exc}", param="messages") from exc
        ids = list(ids)
        add_special = _need_bool(body, "add_special_tokens", False)
        if add_special:  # vLLM re-tokenizes the rendered text with special tokens only when asked
            with self._lock:
                text = self.hf.apply_chat_template(conversation, tools=tools, chat_template=self.chat_template,
                                                   tokenize=False, **kwargs)
            ids = self.encode_text(text, add_special_tokens=True)
        self._check_ids(ids, "messages")
        return self._truncate(ids, body)

    def _parse_message(self, msg: Any) -> list[dict[str, Any]]:
        if not isinstance(msg, dict):
            raise BadRequestError("each message must be an object", param="messages")
        role = msg.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise BadRequestError(f"unknown message role {role!r}", param="messages")
        content = msg.get("content")
        if content is None:
            parts: list[Any] = []
        elif isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list):
            parts = content
        else:
            raise BadRequestError("message content must be a string, a list of parts or null", param="messages")
        texts: list[Any] = []
        for part in parts:
            if isinstance(part, str):
                texts.append(part if self.content_format == "string" else {"type": "text", "text": part})
                continue
            if not isinstance(part, dict):
                raise BadRequestError("each content part must be an object or a string", param="messages")
            ptype = part.get("type")
            if ptype in MEDIA_PART_TYPES or (ptype is None and any(k in part for k in ("image_url", "audio_url", "input_audio", "video_url"))):
                raise UnsupportedContentError(f"content parts of type {ptype!r} are not supported by the proxy "
                                              "(only text: the engine's multimodal placeholders cannot be reproduced)",
                                              param="messages", code="unsupported_content")
            if ptype is None and "text" in part:
                ptype = "text"
            if ptype not in TEXT_PART_TYPES:
                raise BadRequestError(f"unknown content part type {ptype!r}", param="messages")
            text = part.get("text") if ptype != "refusal" else part.get("refusal")
            if ptype == "thinking":
                text = part.get("thinking")
            if text is None:
                continue  # vLLM skips parts with no content
            if not isinstance(text, str):
                raise BadRequestError("a text part's text must be a string", param="messages")
            if self.content_format == "string":
                texts.append(text)
            else:
                d = {"type": "text", "text": text}
                d.update({k: v for k, v in part.items() if k not in ("type", "text", "refusal", "thinking")})
                texts.append(d)
        out: dict[str, Any] = {"role": role, "content": "\n".join(texts) if self.content_format == "string" else texts}
        if role == "assistant":
            if msg.get("tool_calls") is not None:
                tc = msg["tool_calls"]
                if not isinstance(tc, list):
                    raise BadRequestError("'tool_calls' must be a list", param="messages")
                out["tool_calls"] = [dict(c, function=dict(c["function"])) if isinstance(c, dict) and isinstance(c.get("function"), dict) else c
                                     for c in tc]
            if msg.get("reasoning") is not None:
                out["reasoning"] = out["reasoning_content"] = msg["reasoning"]
        elif role == "tool":
            if "tool_call_id" in msg:
                out["tool_call_id"] = msg["tool_call_id"]
            c = out["content"]
            if isinstance(c, list) and all(isinstance(i, dict) and i.get("type") == "text" for i in c):
                out["content"] = "\n".join(i.get("text", "") for i in c)
        if isinstance(msg.get("name"), str):
            out["name"] = msg["name"]
        if role == "developer":
            out["tools"] = msg.get("tools")
        return [out]

    # ----------------------------------------------------------------- checks
    def _check_ids(self, ids: list[int], param: str) -> None:
        if not ids:
            raise BadRequestError("the prompt is empty", param=param)
        if self.max_model_len is not None and len(ids) > self.max_model_len:
            raise BadRequestError(f"This model's maximum context length is {self.max_model_len} tokens. "
                                  f"However, your prompt has {len(ids)} tokens.", param=param,
                                  code="context_length_exceeded")

    @staticmethod
    def _truncate(ids: list[int], body: Mapping[str, Any]) -> list[int]:
        k = body.get("truncate_prompt_tokens")
        if k is None or k == -1:
            return ids
        if type(k) is not int or k < 1:
            raise BadRequestError("'truncate_prompt_tokens' must be a positive int or -1", param="truncate_prompt_tokens")
        side = body.get("truncation_side") or "left"
        if side not in ("left", "right"):
            raise BadRequestError("'truncation_side' must be 'left' or 'right'", param="truncation_side")
        if len(ids) <= k:
            return ids
        return ids[-k:] if side == "left" else ids[:k]


# ------------------------------------------------------------------ helpers
def _tool_dicts(tools: Any) -> list[dict[str, Any]] | None:
    """vLLM's ``[tool.model_dump() for tool in request.tools]`` for ChatCompletionToolsParam."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise BadRequestError("'tools' must be a list", param="tools")
    out = []
    for t in tools:
        if not isinstance(t, dict) or not isinstance(t.get("function"), dict) or t.get("type", "function") != "function":
            raise BadRequestError("each tool must be {'type': 'function', 'function': {...}}", param="tools")
        f = t["function"]
        if not isinstance(f.get("name"), str):
            raise BadRequestError("a tool's function needs a string 'name'", param="tools")
        fd: dict[str, Any] = {"name": f["name"], "description": f.get("description"), "parameters": f.get("parameters")}
        if f.get("strict") is not None:
            fd["strict"] = f["strict"]
        defer = t.get("defer_loading")
        if f.get("defer_loading") is not None:
            fd["defer_loading"] = f["defer_loading"]
        elif defer is not None:
            fd["defer_loading"] = defer
        d: dict[str, Any] = {"type": "function", "function": fd}
        if defer is not None:
            d["defer_loading"] = defer
        out.append(d)
    return out


def _postprocess_tool_calls(conversation: list[dict[str, Any]]) -> None:
    """Tool-call arguments as dicts, as vLLM's ``_postprocess_messages`` leaves them."""
    for m in conversation:
        if m["role"] != "assistant" or "tool_calls" not in m:
            continue
        calls = m["tool_calls"]
        if not isinstance(calls, list):
            continue
        if not calls:
            m.pop("tool_calls")
            continue
        for c in calls:
            if not isinstance(c, dict) or c.get("type", "function") != "function" or not isinstance(c.get("function"), dict):
                raise BadRequestError("assistant tool_calls entries must be function calls", param="tool_calls")
            fn = c["function"]
            args = fn.get("arguments")
            if not args:
                fn["arguments"] = {}
                continue
            if isinstance(args, str):
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    args = None
            fn["arguments"] = args if isinstance(args, dict) else {}


def _developer_to_system(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for m in conversation:
        if m["role"] == "developer":
            m = dict(m, role="system")
            m.pop("tools", None)
        out.append(m)
    return out


def _consolidate_system(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge system messages into one first message when one is not first (vLLM's rule)."""
    contents: list[str] = []
    rest: list[dict[str, Any]] = []
    needs = False
    for i, m in enumerate(conversation):
        if m["role"] == "system":
            if i > 0 or contents:
                needs = True
            c = m.get("content", "")
            if isinstance(c, list):
                c = "\n".join(p["text"] if isinstance(p, dict) and "text" in p else p for p in c if isinstance(p, (dict, str)))
            if c:
                contents.append(c)
        else:
            rest.append(m)
    if not needs:
        return conversation
    return [{"role": "system", "content": "\n\n".join(contents)}, *rest]


@lru_cache(maxsize=1)
def _hf_chat_params() -> frozenset[str]:
    """Parameters of Hugging Face's ``apply_chat_template`` (vLLM always lets these through)."""
    import inspect

    try:
        from transformers import PythonBackend as base  # transformers >= 5
    except ImportError:  # pragma: no cover
        from transformers import PreTrainedTokenizerBase as base
    sig = inspect.signature(base.apply_chat_template)
    return frozenset(p.name for p in sig.parameters.values()
                     if p.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)) - _FORBIDDEN_TEMPLATE_KWARGS


def _parse_template(template: str) -> Any:
    import jinja2
    import jinja2.ext
    import jinja2.sandbox

    class _Generation(jinja2.ext.Extension):  # HF's {% generation %} tag, parsed only
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_g"), [], [], body).set_lineno(lineno)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_Generation, jinja2.ext.loopcontrols])
    return env.parse(template)


@lru_cache(maxsize=32)
def template_variables(template: str) -> frozenset[str]:
    """Undeclared variables of a chat template (the kwargs it can use)."""
    import jinja2.meta

    try:
        return frozenset(jinja2.meta.find_undeclared_variables(_parse_template(template)))
    except Exception:
        return frozenset()


def _accesses(node: Any, varname: str, key: str | None = None) -> bool:
    """``node`` is ``varname`` (key None), or ``varname.key`` / ``varname['key']``."""
    import jinja2.nodes as n

    if key is None:
        if isinstance(node, n.Name):
            return node.name == varname
        if isinstance(node, (n.Getitem, n.Getattr)) and isinstance(node.node, n.Name) and node.node.name == varname:
            return isinstance(node, n.Getitem) and isinstance(node.arg, n.Slice)  # messages[1:]
        if isinstance(node, n.Filter) and node.node is not None:
            return _accesses(node.node, varname)
        return False
    if isinstance(node, n.Getitem) and isinstance(node.arg, n.Const) and node.arg.value == key:
        return _accesses(node.node, varname)
    if isinstance(node, n.Getattr) and node.attr == key:
        return _accesses(node.node, varname)
    if isinstance(node, n.Filter) and node.node is not None:
        return _accesses(node.node, varname, key)
    return False


@lru_cache(maxsize=32)
def detect_content_format(template: str) -> str:
    """"openai" when the template loops over a message's content (parts as dicts), else "string".

    A simplified form of vLLM's ``_detect_content_format`` (``renderers/hf.py``):
    loops over ``messages`` give the message variables; a loop over
    ``message.content`` / ``message['content']`` or over a variable named
    ``content`` means the template expects parts.
    """
    import jinja2.nodes as n

    try:
        root = _parse_template(template)
    except Exception:
        return "string"
    msg_vars = {"messages"}
    for a in root.find_all(n.Assign):  # {% set loop_messages = messages %}
        if isinstance(a.target, n.Name) and any(_accesses(a.node, v) for v in list(msg_vars)):
            msg_vars.add(a.target.name)
    item_vars = set()
    for loop in root.find_all(n.For):
        if any(_accesses(loop.iter, v) for v in msg_vars) and isinstance(loop.target, n.Name):
            item_vars.add(loop.target.name)
    for loop in root.find_all(n.For):
        if any(_accesses(loop.iter, v, "content") for v in item_vars):
            return "openai"
        if isinstance(loop.iter, n.Name) and loop.iter.name == "content":
            return "openai"
    return "string"

