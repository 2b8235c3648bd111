"""The tokenizer of a Hugging Face LLaMA folder, as GGUF vocabulary metadata.

SentencePiece (`tokenizer.model`): pieces, scores and piece types straight from the model proto.
Byte-level BPE (`tokenizer.json`): the vocabulary strings as stored, merges, and the name of the
llama.cpp pre-tokenizer whose split rules equal the tokenizer's own (recognised, never guessed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgelm.errors import UnsupportedModelError
from edgelm.export.gguf_tokenizer import TokenizerChoice, choose_tokenizer, read_sentencepiece
from edgelm.export.hf_source import source_file
from edgelm.paths import read_source_json

# gguf.TokenType values (the same numbers as SentencePiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# split patterns of tokenizer.json pre-tokenizers -> the llama.cpp pre-tokenizer that splits alike
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (  # llama3's with single digits
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPLITS = {"llama3": LLAMA3_SPLIT, "qwen2": QWEN2_SPLIT}
# the described pre-tokenizer steps -> llama.cpp's pre-tokenizer name for exactly those rules
KNOWN_PRE = {
    ("split:llama3", "bytelevel:no-regex"): "llama-bpe",
    ("split:qwen2", "bytelevel:no-regex"): "qwen2",
    ("bytelevel:gpt2-regex",): "gpt-2",
}
# texts of tokens that end a chat turn in common templates; stop strings when present
END_OF_TURN_TEXTS = ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "<|eom_id|>")


@dataclass
class Vocab:
    kind: str  # "spm" or "bpe"
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None  # SentencePiece only
    pre: str | None = None  # byte-level BPE only: llama.cpp pre-tokenizer name
    add_space_prefix: bool | None = None  # SentencePiece's dummy "▁" in front of the text
    notes: list[str] = field(default_factory=list)


def read_vocab(source: Path, n_vocab: int, choice: TokenizerChoice | None = None) -> Vocab:
    """The vocabulary of `source` (from the file `choice` names), padded with unused entries to the model's rows."""
    choice = choice or choose_tokenizer(source)
    if choice.kind == "spm":
        vocab = _sentencepiece_vocab(source)
    elif choice.kind == "bpe":
        vocab = _byte_level_vocab(source)
    else:
        raise UnsupportedModelError(f"{source}: a {choice.description} is read by the BERT exporter only")
    vocab.notes.extend(choice.notes)
    _add_hf_added_tokens(source, vocab)
    if len(vocab.tokens) > n_vocab:
        raise UnsupportedModelError(
            f"{source}: tokenizer has {len(vocab.tokens)} tokens but the model only {n_vocab} embedding rows")
    pad = n_vocab - len(vocab.tokens)
    if pad:
        vocab.notes.append(f"{pad} embedding rows without a token, written as unused [PAD] entries")
    for i in range(len(vocab.tokens), n_vocab):
        vocab.tokens.append(f"[PAD{i}]")
        vocab.types.append(UNUSED)
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)
    return vocab


def _sentencepiece_vocab(source: Path) -> Vocab:
    from sentencepiece import sentencepiece_model_pb2

    where = source_file(source, "tokenizer.model", "tokenizer file")
    try:
        proto = read_sentencepiece(where)
    except ValueError as err:
        raise UnsupportedModelError(f"{where}: not a SentencePiece model ({err})") from None
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise UnsupportedModelError(
            f"{source / 'tokenizer.model'}: SentencePiece "
            f"{sentencepiece_model_pb2.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)} "
            "model; llama.cpp's LLaMA tokenizer implements SentencePiece BPE only")
    return Vocab(
        kind="spm",
        tokens=[p.piece for p in proto.pieces],
        types=[int(p.type) for p in proto.pieces],
        scores=[float(p.score) for p in proto.pieces],
        add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix),
    )


