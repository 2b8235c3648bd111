"""Detokenising as tokens arrive, and stop strings that never leak."""

from __future__ import annotations

import pytest

from edgelm.runtime.core.text import IncrementalDetokenizer, StopMatcher


@pytest.fixture(scope="module")
def byte_tokenizer():
    """A byte-level BPE with no merges over multi-byte text: each byte is its own token."""
    from edgelm.models.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer("plain ascii text only " * 50, vocab_size=300)


def test_multibyte_characters_split_across_tokens_are_never_broken(byte_tokenizer):
    text = "naïve café 😀 日本語 done"
    ids = byte_tokenizer.encode(text).ids
    assert len(ids) > len(text)  # the characters really span several tokens
    detok = IncrementalDetokenizer(byte_tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text


def test_prompt_context_is_not_emitted(byte_tokenizer):
    prompt = byte_tokenizer.encode("plain ").ids
    detok = IncrementalDetokenizer(byte_tokenizer, prompt)
    out = "".join(detok.push(i) for i in byte_tokenizer.encode("text").ids) + detok.flush()
    assert out == "text"


def feed_all(stops, chunks):
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(c) for c in chunks) + matcher.flush()
    return out, matcher.stopped


@pytest.mark.parametrize("chunks", [["Hello", " wor", "ld END", " more"], ["Hello world E", "N", "D"], list("Hello world END!")])
def test_stop_string_spanning_chunks_is_cut_and_never_emitted(chunks):
    out, stopped = feed_all(["END"], chunks)
    assert out == "Hello world " and stopped


def test_partial_stop_prefix_is_released_when_it_turns_out_not_to_be_a_stop():
    out, stopped = feed_all(["END"], ["an EN", "emy"])
    assert out == "an ENemy" and not stopped


def test_earliest_of_several_stops_wins():
    out, _ = feed_all(["\n\n", "B"], ["xx", "B", "y\n\nz"])
    assert out == "xx"
