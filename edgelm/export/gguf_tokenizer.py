"""Which tokenizer a Hugging Face folder really holds, decided from its files, and whether a GGUF architecture takes it.

The GGUF tokenizer model follows the tokenizer, never the architecture: a valid SentencePiece
`tokenizer.model` is written as llama.cpp's `llama` tokenizer, a byte-level BPE `tokenizer.json`
as `gpt2` (with its pre-tokenizer name), a WordPiece one as `bert`. A `tokenizer.model` that is
not SentencePiece (transformers saves the GGUF file it loaded under that name) gives way to a
valid `tokenizer.json` beside it, and the manifest says so.

llama.cpp also switches tokenizer behaviour on the model's name: a `general.name` containing
"phi3" or "phi-3" turns on Phi-3's special-token whitespace rules and looks up four tokens by
text, which aborts the load ("unordered_map::at") when one is missing. The name written here
keeps such a trigger only when the tokenizer follows that rule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edgelm.errors import UnsupportedModelError, first_line
from edgelm.paths import read_source_json

KIND_NAMES = {"spm": "SentencePiece", "bpe": "byte-level BPE", "wordpiece": "WordPiece"}
MAX_SENTENCEPIECE_BYTES = 64 << 20  # real SentencePiece models are a few MB (Gemma 3's 262k pieces: 4.7 MB)
GGUF_MAGIC = b"GGUF"
# llama.cpp (llama-vocab.cpp) changes token attributes for names containing these
PHI3_NAME = re.compile(r"phi-?3", re.IGNORECASE)
OTHER_NAME_TRIGGERS = re.compile(r"modern-bert", re.IGNORECASE)
# Phi-3's rule: every special token strips the whitespace after it, except these; "</s>" too
PHI3_NOT_RSTRIP = ("<unk>", "<s>", "<|endoftext|>")
PHI3_LOOKED_UP = ("</s>", *PHI3_NOT_RSTRIP)


@dataclass(frozen=True)
class TokenizerChoice:
    kind: str  # "spm", "bpe" or "wordpiece"
    file: str  # the file the vocabulary is read from
    notes: tuple[str, ...] = ()  # what was passed over, and why

    @property
    def description(self) -> str:
        return f"{KIND_NAMES[self.kind]} tokenizer ({self.file})"


def choose_tokenizer(source: Path) -> TokenizerChoice:
    """The tokenizer of `source`, from whichever of its files is a valid tokenizer."""
    problem = None
    if (source / "tokenizer.model").is_file():
        problem = sentencepiece_problem(source)
        if problem is None:
            return TokenizerChoice("spm", "tokenizer.model")
    if (source / "tokenizer.json").is_file():
        kind = tokenizer_json_kind(source)
        notes = (f"tokenizer.model is {problem}; the tokenizer was read from tokenizer.json",) if problem else ()
        return TokenizerChoice(kind, "tokenizer.json", notes)
    if problem:
        raise UnsupportedModelError(f"{source / 'tokenizer.model'}: {problem}, and there is no tokenizer.json")
    if (source / "vocab.txt").is_file():
        return TokenizerChoice("wordpiece", "vocab.txt")
    raise UnsupportedModelError(f"{source}: no tokenizer.model (SentencePiece), tokenizer.json or vocab.txt")


def sentencepiece_problem(source: Path) -> str | None:
    """None when tokenizer.model is a SentencePiece model, else what it is instead (a short phrase)."""
    from edgelm.export.hf_source import source_file

    path = source_file(source, "tokenizer.model", "tokenizer file")
    with open(path, "rb") as handle:
        if handle.read(4) == GGUF_MAGIC:
            return "a GGUF file, not a SentencePiece model"
    size = path.stat().st_size
    if size > MAX_SENTENCEPIECE_BYTES:
        return f"not a SentencePiece model ({size} bytes; at most {MAX_SENTENCEPIECE_BYTES} are read)"
    try:
        read_sentencepiece(path)
    except ValueError as err:
        return f"not a SentencePiece model ({first_line(err)})"
    return None


def read_sentencepiece(path: Path):
    """The parsed ModelProto, or ValueError; a proto without pieces is not a tokenizer."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as err:  # protobuf raises its own DecodeError
        raise ValueError(first_line(err)) from None
    if not proto.pieces:
        raise ValueError("no pieces")
    return proto


