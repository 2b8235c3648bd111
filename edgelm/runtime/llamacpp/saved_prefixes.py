"""Finished sequences' KV caches kept in host memory instead of llama.cpp's unified cache.

Why: llama.cpp's unified cache attends over every cell up to the highest one in use, masked or
not, so an idle conversation left in the cache is read again by every step of every other
sequence. Measured on SmolLM2-135M Q4_1 (2 threads): one sequence decoding beside three idle
300-token caches ran about 15-20% slower than alone. A released slot's cells are therefore
copied out (llama.cpp's per-sequence state, a few MB for a few hundred tokens) and removed; a
later prompt that shares a long enough prefix with a saved one gets it copied back into its
slot, so a chat's next turn still evaluates only its new tokens, however many conversations ran
in between, and the cache stays as small as the sequences actually running.

Entries are found by longest shared token prefix and dropped least recently used first once
their bytes pass the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from edgelm.runtime.core.scheduler import shared_prefix

# a saved prefix is restored when the prompt shares at least this many of its tokens: every
# prompt shares BOS with every entry, and copying a state back (well under a millisecond for a
# few hundred tokens of a small model) is cheaper than evaluating even a few tokens
MIN_RESTORE = 4
DEFAULT_BUDGET = 256 << 20  # bytes of saved states per model


@dataclass
class SavedPrefix:
    tokens: tuple[int, ...]
    state: bytes  # llama_state_seq_get_data of the sequence that held `tokens`
    used: int


class SavedPrefixes:
    """Saved sequence states by token prefix, within a byte budget."""

    def __init__(self, budget: int = DEFAULT_BUDGET):
        self.budget = budget
        self.entries: list[SavedPrefix] = []
        self._clock = 0

    @property
    def size(self) -> int:
        return sum(len(e.state) for e in self.entries)

    @property
    def tokens(self) -> int:
        return sum(len(e.tokens) for e in self.entries)

    def best(self, ids: Sequence[int]) -> tuple[SavedPrefix | None, int]:
        """The entry sharing the longest prefix with `ids` (at least MIN_RESTORE), and that length."""
        found, longest = None, 0
        for entry in self.entries:
            shared = shared_prefix(entry.tokens, ids)
            if shared > longest:
                found, longest = entry, shared
        return (found, longest) if longest >= MIN_RESTORE else (None, 0)

    def save(self, tokens: Sequence[int], state: bytes) -> None:
        """Keep `state`; an entry it extends (the same conversation's earlier turn) goes."""
        tokens = tuple(tokens)
        if len(state) > self.budget or not tokens:
            return
        self.entries = [e for e in self.entries if not _prefix_of(e.tokens, tokens)]
        self._clock += 1
        self.entries.append(SavedPrefix(tokens, state, self._clock))
        while self.size > self.budget:
            self.entries.remove(min(self.entries, key=lambda e: e.used))

    def touch(self, entry: SavedPrefix) -> None:
        self._clock += 1
        entry.used = self._clock

    def drop(self, entry: SavedPrefix) -> None:
        if entry in self.entries:
            self.entries.remove(entry)


def _prefix_of(short: tuple[int, ...], long: tuple[int, ...]) -> bool:
    return len(short) <= len(long) and long[: len(short)] == short
