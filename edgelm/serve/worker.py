"""One worker thread per model, a bounded FIFO in front of it, and cancellation between tokens.

A model's backend holds one decoding state, so its requests run one after another in arrival
order on its own thread; different models run in parallel. Results travel back to the event
loop as events on the job's asyncio queue. A cancelled job that is still waiting leaves the
queue at once; a running one stops before its next token: the decoder is wrapped for the job's
duration so that every prefill and step checks the cancel flag first.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

from edgelm.serve.errors import ApiError

log = logging.getLogger("edgelm.serve")


class Cancelled(Exception):
    """Raised inside the decode loop when the job's client has gone."""


class Job:
    """One request's work for a model's worker thread, and the channel its events come back on.

    Events are (kind, value) pairs; `run` emits them from the worker thread.
    """

    def __init__(self, run: Callable[[Job], None]):
        self.run = run
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.cancelled = threading.Event()
        self.state = "new"  # new -> queued -> running -> finished, or queued -> dropped

    def emit(self, kind: str, value: Any = None) -> None:
        """Called from the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop has closed: nobody is listening any more
            self.cancelled.set()

    async def next_event(self) -> tuple[str, Any]:
        return await self.events.get()


class ModelWorker:
    """A model's thread and its queue; `active` and `queued` are read by /health without waiting."""

    def __init__(self, name: str, max_queue: int):
        self.name = name
        self.max_queue = max_queue
        self.lock = threading.Condition()
        self.pending: collections.deque[Job] = collections.deque()
        self.running: Job | None = None
        self.thread: threading.Thread | None = None
        self.stopping = False

    @property
    def active(self) -> int:
        return int(self.running is not None)

    @property
    def queued(self) -> int:
        return len(self.pending)

    def submit(self, job: Job) -> None:
        """Admit a job in order, or refuse it with a 503 when the queue is full."""
        with self.lock:
            if self.stopping:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            busy = self.active or self.pending
            if busy and len(self.pending) >= self.max_queue:
                raise ApiError(503, f"model {self.name!r} has {len(self.pending)} requests waiting, the most "
                               "this server allows; retry shortly", code="queue_full", headers={"Retry-After": "1"})
            job.state = "queued"
            self.pending.append(job)
            if self.thread is None:
                self.thread = threading.Thread(target=self._serve, name=f"edgelm-serve-{self.name}", daemon=True)
                self.thread.start()
            self.lock.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job: a waiting one leaves the queue now, a running one before its next token."""
        job.cancelled.set()
        with self.lock:
            if job.state == "queued":
                job.state = "dropped"
                self.pending.remove(job)

    def stop(self, timeout: float = 5.0) -> bool:
        """Refuse new jobs, drop waiting ones, stop the running one and wait for the thread;
        whether the thread has ended (only then may the model be closed)."""
        with self.lock:
            self.stopping = True
            for job in self.pending:
                job.cancelled.set()
                job.state = "dropped"
                job.emit("error", ApiError(503, "the server is shutting down", code="shutting_down"))
            self.pending.clear()
            if self.running is not None:
                self.running.cancelled.set()
            self.lock.notify()
            thread = self.thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    def _serve(self) -> None:
        while True:
            with self.lock:
                while not self.pending and not self.stopping:
                    self.lock.wait()
                if not self.pending:
                    return
                job = self.pending.popleft()
                job.state = "running"
                self.running = job
            try:
                job.run(job)
            except BaseException:  # run() reports its own errors; this is a bug, and the thread must live
                log.exception("unexpected error in model %s's worker", self.name)
                job.emit("error", ApiError(500, "internal error while running the model", code="internal_error"))
            finally:
                with self.lock:
                    self.running = None
                    job.state = "finished"


class CancelCheckedDecoder:
    """A decoder that raises Cancelled before evaluating anything once the flag is set.

    Checking before the backend call keeps the backend's state consistent: what it holds is
    always what it has evaluated, so the next request starts from a sound state.
    """

    def __init__(self, inner: Any, flag: threading.Event):
        self._inner = inner
        self._flag = flag

    def _check(self) -> None:
        if self._flag.is_set():
            raise Cancelled

    def prefill(self, ids):
        self._check()
        return self._inner.prefill(ids)

    def step(self, token_id):
        self._check()
        return self._inner.step(token_id)

    def prefill_batch(self, rows):
        self._check()
        return self._inner.prefill_batch(rows)

    def step_batch(self, tokens):
        self._check()
        return self._inner.step_batch(tokens)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class cancel_checks:
    """Context manager: the model's decoder checks `flag` for the duration of one job."""

    def __init__(self, model: Any, flag: threading.Event):
        self.model = model
        self.flag = flag
        self.inner = getattr(model, "decoder", None)

    def __enter__(self) -> None:
        if self.inner is not None:
            self.model.decoder = CancelCheckedDecoder(self.inner, self.flag)

    def __exit__(self, *exc: object) -> None:
        if self.inner is not None:
            self.model.decoder = self.inner