def _byte_level_vocab(source: Path) -> Vocab:
    data = read_source_json(source, "tokenizer.json")
    model = data.get("model") or {}
    if not isinstance(model, dict) or not isinstance(model.get("vocab", {}), dict):
        raise UnsupportedModelError(f"{source / 'tokenizer.json'}: model.vocab must be an object")
    if model.get("type") != "BPE":
        raise UnsupportedModelError(f"{source / 'tokenizer.json'}: a {model.get('type')} model; byte-level BPE is "
                                    "supported")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in model.get("vocab", {}).values()):
        raise UnsupportedModelError(f"{source / 'tokenizer.json'}: vocabulary ids must be integers")
    by_id = {int(i): t for t, i in model.get("vocab", {}).items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise UnsupportedModelError(f"{source / 'tokenizer.json'}: vocabulary ids are not 0..{len(by_id) - 1}")
    if model.get("byte_fallback"):
        _check_byte_fallback_unused(source, by_id.values())
    vocab = Vocab(kind="bpe", tokens=[by_id[i] for i in range(len(by_id))],
                  types=[NORMAL] * len(by_id), pre=pre_tokenizer_name(data.get("pre_tokenizer"), source))
    missing = [b for b, c in enumerate(byte_level_alphabet()) if c not in by_id.values()]
    if missing:  # said, not hidden: transformers writes the unknown token there, llama.cpp does not
        vocab.notes.append(f"{len(missing)} of the 256 bytes have no token (e.g. 0x{missing[0]:02X}); "
                           "text containing them tokenises differently in llama.cpp")
    return vocab


def byte_level_alphabet() -> list[str]:
    """The 256 characters byte-level BPE spells bytes with (printable bytes as themselves, the rest from U+0100)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def _check_byte_fallback_unused(source: Path, tokens) -> None:
    """byte_fallback on a byte-level BPE acts only through "<0xNN>" tokens for bytes without their own token.

    transformers' GGUF loader sets the flag on every BPE it rebuilds; it means nothing unless the
    vocabulary holds such a byte token for a byte whose byte-level character is missing. Then
    transformers would emit it and llama.cpp, whose BPE has no byte fallback, never would: refuse.
    """
    present = set(tokens)
    acting = [f"<0x{b:02X}>" for b, c in enumerate(byte_level_alphabet())
              if c not in present and f"<0x{b:02X}>" in present]
    if acting:
        raise UnsupportedModelError(
            f"{source / 'tokenizer.json'}: a byte-level BPE whose byte fallback would emit {len(acting)} byte "
            f"token(s) (e.g. {acting[0]}); llama.cpp's BPE has no byte fallback")


def pre_tokenizer_name(pre: dict | None, source: Path) -> str:
    """The llama.cpp pre-tokenizer that splits text as this tokenizer.json does."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    described = [_describe_step(step) for step in steps]
    if tuple(described) in KNOWN_PRE:
        return KNOWN_PRE[tuple(described)]
    raise UnsupportedModelError(
        f"{source / 'tokenizer.json'}: pre-tokenizer {described or 'none'} matches no llama.cpp "
        f"pre-tokenizer edgelm knows ({', '.join(KNOWN_PRE.values())})")


def _describe_step(step: dict) -> str:
    kind = step.get("type")
    if kind == "Split":
        pattern = (step.get("pattern") or {}).get("Regex")
        name = next((n for n, known in SPLITS.items() if pattern == known), None)
        same = name and step.get("behavior") == "Isolated" and not step.get("invert")
        return f"split:{name}" if same else f"split:{pattern!r}"
    if kind == "ByteLevel":
        if step.get("add_prefix_space"):
            return "bytelevel:prefix-space"
        return "bytelevel:gpt2-regex" if step.get("use_regex", True) else "bytelevel:no-regex"
    return str(kind)


def _add_hf_added_tokens(source: Path, vocab: Vocab) -> None:
    """Tokens transformers adds on top of the base vocabulary (chat markers and the like)."""
    added = _added_tokens(source)
    for token_id in sorted(added):
        content, special = added[token_id]
        token_type = CONTROL if special else USER_DEFINED
        if token_id < len(vocab.tokens):
            if vocab.tokens[token_id] != content:
                raise UnsupportedModelError(
                    f"{source}: added token {token_id} {content!r} disagrees with the vocabulary "
                    f"({vocab.tokens[token_id]!r})")
            if vocab.types[token_id] == NORMAL:
                vocab.types[token_id] = token_type
            continue
        if token_id != len(vocab.tokens):
            raise UnsupportedModelError(f"{source}: added token ids leave a gap before {token_id}")
        vocab.tokens.append(content)
        vocab.types.append(token_type)
        if vocab.scores is not None:
            vocab.scores.append(-1000.0)


def _added_tokens(source: Path) -> dict[int, tuple[str, bool]]:
    found: dict[int, tuple[str, bool]] = {}
    if (source / "tokenizer.json").is_file():
        added = read_source_json(source, "tokenizer.json").get("added_tokens", [])
        for item in added if isinstance(added, list) else [None]:
            listed_id = item.get("id") if isinstance(item, dict) else None
            token_id, content = _added_token(source / "tokenizer.json", item, listed_id)
            found[token_id] = (content, bool(item.get("special")))
    if (source / "tokenizer_config.json").is_file():
        decoder = read_source_json(source, "tokenizer_config.json").get("added_tokens_decoder", {})
        for key, item in (decoder.items() if isinstance(decoder, dict) else [(None, None)]):
            token_id, content = _added_token(source / "tokenizer_config.json", item, key)
            found.setdefault(token_id, (content, bool(item.get("special"))))
    return found


def added_rstrip(source: Path) -> dict[str, bool]:
    """Each added token's text -> whether it strips the whitespace after it (tokenizer.json's flags)."""
    if not (source / "tokenizer.json").is_file():
        return {}
    added = read_source_json(source, "tokenizer.json").get("added_tokens", [])
    return {item["content"]: bool(item.get("rstrip")) for item in (added if isinstance(added, list) else [])
            if isinstance(item, dict) and isinstance(item.get("content"), str)}


def _added_token(path: Path, item: object, token_id: object) -> tuple[int, str]:
    """(id, text) of one added-token entry, or one line naming the file."""
    if isinstance(token_id, str) and token_id.isdigit():
        token_id = int(token_id)
    if (not isinstance(item, dict) or not isinstance(item.get("content"), str)
            or not isinstance(token_id, int) or isinstance(token_id, bool) or token_id < 0):
        raise UnsupportedModelError(f"{path}: an added token is not {{id, content}} with a non-negative id")
    return token_id, item["content"]


def end_of_turn_ids(source: Path, vocab: Vocab, eos_id: int | None) -> list[int]:
    """Ids that end generation: eos, generation_config's eos list, and known end-of-turn markers."""
    ids = [eos_id] if eos_id is not None else []
    if (source / "generation_config.json").is_file():
        listed = read_source_json(source, "generation_config.json").get("eos_token_id")
        listed = listed if isinstance(listed, list) else [listed]
        ids += [i for i in listed if isinstance(i, int) and not isinstance(i, bool)]
    ids += [i for i, t in enumerate(vocab.tokens) if t in END_OF_TURN_TEXTS and vocab.types[i] == CONTROL]
    return [i for i in dict.fromkeys(ids) if 0 <= i < len(vocab.tokens)]


def write_vocab(writer, vocab: Vocab) -> None:
    """Token list, types, scores and the tokenizer model/pre names, into a GGUFWriter."""
    writer.add_tokenizer_model({"spm": "llama", "bpe": "gpt2", "wordpiece": "bert"}[vocab.kind])
    if vocab.pre:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)


def special_vocab(source: Path, vocab: Vocab):
    """gguf's reader of special ids, add-bos/eos flags, merges and the chat template."""
    import gguf

    from edgelm.export.quiet import quiet_loggers

    with quiet_loggers("gguf.vocab"):  # its info lines are not for our users
        return gguf.SpecialVocab(source, load_merges=vocab.kind == "bpe", n_vocab=len(vocab.tokens))
