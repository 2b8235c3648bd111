"""The tiny GPT-2 the transformer tests share: a byte-level BPE trained here and random weights."""

from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"


def train_tokenizer(vocab_size: int = 400):
    """A byte-level BPE on Python's documentation, the way GPT-2's own was built."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from edgelm.models.corpus import builtin_text

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([builtin_text()[:100_000]], trainer)
    return tokenizer


def make_gpt2_source(folder: Path, n_head: int = 2, n_embd: int = 64) -> Path:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tokenizer = train_tokenizer()
    eos = tokenizer.token_to_id(EOS)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_head=n_head,
        n_embd=n_embd,
        n_positions=128,
        vocab_size=tokenizer.get_vocab_size(),
        bos_token_id=eos,
        eos_token_id=eos,
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder
