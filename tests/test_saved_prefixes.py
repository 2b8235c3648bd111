"""The host-memory store of released sequences' caches: found by longest shared prefix, within
its byte budget, one entry per conversation."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from edgelm.runtime.llamacpp.saved_prefixes import MIN_RESTORE, SavedPrefixes

tokens = st.lists(st.integers(0, 5), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(saves=st.lists(st.tuples(tokens, st.integers(1, 40)), max_size=20), budget=st.integers(1, 120),
       probe=tokens)
def test_the_budget_holds_and_lookups_find_the_longest_shared_prefix(saves, budget, probe):
    store = SavedPrefixes(budget)
    for ids, size in saves:
        store.save(ids, bytes(size))
    assert store.size <= budget
    entry, shared = store.best(probe)
    longest = max((_shared(e.tokens, probe) for e in store.entries), default=0)
    if longest >= MIN_RESTORE:
        assert entry is not None and shared == longest == _shared(entry.tokens, probe)
    else:
        assert (entry, shared) == (None, 0)


def test_a_conversations_next_turn_replaces_its_earlier_one():
    store = SavedPrefixes(1000)
    store.save([1, 2, 3, 4, 5], b"a")
    store.save([1, 2, 3, 4, 5, 6, 7], b"b")  # the same conversation, one turn on
    store.save([1, 2, 9, 9, 9], b"c")  # another one sharing its start
    assert sorted(e.tokens for e in store.entries) == [(1, 2, 3, 4, 5, 6, 7), (1, 2, 9, 9, 9)]


def test_the_least_recently_used_goes_first():
    store = SavedPrefixes(10)
    store.save([1, 1, 1, 1], bytes(4))
    store.save([2, 2, 2, 2], bytes(4))
    store.touch(store.entries[0])
    store.save([3, 3, 3, 3], bytes(4))
    assert sorted(e.tokens[0] for e in store.entries) == [1, 3]


def _shared(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
