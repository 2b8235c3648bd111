"""Helpers for the server tests: a real uvicorn server on a free loopback port, run in a thread,
and a slow model whose decoding can be watched (for cancellation and full-queue tests)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import uvicorn

from edgelm.serve.runner import uvicorn_config


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1"):
    """Serve `app` with uvicorn on a free port of `host`; yield the base URL (http://host:port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.bind((host, 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


class SlowDecoder:
    """Wraps a decoder: every evaluation sleeps `delay` seconds and is counted."""

    def __init__(self, inner, delay: float):
        self.inner = inner
        self.delay = delay
        self.steps = 0

    def prefill(self, ids):
        self.steps += 1
        time.sleep(self.delay)
        return self.inner.prefill(ids)

    def step(self, token_id):
        self.steps += 1
        time.sleep(self.delay)
        return self.inner.step(token_id)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def slowed(model, delay: float = 0.02):
    model.decoder = SlowDecoder(model.decoder, delay)
    return model
