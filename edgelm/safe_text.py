"""Text from outside: checked before the runtime uses it, escaped before a terminal shows it.

Model files, manifests and their metadata come from strangers. A string from them printed raw
could move the cursor, retitle the window or hide text (ANSI escapes, bidi overrides), so
`printable` escapes those (it lives in `escaping.py`, beneath `errors.py`, which needs it too).
Text given by the user must be valid Unicode: Linux hands a program its arguments with
undecodable bytes as lone surrogates (surrogateescape), which no tokenizer can encode, so
they are refused with a one-line error naming where they came from.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from edgelm.errors import InputError
from edgelm.escaping import printable

# DEL, C1 controls, lone surrogates and bidi controls: json.dumps leaves these raw
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\ud800-\udfff\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_SURROGATE = re.compile("[\ud800-\udfff]")


def terminal_json(value: object, indent: int | None = None) -> str:
    """JSON text safe to print: json.dumps escapes C0 controls; C1, bidi and surrogates too here."""
    text = json.dumps(value, indent=indent, ensure_ascii=False)  # raw C0 left: only the indentation
    return _UNSAFE_IN_JSON.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def has_lone_surrogates(text: str) -> bool:
    return _SURROGATE.search(text) is not None


def check_text(text: str, where: str) -> str:
    """`text` itself, or an InputError when it holds lone surrogates (bytes that were not UTF-8)."""
    match = _SURROGATE.search(text)
    if match:
        raise InputError(f"{where} is not valid UTF-8 text (an undecodable byte at character {match.start()})")
    return text


def decode_utf8(data: bytes, where: str) -> str:
    """Bytes from a file or a pipe as text, or an InputError naming where and the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{where} is not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})") from None


MAX_TEXT_BYTES = 256 << 20  # far beyond any prompt or training text edgelm handles in memory


def read_text(path: Path, what: str, limit: int = MAX_TEXT_BYTES) -> str:
    """A UTF-8 file's text (`-` is stdin) or an InputError naming the file and the first bad byte.

    At most `limit` bytes are read: a larger file (or an endless stdin) is refused, not loaded."""
    where = f"{what} {printable(path)}"
    try:
        if str(path) == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(path, "rb") as handle:
                data = handle.read(limit + 1)
    except OSError as err:
        raise InputError(f"{where}: cannot read it ({printable(err.strerror or err)})") from None
    if len(data) > limit:
        raise InputError(f"{where}: larger than {limit} bytes; give a smaller file")
    return decode_utf8(data, where)
