"""Control characters escaped before a terminal shows a foreign string.

Standard library only and no edgelm import, so the lowest modules (`errors.py`, whose
`first_line` shortens foreign messages) can use it; `safe_text.py` builds its checks on it.
"""

from __future__ import annotations

import re

# C0 and C1 control characters, DEL, lone surrogates, and the Unicode bidi controls
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_UNSAFE_KEEPING_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, keep_lines: bool = False) -> str:
    """`text` safe to print to a terminal: control characters shown as \\xNN / \\uNNNN escapes.

    With keep_lines, newlines and tabs pass through (generated text, multi-line output)."""
    pattern = _UNSAFE_KEEPING_LINES if keep_lines else _UNSAFE
    return pattern.sub(_escape, str(text))
