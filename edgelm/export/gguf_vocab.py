"""The tokenizer of a Hugging Face LLaMA folder, as GGUF vocabulary metadata.

SentencePiece (`tokenizer.model`): pieces, scores and piece types straight from the model proto.
Byte-level BPE (`tokenizer.json`): the vocabulary strings as stored, merges, and the name of the
llama.cpp pre-tokenizer whose split rules equal the tokenizer's own (recognised, never guessed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from edgelm.errors import UnsupportedModelError

# gguf.TokenType values (the same numbers as SentencePiece's piece types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# split patterns of tokenizer.json pre-tokenizers -> the llama.cpp pre-tokenizer that splits alike
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
KNOWN_PRE = {"llama3 split + byte-level": "llama-bpe", "gpt-2 byte-level": "gpt-2"}
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


def read_vocab(source: Path, n_vocab: int) -> Vocab:
    """The vocabulary of `source`, padded with unused entries to the model's embedding rows."""
    if (source / "tokenizer.model").is_file():
        vocab = _sentencepiece_vocab(source)
    elif (source / "tokenizer.json").is_file():
        vocab = _byte_level_vocab(source)
    else:
        raise UnsupportedModelError(f"{source}: no tokenizer.model (SentencePiece) or tokenizer.json (BPE)")
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

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString((source / "tokenizer.model").read_bytes())
    except Exception as err:  # protobuf raises its own DecodeError
        raise UnsupportedModelError(f"{source / 'tokenizer.model'}: not a SentencePiece model ({err})") from None
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
    data = json.loads((source / "tokenizer.json").read_text(encoding="utf-8"))
    model = data.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise UnsupportedModelError(
            f"{source / 'tokenizer.json'}: a {model.get('type')} model"
            f"{' with byte fallback' if model.get('byte_fallback') else ''}; byte-level BPE is supported")
    by_id = {int(i): t for t, i in model["vocab"].items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise UnsupportedModelError(f"{source / 'tokenizer.json'}: vocabulary ids are not 0..{len(by_id) - 1}")
    return Vocab(kind="bpe", tokens=[by_id[i] for i in range(len(by_id))],
                 types=[NORMAL] * len(by_id), pre=pre_tokenizer_name(data.get("pre_tokenizer"), source))


def pre_tokenizer_name(pre: dict | None, source: Path) -> str:
    """The llama.cpp pre-tokenizer that splits text as this tokenizer.json does."""
    steps = (pre or {}).get("pretokenizers", [pre] if pre else [])
    described = [_describe_step(step) for step in steps]
    if described == ["split:llama3", "bytelevel:no-regex"]:
        return KNOWN_PRE["llama3 split + byte-level"]
    if described == ["bytelevel:gpt2-regex"]:
        return KNOWN_PRE["gpt-2 byte-level"]
    raise UnsupportedModelError(
        f"{source / 'tokenizer.json'}: pre-tokenizer {described or 'none'} matches no llama.cpp "
        f"pre-tokenizer edgelm knows ({', '.join(KNOWN_PRE)})")


def _describe_step(step: dict) -> str:
    kind = step.get("type")
    if kind == "Split":
        pattern = (step.get("pattern") or {}).get("Regex")
        same = pattern == LLAMA3_SPLIT and step.get("behavior") == "Isolated" and not step.get("invert")
        return "split:llama3" if same else f"split:{pattern!r}"
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
    tokenizer_json = source / "tokenizer.json"
    if tokenizer_json.is_file():
        for item in json.loads(tokenizer_json.read_text(encoding="utf-8")).get("added_tokens", []):
            found[int(item["id"])] = (item["content"], bool(item.get("special")))
    config = source / "tokenizer_config.json"
    if config.is_file():
        decoder = json.loads(config.read_text(encoding="utf-8")).get("added_tokens_decoder", {})
        for token_id, item in decoder.items():
            found.setdefault(int(token_id), (item["content"], bool(item.get("special"))))
    return found


def end_of_turn_ids(source: Path, vocab: Vocab, eos_id: int | None) -> list[int]:
    """Ids that end generation: eos, generation_config's eos list, and known end-of-turn markers."""
    ids = [eos_id] if eos_id is not None else []
    generation = source / "generation_config.json"
    if generation.is_file():
        listed = json.loads(generation.read_text()).get("eos_token_id")
        ids += listed if isinstance(listed, list) else [listed] if isinstance(listed, int) else []
    ids += [i for i, t in enumerate(vocab.tokens) if t in END_OF_TURN_TEXTS and vocab.types[i] == CONTROL]
    return [i for i in dict.fromkeys(ids) if 0 <= i < len(vocab.tokens)]


def write_vocab(writer, vocab: Vocab) -> None:
    """Token list, types, scores and the tokenizer model/pre names, into a GGUFWriter."""
    writer.add_tokenizer_model("llama" if vocab.kind == "spm" else "gpt2")
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
    import logging

    import gguf

    logging.getLogger("gguf.vocab").setLevel(logging.ERROR)  # its info lines are not for our users
    return gguf.SpecialVocab(source, load_merges=vocab.kind == "bpe", n_vocab=len(vocab.tokens))
