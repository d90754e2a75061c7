"""Server-sent-event framing for streams passed through unchanged.

The proxy forwards an engine's stream one event at a time, as soon as the
event's blank-line terminator arrives (never the whole response), and looks
inside only the events it needs: the first (time to first token) and those
mentioning ``"usage"`` (the engine's cached-token report).
"""
from __future__ import annotations

import json
from typing import Any

_SEPS = (b"\n\n", b"\r\n\r\n", b"\r\r")


class SSESplitter:
    """Cut a byte stream into whole events (each returned with its terminator)."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        #: Bytes received after the last complete event.
        self._buf = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        buf = self._buf + chunk if self._buf else chunk
        out: list[bytes] = []
        start = 0
        while True:
            cut = -1
            sep_len = 0
            for sep in _SEPS:
                i = buf.find(sep, start)
                if i >= 0 and (cut < 0 or i < cut):
                    cut, sep_len = i, len(sep)
            if cut < 0:
                break
            out.append(buf[start:cut + sep_len])
            start = cut + sep_len
        self._buf = buf[start:]
        return out

    def flush(self) -> bytes:
        """What is left when the stream ends (an unterminated last event, forwarded as is)."""
        rest, self._buf = self._buf, b""
        return rest


def event_data(event: bytes) -> str | None:
    """The event's ``data`` field (data lines joined by newlines), or None when it has none."""
    lines = event.decode("utf-8", "replace").splitlines()
    data = [ln[5:].lstrip(" ") if ln.startswith("data:") else None for ln in lines]
    data = [d for d in data if d is not None]
    return "\n".join(data) if data else None


def event_json(event: bytes) -> Any:
    """The event's data as JSON, or None (``[DONE]``, comments, malformed data)."""
    d = event_data(event)
    if not d or d == "[DONE]":
        return None
    try:
        return json.loads(d)
    except ValueError:
        return None


def error_event(exc: Any) -> bytes:
    """A :class:`~kvroute.serving.errors.ServingError` as one SSE event (its OpenAI-style body), then
    the end-of-stream marker."""
    return b"data: " + json.dumps(exc.body()).encode() + b"\n\ndata: [DONE]\n\n"
