"""Turning token ids back into text safely: incremental detokenising and stop strings."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from edgelm.errors import ArtifactError

REPLACEMENT = "\ufffd"


def vocabulary_size(tokenizer) -> int | None:
    """How many ids a tokenizer can decode (`tokenizers.Tokenizer` or llama.cpp's), if it says."""
    size = getattr(tokenizer, "vocab_size", None)
    if size is None and hasattr(tokenizer, "get_vocab_size"):
        size = tokenizer.get_vocab_size(with_added_tokens=True)
    return size if isinstance(size, int) else None


def check_decodable(ids: Sequence[int], vocab_size: int | None) -> None:
    """An id the tokenizer does not have came from a model or manifest that does not match it:
    a one-line error here, where the tokenizer library would overflow or llama.cpp would abort."""
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or token < 0 or (
                vocab_size is not None and token >= vocab_size):
            raise ArtifactError(f"token id {token!r} is outside the tokenizer's vocabulary of {vocab_size} ids; "
                                "the model and its tokenizer do not match")


class IncrementalDetokenizer:
    """Emits text as tokens arrive, holding back bytes that do not yet form a whole character.

    Decoding each token alone breaks multi-byte characters and byte-level spacing, so this
    decodes a short window of recent tokens and emits only the text that grew at its end.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.vocab_size = vocabulary_size(tokenizer)
        # a few prompt tokens give the decoder context (leading spaces), but are never emitted
        self.ids: list[int] = list(prompt_ids[-4:])
        check_decodable(self.ids, self.vocab_size)
        self.prefix = 0
        self.read = len(self.ids)

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def push(self, token_id: int) -> str:
        check_decodable((token_id,), self.vocab_size)
        self.ids.append(token_id)
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        if after.endswith(REPLACEMENT) or len(after) <= len(before):
            return ""  # an incomplete character: wait for the bytes that finish it
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back at the end (a dangling partial character shows as U+FFFD)."""
        before = self._decode(self.ids[self.prefix : self.read])
        after = self._decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :] if len(after) > len(before) else ""


class StopMatcher:
    """Holds back text that could be the start of a stop string, so a stop never leaks out."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Add text; return what is now safe to emit. Sets `stopped` when a stop string appears."""
        if self.stopped:
            return ""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        keep = self._longest_partial_stop()
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out

    def _longest_partial_stop(self) -> int:
        best = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.pending)), best, -1):
                if self.pending.endswith(stop[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out
