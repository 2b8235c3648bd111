"""Running the app under uvicorn with edgelm's settings, for the CLI and for embedding apps.

uvicorn answers requests it cannot parse (bad framing, oversized headers) itself, before the app
sees them, in plain text. Its HTTP protocol class is subclassed here so that those answers too are
OpenAI-shaped JSON, and its h11 connection so that heads h11 would accept but a proxy may frame
otherwise (Content-Length with Transfer-Encoding: request smuggling) are refused the same way:
400, then the connection closed, so no byte after them is read as another request.
"""

from __future__ import annotations

from typing import Any

from edgelm.serve.errors import ApiError

MAX_HEAD_BYTES = 64 * 1024  # request line and headers


def _strict_connection():
    """h11's connection, refusing the request heads `framing_problem` names; the refusal travels as
    h11's own parse error, so uvicorn answers it through `send_400_response` and closes."""
    import h11

    from edgelm.serve.http import framing_problem

    class StrictFramingConnection(h11.Connection):
        refused: str | None = None

        def next_event(self):
            event = super().next_event()
            if isinstance(event, h11.Request):
                self.refused = framing_problem(event.headers.raw_items(), event.http_version)
                if self.refused:
                    raise h11.RemoteProtocolError(self.refused, error_status_hint=400)
            return event

    return StrictFramingConnection


def _json_400(protocol_class: type) -> type:
    connection_class = _strict_connection()

    class JsonErrorProtocol(protocol_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            limit = self.config.h11_max_incomplete_event_size or MAX_HEAD_BYTES
            self.conn = connection_class(self.conn.our_role, max_incomplete_event_size=limit)

        def send_400_response(self, msg: str) -> None:  # uvicorn's hook for unparseable requests
            msg = getattr(self.conn, "refused", None) or msg
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
