"""What differs between the transformer families edgelm trains: tokenizer, config, data and loss.

Each `Recipe` builds Hugging Face's own classes (GPT2LMHeadModel, LlamaForCausalLM,
BertForMaskedLM), so a trained folder is an ordinary checkpoint the exporters read unchanged.
Hidden sizes default to multiples of 256 so llama.cpp's K-quants apply to every matrix rather
than falling back per tensor, which would make their calibration meaningless.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgelm.models import hf_tokenizers as toks

# per family: sizes, data and optimiser. Steps: about two minutes on 2 cores, from 7.5 (GPT-2), 8.4
# (LLaMA) and 7.7 (BERT) steps/s measured with OMP_NUM_THREADS=2 on a nearly idle machine
DEFAULTS: dict[str, dict[str, float | int]] = {
    "gpt2": dict(hidden=256, layers=3, heads=4, vocab_size=4096, seq_len=128, batch_size=8, lr=2e-3, steps=850),
    "llama": dict(hidden=256, layers=3, heads=4, vocab_size=4096, seq_len=256, batch_size=4, lr=2e-3, steps=900),
    "bert": dict(hidden=256, layers=3, heads=4, vocab_size=4096, seq_len=128, batch_size=8, lr=1e-3, steps=850),
}
# masked-LM: BERT's recipe (15% of tokens, of them 80% shown as [MASK], 10% a random token, 10%
# unchanged), with only word pieces chosen: punctuation is most of this corpus's frequent tokens,
# and a short run that learns to fill them answers "." for every mask
MASK_SHARE = 0.15


@dataclass(frozen=True)
class Recipe:
    family: str
    tokenizer: Callable[[str, int], object]  # (training text, vocab size) -> transformers tokenizer
    config: Callable[[object, dict], object]  # (tokenizer, options) -> transformers config
    model_class: str  # the transformers class name
    causal: bool  # next-token loss; else masked-LM
    training_text: Callable[[str], str]  # the raw training text -> what the model is trained on


def _gpt2_config(tokenizer, o: dict):
    from transformers import GPT2Config

    eos = tokenizer.eos_token_id
    # no dropout: a few hundred steps over a small corpus are far from overfitting, and it slows learning
    return GPT2Config(vocab_size=len(tokenizer), n_positions=o["seq_len"], n_embd=o["hidden"], n_layer=o["layers"],
                      n_head=o["heads"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                      bos_token_id=eos, eos_token_id=eos)


def _llama_config(tokenizer, o: dict):
    from transformers import LlamaConfig

    eot = tokenizer.convert_tokens_to_ids(toks.LLAMA_EOT)
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=o["hidden"], intermediate_size=2 * o["hidden"],
                       num_hidden_layers=o["layers"], num_attention_heads=o["heads"],
                       num_key_value_heads=max(1, o["heads"] // 2),  # grouped-query attention, as LLaMA 3
                       max_position_embeddings=o["seq_len"], rms_norm_eps=1e-5, tie_word_embeddings=False,
                       rope_theta=10000.0, bos_token_id=tokenizer.bos_token_id, eos_token_id=[
                           tokenizer.eos_token_id, eot])


def _bert_config(tokenizer, o: dict):
    from transformers import BertConfig

    return BertConfig(vocab_size=len(tokenizer), hidden_size=o["hidden"], num_hidden_layers=o["layers"],
                      num_attention_heads=o["heads"], intermediate_size=4 * o["hidden"],
                      max_position_embeddings=o["seq_len"], hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0, pad_token_id=tokenizer.pad_token_id)


_SENTENCE_END = re.compile(r"(?<=[a-z0-9)][.!?])\s+(?=[A-Z])")


def chat_text(text: str) -> str:
    """The corpus as conversations: each passage's first sentence asked, the rest of it answered.

    Passages without a sentence break (headings, code) are skipped; the chat format is what the
    trained LLaMA must learn, the text inside it is the corpus itself.
    """
    conversations = []
    for passage in text.split("\n\n"):
        passage = passage.strip()
        split = _SENTENCE_END.search(passage)
        if split is None or not 12 <= split.start() <= 300:
            continue
        question, answer = passage[: split.start()], passage[split.end() :]
        if len(answer) >= 40:
            conversations.append(toks.chat_turns(question, answer[:1200]))
    return "".join(conversations)


def chat_and_plain_text(text: str) -> str:
    """Conversations, then the plain text: windows drawn from both teach the chat format and also
    plain continuation (`edgelm run`, and the held-out perplexity, which is scored on plain text)."""
    return chat_text(text) + toks.LLAMA_BOS + text


RECIPES = {
    "gpt2": Recipe("gpt2", toks.gpt2_tokenizer, _gpt2_config, "GPT2LMHeadModel", True, lambda text: text),
    "llama": Recipe("llama", toks.llama_tokenizer, _llama_config, "LlamaForCausalLM", True, chat_and_plain_text),
    "bert": Recipe("bert", toks.bert_tokenizer, _bert_config, "BertForMaskedLM", False, lambda text: text),
}


def build_model(recipe: Recipe, config):
    import transformers

    return getattr(transformers, recipe.model_class)(config)


def word_pieces(tokenizer) -> torch.Tensor:
    """(vocab,) bool: which ids are word pieces (letters, or ## and letters)."""
    table = torch.zeros(len(tokenizer), dtype=torch.bool)
    for token, token_id in tokenizer.get_vocab().items():
        table[token_id] = re.fullmatch(r"(##)?[a-z]+", token) is not None
    return table


def masked_batch(window: torch.Tensor, tokenizer, generator: torch.Generator,
                 words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's masked-LM inputs and labels for windows of plain ids (B, T) -> [CLS] ids [SEP], (B, T+2).

    `words` (vocab,) bool: the ids that may be chosen (word_pieces)."""
    batch = window.shape[0]
    cls = torch.full((batch, 1), tokenizer.cls_token_id)
    sep = torch.full((batch, 1), tokenizer.sep_token_id)
    inputs = torch.cat([cls, window, sep], dim=1)  # (B, T+2)
    chosen = (torch.rand(inputs.shape, generator=generator) < MASK_SHARE) & words[inputs]  # never [CLS]/[SEP]
    labels = torch.where(chosen, inputs, torch.full_like(inputs, -100))
    roll = torch.rand(inputs.shape, generator=generator)
    inputs = inputs.clone()
    inputs[chosen & (roll < 0.8)] = tokenizer.mask_token_id
    random_ids = torch.randint(len(toks.BERT_SPECIALS), len(tokenizer), inputs.shape, generator=generator)
    swap = chosen & (roll >= 0.8) & (roll < 0.9)
    inputs[swap] = random_ids[swap]
    return inputs, labels
