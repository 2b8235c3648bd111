"""LlamaBatchDecoder: batched logits against solo ones, slot reuse by prefix, release, errors.

The model is the tiny random LLaMA GGUF of test_llama_runtime (F32, 2 layers); every sequence is
teacher-forced with fixed tokens, so batched and solo runs see the same inputs even where their
top-1 differs. Bounds are issue 17's: mean KL <= 1e-4, top-1 agreement >= 99%.
"""

from __future__ import annotations

import numpy as np
import pytest
from batch_harness import CHUNK, run_batched

from edgelm.errors import CapacityError, ContextOverflowError, InputError, UsageError
from edgelm.metrics import mean_kl, top1_agreement
from edgelm.runtime import load
from edgelm.runtime.device import RuntimeOptions
from edgelm.runtime.gguf.metadata import read_gguf_header
from edgelm.runtime.llamacpp.log import captured_llama_log
from edgelm.runtime.llamacpp.memory import estimate_need
from edgelm.runtime.llamacpp.model import open_batch_decoder

THREADS = 2
CONTEXT = 256  # the context of conftest's tiny_gguf_256
MAX_KL = 1e-4
MIN_TOP1 = 0.99
STEPS = 24


@pytest.fixture(scope="module")
def solo(tiny_gguf_256):
    with load(tiny_gguf_256, threads=THREADS) as generator:
        yield generator.decoder


def quantized(source, ftype: int):
    """The tiny model re-quantized by llama.cpp (quantized kernels choose their path by batch shape)."""
    import llama_cpp

    out = source.with_name(f"tiny-{ftype}.gguf")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    with captured_llama_log():  # the per-tensor fallback notes (64 columns) are expected
        assert llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), params) == 0
    return out


def sequences(seed: int, lengths: list[int], steps: int = STEPS) -> list[tuple[list[int], list[int]]]:
    """(prompt, forced continuation) pairs of random ids past the special tokens, BOS first."""
    rng = np.random.default_rng(seed)
    return [([1, *map(int, rng.integers(3, 320, n - 1))], list(map(int, rng.integers(3, 320, steps))))
            for n in lengths]


def solo_logits(solo, prompt: list[int], forced: list[int]) -> np.ndarray:
    """(len(forced) + 1, vocab): after the prompt, then after each forced token, one sequence alone."""
    rows = [solo.prefill(prompt).copy()]
    for token in forced:
        rows.append(solo.step(token).copy())
    return np.stack(rows)


def agreement(reference: list[np.ndarray], other: list[np.ndarray]) -> tuple[float, float]:
    ref, oth = np.concatenate(reference), np.concatenate(other)
    return mean_kl(ref, oth), top1_agreement(ref, oth)


@pytest.mark.parametrize("ftype", [None, 7, 2], ids=["f32", "q8_0", "q4_0"])
def test_four_sequences_stepped_together_match_solo_runs(tiny_gguf_256, solo, ftype):
    path = tiny_gguf_256 if ftype is None else quantized(tiny_gguf_256, ftype)
    seqs = sequences(0, [6, 23, 11, 40])
    with open_batch_decoder(path, RuntimeOptions(threads=THREADS), slots=4) as decoder:
        batched = batched_run(decoder, seqs, starts=[0, 2, 5, 9])  # admitted at different times
    if ftype is None:
        reference = [solo_logits(solo, prompt, forced) for prompt, forced in seqs]
    else:
        with load(path, threads=THREADS) as generator:
            reference = [solo_logits(generator.decoder, prompt, forced) for prompt, forced in seqs]
    kl, top1 = agreement(reference, batched)
    print(f"{path.name}, 4 sequences, {sum(len(r) for r in reference)} rows: mean KL {kl:.3g}, top-1 {top1:.2%}")
    assert kl <= MAX_KL
    assert top1 >= MIN_TOP1


def test_a_released_sequence_leaves_the_others_unchanged(tiny_gguf_256):
    seqs = sequences(1, [9, 30, 14])
    options = RuntimeOptions(threads=THREADS)
    with open_batch_decoder(tiny_gguf_256, options, slots=3) as decoder:
        with_third = batched_run(decoder, seqs, starts=[0, 1, 2], release_at={2: 5})  # released mid-batch
    with open_batch_decoder(tiny_gguf_256, options, slots=3) as decoder:
        without = batched_run(decoder, seqs[:2], starts=[0, 1])  # as if it never existed
    assert len(with_third[2]) == 6
    kl, top1 = agreement(without, with_third[:2])
    print(f"release mid-batch: mean KL {kl:.3g}, top-1 {top1:.2%}")
    assert kl <= MAX_KL
    assert top1 >= MIN_TOP1


def turn(decoder, prompt: list[int], forced: list[int]) -> tuple[int, int, np.ndarray]:
    """One conversation turn: admit, prefill, step the forced reply, release. (slot, tokens
    evaluated, the prompt's last logits)."""
    before = decoder.evaluated
    slot = decoder.admit(prompt)
    first = None
    while first is None:
        first = decoder.prefill(slot, CHUNK)
    first = first.copy()  # the steps below overwrite llama.cpp's buffer
    for token in forced:
        decoder.step({slot: token})
    decoder.release(slot)
    return slot, decoder.evaluated - before, first


def test_a_next_turn_evaluates_only_its_new_tokens(tiny_gguf_256, solo):
    (a1, reply_a), (b1, reply_b), (new_a, _) = sequences(2, [20, 17, 9], steps=6)
    with open_batch_decoder(tiny_gguf_256, RuntimeOptions(threads=THREADS), slots=2) as decoder:
        slot_a, count_a, _ = turn(decoder, a1, reply_a)
        slot_b, count_b, _ = turn(decoder, b1, reply_b)  # another conversation in between
        assert slot_b != slot_a  # both start with BOS; sharing one token must not evict A
        history = [*a1, *reply_a, *new_a[1:]]  # the chat re-sends everything, then the new turn
        slot_a2, count_a2, logits = turn(decoder, history, [])
    print(f"prefix reuse: turn 1 evaluated {count_a}, other conversation {count_b}, "
          f"turn 2 {count_a2} of {len(history)} prompt tokens")
    assert count_a == len(a1) + len(reply_a)
    assert count_b == len(b1) + len(reply_b)
    assert slot_a2 == slot_a
    assert count_a2 == len(new_a) - 1  # only the new turn's tokens
    reference = solo.prefill(history).copy()
    assert mean_kl(reference[None], logits[None]) <= MAX_KL
    assert top1_agreement(reference[None], logits[None]) == 1.0


def test_release_and_readmit_reuses_the_whole_prompt(tiny_gguf_256):
    (prompt, _), = sequences(3, [30], steps=0)
    with open_batch_decoder(tiny_gguf_256, RuntimeOptions(threads=THREADS), slots=2) as decoder:
        slot, count, first = turn(decoder, prompt, [])
        # released: its cache left the context for host memory, whole
        assert decoder.cached_tokens(slot) == () and [e.tokens for e in decoder.saved.entries] == [tuple(prompt)]
        again, count_again, second = turn(decoder, prompt, [])
        # continued whole, then saved again on release: still one entry
        assert [e.tokens for e in decoder.saved.entries] == [tuple(prompt)]
    assert count == len(prompt)
    assert count_again == 1  # the last token is evaluated again for its logits
    assert mean_kl(first[None], second[None]) <= MAX_KL


def test_a_prefix_shared_with_a_longer_cache_cuts_only_that_slot(tiny_gguf_256):
    (prompt, forced), = sequences(4, [24], steps=8)
    with open_batch_decoder(tiny_gguf_256, RuntimeOptions(threads=THREADS), slots=2) as decoder:
        slot, _, _ = turn(decoder, prompt, forced)
        other, _, _ = turn(decoder, sequences(5, [12], steps=0)[0][0], [])
        branch = [*prompt, *forced[:3], 7]  # an edited reply: shares prompt + 3 tokens
        same, count, _ = turn(decoder, branch, [])
        assert count == 1  # the shared part came back from host memory
        # the edited conversation is saved beside the one it branched from; the other one untouched
        assert sorted(len(e.tokens) for e in decoder.saved.entries) == [12, len(branch), len(prompt) + 8]


def test_prompt_chunks_and_decode_steps_share_one_decode(tiny_gguf_256):
    (long, _), (short, forced) = sequences(6, [60, 5], steps=3)
    with open_batch_decoder(tiny_gguf_256, RuntimeOptions(threads=THREADS), slots=2) as decoder:
        a = decoder.admit(short)
        assert decoder.prefill(a, 100) is not None
        b = decoder.admit(long)
        out = decoder.step({a: forced[0]}, {b: 16})
        assert set(out) == {a} and decoder.pending_tokens(b) == 44
        out = decoder.step({a: forced[1]}, {b: 100})
        assert set(out) == {a, b} and decoder.pending_tokens(b) == 0
        assert decoder.decodes == 3


