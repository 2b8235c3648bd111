"""HTTP plumbing below the endpoints: which request framings are refused, reading a bounded JSON
body, and answering from a model job (a JSON body or a server-sent-event stream) while watching
for the client to leave."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from edgelm.serve.errors import ApiError
from edgelm.serve.schema import parse_json
from edgelm.serve.worker import Job, ModelWorker, SequenceWorker

BODY_TIMEOUT_S = 60.0  # a client that trickles its body is cut off after this
CLOSE = {"Connection": "close"}  # after a refused body the connection's framing is unknown: start afresh


def framing_problem(headers: list[tuple[bytes, bytes]], http_version: bytes) -> str | None:
    """Why a request head's framing is refused, or None. h11 has already refused what it cannot
    parse (a space before a colon, a coding other than chunked, two Transfer-Encodings, conflicting
    lengths); this refuses what it would accept but a proxy in front may frame otherwise (RFC 9112
    6.1): Content-Length with Transfer-Encoding, the request smuggling shape, and Transfer-Encoding
    in HTTP/1.0. The connection is closed after the answer."""
    names = [name.lower() for name, _ in headers]
    if b"transfer-encoding" in names and b"content-length" in names:
        return "both Content-Length and Transfer-Encoding given; send one"
    if b"transfer-encoding" in names and http_version != b"1.1":
        return "Transfer-Encoding in an HTTP/1.0 request"
    return None


async def read_json(request, limit: int) -> dict[str, Any]:
    """The request's JSON object; 415 unless it says it is JSON, 413 as soon as it passes `limit` bytes."""
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if kind != "application/json":
        # also the CSRF defence: a browser cannot send JSON across origins without a CORS preflight
        raise ApiError(415, "send the body as JSON with 'Content-Type: application/json'",
                       code="unsupported_media_type")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise ApiError(413, f"the request body of {declared} bytes is over the limit of {limit} bytes",
                       code="request_too_large", headers=CLOSE)
    body = bytearray()
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"the request body is over the limit of {limit} bytes",
                                   code="request_too_large", headers=CLOSE)
    except TimeoutError:
        raise ApiError(408, f"the request body did not arrive within {BODY_TIMEOUT_S:.0f} s",
                       code="request_timeout", headers=CLOSE) from None
    return parse_json(bytes(body))


Render = Callable[[Job, Callable[[dict], Awaitable[None]]], Awaitable[None]]


class JobResponse:
    """An ASGI response that queues a job on a model's worker and renders its events.

    While the job waits or runs, the client's connection is watched: when it goes, the job is
    cancelled, which frees its place in the queue or stops its decoding before the next token.
    """

    def __init__(self, worker: ModelWorker | SequenceWorker, job: Job, render: Render):
        self.worker = worker
        self.job = job
        self.render = render

    async def __call__(self, scope, receive, send) -> None:
        try:
            self.worker.submit(self.job)
        except ApiError as err:
            await err.send(send)
            return
        watcher = asyncio.ensure_future(self._watch(receive))
        try:
            await self.render(self.job, send)
        finally:
            watcher.cancel()
            self.worker.cancel(self.job)  # a no-op once it has finished

    async def _watch(self, receive) -> None:
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # noqa: BLE001 - a server that cannot say is treated as a client that left
            pass
        self.worker.cancel(self.job)
        self.job.events.put_nowait(("disconnected", None))


async def send_json(send, body: Any, status: int = 200) -> None:
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


async def render_result(job: Job, send, shape: Callable[[Any], Any]) -> None:
    """Wait for the job's result and answer with `shape(result)` as JSON (or its error)."""
    while True:
        kind, value = await job.next_event()
        if kind == "done":
            await send_json(send, shape(value))
            return
        if kind == "error":
            await value.send(send)
            return
        if kind == "disconnected":
            return


class EventStream:
    """Server-sent events as OpenAI sends them: `data: {json}` lines, then `data: [DONE]`."""

    def __init__(self, send):
        self.send = send

    async def open(self) -> None:
        await self.send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})

    async def event(self, body: Any) -> None:
        data = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        await self.send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})

    async def close(self) -> None:
        await self.send({"type": "http.response.body", "body": b"", "more_body": False})
