"""The text-generation task: one loop (sample, detokenise, stop) over any decoder backend."""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelm.contract import GenerationSection, TokenizerSection
from edgelm.errors import ContextOverflowError, InputError
from edgelm.runtime.core.aio import AsyncGeneration
from edgelm.runtime.core.constraint_vocab import llg_vocabulary
from edgelm.runtime.core.constraints import Constraint, GrammarMask, pop_constraint
from edgelm.runtime.core.one_slot import OneSlot
from edgelm.runtime.core.params import GenerationParams
from edgelm.runtime.core.sampler import Sampler
from edgelm.runtime.core.scheduler import Scheduler
from edgelm.runtime.core.text import IncrementalDetokenizer, StopMatcher
from edgelm.safe_text import check_text


@dataclass
class Completion:
    """The text of one generation and what happened on the way."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (stop string, or the constraint complete), "eos", or "length"
    truncated_prompt_tokens: int = 0  # >0 when truncate=True dropped the start of the prompt
    timings: dict[str, float] = field(default_factory=dict)
    # with a constraint: True when the text is not a complete match (max_tokens or a stop string came first)
    constraint_incomplete: bool = False
    # chat with tools: the calls the reply makes, OpenAI-shaped ({"id", "type", "function"}); None otherwise
    tool_calls: list[dict[str, Any]] | None = None


class TextStream:
    """Iterates over text pieces; `completion` is filled in once the iteration has finished.
    `cancel()` (from any thread) stops the generation before its next decoder call; the
    iteration then ends without a completion."""

    def __init__(self, pieces: Iterator[str], holder: dict[str, Completion]):
        self._pieces = pieces
        self._holder = holder

    def __iter__(self) -> Iterator[str]:
        return self._pieces

    def __next__(self) -> str:
        return next(self._pieces)

    @property
    def completion(self) -> Completion | None:
        return self._holder.get("completion")

    def ready(self) -> bool:
        """Whether the next piece (or the end) is there already: `next()` will not wait."""
        ticket = self._holder.get("ticket")
        return ticket is None or ticket.ready()

    def on_ready(self, wakeup) -> None:
        """Have `wakeup()` called (from the scheduler's thread) whenever the stream has something
        new, so an event loop can read it while `ready()` without a thread blocked on it."""
        ticket = self._holder.get("ticket")
        if ticket is None:
            wakeup()
        else:
            ticket.on_event(wakeup)

    def cancel(self) -> None:
        stop = self._holder.get("cancel")  # its sequence's ticket: leaves the queue, or its slot
        if stop is not None:
            stop()


class Decoder(ABC):
    """What a backend supplies: logits for a prompt, then for one more token at a time."""

    context_length: int | None = None  # None: no limit (recurrent models)

    @abstractmethod
    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Reset the state, run the whole prompt, return the logits (vocab,) of its last position."""

    @abstractmethod
    def step(self, token_id: int) -> np.ndarray:
        """Feed one token carrying the state forward; return the next logits (vocab,)."""

    def close(self) -> None:
        """Free the backend's session; the object is unusable afterwards."""


class TextGenerator(AsyncGeneration):
    """`generate` and `stream` over a decoder and a `tokenizers.Tokenizer`.

    Every call becomes one sequence of a scheduler (runtime/core/scheduler.py): the one given,
    over a batched decoder, where calls from several threads at once share batched steps; or, by
    default, one over `decoder` alone (`OneSlot`), where such calls take turns in arrival order.
    Either way the calls may come from any thread, and a stream is cancelled through its own
    sequence."""

    task = "text-generation"

    def __init__(self, decoder: Decoder, tokenizer, manifest: Any = None, defaults: GenerationParams | None = None,
                 scheduler: Any = None):
        self._decoder = decoder
        self.scheduler = scheduler if scheduler is not None else Scheduler(OneSlot(decoder), name=_name_of(manifest))
        self.tokenizer = tokenizer
        self.manifest = manifest
        generation = manifest.generation if manifest is not None else GenerationSection()
        special = manifest.tokenizer if manifest is not None else TokenizerSection()
        self.eos_id: int | None = special.eos_id
        self.bos_id: int | None = special.bos_id
        self.add_bos: bool = generation.add_bos
        # further ids that end a generation like eos (a chat model's end-of-turn); backends add them
        self.end_ids: set[int] = set()
        self.closed = False
        stops = generation.stop
        self.defaults = defaults or GenerationParams(stop=stops)

    @property
    def decoder(self) -> Any:
        return self._decoder

    @decoder.setter
    def decoder(self, decoder: Any) -> None:
        """Replace the decoder (tests wrap it to record or slow it); a one-slot scheduler drives
        the new one from its next sequence on."""
        self._decoder = decoder
        if isinstance(self.scheduler.decoder, OneSlot):
            self.scheduler.decoder.decoder = decoder

    # -- public API -------------------------------------------------------------------------
    def generate(self, prompt: str, **params: Any) -> str:
        return self.complete(prompt, **params).text

    def complete(self, prompt: str, **params: Any) -> Completion:
        stream = self.stream(prompt, **params)
        for _ in stream:
            pass
        assert stream.completion is not None
        return stream.completion

    def stream(self, prompt: str, **params: Any) -> TextStream:
        """Stream the continuation of `prompt`. Besides the sampling parameters, at most one of
        json_schema=, regex=, grammar= (Lark) or json_object=True constrains the output."""
        self._check_open()
        constraint = pop_constraint(params)
        resolved = GenerationParams.from_kwargs(self.defaults, **params)
        ids, dropped = self._prompt_ids(prompt, resolved)
        holder: dict[str, Completion] = {}
        return TextStream(self._run(ids, dropped, resolved, holder, constraint), holder)

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def close(self) -> None:
        self.closed = True
        self.scheduler.close()  # its loop has stopped stepping before the decoder goes
        self.decoder.close()

    def __enter__(self) -> TextGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self.closed:
            raise InputError("this model was closed; load it again to use it")

    # -- the loop ---------------------------------------------------------------------------
    def _prompt_ids(self, prompt: str, params: GenerationParams) -> tuple[list[int], int]:
        if not isinstance(prompt, str):
            raise InputError(f"prompt must be a string, got {type(prompt).__name__}")
        check_text(prompt, "the prompt")  # lone surrogates: bytes that were never UTF-8
        ids = self.encode(prompt)
        if not ids:
            raise InputError("the prompt is empty after tokenising; give at least one character")
        limit = self.decoder.context_length
        if limit is None or len(ids) + params.max_tokens <= limit:
            return ids, 0
        room = limit - params.max_tokens
        if not params.truncate or room < 1:
            raise ContextOverflowError(
                f"prompt of {len(ids)} tokens plus max_tokens {params.max_tokens} exceeds the "
                f"context length {limit}; shorten the prompt, lower max_tokens, or pass truncate"
            )
        return ids[-room:], len(ids) - room

    def _run(self, ids: list[int], dropped: int, params: GenerationParams, holder: dict,
             constraint: Constraint | None = None) -> Iterator[str]:
        sequence = Continuation(self, ids, dropped, params, constraint)
        # submitted now, not at the first next(): a stream is queued in the order it was asked for
        ticket = self.scheduler.submit(ids, sequence)
        holder["cancel"] = ticket.cancel
        holder["ticket"] = ticket
        return _relayed(ticket, holder)

    def exclusive(self) -> Any:
        """A context in which the caller drives `decoder` directly (a static batch, scoring) while
        no scheduled sequence is using it; a no-op for a batched decoder's own scheduler."""
        slot = self.scheduler.decoder
        return slot.exclusive if isinstance(slot, OneSlot) else contextlib.nullcontext()


def _name_of(manifest: Any) -> str:
    name = getattr(getattr(manifest, "model", None), "architecture", None) or getattr(manifest, "family", None)
    return str(name or "model")


def _relayed(ticket: Any, holder: dict) -> Iterator[str]:
    """A scheduled sequence's pieces as the scheduler's loop sends them."""
    try:
        yield from ticket.pieces()
    finally:
        ticket.cancel()  # a no-op once finished; a stream closed or dropped early frees its slot
    if ticket.completion is not None:
        holder["completion"] = ticket.completion


class Continuation:
    """One sequence being generated: its sampler, detokeniser, stop matcher, grammar mask and counts.

    The single-prompt loop and batch generation both drive these, so a batch row means
    exactly what a lone generation means.
    """

    def __init__(self, generator: TextGenerator, ids: list[int], dropped: int, params: GenerationParams,
                 constraint: Constraint | None = None):
        self.ids, self.dropped, self.params = ids, dropped, params
        self.end_ids = {generator.eos_id, *generator.end_ids} - {None}
        self.sampler = Sampler(params)
        self.detok = IncrementalDetokenizer(generator.tokenizer, ids)
        self.stops = StopMatcher(params.stop)
        self.grammar = None
        if constraint is not None:
            self.grammar = GrammarMask(constraint, lambda: llg_vocabulary(generator))
        self.seen, self.pieces = list(ids), []
        self.generated, self.reason, self.done = 0, "length", False

    def accept(self, logits: np.ndarray) -> tuple[int | None, str]:
        """Sample the next token from `logits`; return it and the text that is now safe to emit.
        The token is None when the constraint ended the text without one (a model with no end token)."""
        forced = None
        if self.grammar is not None:
            logits, forced = self.grammar.apply(logits)  # forbidden tokens at -inf, before any sampling step
            if logits is None:
                self.reason, self.done = "stop", True
                return None, ""
        # a token the grammar forces is what any sampler would pick; skipping the draw saves its cost
        token = forced if forced is not None else self.sampler(logits, self.seen)
        self.generated += 1
        if token in self.end_ids:
            # under a constraint an end token is only allowed once the grammar is satisfied
            self.reason, self.done = ("stop" if self.grammar is not None else "eos"), True
            return token, ""
        if self.grammar is not None:
            self.grammar.consume(token)
        self.seen.append(token)
        piece = self.stops.feed(self.detok.push(token))
        self.pieces.append(piece)
        if self.stops.stopped:
            self.reason, self.done = "stop", True
        elif self.grammar is not None and self.grammar.stopped:
            self.reason, self.done = "stop", True
        elif self.generated >= self.params.max_tokens:
            self.done = True
        return token, piece

    def finish(self) -> str:
        """Text still held back at the end (nothing once a stop string has matched)."""
        tail = "" if self.stops.stopped else self.stops.feed(self.detok.flush()) + self.stops.flush()
        self.pieces.append(tail)
        return tail

    def completion(self, timings: dict[str, float]) -> Completion:
        return Completion(
            text="".join(self.pieces),
            prompt_tokens=len(self.ids),
            completion_tokens=self.generated,
            finish_reason=self.reason,
            truncated_prompt_tokens=self.dropped,
            timings=timings,
            constraint_incomplete=self.grammar is not None and not self._constraint_met(),
        )

    def _constraint_met(self) -> bool:
        """The text is a whole match: the grammar accepts it and no stop string cut it short."""
        return not self.stops.stopped and self.grammar.accepting
