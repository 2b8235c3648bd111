"""Request smuggling shapes against the real server (uvicorn with edgelm's protocol): each is refused
with a JSON 400 and the connection closed, so the bytes after it never become a second request.

Each shape carries a second, complete request (`GET /health`) where a server that misread the
framing would find one; a second response on the socket would be the smuggled request answered.
"""

from __future__ import annotations

import json
import socket
from urllib.parse import urlparse

import pytest
from serve_fixtures import running
from test_llama_runtime import write_tiny_gguf

import edgelm
from edgelm.serve import create_app

SMUGGLED = b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n"
BODY = b'{"model": "tiny", "prompt": "a", "max_tokens": 1}'
HEAD = b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)


SHAPES = {
    # CL.TE: a front proxy frames by Content-Length, the server by chunked (or the other way round)
    "CL.TE": HEAD + b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n" % (len(chunked(BODY)) + len(SMUGGLED))
    + chunked(BODY) + SMUGGLED,
    "TE.CL": HEAD + b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n" + chunked(BODY) + SMUGGLED,
    "duplicate Content-Length": HEAD + b"Content-Length: %d\r\nContent-Length: 0\r\n\r\n" % len(BODY) + BODY
    + SMUGGLED,
    "Content-Length list": HEAD + b"Content-Length: %d, 0\r\n\r\n" % len(BODY) + BODY + SMUGGLED,
    "space before the colon": HEAD + b"Transfer-Encoding : chunked\r\n\r\n" + chunked(BODY) + SMUGGLED,
    "chunked, identity": HEAD + b"Transfer-Encoding: chunked, identity\r\n\r\n" + chunked(BODY) + SMUGGLED,
    "identity, chunked with a length": HEAD + b"Content-Length: 5\r\nTransfer-Encoding: identity, chunked\r\n\r\n"
    + chunked(BODY) + SMUGGLED,
    "tab before the value, with a length": HEAD + b"Content-Length: 5\r\nTransfer-Encoding:\tchunked\r\n\r\n"
    + chunked(BODY) + SMUGGLED,
    "two Transfer-Encodings": HEAD + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n"
    + chunked(BODY) + SMUGGLED,
    "xchunked": HEAD + b"Transfer-Encoding: xchunked\r\n\r\n" + chunked(BODY) + SMUGGLED,
    "upper-case CHUNKED with a length": HEAD + b"Content-Length: 3\r\nTRANSFER-ENCODING: CHUNKED\r\n\r\n"
    + chunked(BODY) + SMUGGLED,
    "HTTP/1.0 chunked": HEAD.replace(b"HTTP/1.1", b"HTTP/1.0") + b"Transfer-Encoding: chunked\r\n\r\n"
    + chunked(BODY) + SMUGGLED,
    "bare LF line ends": HEAD.replace(b"\r\n", b"\n") + b"Content-Length: 5\nTransfer-Encoding: chunked\n\n"
    + chunked(BODY) + SMUGGLED,
}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    model = edgelm.load(write_tiny_gguf(tmp_path_factory.mktemp("smuggle") / "tiny.gguf"), threads=1)
    with running(create_app({"tiny": model})) as url:
        yield url
    model.close()


def exchange(base_url: str, data: bytes) -> bytes:
    """Send `data`, read until the server closes the connection (a server that keeps it open fails
    the test through the socket's timeout)."""
    address = urlparse(base_url)
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


@pytest.mark.parametrize("name", list(SHAPES))
def test_smuggling_shapes_are_refused_and_the_connection_closed(base_url, name):
    received = exchange(base_url, SHAPES[name])  # returns only once the server has closed
    assert received.startswith(b"HTTP/1.1 400"), received[:200]
    head, _, body = received.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower()
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    error = json.loads(body[:length])["error"]
    assert error["code"] == "bad_http_request" and "\n" not in error["message"]
    assert body[length:] == b"", "a second response: the smuggled request was answered"
    assert received.count(b"HTTP/1.1 ") == 1


def test_a_folded_transfer_encoding_is_never_framing(base_url):
    """h11 joins an obs-fold line to the header before it (RFC 9112 5.2 allows that or a 400): the
    body is framed by Content-Length, the chunk bytes after it are no valid request, and the
    connection closes before the smuggled request is read."""
    folded = (HEAD + b"X-Padding: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n" + chunked(BODY)
              + SMUGGLED)
    received = exchange(base_url, folded)
    assert b"HTTP/1.1 200" not in received and b'"status":"ok"' not in received
    assert received.count(b"HTTP/1.1 400") == 2  # the 5-byte body is not JSON; then the chunk bytes are no request


def test_both_lengths_are_named_in_the_refusal(base_url):
    head, _, body = exchange(base_url, SHAPES["CL.TE"]).partition(b"\r\n\r\n")
    assert "Content-Length and Transfer-Encoding" in json.loads(body)["error"]["message"]


def test_plain_chunked_and_pipelined_requests_still_work(base_url):
    one = HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunked(BODY)
    two = HEAD + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(BODY) + BODY
    received = exchange(base_url, one + two)
    assert received.count(b"HTTP/1.1 200") == 2, received[:400]


def test_an_oversized_body_closes_the_connection(base_url):
    big = HEAD + b"Content-Length: %d\r\n\r\n" % (64 << 20) + b'{"model": "tiny"' + SMUGGLED
    received = exchange(base_url, big)
    assert received.startswith(b"HTTP/1.1 413") and received.count(b"HTTP/1.1 ") == 1
    assert b"connection: close" in received.partition(b"\r\n\r\n")[0].lower()
