"""Where a model's requests run: for a text generator, a thread per request beside its
scheduler's loop; for an encoder, one worker thread and a bounded FIFO per model.

`SequenceWorker` (every text generator): each request's thread submits one sequence to the
model's scheduler, which admits them first come, first served and steps them together (one at a
time for a one-slot model); a cancelled job cancels its sequence, which leaves the queue at once
or its slot before the next step. At most slots + max_queue requests are in flight; beyond that
the answer is 503.

`ModelWorker` (encoders: embed, fill-mask, classify): one thread and a bounded FIFO per model; a
cancelled job that is still waiting leaves the queue at once.

Either way results travel back to the event loop as events on the job's asyncio queue.
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
        self._on_cancel: Callable[[], None] | None = None

    def on_cancel(self, stop: Callable[[], None]) -> None:
        """Call `stop` when the job is cancelled (now, if it already is): how a scheduled
        sequence learns that its client has gone."""
        self._on_cancel = stop
        if self.cancelled.is_set():
            stop()

    def cancel(self) -> None:
        """From any thread. The flag first, then the hook: `on_cancel` looks in the other order,
        so whichever runs second sees the other's write."""
        self.cancelled.set()
        stop = self._on_cancel
        if stop is not None:
            stop()

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

    def health(self) -> dict[str, int]:
        return {"active": self.active, "queued": self.queued}

    def submit(self, job: Job) -> None:
        """Admit a job in order, or refuse it with a 503 when the queue is full."""
        with self.lock:
            if self.stopping:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            busy = self.active or self.pending
            if busy and len(self.pending) >= self.max_queue:
                raise queue_full(self.name, len(self.pending))
            job.state = "queued"
            self.pending.append(job)
            if self.thread is None:
                self.thread = threading.Thread(target=self._serve, name=f"edgelm-serve-{self.name}", daemon=True)
                self.thread.start()
            self.lock.notify()

    def cancel(self, job: Job) -> None:
        """Stop a job: a waiting one leaves the queue now; a running encoder call runs to its end,
        and its result goes to nobody."""
        job.cancel()
        with self.lock:
            if job.state == "queued":
                job.state = "dropped"
                self.pending.remove(job)

    def stop(self, timeout: float = 5.0) -> bool:
        """Refuse new jobs, drop waiting ones, flag the running one and wait for the thread;
        whether the thread has ended (only then may the model be closed)."""
        with self.lock:
            self.stopping = True
            for job in self.pending:
                job.cancel()
                job.state = "dropped"
                job.emit("error", ApiError(503, "the server is shutting down", code="shutting_down"))
            self.pending.clear()
            if self.running is not None:
                self.running.cancel()
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
                run_reported(job, self.name)
            finally:
                with self.lock:
                    self.running = None
                    job.state = "finished"


def run_reported(job: Job, model: str) -> None:
    """Run a job on a worker's thread. run() reports its own errors; one escaping it is a bug,
    answered with a 500, and the thread carries on (or ends) cleanly."""
    try:
        job.run(job)
    except BaseException:
        log.exception("unexpected error in a request for model %s", model)
        job.emit("error", ApiError(500, "internal error while running the model", code="internal_error"))


def queue_full(name: str, waiting: int) -> ApiError:
    return ApiError(503, f"model {name!r} has {waiting} requests waiting, the most this server allows; retry "
                    "shortly", code="queue_full", headers={"Retry-After": "1"})


class SequenceWorker:
    """A scheduled model's requests: each job on its own thread, their sequences batched by the
    model's scheduler. `health()` is the scheduler's own counts."""

    def __init__(self, name: str, max_queue: int, scheduler: Any):
        self.name = name
        self.max_queue = max_queue
        self.scheduler = scheduler
        self.lock = threading.Lock()
        self.jobs: dict[Job, threading.Thread] = {}
        self.stopping = False

    def health(self) -> dict[str, int]:
        return self.scheduler.stats()

    def submit(self, job: Job) -> None:
        """Start the job's thread, or refuse it with a 503 when slots and queue are all taken
        (counted in jobs: a job being tokenised has not reached the scheduler yet)."""
        with self.lock:
            if self.stopping:
                raise ApiError(503, "the server is shutting down", code="shutting_down")
            slots = self.scheduler.slots
            if len(self.jobs) >= slots + self.max_queue:
                raise queue_full(self.name, len(self.jobs) - slots)
            job.state = "running"
            thread = threading.Thread(target=self._serve, args=(job,), name=f"edgelm-serve-{self.name}",
                                      daemon=True)
            self.jobs[job] = thread
            thread.start()

    def cancel(self, job: Job) -> None:
        """Stop a job: its sequence leaves the scheduler's queue now, or its slot before the next step."""
        job.cancel()

    def stop(self, timeout: float = 5.0) -> bool:
        """Refuse new jobs, cancel every one and wait for their threads; whether all have ended."""
        with self.lock:
            self.stopping = True
            jobs = dict(self.jobs)
        for job in jobs:
            job.cancel()
        for thread in jobs.values():
            thread.join(timeout)
        return not any(thread.is_alive() for thread in jobs.values())

    def _serve(self, job: Job) -> None:
        try:
            run_reported(job, self.name)
        finally:
            with self.lock:
                self.jobs.pop(job, None)
                job.state = "finished"
