"""The scheduler: many threads calling one GGUF model loaded with parallel=N, each call a sequence
of one shared batched loop, each equal to the same call on the one-sequence path.

The model is the tiny random LLaMA GGUF of test_llama_runtime (F32, 2 layers); test_llama_batch
measured its batched logits against solo ones at mean KL 7e-11, so sampled tokens are expected
to be identical and are compared exactly. A fake decoder checks the loop's plan (FIFO
admission, prompt chunks beside decode steps) without llama.cpp.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from batch_harness import cancelled_mid_batch

from edgelm.errors import ContextOverflowError, EdgelmError, InputError, UsageError
from edgelm.runtime import load
from edgelm.runtime.core.scheduler import PREFILL_CHUNK, Scheduler

THREADS = 2
CONTEXT = 256  # the context of conftest's tiny_gguf_256
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
          "required": ["n", "ok"]}
ENUM = {"enum": ["red", "green", "blue"]}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}}, "required": ["city"],
    "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def solo(tiny_gguf_256):
    with load(tiny_gguf_256, threads=THREADS) as model:
        yield model


@pytest.fixture(scope="module")
def batched(tiny_gguf_256):
    with load(tiny_gguf_256, threads=THREADS, parallel=4) as model:
        yield model


def fields(completion):
    return (completion.text, completion.finish_reason, completion.prompt_tokens, completion.completion_tokens,
            completion.constraint_incomplete, completion.tool_calls)


def streamed(model, prompt: str, **params):
    stream = model.stream(prompt, **params)
    text = "".join(stream)
    assert text == stream.completion.text
    return fields(stream.completion)


def eight_requests(solo) -> list[tuple[str, dict]]:
    """Distinct prompts and seeds; stop strings taken from each prompt's own unstopped output so
    they do cut it; two JSON-schema constraints and one enum."""
    requests = []
    for i in range(8):
        prompt, params = f"the cat {i} sat", dict(max_tokens=40, temperature=0.9, seed=100 + i)
        if i in (2, 5):
            params.update(json_schema=SCHEMA, temperature=0.7)
        elif i == 7:
            params.update(json_schema=ENUM)
        else:
            text = solo.complete(prompt, **params).text
            params["stop"] = [text[10 + i: 11 + i]] if len(text) > 12 + i else ["zz"]
        requests.append((prompt, params))
    return requests


def test_eight_concurrent_streams_each_equal_their_solo_run(solo, batched):
    requests = eight_requests(solo)
    alone = [streamed(solo, prompt, **params) for prompt, params in requests]
    assert {a[1] for a in alone} >= {"stop"}  # the stop strings and constraints end some
    decodes, evaluated = batched.decoder.decodes, batched.decoder.evaluated
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda r: streamed(batched, r[0], **r[1]), requests))
    assert together == alone
    tokens = sum(a[3] for a in alone)
    # steps were shared: far fewer llama_decode calls than tokens evaluated
    assert batched.decoder.decodes - decodes < (batched.decoder.evaluated - evaluated) / 2
    assert tokens > 0 and batched.scheduler.stats()["active"] == 0


def test_a_single_call_behaves_as_before(solo, batched):
    params = dict(max_tokens=24, temperature=0)
    assert fields(batched.complete("the cat", **params)) == fields(solo.complete("the cat", **params))
    chat = [{"role": "user", "content": "weather in Paris?"}]
    for extra in ({}, {"tools": TOOLS, "tool_choice": "required"}, {"json_schema": SCHEMA}):
        assert fields(batched.chat_complete(chat, **params, **extra)) == fields(solo.chat_complete(chat, **params, **extra))
    call = batched.chat_complete(chat, tools=TOOLS, tool_choice="required", max_tokens=60, temperature=0)
    assert call.tool_calls and call.tool_calls[0]["function"]["name"] == "weather"


def test_cancelling_one_stream_mid_batch_leaves_the_others_unchanged(solo, batched):
    cancelled_mid_batch(solo, batched, [f"a dog {i}" for i in range(4)])


def test_a_second_chat_turn_after_other_conversations_prefills_only_new_tokens(tiny_gguf_256):
    with load(tiny_gguf_256, threads=THREADS, parallel=4) as model:
        first = [{"role": "user", "content": "the cat sat on the mat"}]
        reply = model.chat_complete(first, max_tokens=12, temperature=0)
        others = [[{"role": "user", "content": f"another talk {i}"}] for i in range(3)]
        with ThreadPoolExecutor(3) as pool:  # other conversations, in the other slots
            list(pool.map(lambda c: model.chat(c, max_tokens=12, temperature=0), others))
        second = [*first, {"role": "assistant", "content": reply.text}, {"role": "user", "content": "and then?"}]
        ids = model.chat_ids(second)
        before = model.decoder.evaluated
        again = model.chat_complete(second, max_tokens=8, temperature=0)
        prefilled = model.decoder.evaluated - before - (again.completion_tokens - 1)  # the last sample is never fed
        reused = len(ids) - prefilled
        assert reused >= len(model.chat_ids(first)), (reused, len(ids))  # at least the whole first prompt kept
        assert prefilled < len(ids) - len(model.chat_ids(first)) + reply.completion_tokens


def test_streams_beyond_the_slots_wait_and_all_finish(tiny_gguf_256, solo):
    with load(tiny_gguf_256, threads=THREADS, parallel=2) as model:
        prompts = [f"queue {i}" for i in range(6)]
        with ThreadPoolExecutor(6) as pool:
            out = list(pool.map(lambda p: model.generate(p, max_tokens=10, temperature=0), prompts))
        assert out == [solo.generate(p, max_tokens=10, temperature=0) for p in prompts]
        in_slots = sum(len(model.decoder.cached_tokens(s)) for s in range(2))
        assert model.scheduler.stats() == {"slots": 2, "active": 0, "queued": 0,
                                           "cached_tokens": in_slots + model.decoder.saved_tokens}
        assert in_slots == 0 and model.decoder.saved_tokens > 0  # released caches wait in host memory


def test_errors_stay_one_line_and_closing_ends_waiting_streams(tiny_gguf_256):
    with pytest.raises(UsageError, match="parallel must be a positive integer"):
        load(tiny_gguf_256, parallel=0)
    model = load(tiny_gguf_256, threads=THREADS, parallel=1)
    with pytest.raises(ContextOverflowError, match="context length"):
        model.stream("x " * 300, max_tokens=4)
    running = model.stream("the cat", max_tokens=200, temperature=0.8, stop=[])
    waiting = model.stream("the dog", max_tokens=4)
    next(iter(running))
    model.close()
    with pytest.raises(InputError, match="closed"):
        "".join(waiting)
    with pytest.raises(InputError, match="closed"):
        model.generate("again")


# -- the loop's plan, on a fake decoder ---------------------------------------------------------
class FakeDecoder:
    """Records each step's plan; logits always make token 5 the likeliest."""

    def __init__(self, slots: int, vocab: int = 8):
        self.slots, self.context_length, self.vocab = slots, 1000, vocab
        self.pending: dict[int, int] = {}
        self.steps: list[tuple[dict, dict]] = []
        self.admitted: list[int] = []

    def admit(self, ids):
        slot = next(s for s in range(self.slots) if s not in self.pending)
        self.pending[slot] = len(ids)
        self.admitted.append(len(ids))
        return slot

    def step(self, tokens=None, prefill=None):
        self.steps.append((dict(tokens or {}), dict(prefill or {})))
        time.sleep(0.001)
        out = {slot: self._row() for slot in tokens or {}}
        for slot, most in (prefill or {}).items():
            self.pending[slot] -= min(most, self.pending[slot])
            if self.pending[slot] == 0:
                out[slot] = self._row()
        return out

    def _row(self):
        row = np.zeros(self.vocab, np.float32)
        row[5] = 10.0
        return row

    def release(self, slot):
        del self.pending[slot]

    def cached_tokens(self, slot):
        return ()


