"""Tokenizer and chat-template parity between a GGUF export and its Hugging Face source.

Tokenizer: llama.cpp's tokenisation of the GGUF (special tokens parsed) against the source's own
tokenizer: `tokenizers` for byte-level BPE, the `sentencepiece` library for SentencePiece.
Template: edgelm's sandboxed renderer against transformers' apply_chat_template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from edgelm.artifact import Check, Manifest

PROBES = (
    "Hello world",
    "Hello, world! How are you today?",
    "   leading spaces, and   runs of    spaces   ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF\n",
    "Unicode: café naïve Straße Ελληνικά русский עברית",
    "emoji 🙂👍🏽🚀 and a family 👨‍👩‍👧",
    "CJK 你好世界 日本語のテキスト 한국어",
    "numbers 1234567 3.14159 and 1,000,000",
    "code:\n    def f(x):\n        return x**2  # square\n",
    "",
    " ",
    "\n\n",
)
CONVERSATIONS = (
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "What is 2+2?"},
     {"role": "assistant", "content": "4."},
     {"role": "user", "content": "And 3+3?"}],
    [{"role": "user", "content": "  spaces \n and unicode 🙂 你好 "}],
)


def special_probes(specials: list[str]) -> list[str]:
    """Probes with the special tokens inside text, as chat prompts contain them."""
    probes = [f"{m}Hi there{m}\n{m} after" for m in specials[:4]]
    return probes + ([f"{specials[0]}user\n\nHello{specials[-1]}"] if specials else [])


def tokenizer_checks(llm, source: Path, manifest: Manifest) -> list[Check]:
    """Share of probes where llama.cpp's token ids equal the source tokenizer's (must be 1)."""
    specials = _control_texts(llm, manifest)
    reference = _reference_tokenizer(source, specials, manifest)
    probes = [*PROBES, *special_probes(specials)]
    mismatches = []
    for text in probes:
        mine = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        theirs = reference(text)
        if list(mine) != list(theirs):
            mismatches.append(text)
    check = Check.at_least("tokenizer_parity", (len(probes) - len(mismatches)) / len(probes), 1.0)
    check.note = f"{len(probes)} probes" + (f"; first mismatch: {mismatches[0]!r}" if mismatches else "")
    return [check]


def _control_texts(llm, manifest: Manifest) -> list[str]:
    """The texts of bos and the end-of-turn tokens, as the GGUF spells them."""
    ids = [manifest.tokenizer.bos_id, *manifest.generation.stop_ids]
    texts = [llm.detokenize([i], special=True).decode("utf-8", "replace")
             for i in ids if isinstance(i, int) and 0 <= i < llm.n_vocab()]
    return list(dict.fromkeys(t for t in texts if t))


def _reference_tokenizer(source: Path, specials: list[str], manifest: Manifest):
    if manifest.tokenizer.kind == "bpe":
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
        return lambda text: tokenizer.encode(text, add_special_tokens=False).ids
    import sentencepiece

    processor = sentencepiece.SentencePieceProcessor(model_file=str(source / "tokenizer.model"))
    from edgelm.export.gguf_vocab import _added_tokens

    # markers added on top of the SentencePiece model (Phi-3's <|end|>) have ids past its pieces
    added = {content: token_id for token_id, (content, _) in _added_tokens(source).items()}
    special_ids = {text: added.get(text, processor.PieceToId(text)) for text in specials}
    # sentencepiece treats control pieces in text as plain text; split them out first, as
    # transformers and llama.cpp do, and encode each stretch of text on its own
    pattern = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")") if specials else None

    def encode(text: str) -> list[int]:
        parts = pattern.split(text) if pattern else [text]
        ids: list[int] = []
        for part in parts:
            if part in special_ids:
                ids.append(special_ids[part])
            elif part:
                ids += processor.EncodeAsIds(part)
        return ids

    return encode


def chat_template_checks(source: Path, manifest: Manifest) -> list[Check]:
    """Share of conversations edgelm renders exactly as transformers does (must be 1)."""
    template = manifest.generation.chat_template
    if not template:
        return []
    from transformers import AutoTokenizer

    from edgelm.runtime.chat.template import render_chat

    hf = AutoTokenizer.from_pretrained(source)
    hf.chat_template = template
    mismatches = []
    for messages in CONVERSATIONS:
        theirs = _render_or_error(lambda messages=messages: hf.apply_chat_template(messages, tokenize=False,
                                                                 add_generation_prompt=True))
        mine = _render_or_error(lambda messages=messages: render_chat(
            template, [dict(m) for m in messages], bos_token=hf.bos_token or "",
            eos_token=hf.eos_token or "", add_generation_prompt=True))
        if mine != theirs:
            mismatches.append(json.dumps(messages)[:80])
    check = Check.at_least("chat_template_parity", 1 - len(mismatches) / len(CONVERSATIONS), 1.0)
    check.note = f"{len(CONVERSATIONS)} conversations" + (f"; first mismatch: {mismatches[0]}" if mismatches else "")
    return [check]


def _render_or_error(render) -> str:
    """The rendered prompt, or a marker when the template refuses the conversation."""
    try:
        return render()
    except Exception:  # both sides refusing (raise_exception) counts as agreeing
        return "<template refused the conversation>"
