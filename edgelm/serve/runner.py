"""Running the app under uvicorn with edgelm's settings, for the CLI and for embedding apps.

uvicorn answers requests it cannot parse (bad framing, a smuggling-shaped Content-Length with
Transfer-Encoding, oversized headers) itself, before the app sees them, in plain text. Its HTTP
protocol classes are subclassed here so that those answers too are OpenAI-shaped JSON.
"""

from __future__ import annotations

from typing import Any

from edgelm.serve.errors import ApiError

MAX_HEAD_BYTES = 64 * 1024  # request line and headers


def _json_400(protocol_class: type) -> type:
    class JsonErrorProtocol(protocol_class):
        def send_400_response(self, msg: str) -> None:  # uvicorn's hook for unparseable requests
            body = ApiError(400, f"malformed HTTP request ({msg})", code="bad_http_request").body()
            head = (b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
            self.transport.write(head + body)
            self.transport.close()

    JsonErrorProtocol.__name__ = f"Json{protocol_class.__name__}"
    return JsonErrorProtocol


def http_protocol() -> type:
    """h11's parser, answering bad requests in JSON. httptools is faster but buffers a request's
    headers without a limit; h11 refuses a request head over 64 KiB."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    return _json_400(H11Protocol)


def uvicorn_config(app: Any, **overrides: Any):
    """A uvicorn.Config for `app`: no Server header, JSON for malformed requests, a short shutdown."""
    import uvicorn

    settings = dict(http=http_protocol(), h11_max_incomplete_event_size=MAX_HEAD_BYTES, server_header=False,
                    timeout_graceful_shutdown=5, log_level="info")
    settings.update(overrides)
    return uvicorn.Config(app, **settings)
