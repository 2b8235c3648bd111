"""One concrete hostile input per class of fault in GGUF and tokenizer files (the fuzz tests cover
the classes at large): each is refused with one line, where it would otherwise crash or mislead."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from gguf_rewriter import ARRAY, FLOAT32, INT32, STRING, UINT32, parse, relayout, write
from llama_worker import LlamaWorker
from test_llama_runtime import spm_vocab, write_tiny_gguf

from edgelm.errors import ArtifactError, EdgelmError
from edgelm.runtime import load
from edgelm.runtime.core.text import IncrementalDetokenizer
from edgelm.runtime.gguf.metadata import read_gguf_header
from edgelm.runtime.ort.tokenizer import load_tokenizer

N_VOCAB = len(spm_vocab()[0])


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> bytes:
    return write_tiny_gguf(tmp_path_factory.mktemp("seed") / "seed.gguf", hidden=32, ff=64, layers=1).read_bytes()


def _set(key, type_id, value, element=None):
    return lambda g: g.set(key, type_id, value, element)


def _tensor(tensor_name, **changes):
    def change(g):
        tensor = next(t for t in g.tensors if t.name == tensor_name.encode())
        for field, value in changes.items():
            setattr(tensor, field, value)
    return change


def _kv(key, **changes):
    def change(g):
        kv = g.find(key)
        for field, value in changes.items():
            setattr(kv, field, value)
    return change


def _repeat_token(g):
    tokens = g.find("tokenizer.ggml.tokens").value
    tokens[-1] = tokens[-2]


def _relaid(change):
    return lambda g: (change(g), relayout(g))


def _aligned_to(alignment):
    def change(g):
        g.set("general.alignment", UINT32, alignment)
        g.alignment = alignment  # the data section starts at the next multiple of 16, not of 32
    return change


def _nul_in_token(g):
    tokens = g.find("tokenizer.ggml.tokens").value
    tokens[-1] = tokens[-2] + b"\0tail"  # the same token as far as C is concerned


def _no_newline_byte(g):
    tokens = g.find("tokenizer.ggml.tokens").value
    tokens[tokens.index(b"<0x0A>")] = b"=0x0A>"  # one flipped bit


def _one_more_token(g):
    g.find("tokenizer.ggml.tokens").value.append(b"extra")
    g.find("tokenizer.ggml.scores").value.append(0.0)
    g.find("tokenizer.ggml.token_type").value.append(1)


HOSTILE_GGUF = {  # name: (change to the seed, words the refusal must contain)
    "tensor offset past the end": (_tensor("output.weight", offset=1 << 40), "truncated"),
    "string length 2**63": (_kv("tokenizer.chat_template", length_lie=1 << 63), "string value"),
    "array count huge": (_kv("tokenizer.ggml.scores", length_lie=1 << 61), "array"),
    "eos id = vocabulary size": (_set("tokenizer.ggml.eos_token_id", UINT32, N_VOCAB), "outside the vocabulary"),
    "bos id -1 as unsigned": (_set("tokenizer.ggml.bos_token_id", UINT32, -1), "outside the vocabulary"),
    "context_length 0": (_set("llama.context_length", UINT32, 0), "context_length is 0"),
    "context_length 2**32-1": (_set("llama.context_length", UINT32, 2**32 - 1), "context_length is 4294967295"),
    "context_length as a string": (_set("llama.context_length", STRING, b"4096"), "reads it as a uint32"),
    "token_embd rows != vocabulary": (_one_more_token, "rows for a vocabulary"),
    "vocab_size != token_embd rows": (_set("llama.vocab_size", UINT32, N_VOCAB + 1), "vocab_size"),
    "embedding_length != token_embd": (lambda g: (g.set("llama.embedding_length", UINT32, 64),
                                                  g.set("llama.rope.dimension_count", UINT32, 16)),
                                       "embedding_length is 64"),
    "block_count 0": (_set("llama.block_count", UINT32, 0), "block_count is 0"),
    "block_count 2**32-1": (_set("llama.block_count", UINT32, 2**32 - 1), "block_count"),
    "head count 0": (_set("llama.attention.head_count", UINT32, 0), "head_count 0"),
    "head count past the embedding": (_set("llama.attention.head_count", UINT32, 1 << 20), "heads of size 0"),
    "head_count_kv 0": (_set("llama.attention.head_count_kv", UINT32, 0), "head_count_kv 0"),
    "per-layer heads of the wrong length": (_set("llama.attention.head_count", ARRAY, [4, 4, 4], INT32), "entries for 1 layers"),
    "a negative per-layer expert count": (_set("llama.expert_used_count", ARRAY, [-2], INT32), "negative count (-2)"),
    "experts used > experts": (lambda g: (g.set("llama.expert_count", UINT32, 2), g.set("llama.expert_used_count", UINT32, 3)),
                               "expert_used_count 3"),
    "unknown rope scaling": (_set("llama.rope.scaling.type", STRING, b"sideways"), "rope.scaling.type"),
    "NaN norm epsilon": (_set("llama.attention.layer_norm_rms_epsilon", FLOAT32, float("nan")), "nan"),
    "a repeated token": (_repeat_token, "twice"),
    "a token that repeats another up to a NUL": (_nul_in_token, "twice"),
    "a byte token missing": (_no_newline_byte, "no token for byte 0x0A"),
    "a bert vocabulary on a llama": (_set("tokenizer.ggml.model", STRING, b"bert"), "tokenizer.ggml.model"),
    "unknown architecture": (_set("general.architecture", STRING, b"skynet"), "not an architecture llama.cpp knows"),
    "array of arrays": (_set("tokenizer.ggml.merges", ARRAY, [0, 0], ARRAY), "array of arrays"),
    "an integer weight": (_tensor("token_embd.weight", type_id=26), "type I32"),
    "a quantized norm": (_relaid(_tensor("blk.0.attn_norm.weight", type_id=8)), "1-D of type Q8_0"),
    "empty tensor dimension": (_tensor("output_norm.weight", dims=[0]), "empty dimension"),
    "tensor name of 64 bytes": (_tensor("output_norm.weight", name=b"n" * 64), "at most 63"),
    "alignment as uint64": (_set("general.alignment", 10, 32), "not a uint32"),
    "alignment 16, tensors off ggml's boundary": (_aligned_to(16), "32-byte boundary"),
    "scores shorter than tokens": (lambda g: g.find("tokenizer.ggml.scores").value.pop(), "entries for"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_GGUF))
def test_hostile_gguf_is_refused_in_one_line(seed, tmp_path, case):
    change, words = HOSTILE_GGUF[case]
    g = parse(seed)
    change(g)
    path = tmp_path / "hostile.gguf"
    path.write_bytes(write(g))
    with pytest.raises(ArtifactError, match="not a valid GGUF file") as err:
        read_gguf_header(path)
    assert words in str(err.value) and "\n" not in str(err.value)


def test_heads_wider_or_narrower_than_embedding_over_heads_are_accepted(seed, tmp_path):
    # Mistral-Nemo is a llama of 5120 wide with 32 heads of 128: key_length and value_length say so
    g = parse(seed)
    for key in ("llama.attention.key_length", "llama.attention.value_length", "llama.rope.dimension_count"):
        g.set(key, UINT32, 4)  # the seed's heads would be 32 / 4 = 8 wide
    path = tmp_path / "narrow.gguf"
    path.write_bytes(write(g))
    assert read_gguf_header(path).get("llama.attention.key_length") == 4
    g.set("llama.attention.value_length", UINT32, 8)
    path.write_bytes(write(g))
    with pytest.raises(ArtifactError, match="4 wide for keys, 8 for values"):
        read_gguf_header(path)


ABORTS_LLAMA_CPP = ["a repeated token", "block_count 0", "unknown rope scaling", "experts used > experts",
                    "alignment 16, tensors off ggml's boundary", "a bert vocabulary on a llama", "a byte token missing",
                    "a negative per-layer expert count", "an integer weight", "a quantized norm",
                    "a token that repeats another up to a NUL"]


@pytest.mark.parametrize("case", ABORTS_LLAMA_CPP)
def test_llama_cpp_itself_aborts_on_what_the_check_refuses(seed, tmp_path, case):
    """Why the checks exist: handed to llama.cpp directly, these files kill the process."""
    g = parse(seed)
    HOSTILE_GGUF[case][0](g)
    path = tmp_path / "hostile.gguf"
    path.write_bytes(write(g))
    code = ("import llama_cpp, sys; m = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, verbose=False); "
            "m.eval(m.tokenize(b'hello\\nworld'))")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, timeout=120,
                          env={"GGML_NO_BACKTRACE": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode < 0, done.stderr[-500:]  # a signal (SIGABRT), not an exception


def test_a_broken_chat_template_in_the_metadata_is_one_line(seed, tmp_path):
    # llama-cpp-python compiles every template in the metadata while loading, outside edgelm's sandbox
    g = parse(seed)
    g.set("tokenizer.chat_template", STRING, b"{% for")
    path = tmp_path / "template.gguf"
    path.write_bytes(write(g))
    worker = LlamaWorker()
    try:
        answer = worker.check(path)
    finally:
        worker.close()
    assert answer.startswith("refused ") and "template" in answer, answer


def test_ids_outside_the_vocabulary_never_reach_llama_cpp(seed, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(seed)
    with load(path, threads=1, n_ctx=64) as model:
        for bad in (N_VOCAB, -1, 2**31, 2**40):
            with pytest.raises(EdgelmError):
                model.decoder.prefill([1, bad])
            with pytest.raises(EdgelmError):
                model.tokenizer.decode([bad])
            with pytest.raises(ArtifactError, match="outside the tokenizer's vocabulary"):
                IncrementalDetokenizer(model.tokenizer, [1]).push(bad)
        assert model.generate("hello", max_tokens=2, temperature=0) is not None  # still usable


# -- tokenizer.json ------------------------------------------------------------------------------
def tiny_tokenizer(**changes) -> dict:
    tree = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], "normalizer": None,
            "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]}}
    tree.update(changes)
    return tree


def test_a_truncation_section_that_panics_the_library_is_dropped(tmp_path):
    # stride >= max_length: tokenizers panics (a BaseException) on the first encode
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tiny_tokenizer(
        truncation={"direction": "Right", "max_length": 2, "strategy": "LongestFirst", "stride": 5})))
    from tokenizers import Tokenizer

    with pytest.raises(BaseException) as raw:  # noqa: B017  (what happens without edgelm's loader)
        Tokenizer.from_file(str(path)).encode("ab ab ab")
    assert not isinstance(raw.value, Exception)  # pyo3's PanicException: `except Exception` misses it
    assert load_tokenizer(path).encode("ab ab ab").ids == [2, 2, 2]


@pytest.mark.parametrize("tree, words", [
    (tiny_tokenizer(model={"type": "BPE", "vocab": {"a": 0}, "merges": [["a", "zz"]]}), "not a valid tokenizer.json"),
    (tiny_tokenizer(pre_tokenizer={"type": "Split", "pattern": {"Regex": "("}, "behavior": "Isolated",
                                   "invert": False}), "not a valid tokenizer.json"),
    (tiny_tokenizer(model={"type": "BPE", "vocab": {"a": 2**32 - 1}, "merges": []}), "token id 4294967295"),
])
def test_hostile_tokenizer_files_are_one_line(tmp_path, tree, words):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tree))
    with pytest.raises(ArtifactError, match=words) as err:
        load_tokenizer(path)
    assert "\n" not in str(err.value)


def test_an_added_token_past_the_model_vocabulary_is_refused(tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(tiny_tokenizer(added_tokens=[
        {"id": 3, "content": "<x>", "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}])))
    assert load_tokenizer(path, vocab_size=4).token_to_id("<x>") == 3
    with pytest.raises(ArtifactError, match="token id 3, but the model has only 3"):
        load_tokenizer(path, vocab_size=3)


@pytest.mark.parametrize("data", [b"\xff\xfe{}", b'{"version": "1.0", "model": {', b"[" * 100_000])
def test_unreadable_tokenizer_files_are_one_line(tmp_path, data):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(data)
    with pytest.raises(ArtifactError, match="not a valid tokenizer.json") as err:
        load_tokenizer(path)
    assert "\n" not in str(err.value)


def test_known_architectures_are_those_of_the_installed_llama_cpp():
    from pathlib import Path

    import llama_cpp

    from edgelm.runtime.gguf.metadata import KNOWN_ARCHITECTURES

    library = b"".join(p.read_bytes() for p in (Path(llama_cpp.__file__).parent / "lib").glob("libllama.so*"))
    # C string literals end in NUL (the linker may share a tail: "bert" inside "modern-bert")
    missing = sorted(name for name in KNOWN_ARCHITECTURES if name.encode() + b"\0" not in library)
    assert not missing, f"not in this llama.cpp build: {missing}"
