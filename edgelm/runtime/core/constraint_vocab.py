"""The model's vocabulary as llguidance sees it: every token's bytes, end ids and an encoder.

llguidance works on bytes; edgelm's tokenizers speak strings. The bytes of each token come
from the tokenizer's own vocabulary: for byte-level BPE (GPT-2, trained BPE) the printable
alphabet GPT-2 maps bytes to is mapped back; for SentencePiece-style vocabularies "▁" is a
space and "<0xAB>" a byte; for character vocabularies a piece is its UTF-8. A tokenizer that
knows better builds its own (the llama.cpp backend reads llama.cpp's pieces). Special tokens
get llguidance's 0xFF prefix, so no grammar can produce them as text.

Building this takes a few hundred milliseconds for a 50k vocabulary, so it is done once per
loaded model and kept beside it (a weak reference: it goes with the model).
"""

from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

SPECIAL_PREFIX = b"\xff"  # llguidance's mark for a token that is not text
VIRTUAL_END = b"\xff<|edgelm-end|>"  # the end token of a model without one (see `_with_end`)
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class Vocabulary:
    """llguidance's tokenizer for a model, and how many of its ids are the model's own: ids from
    `size` on are a virtual end token (for a model without one) and never a logit."""

    tokenizer: Any  # llguidance.LLTokenizer
    size: int


def llg_vocabulary(generator: Any) -> Vocabulary:
    """The llguidance view of `generator`'s vocabulary, built on first use and kept with the model.
    A server can call this once at load so the first constrained request does not pay for it."""
    if generator not in _CACHE:
        _CACHE[generator] = _build(generator)
    return _CACHE[generator]


@runtime_checkable
class OwnVocabulary(Protocol):
    """A tokenizer that builds llguidance's view of its vocabulary itself (the llama.cpp
    backend's, from the loaded model's pieces and native tokenize function). Recognised by
    shape, so the core never imports the backend that makes one."""

    def llg_vocabulary(self, end_ids: set[int]) -> Vocabulary: ...


def _build(generator: Any) -> Vocabulary:
    end = {generator.eos_id, *generator.end_ids} - {None}
    if isinstance(generator.tokenizer, OwnVocabulary):
        return generator.tokenizer.llg_vocabulary(end)
    tokens, specials = token_bytes(generator.tokenizer)
    end_ids = sorted(i for i in end if i < len(tokens))
    return _with_end(tokens, specials, end_ids, generator.tokenizer)


def _with_end(tokens: list[bytes], specials: set[int], end_ids: list[int], tokenizer) -> Vocabulary:
    """An LLTokenizer over the vocabulary. A model without an end token gets a virtual one just
    past its ids: when the grammar allows only that, generation ends, since no real token can
    follow. (Logits wider than the vocabulary, from padded embeddings, are masked by GrammarMask.)"""
    import llguidance

    size = len(tokens)
    if not end_ids:
        tokens = [*tokens, VIRTUAL_END]
        end_ids = [size]
        specials = {*specials, size}
    wrapper = llguidance.TokenizerWrapper(_Vocabulary(tokens, end_ids[0], sorted(specials), tokenizer))
    return Vocabulary(llguidance.LLTokenizer(wrapper, n_vocab=len(tokens), eos_token=end_ids), size)


class _Vocabulary:
    """The object llguidance's TokenizerWrapper reads: token bytes, special ids and encode()."""

    def __init__(self, tokens: list[bytes], eos: int, specials: list[int], tokenizer):
        self.tokens = tokens
        self.eos_token_id = eos
        self.bos_token_id = None
        self.special_token_ids = specials
        self._tokenizer = tokenizer

    def __call__(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError("text, not bytes")  # tells the wrapper to pass strings
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)


def token_bytes(tokenizer) -> tuple[list[bytes], set[int]]:
    """(bytes of every id, the special ids) of a `tokenizers.Tokenizer`."""
    # the decoder's own JSON (its pickled state): serialising the whole tokenizer costs far more
    decoder = tokenizer.decoder
    decoders = _decoder_types(json.loads(decoder.__getstate__()) if decoder is not None else None)
    added = tokenizer.get_added_tokens_decoder()
    specials = {i for i, token in added.items() if token.special}
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    tokens = [b""] * (max(vocab.values(), default=-1) + 1)
    for piece, i in vocab.items():
        if i in specials:
            tokens[i] = SPECIAL_PREFIX + piece.encode("utf-8")
        elif i in added:  # added text tokens are stored as plain text, never byte-mapped
            tokens[i] = piece.encode("utf-8")
        else:
            tokens[i] = _piece_bytes(piece, decoders)
    return tokens, specials


def _decoder_types(decoder: dict | None) -> set[str]:
    if not decoder:
        return set()
    if decoder.get("type") == "Sequence":
        return {t for d in decoder.get("decoders", []) for t in _decoder_types(d)}
    return {decoder.get("type", "")}


def _piece_bytes(piece: str, decoders: set[str]) -> bytes:
    if "ByteLevel" in decoders:
        # each alphabet character becomes the character of its byte's value, which latin-1 writes as that byte
        try:
            return piece.translate(_byte_table()).encode("latin-1")
        except UnicodeEncodeError:  # not a byte-level piece after all
            return piece.encode("utf-8")
    if "ByteFallback" in decoders and (match := _BYTE_PIECE.match(piece)):
        return bytes([int(match.group(1), 16)])
    if "Metaspace" in decoders or "Replace" in decoders:
        piece = piece.replace("\u2581", " ")
    return piece.encode("utf-8")


_BYTE_TABLE: dict[int, int] = {}


def _byte_table() -> dict[int, int]:
    """Byte-level BPE writes each byte as a printable character: bytes that are printable in
    Latin-1 stand for themselves, the others take the characters from U+0100 on, in order.
    This maps each such character back to its byte value (a str.translate table)."""
    if not _BYTE_TABLE:
        printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
        shifted = [b for b in range(256) if b not in printable]
        _BYTE_TABLE.update({b: b for b in printable})
        _BYTE_TABLE.update({256 + n: b for n, b in enumerate(shifted)})
    return _BYTE_TABLE
