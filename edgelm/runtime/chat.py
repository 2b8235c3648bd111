"""Chat on top of the text generator: render the conversation with the model's template, fit it
to the context by dropping whole old turns, then run the shared generation loop."""

from __future__ import annotations

from typing import Any

from edgelm.contract import GenerationSection
from edgelm.errors import ContextOverflowError, InputError
from edgelm.runtime.chat_template import check_messages, render_chat
from edgelm.runtime.generator import Completion, TextGenerator, TextStream
from edgelm.runtime.params import GenerationParams


class ChatGenerator(TextGenerator):
    """A TextGenerator with `chat`, `chat_complete` and `chat_stream` over message lists."""

    def __init__(self, decoder, tokenizer, manifest: Any = None, defaults: GenerationParams | None = None):
        super().__init__(decoder, tokenizer, manifest, defaults)
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
    def chat_prompt(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text the model's chat template makes of `messages`."""
        return render_chat(self.chat_template, messages, bos_token=self.bos_text, eos_token=self.eos_text,
                           add_generation_prompt=add_generation_prompt)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        ids = self.tokenizer.encode(self.chat_prompt(messages), add_special_tokens=False).ids
        # most templates write the BOS text themselves; add it only where they did not
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id, *ids]
        return ids

    def fit_messages(self, messages: list[dict], max_tokens: int) -> tuple[list[dict], int, list[int]]:
        """Drop the oldest turns (never the system message, never the last user message) until
        the prompt plus `max_tokens` fits the context; return (messages, dropped messages, ids)."""
        kept = check_messages(messages)
        limit = self.decoder.context_length
        dropped = 0
        while True:
            ids = self.chat_ids(kept)
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
    def chat(self, messages: list[dict], **params: Any) -> str:
        """The assistant's reply to a conversation (a list of {"role", "content"} dicts)."""
        return self.chat_complete(messages, **params).text

    def chat_complete(self, messages: list[dict], **params: Any) -> Completion:
        stream = self.chat_stream(messages, **params)
        for _ in stream:
            pass
        assert stream.completion is not None
        return stream.completion

    def chat_stream(self, messages: list[dict], **params: Any) -> TextStream:
        """Stream the reply. With truncate=True whole old turns are dropped to fit the context
        (the completion's truncated_prompt_tokens says how many tokens went); otherwise a
        conversation that does not fit raises ContextOverflowError."""
        self._check_open()
        resolved = GenerationParams.from_kwargs(self.defaults, **params)
        if not self.chat_template:
            raise InputError("this model has no chat template; use generate() with a plain prompt")
        full = self.chat_ids(check_messages(messages))
        limit = self.decoder.context_length
        if limit is not None and len(full) + resolved.max_tokens > limit and not resolved.truncate:
            raise ContextOverflowError(
                f"the conversation of {len(full)} tokens plus max_tokens {resolved.max_tokens} exceeds the "
                f"context length {limit}; drop old turns, lower max_tokens, or pass truncate"
            )
        _, _, ids = self.fit_messages(messages, resolved.max_tokens)
        holder: dict[str, Completion] = {}
        return TextStream(self._run(ids, len(full) - len(ids), resolved, holder), holder)


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
