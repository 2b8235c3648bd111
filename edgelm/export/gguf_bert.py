"""BERT sentence embedders -> GGUF (llama.cpp's bert architecture), run by llama.cpp's embedding mode.

Only embeddings: llama.cpp's BERT graph outputs pooled hidden states, not MLM or classifier heads,
so fill-mask and classify stay ONNX. The WordPiece vocabulary is written the way llama.cpp's WPM
tokenizer reads it: word-initial pieces marked with U+2581, continuation pieces without "##".
llama.cpp always lower-cases and strips accents, so a cased vocabulary is refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgelm.artifact import Manifest, sha256_of, write_artifact
from edgelm.contract import GgufEncoderModel, SourceSection, TokenizerSection
from edgelm.errors import UnsupportedModelError, UsageError
from edgelm.export.bert import max_length_of, sentence_transformers_facts
from edgelm.export.checks import validate_into
from edgelm.export.gguf import MODEL_FILE, write_model_file
from edgelm.export.gguf_arch import BERT, Shape, config_values
from edgelm.export.gguf_tensors import weight_files
from edgelm.export.gguf_tokenizer import check_pairing, choose_tokenizer
from edgelm.export.gguf_vocab import CONTROL, NORMAL, UNKNOWN, Vocab
from edgelm.export.hf_source import check_source_links, source_file
from edgelm.export.options import ExportOptions
from edgelm.paths import MAX_SOURCE_JSON_BYTES, read_source_json

PHANTOM_SPACE = "\u2581"  # marks a word-initial piece for llama.cpp's WPM tokenizer
POOLING_TYPES = {"mean": "MEAN", "cls": "CLS"}  # gguf.PoolingType members llama.cpp implements for BERT


def export_gguf_bert(source: Path, config: dict, out: Path, options: ExportOptions) -> Manifest:
    if options.task not in ("auto", "embed"):
        raise UsageError(f"task {options.task!r} is not available in GGUF (llama.cpp runs BERT for embeddings "
                         "only); export it with --format onnx")
    check_source_links(source)
    with config_values(source, BERT.name):
        BERT.check(source, config)
        shape = BERT.shape(config)
    choice = choose_tokenizer(source)
    check_pairing(source, choice, BERT.name, BERT.tokenizers)
    st = sentence_transformers_facts(source)
    pooling = _pooling(source, st)
    vocab, specials = read_wordpiece_vocab(source, shape.vocab_size)
    special = _special_vocab(source, vocab, specials)
    manifest = _manifest(source, config, shape, vocab, special, pooling, st, options.quant)

    def pooling_key(writer) -> None:
        import gguf

        writer.add_pooling_type(gguf.PoolingType[POOLING_TYPES[pooling]])

    with write_artifact(out, manifest) as tmp:
        target = write_model_file(tmp, manifest, source, config, BERT, shape, vocab, special, options, pooling_key)
        validate_into(manifest, options.validate, lambda: _validate(target, source, manifest))
    return manifest


def _validate(target: Path, source: Path, manifest: Manifest) -> list:
    from edgelm.export.gguf_bert_validate import validate_gguf_embedder  # torch, only when validating

    return validate_gguf_embedder(target, source, manifest)


def _pooling(source: Path, st: dict[str, Any] | None) -> str:
    modes = st["pooling"] if st else ["mean"]  # no sentence-transformers folder: mean, as for ONNX
    if len(modes) != 1 or modes[0] not in POOLING_TYPES:
        raise UnsupportedModelError(f"{source}: pooling {'+'.join(modes)} is not one llama.cpp implements "
                                    f"({', '.join(POOLING_TYPES)}); export it with --format onnx")
    return modes[0]


def read_wordpiece_vocab(source: Path, n_vocab: int) -> tuple[Vocab, dict[str, int]]:
    """The vocabulary in llama.cpp's WPM spelling, and the special tokens' ids by their role."""
    tokens, specials, lowercase = _wordpiece_source(source)
    if not lowercase:
        raise UnsupportedModelError(f"{source}: a cased vocabulary; llama.cpp's BERT tokenizer always lower-cases "
                                    "and strips accents, so its tokens would differ (export it with --format onnx)")
    if len(tokens) != n_vocab:
        raise UnsupportedModelError(f"{source}: the vocabulary has {len(tokens)} tokens but the model {n_vocab} rows")
    special_texts = set(specials.values())
    written, types = [], []
    for token in tokens:
        if token in special_texts:
            written.append(token)
            types.append(UNKNOWN if token == specials.get("unk") else CONTROL)
        elif token.startswith("##"):
            written.append(token[2:])
            types.append(NORMAL)
        elif token.startswith("[") and token.endswith("]"):  # [unused0] and the like: never a word
            written.append(token)
            types.append(NORMAL)
        else:
            written.append(PHANTOM_SPACE + token)
            types.append(NORMAL)
    index = {t: i for i, t in enumerate(tokens)}
    ids = {role: index[text] for role, text in specials.items() if text in index}
    return Vocab(kind="wordpiece", tokens=written, types=types), ids


def _wordpiece_source(source: Path) -> tuple[list[str], dict[str, str], bool]:
    """(tokens by id, special token texts by role, lower-cases?) from tokenizer.json or vocab.txt."""
    config = read_source_json(source, "tokenizer_config.json") if (source / "tokenizer_config.json").is_file() else {}
    specials = {role: str(config.get(f"{role}_token") or default) for role, default in
                (("cls", "[CLS]"), ("sep", "[SEP]"), ("pad", "[PAD]"), ("unk", "[UNK]"), ("mask", "[MASK]"))}
    if (source / "tokenizer.json").is_file():
        data = read_source_json(source, "tokenizer.json")
        model = data.get("model")
        model = model if isinstance(model, dict) else {}
        if model.get("type") != "WordPiece" or model.get("continuing_subword_prefix", "##") != "##":
            raise UnsupportedModelError(f"{source / 'tokenizer.json'}: a {model.get('type')!r} model; "
                                        "llama.cpp's BERT tokenizer is WordPiece with ## continuations")
        vocab = model.get("vocab") or {}
        if not isinstance(vocab, dict) or not all(type(i) is int for i in vocab.values()):
            raise UnsupportedModelError(f"{source / 'tokenizer.json'}: model.vocab is not a map of tokens to ids")
        by_id = {i: t for t, i in vocab.items()}
        if sorted(by_id) != list(range(len(by_id))):
            raise UnsupportedModelError(f"{source / 'tokenizer.json'}: vocabulary ids are not 0..{len(by_id) - 1}")
        normalizer = data.get("normalizer") or {}
        lowercase = normalizer.get("type") == "BertNormalizer" and bool(normalizer.get("lowercase", True))
        return [by_id[i] for i in range(len(by_id))], specials, lowercase
    if (source / "vocab.txt").is_file():
        path = source_file(source, "vocab.txt", "vocabulary file")
        if path.stat().st_size > MAX_SOURCE_JSON_BYTES:
            raise UnsupportedModelError(f"{path}: too large for a vocabulary (limit {MAX_SOURCE_JSON_BYTES} bytes)")
        try:
            tokens = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise UnsupportedModelError(f"{path}: not UTF-8 text") from None
        return tokens, specials, bool(config.get("do_lower_case", True))
    raise UnsupportedModelError(f"{source}: no tokenizer.json or vocab.txt")


def _special_vocab(source: Path, vocab: Vocab, ids: dict[str, int]):
    """Special ids for llama.cpp: [CLS] is its BOS (put first), [SEP] its separator (put last)."""
    from edgelm.export.gguf_vocab import special_vocab

    special = special_vocab(source, vocab)
    special.special_token_ids = {typ: ids[role] for typ, role in
                                 (("bos", "cls"), ("sep", "sep"), ("pad", "pad"), ("unk", "unk"), ("mask", "mask"))
                                 if role in ids}
    special.add_special_token = {"bos": True, "sep": True, "eos": False}
    special.chat_template = None
    return special


def _manifest(source: Path, config: dict, shape: Shape, vocab: Vocab, special, pooling: str,
              st: dict[str, Any] | None, quant: str) -> Manifest:
    ids = special.special_token_ids
    return Manifest(
        family="bert", task="embed", format="gguf", quant=quant,
        tokenizer=TokenizerSection(file=MODEL_FILE, kind="wordpiece", vocab_size=len(vocab.tokens),
                                   bos_id=ids.get("bos"), pad_id=ids.get("pad"), unk_id=ids.get("unk"),
                                   mask_id=ids.get("mask"), lowercase=True),
        model=GgufEncoderModel(
            file=MODEL_FILE, architecture=BERT.name, context_length=max_length_of(source, config, st),
            num_layers=shape.n_layers, num_heads=shape.n_heads, hidden_size=shape.hidden,
            vocab_size=shape.vocab_size, head_dim=shape.head_dim, pooling=(pooling,),
            normalize=bool(st and st["normalize"]), dim=shape.hidden, sentence_transformers=st is not None,
        ),
        source=SourceSection(
            path=str(source.resolve()), sha256={str(f.relative_to(source)): sha256_of(f) for f in weight_files(source)},
            architectures=tuple(str(a) for a in config.get("architectures") or ()),
        ),
    )
