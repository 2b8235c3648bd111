"""Slot choice shared by the batched decoders: a prompt goes to the slot whose cache it continues,
and a new conversation that only shares a system prompt with an idle one does not evict it."""

from __future__ import annotations

import pytest

from edgelm.errors import CapacityError, ContextOverflowError, InputError
from edgelm.runtime.core.slots import SlotBook


class Book(SlotBook):
    def __init__(self, slots: int, cached: list[list[int]]):
        self._open_slots(slots)
        self.context_length, self.vocab_size = 100, 1000
        for state, tokens in zip(self.states, cached):
            state.cached = list(tokens)
            state.used = self._tick()


SYSTEM = list(range(1, 25))  # 24 tokens every conversation starts with
IDLE_CHAT = SYSTEM + list(range(500, 519))  # one short turn of another conversation: 43 tokens


def test_a_next_turn_goes_to_its_own_slot():
    book = Book(3, [IDLE_CHAT, SYSTEM + [900]])
    assert book._free_slot_for(IDLE_CHAT + [7, 8, 9]) == 0


def test_sharing_only_the_system_prompt_takes_an_empty_slot_not_an_idle_conversation():
    book = Book(2, [IDLE_CHAT, []])
    assert book._free_slot_for(SYSTEM + [600, 601, 602]) == 1  # with 0.5 of a cache, slot 0 was taken


def test_with_no_empty_slot_the_least_recently_used_goes():
    book = Book(2, [IDLE_CHAT, SYSTEM + list(range(700, 730))])
    assert book._free_slot_for(SYSTEM + [600]) == 0
    book.states[0].active = book.states[1].active = True
    with pytest.raises(CapacityError):
        book._free_slot_for([1])


def test_prompts_are_checked_in_one_line():
    book = Book(1, [])
    with pytest.raises(InputError, match="at least one token"):
        book._checked_prompt([], "prompt")
    with pytest.raises(ContextOverflowError, match="exceeds the context length 100"):
        book._checked_prompt([1] * 101, "prompt")
    with pytest.raises(InputError):
        book._checked_prompt([5000], "prompt")
