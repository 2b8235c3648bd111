"""A single-sequence `Decoder` seen as a one-slot batched decoder, so one scheduler drives every
text model.

Models that cannot step several sequences at once (optimum's GPT-2 graph, RNN/LSTM, a GGUF
loaded without `parallel`) still get the scheduler's loop thread: calls from several threads
queue in order instead of corrupting one decoding state, and cancelling a stream goes through
its own sequence instead of wrapping the model's decoder. The slot's prompt goes in whole: with
one slot there is no running stream for a chunk to stall.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


class OneSlot:
    """The `BatchDecoder` interface (runtime/core/scheduler.py) over one `Decoder`.

    `exclusive` is held from admission to release: code that drives the decoder directly
    (`complete_batch`, scoring) takes it too, so it never runs in the middle of a sequence."""

    slots = 1

    def __init__(self, decoder: Any):
        self.decoder = decoder
        self.exclusive = threading.Lock()
        self._prompt: list[int] | None = None
        self._tokens: list[int] = []
        self._held = False

    @property
    def context_length(self) -> int | None:
        return self.decoder.context_length

    def admit(self, prompt_ids: Sequence[int]) -> int:
        self.exclusive.acquire()
        self._held = True
        self._prompt = list(prompt_ids)
        return 0

    def step(self, tokens: Mapping[int, int] | None = None,
             prefill: Mapping[int, int] | None = None) -> dict[int, np.ndarray]:
        if prefill and 0 in prefill and self._prompt is not None:
            ids, self._prompt = self._prompt, None
            logits = self.decoder.prefill(ids)
            self._tokens = list(ids)
            return {0: logits}
        if tokens and 0 in tokens:
            logits = self.decoder.step(tokens[0])
            self._tokens.append(tokens[0])
            return {0: logits}
        return {}

    def release(self, slot: int) -> None:
        self._prompt = None
        if self._held:
            self._held = False
            self.exclusive.release()

    def cached_tokens(self, slot: int) -> tuple[int, ...]:
        return tuple(self._tokens)
