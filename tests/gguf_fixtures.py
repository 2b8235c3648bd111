"""Tiny seeded Qwen2 and Phi-3 checkpoints built offline, saved as transformers saves real ones.

Qwen2: a byte-level BPE trained here with Qwen2's own split rule, ChatML specials and template,
tied embeddings, attention biases (randomised: the initialiser leaves them zero, which would hide
a lost bias). Phi-3: a SentencePiece model with Phi-3's chat markers added on top (ids past the
SentencePiece pieces, as in the real tokenizer), fused qkv_proj and gate_up_proj.
"""

from __future__ import annotations

import json
from pathlib import Path

from llama_fixtures import _save_tokenizer, _spm_tokenizer, corpus_text

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PHI3_SPECIALS = ("<|end|>", "<|user|>", "<|assistant|>", "<|system|>")
PHI3_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)


def check(manifest, name):
    """The validation check of that name in a manifest (StopIteration if it has none)."""
    return next(c for c in manifest.validation if c.name == name)


def qwen2_tokenizer(vocab: int = 384):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - len(QWEN2_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus_text()], trainer=trainer)
    tok.add_special_tokens(list(QWEN2_SPECIALS))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")


def _randomise_biases(model, seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)


def build_tiny_qwen2(folder: str | Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = qwen2_tokenizer()
    _save_tokenizer(folder, tokenizer, CHATML_TEMPLATE, in_jinja_file=False)
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
        rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    _randomise_biases(model, seed)
    model.save_pretrained(folder, safe_serialization=True)
    eos = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return folder


def build_tiny_phi3(folder: str | Path, *, hidden: int = 64, layers: int = 2, seed: int = 0,
                    rope_scaling: dict | None = None) -> Path:
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _spm_tokenizer(folder, 512)
    tokenizer.add_special_tokens({"additional_special_tokens": list(PHI3_SPECIALS)})
    _save_tokenizer(folder, tokenizer, PHI3_TEMPLATE, in_jinja_file=False)
    config = Phi3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        original_max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=rope_scaling,
        sliding_window=None, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    Phi3ForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
    eos = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|end|>")]
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": tokenizer.bos_token_id,
                                                               "eos_token_id": eos}))
    return folder
