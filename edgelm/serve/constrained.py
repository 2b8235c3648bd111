"""Mapping OpenAI's `response_format` and `tools` onto edgelm's constrained generation, where the
loaded model's runtime offers it. Where it does not, those fields keep their neutral values only
and anything else is a 400 naming the field (see schema.unsupported)."""

from __future__ import annotations

from typing import Any


def chat_fields(task: Any) -> dict | None:
    """Checks for the constrained-generation fields `task.chat_stream` accepts; None: it accepts none."""
    return None


def chat_options(extra: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for `chat_stream` from the checked fields."""
    return {}