def tokenizer_json_kind(source: Path) -> str:
    """"bpe" (byte-level) or "wordpiece" from tokenizer.json's model and pre-tokenizer; else one line."""
    data = read_source_json(source, "tokenizer.json")
    model = data.get("model")
    kind = model.get("type") if isinstance(model, dict) else None
    if kind == "WordPiece":
        return "wordpiece"
    pre, normalizer = data.get("pre_tokenizer"), data.get("normalizer")
    if kind == "BPE" and _has_step(pre, "ByteLevel"):
        return "bpe"
    if kind == "BPE" and (_has_step(pre, "Metaspace") or _has_step(normalizer, "Prepend")):
        raise UnsupportedModelError(
            f"{source / 'tokenizer.json'}: a SentencePiece-style BPE (Metaspace) without its tokenizer.model; "
            "edgelm writes SentencePiece vocabularies from tokenizer.model")
    if kind == "BPE":
        return "bpe"  # the pre-tokenizer is matched against llama.cpp's and refused there if unknown
    raise UnsupportedModelError(f"{source / 'tokenizer.json'}: a {kind!r} model; edgelm converts byte-level BPE, "
                                "WordPiece, and SentencePiece BPE from tokenizer.model")


def _has_step(node: object, kind: str) -> bool:
    """Whether a tokenizer.json pre-tokenizer or normalizer (or a Sequence of them) has a step of `kind`."""
    if not isinstance(node, dict):
        return False
    steps = node.get("pretokenizers") or node.get("normalizers") or [node]
    return any(isinstance(step, dict) and step.get("type") == kind for step in steps if isinstance(steps, list))


def check_pairing(source: Path, choice: TokenizerChoice, arch: str, accepted: tuple[str, ...]) -> None:
    """Refuse, before converting, a tokenizer the architecture's GGUF export does not take."""
    if choice.kind in accepted:
        return
    takes = " or ".join(KIND_NAMES[k] for k in accepted)
    raise UnsupportedModelError(f"{source}: a {choice.description} with the {arch} architecture; edgelm's {arch} "
                                f"GGUF takes {takes} tokenizers only")


def gguf_model_name(folder_name: str, tokens: list[str], rstrip: dict[str, bool]) -> str:
    """general.name for the file: the folder's name, without a name llama.cpp would misread.

    The Phi-3 trigger stays only when the vocabulary has the tokens llama.cpp looks up and the
    source's added tokens strip whitespace exactly as llama.cpp's Phi-3 rule does; otherwise it is
    spelled apart ("phi_3"), and so are names of rules edgelm never wants (ModernBERT's).
    """
    name = OTHER_NAME_TRIGGERS.sub(lambda m: m.group(0).replace("-", "_"), folder_name)
    if PHI3_NAME.search(name) and not phi3_rule_holds(tokens, rstrip):
        name = PHI3_NAME.sub(lambda m: m.group(0)[:3] + "_3", name)
    return name


def phi3_rule_holds(tokens: list[str], rstrip: dict[str, bool]) -> bool:
    """Whether llama.cpp's Phi-3 whitespace rule is what the source's own added tokens do.

    `rstrip`: each added token's text -> its rstrip flag. "</s>" must be listed: llama.cpp strips
    after it whether or not it is an added token.
    """
    present = set(tokens)
    if not all(t in present for t in PHI3_LOOKED_UP) or rstrip.get("</s>") is not True:
        return False
    return all(flag == (text not in PHI3_NOT_RSTRIP) for text, flag in rstrip.items())
