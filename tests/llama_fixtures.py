"""Tiny LLaMA checkpoints built offline for tests: a Hugging Face folder like the real ones.

`build_tiny_llama(folder, tokenizer="bpe"|"spm", ...)` writes config.json, model.safetensors,
the tokenizer files (tokenizer.json for byte-level BPE; tokenizer.model for SentencePiece),
tokenizer_config.json with a chat template, and generation_config.json. Weights are seeded and,
optionally, trained for a few steps on the built-in corpus (`train_steps`). Random weights give
near-ties between the top two logits at some positions, which any float rounding may flip.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

# llama3's split pattern (contractions, letters, up to 3 digits, punctuation, newlines, spaces)
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
BPE_SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>",
                "<|start_header_id|>", "<|end_header_id|>")
BPE_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
SPM_CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %} {{ m['content'] }}{{ eos_token }}"
    "{% else %}<<SYS>>\n{{ m['content'] }}\n<</SYS>>\n\n{% endif %}{% endfor %}"
)
LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
LINEAR_ROPE_SCALING = {"rope_type": "linear", "factor": 2.0}
CORPUS_CHARS = 120_000  # enough text for a 512-piece vocabulary, quick to train on


def corpus_text() -> str:
    from edgelm.models.corpus import builtin_text, split_held_out

    return split_held_out(builtin_text())[0][:CORPUS_CHARS]


def build_tiny_llama(
    folder: str | Path,
    *,
    tokenizer: str = "bpe",  # "bpe" (byte-level, tokenizer.json) or "spm" (tokenizer.model)
    hidden: int = 256,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,  # fewer than heads: grouped-query attention
    intermediate: int | None = None,  # default 2 * hidden
    vocab: int = 512,
    tie_embeddings: bool = False,
    rope_scaling: str | None = None,  # None, "llama3" or "linear"
    chat_template: str | None | bool = True,  # True: the tokenizer's default template
    template_in_jinja_file: bool = False,  # chat_template.jinja instead of tokenizer_config.json
    pretokenizer: str = "llama3",  # bpe only: "llama3" or "gpt2"
    model_type: str = "llama",  # or "mistral" (same layout)
    train_steps: int = 0,  # a few Adam steps on the corpus; slow on a busy machine
    max_positions: int = 256,
    seed: int = 0,
) -> Path:
    """Write a tiny Hugging Face LLaMA folder and return its path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if tokenizer == "bpe":
        hf_tokenizer = _bpe_tokenizer(folder, vocab, pretokenizer)
        default_template = BPE_CHAT_TEMPLATE
    elif tokenizer == "spm":
        hf_tokenizer = _spm_tokenizer(folder, vocab)
        default_template = SPM_CHAT_TEMPLATE
    else:
        raise ValueError(f"tokenizer must be 'bpe' or 'spm', not {tokenizer!r}")
    template = default_template if chat_template is True else (chat_template or None)
    _save_tokenizer(folder, hf_tokenizer, template, template_in_jinja_file)
    config = _config(hf_tokenizer, model_type, hidden, layers, heads, kv_heads,
                     intermediate or 2 * hidden, tie_embeddings, rope_scaling, max_positions)
    model = _seeded_model(config, seed)
    if train_steps:
        _train(model, hf_tokenizer, train_steps, seed)
    model.save_pretrained(folder, safe_serialization=True)
    _write_generation_config(folder, hf_tokenizer, tokenizer)
    return folder


def _bpe_tokenizer(folder: Path, vocab: int, pretokenizer: str):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if pretokenizer == "llama3":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ])
    elif pretokenizer == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise ValueError(f"pretokenizer must be 'llama3' or 'gpt2', not {pretokenizer!r}")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab - len(BPE_SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus_text()], trainer=trainer)
    tok.add_special_tokens(list(BPE_SPECIALS))  # appended after the merged vocabulary, as in llama3
    bos = BPE_SPECIALS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=BPE_SPECIALS[1])


def _spm_tokenizer(folder: Path, vocab: int):
    import io

    import sentencepiece as spm
    from transformers import LlamaTokenizer

    model = io.BytesIO()
    lines = [line for line in corpus_text().splitlines() if line.strip()]
    # the settings of LLaMA's own tokenizer.model: BPE pieces, byte fallback, text kept as is
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, add_dummy_prefix=True,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0,
        max_sentence_length=1 << 16, minloglevel=2, num_threads=1)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return LlamaTokenizer(str(folder / "tokenizer.model"), legacy=False, add_bos_token=True,
                          add_eos_token=False)


def _save_tokenizer(folder: Path, tokenizer, template: str | None, in_jinja_file: bool) -> None:
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    jinja = folder / "chat_template.jinja"
    config.pop("chat_template", None)
    if jinja.exists():
        jinja.unlink()
    if template is not None and in_jinja_file:
        jinja.write_text(template)
    elif template is not None:
        config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2))


def _config(tokenizer, model_type, hidden, layers, heads, kv_heads, intermediate, tied,
            rope_scaling, max_positions):
    from transformers import LlamaConfig, MistralConfig

    scaling = {"llama3": LLAMA3_ROPE_SCALING, "linear": LINEAR_ROPE_SCALING, None: None}[rope_scaling]
    common = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        rope_theta=500000.0 if rope_scaling == "llama3" else 10000.0,
    )
    if model_type == "mistral":
        return MistralConfig(sliding_window=None, **common)
    return LlamaConfig(rope_scaling=scaling, **common)


def _seeded_model(config, seed: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _train(model, tokenizer, steps: int, seed: int, batch: int = 8, length: int = 64) -> None:
    """A few Adam steps on the corpus (the weights stop being purely random)."""
    import torch

    ids = torch.tensor(tokenizer(corpus_text()[:40_000], add_special_tokens=False)["input_ids"])
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - length - 1, (batch,), generator=generator)
        window = torch.stack([ids[s : s + length] for s in starts.tolist()])  # (B, T)
        loss = model(input_ids=window, labels=window).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()


def _write_generation_config(folder: Path, tokenizer, kind: str) -> None:
    eos = [tokenizer.eos_token_id]
    if kind == "bpe":  # chat models stop at the end of a turn as well as at the end of text
        eos.append(tokenizer.convert_tokens_to_ids("<|eot_id|>"))
    config = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": eos if len(eos) > 1 else eos[0]}
    (folder / "generation_config.json").write_text(json.dumps(config, indent=2))


def copy_folder(source: Path, target: Path) -> Path:
    """A private copy of a built folder, for tests that change files in it."""
    shutil.copytree(source, target)
    return target