class CountingContinuation:
    """Stands in for runtime.generator.Continuation: emits "x" per token, done after `n`."""

    def __init__(self, n: int):
        self.n, self.done, self.count = n, False, 0

    def accept(self, logits):
        self.count += 1
        self.done = self.count >= self.n
        return int(np.argmax(logits)), "x"

    def finish(self):
        return ""

    def completion(self, timings):
        return ("done", self.count)


def test_a_long_prompt_goes_in_chunks_beside_running_decode_steps():
    decoder = FakeDecoder(slots=2)
    scheduler = Scheduler(decoder)
    first = scheduler.submit([1] * 10, CountingContinuation(40))
    pieces = first.pieces()
    next(pieces)  # decoding now
    second = scheduler.submit([1] * 300, CountingContinuation(3))
    assert "".join(second.pieces()) == "xxx"
    "".join(pieces)
    chunked = [(tokens, prefill) for tokens, prefill in decoder.steps if prefill and tokens]
    assert chunked and all(prefill == {1: PREFILL_CHUNK} and tokens == {0: 5} for tokens, prefill in chunked)
    assert decoder.steps[0] == ({}, {0: 1 << 30})  # alone, the prompt goes in whole
    scheduler.close()


def test_admission_is_first_come_first_served():
    decoder = FakeDecoder(slots=1)
    scheduler = Scheduler(decoder)
    gate = threading.Event()
    original = decoder.step

    def held(tokens=None, prefill=None):
        gate.wait(5)
        return original(tokens, prefill)

    decoder.step = held
    tickets = [scheduler.submit([1] * (i + 1), CountingContinuation(2)) for i in range(5)]
    tickets[2].cancel()  # a waiting one leaves the queue at once
    gate.set()
    for ticket in tickets:
        list(ticket.pieces())
    assert decoder.admitted == [1, 2, 4, 5]
    assert tickets[2].completion is None and tickets[4].completion == ("done", 2)
    scheduler.close()


