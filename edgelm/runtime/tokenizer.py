"""Loading `tokenizer.json` with the `tokenizers` library (never transformers)."""

from __future__ import annotations

from pathlib import Path

from edgelm.errors import ArtifactError


def load_tokenizer(path: Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception for malformed files
        raise ArtifactError(f"{path}: not a valid tokenizer.json ({str(err).splitlines()[0][:120]})") from None
