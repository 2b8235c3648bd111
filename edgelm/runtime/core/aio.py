"""asyncio variants of the generation API, for apps with an event loop.

A stream's pieces are produced by the model's scheduler thread, which wakes the event loop for
each (`TextStream.on_ready`): a piece is read only once it is there, so the loop never blocks on
the model and no thread waits per stream. A task that is cancelled while it waits, or a stream
closed early, cancels the sequence itself: it leaves the scheduler's queue at once or its slot
before the next step, exactly as `TextStream.cancel` does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

_END = object()


class AsyncTextStream:
    """`async for piece in stream`; `completion` once the iteration has finished; `cancel()`."""

    def __init__(self, stream: Any):
        self._stream = stream
        self._pieces = iter(stream)
        self._arrived: asyncio.Event | None = None  # made on first use, on the loop that reads

    def __aiter__(self) -> AsyncIterator[str]:
        return self

    async def __anext__(self) -> str:
        try:
            await self._until_ready()
        except asyncio.CancelledError:
            self._stream.cancel()  # the awaiting task went: so does its sequence
            raise
        piece = next(self._pieces, _END)  # there already: does not wait
        if piece is _END:
            raise StopAsyncIteration
        return piece

    async def _until_ready(self) -> None:
        if self._arrived is None:
            loop, self._arrived = asyncio.get_running_loop(), asyncio.Event()
            self._stream.on_ready(lambda: loop.call_soon_threadsafe(self._arrived.set))
        while not self._stream.ready():
            self._arrived.clear()
            if self._stream.ready():  # arrived between the check and the clear
                return
            await self._arrived.wait()

    @property
    def completion(self) -> Any:
        return self._stream.completion

    def cancel(self) -> None:
        self._stream.cancel()

    async def aclose(self) -> None:
        self._stream.cancel()

    async def __aenter__(self) -> AsyncTextStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stream.cancel()  # a no-op once the sequence has finished


async def drained(stream: AsyncTextStream) -> Any:
    async with stream:
        async for _ in stream:
            pass
    return stream.completion


class AsyncGeneration:
    """Mixed into TextGenerator: astream / acomplete / agenerate."""

    def astream(self, prompt: str, **params: Any) -> AsyncTextStream:
        """`stream` for an event loop: the prompt is checked and queued now; pieces are awaited."""
        return AsyncTextStream(self.stream(prompt, **params))

    async def acomplete(self, prompt: str, **params: Any) -> Any:
        return await drained(self.astream(prompt, **params))

    async def agenerate(self, prompt: str, **params: Any) -> str:
        return (await self.acomplete(prompt, **params)).text


class AsyncEncoding:
    """Mixed into the encoders: aembed / aclassify / afill_mask, each run in a worker thread."""

    async def aembed(self, texts: Any, **params: Any) -> Any:
        return await asyncio.to_thread(lambda: self.embed(texts, **params))

    async def aclassify(self, texts: Any, **params: Any) -> Any:
        return await asyncio.to_thread(lambda: self.classify(texts, **params))

    async def afill_mask(self, text: str, **params: Any) -> Any:
        return await asyncio.to_thread(lambda: self.fill_mask(text, **params))
