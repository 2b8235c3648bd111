"""Loading `tokenizer.json` with the `tokenizers` library (never transformers).

The file comes from outside. The library raises a bare Exception for most malformed files, but
some (an invalid regex in a pre-tokenizer, a merge naming a missing token) end in a Rust panic,
which pyo3 raises as `PanicException`, a BaseException that `except Exception` lets through.
Both become one ArtifactError here. The file's padding and truncation settings are dropped:
they would silently cut or pad every prompt, and the runtime decides those itself.
"""

from __future__ import annotations

from pathlib import Path

from edgelm.errors import ArtifactError, first_line
from edgelm.paths import bounded_size

PROBE_TEXT = "Hello, world! It's 2024: caf\u00e9 \u4f60\u597d \U0001f600\n\tend"
MAX_TOKENIZER_BYTES = 1 << 30  # real tokenizer.json files are a few MB; parsing holds it all in memory


def load_tokenizer(path: Path, vocab_size: int | None = None):
    """The tokenizer in `path`, without padding or truncation; with `vocab_size`, every id it can
    produce (added tokens included) must be below it, as the model's embedding has no other rows."""
    from tokenizers import Tokenizer

    path = Path(path)
    bounded_size(path, MAX_TOKENIZER_BYTES, "tokenizer")
    try:
        tokenizer = Tokenizer.from_file(str(path))
        tokenizer.no_padding()
        tokenizer.no_truncation()
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        largest = max(vocab.values(), default=-1)
        # some broken files load but panic on their first use (a merge of a missing token, a bad
        # regex): one probe through every stage finds them here rather than mid-generation
        tokenizer.decode(tokenizer.encode(PROBE_TEXT).ids)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as err:  # noqa: B036  (a Rust panic is a BaseException; see the module docstring)
        raise ArtifactError(f"{path}: not a valid tokenizer.json ({first_line(err, 120)})") from None
    if largest < 0:
        raise ArtifactError(f"{path}: the tokenizer has an empty vocabulary")
    if largest >= len(vocab):  # ids are 0..n-1 in every real tokenizer; a gap is a hostile id (2**32-1)
        raise ArtifactError(f"{path}: the tokenizer has token id {largest} in a vocabulary of {len(vocab)} tokens")
    if vocab_size is not None and largest >= vocab_size:
        raise ArtifactError(f"{path}: the tokenizer has token id {largest}, but the model has only "
                            f"{vocab_size} token ids")
    return GuardedTokenizer(tokenizer, path)


class GuardedTokenizer:
    """A `tokenizers.Tokenizer` whose encode and decode calls turn a Rust panic into an ArtifactError
    naming the file: a pre-tokenizer regex that backtracks catastrophically passes the load probe
    and panics only on some user's text. Everything else is the tokenizer's own (the Rust class
    cannot be subclassed, so this delegates)."""

    def __init__(self, tokenizer, path: Path):
        self._tokenizer = tokenizer
        self._path = path

    def __getattr__(self, name: str):
        return getattr(self._tokenizer, name)

    def _guarded(self, method: str, *args, **kwargs):
        try:
            return getattr(self._tokenizer, method)(*args, **kwargs)
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except Exception as err:
            if type(err).__name__ == "PanicException":  # pyo3 may also raise it as an Exception subclass
                raise self._failed(err) from None
            raise
        except BaseException as err:  # noqa: B036 - a Rust panic is a BaseException; see the module docstring
            raise self._failed(err) from None

    def _failed(self, err: BaseException) -> ArtifactError:
        return ArtifactError(f"{self._path}: the tokenizer failed on this text ({first_line(err, 120)})")

    def encode(self, *args, **kwargs):
        return self._guarded("encode", *args, **kwargs)

    def encode_batch(self, *args, **kwargs):
        return self._guarded("encode_batch", *args, **kwargs)

    def decode(self, *args, **kwargs):
        return self._guarded("decode", *args, **kwargs)

    def decode_batch(self, *args, **kwargs):
        return self._guarded("decode_batch", *args, **kwargs)