class RaisingContinuation(CountingContinuation):
    """A sequence whose sampling fails (as a grammar error would) after `good` tokens."""

    def __init__(self, good: int):
        super().__init__(100)
        self.good = good

    def accept(self, logits):
        if self.count >= self.good:
            raise ValueError("grammar broke")
        return super().accept(logits)


def test_a_continuation_that_raises_ends_its_sequence_alone():
    decoder = FakeDecoder(slots=2)
    scheduler = Scheduler(decoder)
    failing = scheduler.submit([1, 2], RaisingContinuation(2))
    other = scheduler.submit([1, 2, 3], CountingContinuation(6))
    with pytest.raises(ValueError, match="grammar broke"):
        "".join(failing.pieces())
    assert "".join(other.pieces()) == "x" * 6
    assert decoder.pending == {}  # both slots released
    scheduler.close()


def test_a_failing_loop_ends_every_sequence_instead_of_leaving_it_waiting():
    decoder = FakeDecoder(slots=1)

    def broken(slot):
        raise RuntimeError("release failed")

    decoder.release = broken
    scheduler = Scheduler(decoder)
    running = scheduler.submit([1], CountingContinuation(2))
    waiting = scheduler.submit([1, 2], CountingContinuation(2))
    assert "".join(running.pieces()) == "xx"  # its text was complete when its slot failed to free
    kind, err = waiting.events.get(timeout=5)  # before the fix: never, the loop thread had died
    assert kind == "error" and isinstance(err, EdgelmError)
    assert "stopped (RuntimeError: release failed)" in str(err)
    with pytest.raises(InputError, match="closed"):
        scheduler.submit([1], CountingContinuation(1))
    scheduler.close()  # the loop has ended: returns at once
