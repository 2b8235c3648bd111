"""Every text model runs through a scheduler: a one-slot model (GGUF without parallel, LSTM)
takes calls from several threads in turn, each equal to the same call alone; the asyncio
variants give what the blocking calls give, and a cancelled task frees its sequence.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from edgelm.runtime import load
from edgelm.runtime.core.one_slot import OneSlot

THREADS = 2


@pytest.fixture(scope="module")
def solo(tiny_gguf_256):
    with load(tiny_gguf_256, threads=THREADS) as model:
        yield model


def test_a_model_loaded_without_parallel_has_a_one_slot_scheduler(solo):
    assert isinstance(solo.scheduler.decoder, OneSlot) and solo.scheduler.slots == 1


def test_threads_calling_a_one_slot_model_at_once_each_get_their_solo_result(solo):
    requests = [(f"the dog {i} ran", dict(max_tokens=20, temperature=0.8, seed=i)) for i in range(6)]
    alone = [solo.complete(prompt, **params).text for prompt, params in requests]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda r: solo.complete(r[0], **r[1]).text, requests))
    assert together == alone
    assert solo.scheduler.stats()["active"] == 0


def test_threads_mixing_stream_and_chat_on_a_one_slot_model(solo):
    chat = [{"role": "user", "content": "hello there"}]
    expected_chat = solo.chat(chat, max_tokens=12, temperature=0)
    expected_text = solo.generate("the cat", max_tokens=12, temperature=0)
    results: dict[str, list[str]] = {"chat": [], "text": []}

    def run(kind: str) -> None:
        for _ in range(3):
            if kind == "chat":
                results[kind].append(solo.chat(chat, max_tokens=12, temperature=0))
            else:
                results[kind].append("".join(solo.stream("the cat", max_tokens=12, temperature=0)))

    workers = [threading.Thread(target=run, args=(k,)) for k in ("chat", "text", "chat", "text")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert results["chat"] == [expected_chat] * 6 and results["text"] == [expected_text] * 6


def test_astream_and_agenerate_equal_the_blocking_calls(solo):
    params = dict(max_tokens=16, temperature=0.7, seed=5)
    expected = solo.generate("the cat sat", **params)

    async def main():
        pieces = [p async for p in solo.astream("the cat sat", **params)]
        whole = await solo.agenerate("the cat sat", **params)
        both = await asyncio.gather(solo.agenerate("the cat sat", **params), solo.agenerate("the cat sat", **params))
        return "".join(pieces), whole, both

    streamed, whole, both = asyncio.run(main())
    assert streamed == whole == expected and list(both) == [expected, expected]


def test_achat_equals_chat(solo):
    messages = [{"role": "user", "content": "hi"}]
    expected = solo.chat(messages, max_tokens=10, temperature=0)
    assert asyncio.run(solo.achat(messages, max_tokens=10, temperature=0)) == expected


def test_a_cancelled_async_task_frees_its_sequence(solo):
    async def main():
        started = asyncio.Event()

        async def consume():
            async for _ in solo.astream("the dog", max_tokens=200, temperature=0.9, seed=1, stop=[]):
                started.set()
                await asyncio.sleep(0.01)

        task = asyncio.create_task(consume())
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        # the next call is served at once: the cancelled sequence left its slot
        return await asyncio.wait_for(solo.agenerate("the cat", max_tokens=4, temperature=0), 30)

    assert asyncio.run(main()) == solo.generate("the cat", max_tokens=4, temperature=0)
    assert solo.scheduler.stats()["active"] == 0


def test_an_async_stream_left_early_cancels_its_sequence(solo):
    async def main():
        stream = solo.astream("the dog", max_tokens=200, temperature=0.9, seed=2, stop=[])
        async with stream:
            async for _ in stream:
                break
        return stream.completion

    assert asyncio.run(main()) is None
    assert solo.generate("the cat", max_tokens=4, temperature=0)  # the slot is free again
    assert solo.scheduler.stats()["active"] == 0


def test_async_encoding_runs_the_blocking_call_off_the_event_loop():
    from edgelm.runtime.core.aio import AsyncEncoding

    loop_threads = []

    class Encoder(AsyncEncoding):
        def embed(self, texts, **params):
            loop_threads.append(threading.current_thread())
            return [len(t) * params.get("scale", 1) for t in texts]

    async def main():
        return await Encoder().aembed(["ab", "abc"], scale=2), threading.current_thread()

    vectors, loop_thread = asyncio.run(main())
    assert vectors == [4, 6] and loop_threads and loop_threads[0] is not loop_thread


def test_a_chat_reply_without_max_tokens_runs_until_the_turn_ends_or_the_context_is_full(solo):
    messages = [{"role": "user", "content": "tell me a long story"}]
    reply = solo.chat_complete(messages, temperature=0)
    if reply.finish_reason == "length":  # the context filled: not cut at the 128-token default
        assert reply.prompt_tokens + reply.completion_tokens == solo.decoder.context_length
    else:
        assert reply.finish_reason in ("eos", "stop")
    capped = solo.chat_complete(messages, temperature=0, max_tokens=5)
    assert capped.completion_tokens <= 5 and reply.text.startswith(capped.text)


def test_more_async_streams_than_worker_threads_all_finish(solo):
    # the event loop is woken by the scheduler: no thread waits per stream, so twelve streams
    # (beyond asyncio's default executor on a small machine) all run to their solo results
    prompts = [f"the cat {i}" for i in range(12)]
    expected = [solo.generate(p, max_tokens=6, temperature=0) for p in prompts]

    async def main():
        async def one(prompt):
            return "".join([piece async for piece in solo.astream(prompt, max_tokens=6, temperature=0)])

        return await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 60)

    assert asyncio.run(main()) == expected