def test_errors_a_user_can_cause_are_one_line(tiny_gguf_256):
    options = RuntimeOptions(threads=THREADS)
    with pytest.raises(UsageError, match="parallel sequences"):
        open_batch_decoder(tiny_gguf_256, options, slots=0)
    with open_batch_decoder(tiny_gguf_256, options, slots=2) as decoder:
        decoder.admit([1, 5])
        decoder.admit([1, 6])
        with pytest.raises(CapacityError, match="all 2 sequence slots are in use"):
            decoder.admit([1, 7])
        decoder.release(0)
        with pytest.raises(ContextOverflowError, match="exceeds the context length 256"):
            decoder.admit([1] * (CONTEXT + 1))
        with pytest.raises(InputError, match="not an id"):
            decoder.admit([1, 10**6])
        with pytest.raises(InputError, match="at least one token"):
            decoder.admit([])
        with pytest.raises(UsageError, match="holds no admitted sequence"):
            decoder.step({0: 5})
        with pytest.raises(UsageError, match="prompt tokens to prefill"):
            decoder.step({1: 5})
        with pytest.raises(UsageError, match="slot must be an integer"):
            decoder.release(9)
        slot = decoder.admit([1] * CONTEXT)  # a full context: no room for one more token
        while decoder.prefill(slot, 128) is None:
            pass
        with pytest.raises(ContextOverflowError, match="257 tokens exceed the context length 256"):
            decoder.step({slot: 5})
    with pytest.raises(InputError, match="closed"):
        decoder.admit([1])


def test_the_memory_preflight_counts_every_slot(tiny_gguf_256, monkeypatch):
    from edgelm.errors import ArtifactError
    from edgelm.runtime.llamacpp import memory

    header = read_gguf_header(tiny_gguf_256)
    size = tiny_gguf_256.stat().st_size
    one, four = estimate_need(header, size, CONTEXT), estimate_need(header, size, CONTEXT, sequences=4)
    assert four.kv_cache == 4 * one.kv_cache > 0
    monkeypatch.setattr(memory, "available_memory", lambda: one.total + one.kv_cache)  # fits 2 slots, not 4
    open_batch_decoder(tiny_gguf_256, RuntimeOptions(threads=1), slots=2).close()
    with pytest.raises(ArtifactError, match="for 4 sequences of 256 tokens.*fewer parallel sequences"):
        open_batch_decoder(tiny_gguf_256, RuntimeOptions(threads=1), slots=4)


def test_four_interleaved_chats_each_prefill_only_new_tokens(tiny_gguf_256):
    """Issue 17's case: a chat interleaved with 3 others, no more conversations than slots."""
    rng = np.random.default_rng(7)
    histories: list[list[int]] = [[1] for _ in range(4)]
    counts: list[list[int]] = [[] for _ in range(4)]
    with open_batch_decoder(tiny_gguf_256, RuntimeOptions(threads=THREADS), slots=4) as decoder:
        for _ in range(5):
            for chat in range(4):
                new = list(map(int, rng.integers(3, 320, 6)))
                reply = list(map(int, rng.integers(3, 320, 3)))
                histories[chat] += new
                _, count, _ = turn(decoder, histories[chat], reply)
                histories[chat] += reply
                counts[chat].append(count - len(reply))  # prompt tokens evaluated this turn
    print(f"prompt tokens evaluated per turn, chat 0: {counts[0]}")
    assert all(c == [7, 6, 6, 6, 6] for c in counts)  # BOS + 6, then only each turn's 6 new tokens


def test_the_saved_prefix_budget_leaves_most_free_memory_alone(tiny_gguf_256, monkeypatch):
    from edgelm.runtime.llamacpp import memory
    from edgelm.runtime.llamacpp.saved_prefixes import DEFAULT_BUDGET

    header = read_gguf_header(tiny_gguf_256)
    size = tiny_gguf_256.stat().st_size
    need = estimate_need(header, size, CONTEXT, sequences=2).total
    monkeypatch.setattr(memory, "available_memory", lambda: need + 4 * (1 << 20))  # 4 MiB beyond the model
    with open_batch_decoder(tiny_gguf_256, RuntimeOptions(threads=1), slots=2) as decoder:
        assert decoder.saved is not None and decoder.saved.budget == 1 << 20  # a quarter of what is left
    monkeypatch.setattr(memory, "available_memory", lambda: None)  # unknown: the default ceiling
    with open_batch_decoder(tiny_gguf_256, RuntimeOptions(threads=1), slots=2) as decoder:
        assert decoder.saved.budget == DEFAULT_BUDGET


def batched_run(decoder, seqs, starts: list[int], release_at: dict[int, int] | None = None) -> list[np.ndarray]:
    """run_batched with llama.cpp's count: one llama_decode per tick, decode steps and prompt chunks together."""
    return run_batched(decoder, seqs, starts, calls=lambda: decoder.decodes,
                       calls_per_step=lambda stepping, filling: 1 if stepping or filling else 0, release_at=release_at)

