"""Shared drivers for the batched decoders' tests (llama.cpp's and the fused ONNX GPT-2's)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CHUNK = 8  # prompt tokens per prefill: prompts go in pieces between decode steps


def run_batched(decoder, seqs, starts: list[int], calls: Callable[[], int], calls_per_step: Callable[[dict, dict], int],
                release_at: dict[int, int] | None = None) -> list[np.ndarray]:
    """Drives the decoder as the scheduler does: at tick t, sequence i (if starts[i] == t) is
    admitted; each tick is ONE step that advances every decoding sequence by its next forced
    token and feeds every prefilling one a chunk. Each sequence's logits rows (the prompt's
    last, then after each forced token); `release_at[i]`: released after that many forced
    tokens. `calls()` counts the backend's calls, and each step must make
    `calls_per_step(stepping, filling)` of them."""
    release_at = release_at or {}
    slots: dict[int, int] = {}
    rows: dict[int, list[np.ndarray]] = {i: [] for i in range(len(seqs))}
    done: set[int] = set()
    tick = 0
    while len(done) < len(seqs):
        for i, start in enumerate(starts):
            if start == tick:
                slots[i] = decoder.admit(seqs[i][0])
        live = [i for i in slots if i not in done]
        stepping = {slots[i]: seqs[i][1][len(rows[i]) - 1] for i in live if rows[i]}
        filling = {slots[i]: CHUNK for i in live if not rows[i]}
        before = calls()
        out = decoder.step(stepping, filling)
        assert calls() == before + calls_per_step(stepping, filling)
        by_slot = {slot: i for i, slot in slots.items() if i in live}
        for slot, logits in out.items():
            rows[by_slot[slot]].append(logits.copy())  # decode rows are views until the next step
        for i in live:
            forced = len(rows[i]) - 1
            if forced == len(seqs[i][1]) or forced == release_at.get(i):
                decoder.release(slots[i])
                done.add(i)
        tick += 1
    return [np.stack(rows[i]) for i in range(len(seqs))]


def cancelled_mid_batch(solo, batched, prompts: list[str]) -> None:
    """Cancelling one of several running streams leaves the others' text as it is alone."""
    params = dict(max_tokens=48, temperature=0.8, stop=[])
    alone = [solo.complete(p, seed=i, **params).text for i, p in enumerate(prompts)]
    streams = [batched.stream(p, seed=i, **params) for i, p in enumerate(prompts)]
    texts = ["" for _ in prompts]
    iterators = [iter(s) for s in streams]
    for _ in range(3):  # every stream running, one piece each
        for i, it in enumerate(iterators):
            texts[i] += next(it, "")
    streams[1].cancel()
    texts[1] += "".join(iterators[1])  # ends soon, without a completion
    for i in (0, 2, 3):
        texts[i] += "".join(iterators[i])
    assert [texts[i] for i in (0, 2, 3)] == [alone[i] for i in (0, 2, 3)]
    assert streams[1].completion is None and alone[1].startswith(texts[1]) and texts[1] != alone[1]
    assert batched.scheduler.stats()["active"] == 0
