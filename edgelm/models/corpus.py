"""The built-in English corpus: Python's own documentation topics, present on every CPython."""

from __future__ import annotations

HELD_OUT_FRACTION = 0.05  # the last 5% of the text, never trained on, for perplexity


def builtin_text() -> str:
    from pydoc_data.topics import topics

    # sorted keys: the same text, in the same order, on every machine
    return "\n\n".join(topics[key] for key in sorted(topics))


def split_held_out(text: str, fraction: float = HELD_OUT_FRACTION) -> tuple[str, str]:
    """(train, held_out): a fixed tail slice, cut at a line break so no word is split."""
    cut = int(len(text) * (1 - fraction))
    newline = text.rfind("\n", 0, cut)
    cut = newline if newline > len(text) // 2 else cut
    return text[:cut], text[cut:]


def words(text: str) -> list[str]:
    import re

    return re.findall(r"[A-Za-z]+", text)


def real_word_fraction(generated: str, corpus: str | None = None) -> float:
    """Share of the generated words (letters only) that occur as words in the corpus."""
    known = set(w.lower() for w in words(corpus if corpus is not None else builtin_text()))
    found = words(generated)
    return sum(w.lower() in known for w in found) / len(found) if found else 0.0
