"""Chat on top of the text generator: render the conversation with the model's template, fit it
to the context by dropping whole old turns, then run the shared generation loop."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from edgelm.contract import GenerationSection
from edgelm.errors import ContextOverflowError, InputError, UsageError
from edgelm.runtime.chat.template import check_messages, reads_variable, render_chat
from edgelm.runtime.chat.tools import (
    assistant_message,
    check_tools,
    messages_for_template,
    parse_tool_calls,
    tool_constraint,
    with_tool_description,
)
from edgelm.runtime.core.aio import AsyncTextStream, drained
from edgelm.runtime.core.constraints import pop_constraint
from edgelm.runtime.core.generator import Completion, TextGenerator, TextStream
from edgelm.runtime.core.params import GenerationParams


class AsyncChat:
    """Mixed into ChatGenerator: achat_stream / achat_complete / achat."""

    def achat_stream(self, messages: list[dict], **params: Any) -> AsyncTextStream:
        return AsyncTextStream(self.chat_stream(messages, **params))

    async def achat_complete(self, messages: list[dict], **params: Any) -> Any:
        return await drained(self.achat_stream(messages, **params))

    async def achat(self, messages: list[dict], *, return_message: bool = False, **params: Any) -> Any:
        completion = await self.achat_complete(messages, **params)
        if return_message:
            return assistant_message(completion.text, completion.tool_calls)
        return completion.text


class ChatGenerator(TextGenerator, AsyncChat):
    """A TextGenerator with `chat`, `chat_complete` and `chat_stream` over message lists."""

    def __init__(self, decoder, tokenizer, manifest: Any = None, defaults: GenerationParams | None = None,
                 scheduler: Any = None):
        super().__init__(decoder, tokenizer, manifest, defaults, scheduler)
        generation = manifest.generation if manifest is not None else GenerationSection()
        self.chat_template: str = generation.chat_template or ""
        self.end_ids |= set(generation.stop_ids)  # the exporter's end-of-turn ids
        if hasattr(tokenizer, "end_of_generation_ids"):
            self.end_ids |= tokenizer.end_of_generation_ids()
        self.bos_text = self._special_text(self.bos_id)
        self.eos_text = self._special_text(self.eos_id)

    def _special_text(self, token_id: int | None) -> str:
        if token_id is None or not hasattr(self.tokenizer, "token_text"):
            return ""
        return self.tokenizer.token_text(token_id)

    # -- prompts ----------------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> str:
        """The prompt text the model's chat template makes of `messages` (and `tools`, passed to
        the template as `tools`, the way Hugging Face templates expect them)."""
        extra = {"tools": check_tools(tools)} if tools is not None else {}
        return render_chat(self.chat_template, messages_for_template(messages), bos_token=self.bos_text,
                           eos_token=self.eos_text, add_generation_prompt=add_generation_prompt, **extra)

    def chat_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        ids = self.tokenizer.encode(self.chat_prompt(messages, tools=tools), add_special_tokens=False).ids
        # most templates write the BOS text themselves; add it only where they did not
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def fit_messages(self, messages: list[dict], max_tokens: int,
                     tools: list[dict] | None = None) -> tuple[list[dict], int, list[int]]:
        """Drop the oldest turns (never the system message, never the last user message) until
        the prompt plus `max_tokens` fits the context; return (messages, dropped messages, ids)."""
        kept = check_messages(messages_for_template(messages))
        limit = self.decoder.context_length
        dropped = 0
        while True:
            ids = self.chat_ids(kept, tools)
            if limit is None or len(ids) + max_tokens <= limit:
                return kept, dropped, ids
            cut = _oldest_turn(kept)
            if cut is None:
                raise ContextOverflowError(
                    f"the conversation's last message alone needs {len(ids)} tokens plus max_tokens "
                    f"{max_tokens}, more than the context length {limit}; shorten it or lower max_tokens"
                )
            start, end = cut
            dropped += end - start
            kept = kept[:start] + kept[end:]

    # -- public API -------------------------------------------------------------------------
    def chat(self, messages: list[dict], *, tools: list[dict] | None = None, tool_choice: Any = None,
             return_message: bool = False, **params: Any) -> str | dict[str, Any]:
        """The assistant's reply to a conversation (a list of {"role", "content"} dicts).

        With `tools` (OpenAI's [{"type": "function", "function": {...}}]) the reply may be a
        tool call, constrained to valid arguments; `tool_choice` is "auto" (default), "none",
        "required" or {"type": "function", "function": {"name": ...}}. `return_message=True`
        returns the OpenAI-shaped assistant message {"role", "content", "tool_calls"?}."""
        completion = self.chat_complete(messages, tools=tools, tool_choice=tool_choice, **params)
        if return_message:
            return assistant_message(completion.text, completion.tool_calls)
        return completion.text

    def chat_complete(self, messages: list[dict], **params: Any) -> Completion:
        stream = self.chat_stream(messages, **params)
        for _ in stream:
            pass
        assert stream.completion is not None
        return stream.completion

    def chat_stream(self, messages: list[dict], *, tools: list[dict] | None = None, tool_choice: Any = None,
                    **params: Any) -> TextStream:
        """Stream the reply: until the model ends its turn or the context is full, or at most
        max_tokens when given. With truncate=True whole old turns are dropped to fit the context
        (the completion's truncated_prompt_tokens says how many tokens went); otherwise a
        conversation that does not fit raises ContextOverflowError. With tools, a reply that
        is a tool call streams as its JSON text and the completion's tool_calls holds it."""
        self._check_open()
        tools, constraint = self._reply_constraint(tools, tool_choice, params)
        messages = self._with_tools_described(messages, tools, tool_choice)
        if params.get("max_tokens") is None:
            params.pop("max_tokens", None)  # None: until the turn ends (below)
        GenerationParams.from_kwargs(self.defaults, **params)  # bad parameters fail before rendering
        if not self.chat_template:
            raise InputError("this model has no chat template; use generate() with a plain prompt")
        full = self.chat_ids(check_messages(messages_for_template(messages)), tools)
        limit = self.decoder.context_length
        if "max_tokens" not in params and limit is not None:
            params["max_tokens"] = self._reply_room(limit, len(full), bool(params.get("truncate")))
        resolved = GenerationParams.from_kwargs(self.defaults, **params)
        if limit is not None and len(full) + resolved.max_tokens > limit and not resolved.truncate:
            raise ContextOverflowError(
                f"the conversation of {len(full)} tokens plus max_tokens {resolved.max_tokens} exceeds the "
                f"context length {limit}; drop old turns, lower max_tokens, or pass truncate"
            )
        fits = limit is None or len(full) + resolved.max_tokens <= limit
        ids = full if fits else self.fit_messages(messages, resolved.max_tokens, tools)[2]  # render once when it fits
        holder: dict[str, Completion] = {}
        pieces = self._run(ids, len(full) - len(ids), resolved, holder, constraint)
        if constraint is not None and constraint.kind == "tools":
            pieces = _reading_tool_calls(pieces, holder)
        return TextStream(pieces, holder)

    @staticmethod
    def _reply_room(limit: int, prompt: int, truncate: bool) -> int:
        """Without max_tokens a reply runs until the model ends its turn or the context is full,
        as a chat does; with truncate and no room left, old turns go to leave a quarter of it."""
        room = limit - prompt
        return room if room >= 1 or not truncate else max(1, limit // 4)

    def _with_tools_described(self, messages: Any, tools: list | None, tool_choice: Any) -> Any:
        """With tool_choice "auto" and a template that has no tools section (it never reads `tools`),
        the tools are described at the top of the system message: the model could not know it may
        call them. With "required" or a named tool the grammar writes the call, and a description
        would only take context."""
        if tools is None or tool_choice not in (None, "auto") or reads_variable(self.chat_template, "tools"):
            return messages
        return with_tool_description(check_messages(messages_for_template(messages)), tools)

    def _reply_constraint(self, tools: Any, tool_choice: Any, params: dict) -> tuple[list | None, Any]:
        """(checked tools, the constraint on the reply): the one given in `params` (taken out of
        it), or the tool call that `tool_choice` asks for; never both."""
        constraint = pop_constraint(params)
        if tools is None:
            if tool_choice is not None:
                raise UsageError("tool_choice needs tools")
            return None, constraint
        tools = check_tools(tools)
        calls = tool_constraint(tools, tool_choice)
        if calls is not None and constraint is not None:
            raise UsageError(f'a {constraint.kind} constraint and tools cannot both shape a reply; '
                             'pass tool_choice="none" to use the constraint')
        return tools, constraint or calls


def _reading_tool_calls(pieces: Iterator[str], holder: dict[str, Completion]) -> Iterator[str]:
    """Pass the pieces on; once the reply is complete, read the tool call it makes (if any)."""
    yield from pieces
    completion = holder.get("completion")  # none when the stream was cancelled
    if completion is None:
        return
    if not completion.constraint_incomplete:
        completion.tool_calls = parse_tool_calls(completion.text)
    elif completion.text.lstrip().startswith("{"):
        # a call cut short (max_tokens, a stop string) is no call, and its partial JSON no content
        completion.text = ""


def _oldest_turn(messages: list[dict]) -> tuple[int, int] | None:
    """Index range of the oldest droppable turn: from the first non-system message up to the
    next user message, so the kept conversation still starts with a user turn."""
    first = next((i for i, m in enumerate(messages) if m["role"] != "system"), None)
    if first is None:
        return None
    later_user = next((i for i in range(first + 1, len(messages)) if messages[i]["role"] == "user"), None)
    if later_user is None:
        return None
    return first, later_user
