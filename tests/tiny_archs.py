"""Tiny seeded checkpoints for the GGUF architectures added last (Qwen3, Gemma 3 text), and any
decoder architecture with any tokenizer kind, built offline with transformers' own config classes.

Shapes follow the real configs in what the converter must get right: Qwen3's head_dim wider than
hidden / heads (0.6B: 128 against 1024 / 16) with per-head q/k norms and tied embeddings; Gemma 3's
five sliding-window layers to one global one (270M and 1B), a query scale of head_dim, local and
global rope bases, (1 + w) norms before and after attention and feed-forward, GELU-tanh, a
SentencePiece tokenizer without a dummy prefix and <start_of_turn>/<end_of_turn> markers. Norm
weights are randomised: their initial values (ones, or zeros for Gemma's 1 + w) would hide a lost
or doubled offset.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

from gguf_fixtures import CHATML_TEMPLATE, _randomise_biases, qwen2_tokenizer

from llama_fixtures import _bpe_tokenizer, _save_tokenizer, _spm_tokenizer, corpus_text

GEMMA_SPECIALS = ("<start_of_turn>", "<end_of_turn>")
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA3_WINDOW = 8  # tokens; the validation's prompts and held-out text run past it


def randomise_norms(model, seed: int, scale: float = 0.1) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name and param.dim() == 1:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


def _save_model(model, folder: Path, seed: int) -> None:
    randomise_norms(model, seed)
    model.save_pretrained(folder, safe_serialization=True)


def build_tiny_qwen3(folder: str | Path, *, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = qwen2_tokenizer()  # Qwen3 keeps Qwen2's byte-level BPE, split rule and ChatML
    _save_tokenizer(folder, tokenizer, CHATML_TEMPLATE, in_jinja_file=False)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=2 * hidden // 4, max_position_embeddings=512,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True, use_sliding_window=False,
        attention_bias=False, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    _save_model(Qwen3ForCausalLM(config).eval(), folder, seed)
    eos = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    return folder


def gemma_tokenizer(folder: Path, vocab: int = 512):
    """A SentencePiece BPE trained as Gemma's is: no dummy prefix, byte fallback, pad/eos/bos/unk first."""
    import sentencepiece as spm
    from transformers import GemmaTokenizer

    model = io.BytesIO()
    lines = [line for line in corpus_text().splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab, model_type="bpe",
        byte_fallback=True, split_digits=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, add_dummy_prefix=False,
        pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=list(GEMMA_SPECIALS),
        character_coverage=1.0, max_sentence_length=1 << 16, minloglevel=2, num_threads=1)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    return GemmaTokenizer(str(folder / "tokenizer.model"), add_bos_token=True, add_eos_token=False)


def build_tiny_gemma3(folder: str | Path, *, hidden: int = 64, layers: int = 7, seed: int = 0,
                      window: int = GEMMA3_WINDOW, rope_scaling: dict | None = None, **changes) -> Path:
    """Layers 0-4 and 6 slide over `window` tokens, layer 5 attends globally (Gemma 3's 5:1 pattern)."""
    import torch
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = gemma_tokenizer(folder)
    _save_tokenizer(folder, tokenizer, GEMMA_TEMPLATE, in_jinja_file=False)
    head_dim = 32  # wider than hidden / heads (16), as 256 is in the real 270M and 1B
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=1, head_dim=head_dim, query_pre_attn_scalar=head_dim,
        max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1000000.0, rope_local_base_freq=10000.0,
        sliding_window=window, rope_scaling=rope_scaling, hidden_activation="gelu_pytorch_tanh",
        final_logit_softcapping=None, attn_logit_softcapping=None, tie_word_embeddings=True,
        pad_token_id=0, eos_token_id=1, bos_token_id=2, **changes,
    )
    config.architectures = ["Gemma3ForCausalLM"]
    torch.manual_seed(seed)
    _save_model(Gemma3ForCausalLM(config).eval(), folder, seed)
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 2, "eos_token_id": [1, end_of_turn],
                                                               "pad_token_id": 0}))
    return folder


# ---- every decoder architecture with every tokenizer kind ----------------------------------------

def build_tokenizer(kind: str, folder: str | Path) -> Path:
    """A tokenizer folder of one kind: "spm" (tokenizer.model), "bpe" (byte-level tokenizer.json), "wordpiece"."""
    folder = Path(folder)
    if kind != "wordpiece":  # the BERT builder makes its own folder
        folder.mkdir(parents=True, exist_ok=True)
    if kind == "spm":
        tokenizer = _spm_tokenizer(folder, 512)
    elif kind == "bpe":
        tokenizer = _bpe_tokenizer(folder, 512, "llama3")
    elif kind == "wordpiece":
        from test_gguf_bert import write_wordpiece_bert

        write_wordpiece_bert(folder)
        for name in folder.iterdir():  # keep the tokenizer files only
            if name.name in ("config.json", "model.safetensors") or name.is_dir():
                shutil.rmtree(name) if name.is_dir() else name.unlink()
        return folder
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    _save_tokenizer(folder, tokenizer, None, in_jinja_file=False)
    return folder


def _vocab_size(tokenizer_folder: Path) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(tokenizer_folder))


def decoder_config(arch: str, vocab: int):
    """A tiny config of each GGUF decoder architecture edgelm converts."""
    import transformers as tf

    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    if arch == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, use_sliding_window=False, **common)
    if arch == "phi3":
        return tf.Phi3Config(num_key_value_heads=2, original_max_position_embeddings=256, sliding_window=None,
                             pad_token_id=0, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(num_key_value_heads=2, head_dim=32, use_sliding_window=False, **common)
    if arch == "gemma3":
        config = tf.Gemma3TextConfig(num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32,
                                     sliding_window=GEMMA3_WINDOW, pad_token_id=0, **{**common, "num_hidden_layers": 3})
        config.architectures = ["Gemma3ForCausalLM"]
        return config
    raise ValueError(f"no tiny config for {arch!r}")


def build_with_tokenizer(arch: str, tokenizer_folder: Path, folder: str | Path, seed: int = 0) -> Path:
    """A tiny random `arch` checkpoint carrying the tokenizer files of `tokenizer_folder`."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    shutil.copytree(tokenizer_folder, folder)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(decoder_config(arch, _vocab_size(tokenizer_folder)),
                                             dtype=torch.float32).eval()
    _randomise_biases(model, seed)
    _save_model(model, folder, seed)
    return folder
