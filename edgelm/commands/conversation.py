"""`edgelm chat`'s conversation files: `/save FILE` writes, `--resume FILE` reads, as JSON in
OpenAI's message shape (a list of {"role", "content"}). A file to resume may come from anyone:
it is read bounded and checked message by message, and any problem is one line naming it."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path

from edgelm.errors import InputError
from edgelm.safe_text import check_text, read_text

MAX_CONVERSATION_BYTES = 16 << 20
MAX_MESSAGES = 10_000
ROLES = ("system", "user", "assistant")


def load_conversation(path: Path) -> list[dict[str, str]]:
    """The messages a conversation file holds, checked; an InputError naming the file otherwise."""
    text = read_text(path, "the conversation file", limit=MAX_CONVERSATION_BYTES)
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise InputError(f"{path}: not a JSON conversation ({str(err)[:100]})") from None
    if isinstance(document, dict):  # {"messages": [...]}, as an OpenAI request body holds them
        document = document.get("messages")
    if not isinstance(document, list) or not document:
        raise InputError(f"{path}: a conversation is a non-empty JSON list of {{\"role\", \"content\"}} messages")
    if len(document) > MAX_MESSAGES:
        raise InputError(f"{path}: more than {MAX_MESSAGES} messages")
    return [_message(path, i, raw) for i, raw in enumerate(document)]


def _message(path: Path, i: int, raw: object) -> dict[str, str]:
    if not isinstance(raw, dict):
        raise InputError(f"{path}: message {i} is not an object with role and content")
    role, content = raw.get("role"), raw.get("content")
    if role not in ROLES:
        raise InputError(f"{path}: message {i} has role {str(role)[:40]!r}; a chat holds {', '.join(ROLES)}")
    if not isinstance(content, str):
        raise InputError(f"{path}: message {i} ({role}) has no 'content' string")
    if role == "system" and i != 0:
        raise InputError(f"{path}: message {i} is a system message; only the first may be one")
    return {"role": role, "content": check_text(content, f"{path}: message {i}")}


def save_conversation(path: Path, messages: list[dict[str, str]]) -> None:
    """Write the conversation whole or not at all (a temporary file beside it, then a rename)."""
    path = Path(path)
    data = json.dumps(messages, indent=2, ensure_ascii=False) + "\n"
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(data)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise
