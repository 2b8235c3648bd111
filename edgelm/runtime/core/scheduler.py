"""One loop per loaded model that decodes many sequences together (issue 17's scheduler).

Callers on any thread `submit` a sequence: its prompt ids and its own `Continuation` (sampler,
detokeniser, stop strings, grammar mask), so a sequence means exactly what it means alone. One
background thread owns the batched decoder (`LlamaBatchDecoder`'s interface: admit, step,
release) and repeats one round:

- cancelled sequences leave their slots (their cache stays for prefix reuse);
- waiting sequences are admitted in submission order (FIFO) while a slot is free; a later
  request never overtakes an earlier one, so nobody waits forever behind newer arrivals;
- ONE `step` evaluates the sampled token of every decoding sequence together with a chunk of
  every prompt still prefilling, so a long prompt does not stall the running streams;
- each sequence whose logits came back samples its next token with its own Continuation; its
  text goes to the submitter through a thread-safe queue, and a finished sequence is released.

Only the loop thread calls the decoder (it is not thread-safe); submitters block on their own
ticket's queue. This module imports no backend: it drives whatever has the decoder's interface.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from edgelm.errors import EdgelmError, InputError

log = logging.getLogger("edgelm.scheduler")

# Prompt tokens one prefilling sequence adds to a step while other sequences are decoding. A
# decode step of a small model on a CPU is bound by reading the weights; a chunk adds compute in
# proportion to its tokens, so it lengthens that step for every running stream. 64 tokens keep
# one such step within a few decode steps' time (running streams stall for tens of milliseconds,
# not for a whole prompt), while a 64-row matrix product already runs near the CPU's full
# prefill rate, so a long prompt still goes in at nearly its solo speed. With no stream
# decoding there is nobody to stall: the prompt goes in as large pieces as the batch holds.
PREFILL_CHUNK = 64
WHOLE_PROMPT = 1 << 30  # "as much as the batch holds"; the decoder caps it by its room


def shared_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens two sequences have in common (slot choice and prefix reuse)."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class BatchDecoder(Protocol):
    """What the scheduler drives (runtime/llamacpp/batch.py's LlamaBatchDecoder)."""

    slots: int
    context_length: int

    def admit(self, prompt_ids: Sequence[int]) -> int: ...

    def step(self, tokens: Mapping[int, int] | None = None,
             prefill: Mapping[int, int] | None = None) -> dict[int, np.ndarray]: ...

    def release(self, slot: int) -> None: ...

    def cached_tokens(self, slot: int) -> tuple[int, ...]: ...


class Ticket:
    """One submitted sequence: the Continuation the loop drives and the queue its text comes back on.

    Events are ("piece", text), then ("done", Completion), ("error", exception) or ("cancelled", None).
    """

    def __init__(self, scheduler: Scheduler, ids: Sequence[int], continuation: Any):
        self.ids = list(ids)
        self.continuation = continuation
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.slot: int | None = None
        self.token: int | None = None  # sampled, to be evaluated by the next step
        self.cancelled = False
        self.finished = False
        self.completion = None
        self.submitted = time.perf_counter()
        self.admitted: float | None = None
        self.first_logits: float | None = None
        self._scheduler = scheduler
        self._wakeup: Any = None  # called after each event is queued (from the loop thread)

    def post(self, kind: str, value: Any) -> None:
        """(On the loop thread.) Queue an event and wake whoever waits for one without a thread."""
        self.events.put((kind, value))
        wakeup = self._wakeup
        if wakeup is not None:
            try:
                wakeup()
            except Exception:  # noqa: BLE001 - a waiter that has gone (a closed event loop) wakes nobody
                log.debug("a ticket's wakeup failed", exc_info=True)

    def on_event(self, wakeup: Any) -> None:
        """Call `wakeup()` (from the loop thread, so it must be quick and thread-safe) after each
        event, and once now when events are already waiting: for a consumer, such as an event
        loop, that reads `pieces()` only while `ready()` instead of blocking a thread on it."""
        self._wakeup = wakeup
        if self.ready():
            wakeup()

    def ready(self) -> bool:
        """Whether the next step of `pieces()` returns without waiting."""
        return not self.events.empty()

    def cancel(self) -> None:
        """Stop this sequence: a waiting one leaves the queue now, a running one its slot before
        the next step. No-op once it has finished."""
        self._scheduler.cancel(self)

    def pieces(self) -> Iterator[str]:
        """The text as the loop produces it; ends when the sequence finishes or is cancelled, and
        raises the error that ended it otherwise."""
        while True:
            kind, value = self.events.get()
            if kind == "piece":
                yield value
            elif kind == "error":
                raise value
            else:  # done or cancelled
                return

    def timings(self, now: float) -> dict[str, float]:
        admitted = self.admitted or now
        return {"queued_s": admitted - self.submitted, "prefill_s": (self.first_logits or now) - admitted,
                "total_s": now - admitted}


class Scheduler:
    """Owns a batched decoder's loop: admission, chunked prefill beside decode steps, sampling per
    sequence, cancellation per sequence. `submit` and `cancel` may be called from any thread."""

    def __init__(self, decoder: BatchDecoder, prefill_chunk: int = PREFILL_CHUNK, name: str = "model"):
        self.decoder = decoder
        self.prefill_chunk = prefill_chunk
        self.name = name
        self._lock = threading.Condition()
        self._waiting: deque[Ticket] = deque()
        self._running: dict[int, Ticket] = {}  # slot -> its sequence
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def slots(self) -> int:
        return self.decoder.slots

    # -- any thread --------------------------------------------------------------------------
    def submit(self, ids: Sequence[int], continuation: Any) -> Ticket:
        """Queue a sequence; its text comes back through the returned ticket."""
        ticket = Ticket(self, ids, continuation)
        with self._lock:
            if self._closed:
                raise InputError("this model was closed; load it again to use it")
            self._waiting.append(ticket)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=f"edgelm-scheduler-{self.name}",
                                                daemon=True)
                self._thread.start()
            self._lock.notify()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.finished or ticket.cancelled:
                return
            ticket.cancelled = True
            if ticket.slot is None:  # never admitted: it leaves the queue at once
                self._waiting.remove(ticket)
                self._end(ticket, "cancelled", None)
            self._lock.notify()  # a running one is released by the loop before its next step

    def stats(self) -> dict[str, int]:
        """Slots, sequences decoding or prefilling, sequences waiting, tokens the caches hold."""
        with self._lock:
            active, queued = len(self._running), len(self._waiting)
        # read beside the loop: a slot's cache list only grows or is cut, so a count is never torn
        cached = sum(len(self.decoder.cached_tokens(s)) for s in range(self.slots))
        cached += getattr(self.decoder, "saved_tokens", 0)  # released caches kept outside the context
        return {"slots": self.slots, "active": active, "queued": queued, "cached_tokens": cached}

    def close(self) -> None:
        """End every sequence (their submitters get an error) and stop the loop; the decoder is
        the owner's to close afterwards, once no step can be running."""
        with self._lock:
            self._closed = True
            closed = InputError("the model was closed while this generation was running")
            while self._waiting:
                self._end(self._waiting.popleft(), "error", closed)
            for ticket in self._running.values():
                ticket.cancelled = True
            self._lock.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # -- the loop thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    batch = self._next_batch()
                    if batch is None:
                        return
                    tokens, prefill = self._plan(batch)
                self._run_step(batch, tokens, prefill)
        except BaseException as err:  # a bug in the loop: no submitter may wait forever on a dead thread
            log.exception("the scheduler loop of model %s stopped", self.name)
            self._stop_all(err)

    def _stop_all(self, err: BaseException) -> None:
        """(On the dying loop thread.) Close the scheduler and end every sequence with an error;
        the decoder's state is unknown, so no slot is released into it."""
        if not isinstance(err, EdgelmError):
            err = EdgelmError(f"the scheduler of model {self.name} stopped ({type(err).__name__}: {err})")
        with self._lock:
            self._closed = True
            for ticket in [*self._waiting, *self._running.values()]:
                if not ticket.finished:
                    self._end(ticket, "error", err)
            self._waiting.clear()
            self._running.clear()

    def _next_batch(self) -> dict[int, Ticket] | None:
        """(Under the lock.) The sequences of the next step, after releasing the cancelled and
        admitting the waiting; waits while there is nothing to do; None once closed and idle."""
        while True:
            self._drop_cancelled()
            self._admit()
            if self._running:
                return dict(self._running)
            if self._closed:
                return None
            self._lock.wait()

    def _drop_cancelled(self) -> None:
        for ticket in list(self._running.values()):
            if ticket.cancelled and self._closed:
                self._release(ticket, "error", InputError("the model was closed while this generation was running"))
            elif ticket.cancelled:
                self._release(ticket, "cancelled", None)

    def _admit(self) -> None:
        """First come, first served: the oldest waiting sequence takes the next free slot."""
        while self._waiting and len(self._running) < self.slots:
            ticket = self._waiting.popleft()
            try:
                ticket.slot = self.decoder.admit(ticket.ids)
            except EdgelmError as err:  # a prompt the decoder refuses fails alone
                self._end(ticket, "error", err)
                continue
            ticket.admitted = time.perf_counter()
            self._running[ticket.slot] = ticket

    def _plan(self, batch: dict[int, Ticket]) -> tuple[dict[int, int], dict[int, int]]:
        """Decode tokens for the sequences that have sampled one, prompt chunks for the others:
        small chunks while anybody is decoding, as much as fits while nobody is."""
        tokens = {slot: t.token for slot, t in batch.items() if t.token is not None}
        chunk = self.prefill_chunk if tokens else WHOLE_PROMPT
        prefill = {slot: chunk for slot, t in batch.items() if t.token is None}
        return tokens, prefill

    def _run_step(self, batch: dict[int, Ticket], tokens: dict[int, int], prefill: dict[int, int]) -> None:
        try:
            rows = self.decoder.step(tokens, prefill)
        except Exception as err:  # noqa: BLE001 - the cache's state is unknown: end every sequence in it
            if not isinstance(err, EdgelmError):
                log.error("batched step of model %s failed: %s: %s", self.name, type(err).__name__, err)
            with self._lock:
                for ticket in batch.values():
                    self._release(ticket, "error", err)
            return
        for slot, logits in rows.items():
            self._advance(batch[slot], logits)

    def _advance(self, ticket: Ticket, logits: np.ndarray) -> None:
        """Sample the sequence's next token, send its text, and release it once it is done."""
        sequence = ticket.continuation
        now = time.perf_counter()
        if ticket.first_logits is None:
            ticket.first_logits = now
        try:
            token, piece = sequence.accept(logits)
            if piece:
                ticket.post("piece", piece)
            if not sequence.done:
                ticket.token = token
                return
            tail = sequence.finish()
            if tail:
                ticket.post("piece", tail)
            ticket.completion = sequence.completion(ticket.timings(time.perf_counter()))
        except Exception as err:  # noqa: BLE001 - one sequence's failure (a grammar error) ends it alone
            with self._lock:
                self._release(ticket, "error", err)
            return
        with self._lock:
            self._release(ticket, "done", ticket.completion)

    def _release(self, ticket: Ticket, kind: str, value: Any) -> None:
        """(Under the lock, on the loop thread.) Free the slot, keeping its cache, and tell the submitter."""
        try:
            if self._running.get(ticket.slot) is ticket:
                del self._running[ticket.slot]
                self.decoder.release(ticket.slot)
        finally:  # told even when the decoder fails: it has left _running, where _stop_all looks
            self._end(ticket, kind, value)

    @staticmethod
    def _end(ticket: Ticket, kind: str, value: Any) -> None:
        ticket.finished = True
        ticket.post(kind, value)
