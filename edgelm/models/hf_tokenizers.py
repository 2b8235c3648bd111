"""Tokenizers for the transformer families, trained with the `tokenizers` library on the training text.

Each follows the split rules of the real family so the exporters recognise it: GPT-2's byte-level
BPE with GPT-2's own regex, LLaMA 3's byte-level BPE with its split pattern and chat tokens, and
BERT's lower-casing WordPiece. Each is returned wrapped in the transformers class the family's
checkpoints use, so `save_pretrained` writes the usual files.
"""

from __future__ import annotations

from edgelm.models.tokenizer import text_chunks

GPT2_EOS = "<|endoftext|>"
# LLaMA 3's chat tokens (the GGUF exporter knows <|eot_id|> as an end of turn)
LLAMA_BOS, LLAMA_EOS, LLAMA_EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
LLAMA_HEADER = ("<|start_header_id|>", "<|end_header_id|>")
LLAMA_SPECIALS = (LLAMA_BOS, LLAMA_EOS, LLAMA_EOT, *LLAMA_HEADER)
# LLaMA 3's split pattern: contractions, letters, up to 3 digits, punctuation, newlines, spaces
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def chat_turns(user: str, assistant: str) -> str:
    """One conversation exactly as LLAMA_CHAT_TEMPLATE renders it (trimmed contents, BOS first)."""
    start, end = LLAMA_HEADER
    return (f"{LLAMA_BOS}{start}user{end}\n\n{user.strip()}{LLAMA_EOT}"
            f"{start}assistant{end}\n\n{assistant.strip()}{LLAMA_EOT}")


def _byte_level_bpe(text: str, vocab_size: int, pre_tokenizer, specials: tuple[str, ...]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(text_chunks(text), trainer=trainer)
    tokenizer.add_special_tokens(list(specials))  # after the merged vocabulary, as the real families do
    return tokenizer


def gpt2_tokenizer(text: str, vocab_size: int):
    """Byte-level BPE split by GPT-2's regex (ByteLevel's own), one special token."""
    from tokenizers import pre_tokenizers
    from transformers import GPT2TokenizerFast

    tok = _byte_level_bpe(text, vocab_size, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                          (GPT2_EOS,))
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token=GPT2_EOS, eos_token=GPT2_EOS, unk_token=GPT2_EOS)


def llama_tokenizer(text: str, vocab_size: int):
    """LLaMA 3's byte-level BPE: its split pattern, then bytes; BOS added to every encoding."""
    from tokenizers import Regex, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    pre = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tok = _byte_level_bpe(text, vocab_size, pre, LLAMA_SPECIALS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{LLAMA_BOS} $A", pair=f"{LLAMA_BOS} $A {LLAMA_BOS} $B",
        special_tokens=[(LLAMA_BOS, tok.token_to_id(LLAMA_BOS))])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=LLAMA_BOS, eos_token=LLAMA_EOS)
    wrapped.chat_template = LLAMA_CHAT_TEMPLATE
    return wrapped


def bert_tokenizer(text: str, vocab_size: int):
    """Lower-casing WordPiece with BERT's normaliser, pre-tokenizer and [CLS] ... [SEP] framing."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                strip_accents=None, lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(BERT_SPECIALS),
                                        show_progress=False)
    tok.train_from_iterator(text_chunks(text), trainer=trainer)
    # the trainer numbers its alphabet in hash-set order, different from run to run: renumber
    # (specials first, then sorted) so a seed gives the same files; WordPiece ignores the order
    rest = sorted(set(tok.get_vocab()) - set(BERT_SPECIALS))
    tok.model = models.WordPiece(vocab={t: i for i, t in enumerate([*BERT_SPECIALS, *rest])}, unk_token="[UNK]",
                                 max_input_chars_per_word=100)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return BertTokenizerFast(tokenizer_object=tok, do_lower_case=True, unk_token="[UNK]", sep_token="[SEP]",
                             pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]")
