"""The tokenizer files decide the GGUF tokenizer: which file is valid, what kind it is, what llama.cpp would misread."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgelm.errors import UnsupportedModelError
from edgelm.export.gguf_tokenizer import (
    PHI3_NAME,
    choose_tokenizer,
    gguf_model_name,
    phi3_rule_holds,
    tokenizer_json_kind,
)
from edgelm.export.gguf_vocab import byte_level_alphabet, read_vocab

BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": True}


def byte_level_json(extra_tokens=(), drop=(), byte_fallback=False) -> dict:
    tokens = [c for c in byte_level_alphabet() if c not in drop] + list(extra_tokens)
    return {"version": "1.0", "added_tokens": [], "normalizer": None, "pre_tokenizer": BYTE_LEVEL,
            "post_processor": None, "decoder": {"type": "ByteLevel"},
            "model": {"type": "BPE", "vocab": {t: i for i, t in enumerate(tokens)}, "merges": [],
                      "byte_fallback": byte_fallback}}


def write_folder(tmp_path, tokenizer_json: dict | None = None, tokenizer_model: bytes | None = None):
    if tokenizer_json is not None:
        (tmp_path / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    if tokenizer_model is not None:
        (tmp_path / "tokenizer.model").write_bytes(tokenizer_model)
    return tmp_path


def gguf_header() -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, 0, 0)


def test_gguf_saved_as_tokenizer_model_gives_way_to_tokenizer_json(tmp_path):
    """transformers writes the GGUF it loaded as tokenizer.model beside a correct tokenizer.json."""
    folder = write_folder(tmp_path, byte_level_json(), gguf_header())
    choice = choose_tokenizer(folder)
    assert (choice.kind, choice.file) == ("bpe", "tokenizer.json")
    assert "a GGUF file" in choice.notes[0]
    vocab = read_vocab(folder, 256, choice)
    assert vocab.kind == "bpe" and vocab.pre == "gpt-2" and any("GGUF file" in n for n in vocab.notes)


def test_invalid_tokenizer_model_alone_is_refused_in_one_line(tmp_path):
    folder = write_folder(tmp_path, None, gguf_header())
    with pytest.raises(UnsupportedModelError, match="a GGUF file, not a SentencePiece model") as info:
        choose_tokenizer(folder)
    assert "\n" not in str(info.value)


def test_byte_fallback_flag_on_byte_level_bpe_is_accepted_when_it_never_acts(tmp_path):
    folder = write_folder(tmp_path, byte_level_json(byte_fallback=True))
    vocab = read_vocab(folder, 256)
    assert vocab.kind == "bpe" and not vocab.notes


def test_missing_byte_tokens_are_reported_not_hidden(tmp_path):
    folder = write_folder(tmp_path, byte_level_json(drop=byte_level_alphabet()[:3], byte_fallback=True))
    vocab = read_vocab(folder, 256)
    assert any("3 of the 256 bytes have no token" in n for n in vocab.notes)


def test_byte_fallback_that_would_emit_byte_tokens_is_refused(tmp_path):
    alphabet = byte_level_alphabet()
    folder = write_folder(tmp_path, byte_level_json(extra_tokens=["<0x00>"], drop=[alphabet[0]], byte_fallback=True))
    with pytest.raises(UnsupportedModelError, match="byte fallback would emit 1 byte token"):
        read_vocab(folder, 256)


def test_byte_level_alphabet_is_gpt2s():
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    assert byte_level_alphabet() == [bytes_to_unicode()[b] for b in range(256)]


def test_metaspace_bpe_without_tokenizer_model_and_unigram_are_refused(tmp_path):
    metaspace = byte_level_json()
    metaspace["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581"}
    unigram = byte_level_json()
    unigram["model"] = {"type": "Unigram", "vocab": [["a", 0.0]]}
    for data, message in ((metaspace, "SentencePiece-style BPE"), (unigram, "'Unigram' model")):
        (tmp_path / "tokenizer.json").write_text(json.dumps(data))
        with pytest.raises(UnsupportedModelError, match=message) as info:
            tokenizer_json_kind(tmp_path)
        assert "\n" not in str(info.value)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_as_tokenizer_model_choose_or_refuse_in_one_line(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("spm")
    (folder / "tokenizer.model").write_bytes(data)
    try:
        choice = choose_tokenizer(folder)
    except UnsupportedModelError as err:
        assert "\n" not in str(err)
    else:  # only a real SentencePiece proto is taken
        assert choice.kind == "spm"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("phiPHI-3 _modernbt"), max_size=24),
       st.sets(st.sampled_from(["</s>", "<unk>", "<s>", "<|endoftext|>", "<|end|>"])),
       st.dictionaries(st.sampled_from(["</s>", "<unk>", "<s>", "<|endoftext|>", "<|end|>"]), st.booleans()))
def test_written_name_triggers_llama_cpp_rules_only_when_they_hold(name, tokens, rstrip):
    """llama.cpp aborts or strips whitespace by general.name; the name must not say what the tokenizer does not do."""
    written = gguf_model_name(name, sorted(tokens), rstrip)
    assert "modern-bert" not in written.lower()
    if PHI3_NAME.search(written):
        assert phi3_rule_holds(sorted(tokens), rstrip)
    if not PHI3_NAME.search(name) and "modern-bert" not in name.lower():
        assert written == name  # an innocent name is kept as is
