"""Errors as OpenAI sends them: {"error": {"message", "type", "param", "code"}} with the right status."""

from __future__ import annotations

import json

from edgelm.errors import ArtifactError, ContextOverflowError, EdgelmError, InputError, UsageError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "invalid_request_error", 405: "invalid_request_error", 408: "invalid_request_error",
         413: "invalid_request_error", 415: "invalid_request_error", 500: "server_error", 503: "server_error"}
MAX_MESSAGE = 400  # characters; a message quoting user input never grows with it


class ApiError(Exception):
    """An HTTP error answered in OpenAI's shape; `message` is one line for the client."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = one_line(message)
        self.param = param
        self.code = code
        self.headers = headers or {}

    def payload(self) -> dict:
        """{"error": {...}}: the JSON body, as an object."""
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}

    def body(self) -> bytes:
        return json.dumps(self.payload(), ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    async def send(self, send) -> None:
        """Answer with this error through a raw ASGI `send`."""
        body = self.body()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def quoted(value: object, limit: int = 64) -> str:
    """A user-supplied value shown safely inside a message: JSON-quoted, control characters escaped, cut short."""
    text = json.dumps(value if isinstance(value, str) else str(value))
    return text if len(text) <= limit else text[: limit - 4] + '..."'


def from_edgelm(err: EdgelmError) -> ApiError:
    """What a runtime error means over HTTP: the client's fault (400) or the model's (500)."""
    if isinstance(err, ContextOverflowError):
        return ApiError(400, str(err), code="context_length_exceeded")
    if isinstance(err, UsageError):
        return ApiError(400, str(err), param=_named_parameter(str(err)))
    if isinstance(err, InputError):
        return ApiError(400, str(err))
    if isinstance(err, ArtifactError):
        return ApiError(500, f"the model failed: {err}", code="model_error")
    return ApiError(500, str(err), code="model_error")


def _named_parameter(message: str) -> str | None:
    """GenerationParams names the offending parameter first ("temperature must be ...")."""
    from dataclasses import fields

    from edgelm.runtime.core.params import GenerationParams

    first = message.split(" ", 1)[0].strip(":,;")
    return first if first in {f.name for f in fields(GenerationParams)} else None
