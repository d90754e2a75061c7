"""Errors of the serving path, each carrying the HTTP status and OpenAI error type it maps to.

The proxy turns every :class:`ServingError` into an OpenAI-style body
``{"error": {"message", "type", "param", "code"}}`` with :attr:`status`; nothing
else reaches a client as a traceback.
"""
from __future__ import annotations

from typing import Any

from ..kvindex.errors import KVRouteError


class ServingError(KVRouteError):
    """Base class: an error with an HTTP status and an OpenAI error ``type``."""

    #: HTTP status the proxy answers with.
    status = 500
    #: OpenAI error ``type`` field.
    type = "server_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        #: The request field at fault, if one is.
        self.param = param
        #: A short machine-readable code (defaults to the class's ``type``).
        self.code = code

    def body(self) -> dict[str, Any]:
        """The OpenAI-style error document."""
        return {"error": {"message": str(self), "type": self.type, "param": self.param,
                          "code": self.code if self.code is not None else self.status}}


class BadRequestError(ServingError):
    """Malformed JSON, wrong types, missing fields, a prompt over the model's length."""

    status = 400
    type = "invalid_request_error"


class UnsupportedContentError(BadRequestError):
    """Content kvroute cannot tokenize as the engine would (images, audio, video...)."""


class ModelNotFoundError(ServingError):
    """The request names a model no engine serves."""

    status = 404
    type = "invalid_request_error"


class NoEngineError(ServingError):
    """No healthy engine can take the request (or every try failed before its first byte)."""

    status = 503
    type = "service_unavailable"


class EngineFailedError(ServingError):
    """The engine failed the request after the proxy had started answering (sent as an SSE error event)."""

    status = 502
    type = "bad_gateway"


class TokenizerNotFoundError(KVRouteError, FileNotFoundError):
    """No local tokenizer files for the model (the proxy never downloads unless told to)."""
