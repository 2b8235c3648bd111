"""The bookkeeping every batched decoder keeps for its sequence slots, in one place.

A slot holds the tokens its cache has evaluated, the prompt tokens still to evaluate, whether a
sequence is admitted, and when it was last used. `SlotBook` checks a prompt, picks a free slot
for it, and answers `cached_tokens` / `pending_tokens`; the decoders (llama.cpp's
LlamaBatchDecoder, the fused ONNX GPT-2's FusedBatchDecoder) keep only what their backend needs:
how a cache is cut, evaluated and freed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from edgelm.errors import CapacityError, ContextOverflowError, InputError, UsageError
from edgelm.runtime.core.params import check_token_ids
from edgelm.runtime.core.scheduler import shared_prefix

# a free slot counts as the prompt's own conversation when the prompt shares at least this part
# of its cache. Lower, a new conversation that shares only a system prompt with an idle one
# (SmolLM2: 24 of 43 tokens after one short turn) took its slot and evicted it, and the idle
# conversation's next turn was prefilled whole; a next turn re-renders the whole history, so it
# shares nearly all of it (all but a boundary token or two that tokenise differently).
CONTINUES = 0.9


@dataclass
class Slot:
    cached: list[int] = field(default_factory=list)  # tokens whose keys/values the cache holds
    pending: list[int] = field(default_factory=list)  # prompt tokens admitted, not yet evaluated
    active: bool = False
    used: int = 0  # when last admitted or stepped, for least-recently-used choice


def check_slot_count(slots: object, most: int) -> int:
    if isinstance(slots, bool) or not isinstance(slots, int) or not 1 <= slots <= most:
        raise UsageError(f"parallel sequences must be an integer in [1, {most}], got {slots!r:.40}")
    return slots


class SlotBook:
    """Mixed into a batched decoder: `slots`, `states`, `context_length` and `vocab_size` set by it."""

    slots: int
    context_length: int
    vocab_size: int

    def _open_slots(self, slots: int) -> None:
        self.slots = slots
        self.states = [Slot() for _ in range(slots)]
        self._clock = 0

    def _checked_prompt(self, prompt_ids: Sequence[int], where: str) -> list[int]:
        ids = check_token_ids(prompt_ids, self.vocab_size, where)  # an id past the vocabulary never reaches a kernel
        if not ids:
            raise InputError("a prompt needs at least one token")
        if len(ids) > self.context_length:
            raise ContextOverflowError(
                f"a prompt of {len(ids)} tokens exceeds the context length {self.context_length}")
        return ids

    def _free_slot_for(self, ids: list[int]) -> int:
        """The free slot whose cache this prompt continues (the longest shared prefix), else an
        empty one, else the least recently used one."""
        free = [s for s, state in enumerate(self.states) if not state.active]
        if not free:
            raise CapacityError(f"all {self.slots} sequence slots are in use; release one first")
        shared = {s: shared_prefix(self.states[s].cached, ids) for s in free}
        continued = [s for s in free if shared[s] and shared[s] >= CONTINUES * len(self.states[s].cached)]
        if continued:
            return max(continued, key=lambda s: (shared[s], -self.states[s].used))
        return min(free, key=lambda s: (len(self.states[s].cached) > 0, self.states[s].used))

    def _start(self, slot: int, ids: list[int], keep: int) -> None:
        """The slot's sequence admitted: its cache kept up to `keep` tokens (the caller has cut
        the backend's), the rest of the prompt pending."""
        state = self.states[slot]
        del state.cached[keep:]
        state.pending = ids[keep:]
        state.active = True
        state.used = self._tick()

    def _end(self, slot: int) -> Slot:
        state = self._active(slot)
        state.active = False
        state.pending = []  # tokens never evaluated are not in the cache
        return state

    def cached_tokens(self, slot: int) -> tuple[int, ...]:
        """The tokens whose keys and values the slot's cache holds."""
        self._slot(slot)
        return tuple(self.states[slot].cached)

    def pending_tokens(self, slot: int) -> int:
        """Prompt tokens of an admitted sequence not evaluated yet (0: it is decoding)."""
        return len(self._active(slot).pending)

    def _tick(self) -> int:
        self._clock += 1
        return self._clock

    def _slot(self, slot: object) -> int:
        if isinstance(slot, bool) or not isinstance(slot, int) or not 0 <= slot < self.slots:
            raise UsageError(f"slot must be an integer in [0, {self.slots}), got {slot!r:.40}")
        return slot

    def _active(self, slot: object) -> Slot:
        state = self.states[self._slot(slot)]
        if not state.active:
            raise UsageError(f"slot {slot!r:.40} holds no admitted sequence")
        return state
