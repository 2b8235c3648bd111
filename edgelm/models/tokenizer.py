"""Tokenizers for the recurrent models, built with the `tokenizers` library on the training text."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

UNK = "<unk>"
EOS = "<|endoftext|>"
SPECIALS = [UNK, EOS]


def train_char_tokenizer(text: str) -> Tokenizer:
    """One token per character seen in the text; unseen characters map to <unk>."""
    chars = sorted(set(text))
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    # A BPE model without merges and without a pre-tokenizer splits text into single characters.
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens(SPECIALS)
    return tokenizer


def train_bpe_tokenizer(text: str, vocab_size: int) -> Tokenizer:
    """Byte-level BPE: every string is representable, frequent byte runs become single tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(text_chunks(text), trainer=trainer)
    return tokenizer


def text_chunks(text: str, size: int = 10_000):
    """The text in slices, as the tokenizer trainers take it (hf_tokenizers shares this)."""
    for start in range(0, len(text), size):
        yield text[start : start + size]
