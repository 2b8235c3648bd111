"""Response bodies shaped exactly as OpenAI's: completions, chat completions, their stream chunks."""

from __future__ import annotations

import time
import uuid
from typing import Any

from edgelm.runtime.core.generator import Completion

FINISH = {"eos": "stop", "stop": "stop", "length": "length", "tool_calls": "tool_calls"}  # edgelm's -> OpenAI's


def usage(completion: Completion) -> dict[str, int]:
    out = {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
           "total_tokens": completion.prompt_tokens + completion.completion_tokens}
    if completion.truncated_prompt_tokens:  # `truncate` dropped the start of the prompt: say so
        out["truncated_prompt_tokens"] = completion.truncated_prompt_tokens
    return out


class Shaper:
    """Builds one response's objects; `chat` picks chat.completion over text_completion."""

    def __init__(self, model_id: str, chat: bool, include_usage: bool = False):
        self.model_id = model_id
        self.chat = chat
        self.include_usage = include_usage
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def _envelope(self, obj: str, choices: list) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_id, "choices": choices}

    def whole(self, completion: Completion) -> dict[str, Any]:
        """The non-streamed answer."""
        reason = FINISH.get(completion.finish_reason, completion.finish_reason)
        calls = getattr(completion, "tool_calls", None)
        if self.chat:
            message: dict[str, Any] = {"role": "assistant", "content": completion.text}
            if calls:
                message, reason = {"role": "assistant", "content": None, "tool_calls": calls}, "tool_calls"
            choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": reason}
            body = self._envelope("chat.completion", [choice])
        else:
            choice = {"index": 0, "text": completion.text, "logprobs": None, "finish_reason": reason}
            body = self._envelope("text_completion", [choice])
        body["usage"] = usage(completion)
        return body

    def chunk(self, text: str | None = None, *, role: bool = False, finish: str | None = None) -> dict[str, Any]:
        """One stream chunk: the opening role delta (chat), a piece of text, or the finishing chunk."""
        reason = FINISH.get(finish, finish) if finish else None
        if self.chat:
            delta: dict[str, Any] = {}
            if role:
                delta = {"role": "assistant", "content": ""}
            elif text is not None:
                delta = {"content": text}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
            body = self._envelope("chat.completion.chunk", [choice])
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
            body = self._envelope("text_completion", [choice])
        if self.include_usage:
            body["usage"] = None  # every chunk but the last carries usage: null, as OpenAI sends
        return body

    def tool_calls_chunk(self, calls: list[dict[str, Any]]) -> dict[str, Any]:
        """The whole tool call in one delta (its text was held back until it was complete)."""
        body = self.chunk(None)
        body["choices"][0]["delta"] = {"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
        return body

    def usage_chunk(self, completion: Completion) -> dict[str, Any]:
        body = self._envelope("chat.completion.chunk" if self.chat else "text_completion", [])
        body["usage"] = usage(completion)
        return body
