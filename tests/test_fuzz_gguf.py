"""Fuzzing GGUF files: every mutated file ends in a run or a one-line EdgelmError, never a crash.

The seed is the tiny LLaMA GGUF of test_llama_runtime.py. Each example mutates it at the byte
level (flips, truncations, insertions, deletions, mostly inside the header) or at the field level
(counts, string and array lengths, value types, metadata values, token ids, tensor dims, types,
offsets and names, through gguf_rewriter.py), then runs edgelm's Python header check in this
process. A file that passes the check is loaded and run by llama.cpp in a child process
(llama_worker.py), since a fault there is a signal that would kill the test process: it must
answer "ok" or a one-line EdgelmError, without dying or hanging (a per-example deadline).

Short profile (the default, for CI): `pytest tests/test_fuzz_gguf.py`.
Long profile, 2000 byte-level and 3000 field-level examples (2 x 1000 any field, 2 x 500 metadata
values only; two to three minutes on a busy 2-core machine, niced):
    EDGELM_FUZZ=long nice -n 10 .venv/bin/python -m pytest tests/test_fuzz_gguf.py -q -s
"""

from __future__ import annotations

import math
import re
import time
from collections import Counter

import pytest

hypothesis = pytest.importorskip("hypothesis")

from gguf_rewriter import ARRAY, BOOL, FLOAT32, INT32, STRING, UINT32, Gguf, parse, relayout, write  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from llama_worker import LlamaWorker  # noqa: E402
from test_llama_runtime import spm_vocab, write_tiny_gguf  # noqa: E402

from conftest import fuzz_examples  # noqa: E402
from edgelm.errors import ArtifactError  # noqa: E402
from edgelm.runtime.gguf.metadata import read_gguf_header  # noqa: E402

HIDDEN, N_VOCAB = 32, len(spm_vocab()[0])
HEADER_DEADLINE_S = 10.0  # the Python check reads the header only; seconds would mean a runaway loop
INTERESTING = sorted({
    0, 1, 2, 3, 4, 7, 8, 31, 32, 33, 63, 64, 65, 255, 256, 512, 513, 1024, 1025, 1 << 15, (1 << 16) - 1,
    (1 << 31) - 1, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 40, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1,
    -1, -2, N_VOCAB - 1, N_VOCAB, N_VOCAB + 1, HIDDEN - 1, HIDDEN + 1, HIDDEN * 2,
})
ints = st.one_of(st.sampled_from(INTERESTING), st.integers(-(1 << 64), 1 << 64))
small_ints = st.one_of(st.sampled_from(INTERESTING), st.integers(0, 300))
floats = st.one_of(st.sampled_from([0.0, -0.0, 1e-45, -1.0, math.nan, math.inf, -math.inf, 1e38, 3.4e38]),
                   st.floats(width=32))
texts = st.one_of(st.sampled_from(["", "llama", "gpt2", "yarn", "linear", "none", "\x00", "\udcff"]),
                  st.text(max_size=20))
raw_bytes = st.one_of(texts.map(lambda s: s.encode("utf-8", "surrogatepass")), st.binary(max_size=40))

ARCH_KEYS = ["context_length", "block_count", "embedding_length", "feed_forward_length", "attention.head_count",
             "attention.head_count_kv", "rope.dimension_count", "vocab_size", "expert_count", "expert_used_count",
             "nextn_predict_layers", "attention.key_length", "attention.value_length", "expert_group_count"]
FLOAT_KEYS = ["attention.layer_norm_rms_epsilon", "rope.freq_base", "rope.scaling.factor"]
TOKEN_ID_KEYS = ["bos", "eos", "eot", "unknown", "padding", "seperator", "mask", "eom", "cls"]
ARCHITECTURES = ["llama", "gpt2", "qwen2", "mamba", "bert", "t5", "clip", "rwkv6", "llama4", "nonsense", ""]
TOKENIZER_MODELS = ["llama", "gpt2", "bert", "t5", "rwkv", "no_vocab", "none", "plamo2", "x"]


@pytest.fixture(scope="module")
def seed(tmp_path_factory) -> bytes:
    path = write_tiny_gguf(tmp_path_factory.mktemp("seed") / "seed.gguf", hidden=HIDDEN, ff=64, layers=1)
    return path.read_bytes()


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


@pytest.fixture(scope="module")
def bpe_seed(seed) -> bytes:
    """The seed with a byte-level BPE vocabulary (tokenizer.ggml.model "gpt2", merges, pre-tokenizer)
    of the same size, so its tensors stay as they are."""
    g = parse(seed)
    merges = [("\u0120", "t"), ("h", "e"), ("\u0120t", "he"), ("l", "l"), ("o", "r"), ("\u0120w", "or")]
    tokens = byte_level_alphabet() + ["\u0120w"] + [a + b for a, b in merges] + ["<|begin|>", "<|end|>"]
    tokens += [f"<|unused{i}|>" for i in range(N_VOCAB - len(tokens))]
    g.set("tokenizer.ggml.model", STRING, b"gpt2")
    g.set("tokenizer.ggml.pre", STRING, b"gpt-2")
    g.set("tokenizer.ggml.tokens", ARRAY, [t.encode() for t in tokens], STRING)
    g.set("tokenizer.ggml.token_type", ARRAY, [1] * 263 + [3] * (N_VOCAB - 263), INT32)
    g.set("tokenizer.ggml.merges", ARRAY, [f"{a} {b}".encode() for a, b in merges], STRING)
    g.set("tokenizer.ggml.bos_token_id", UINT32, tokens.index("<|begin|>"))
    g.set("tokenizer.ggml.eos_token_id", UINT32, tokens.index("<|end|>"))
    g.set("tokenizer.ggml.eot_token_id", UINT32, tokens.index("<|end|>"))
    g.set("tokenizer.ggml.unknown_token_id", UINT32, 0)
    g.set("tokenizer.ggml.add_bos_token", BOOL, False)
    g.set("tokenizer.chat_template", STRING, b"{% for m in messages %}{{ m['content'] }}<|end|>{% endfor %}")
    return write(g)


@pytest.fixture(scope="module")
def worker():
    running = LlamaWorker(timeout_s=60.0)
    yield running
    running.close()


class Outcomes:
    """Counts how examples ended, so a test can show that llama.cpp really was reached."""

    def __init__(self):
        self.refused_by_header = self.ran = self.refused_by_runtime = 0
        self.runtime_reasons: Counter[str] = Counter()  # what stopped files that passed the header check

    def __str__(self) -> str:
        counts = {k: v for k, v in vars(self).items() if isinstance(v, int)}
        return f"{counts}; runtime refusals: {self.runtime_reasons.most_common(6)}"


def check_file(data: bytes, path, worker: LlamaWorker, outcomes: Outcomes) -> None:
    path.write_bytes(data)
    started = time.monotonic()
    try:
        read_gguf_header(path)
    except ArtifactError as err:
        assert "\n" not in str(err), str(err)
        outcomes.refused_by_header += 1
        return
    finally:
        assert time.monotonic() - started < HEADER_DEADLINE_S, "the header check ran past its deadline"
    answer = worker.check(path)
    # keep the file that broke llama.cpp next to the test's output, for a regression test
    assert answer == "ok" or (answer.startswith("refused ") and "MULTILINE" not in answer), (
        f"{answer} (the file is {path})")
    if answer == "ok":
        outcomes.ran += 1
    else:
        outcomes.refused_by_runtime += 1
        outcomes.runtime_reasons[re.sub(r"^refused \S+: |\d+", "", answer)[:110]] += 1


# -- byte level ---------------------------------------------------------------------------------
def mutate_bytes(draw, data: bytes, header_end: int) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        end = max(len(out), 1)
        near = draw(st.booleans()) or draw(st.booleans())  # 3 in 4 land inside the header
        pos = draw(st.integers(0, min(header_end, end) - 1 if near else end - 1))
        op = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        if op == "flip" and out:
            out[pos % len(out)] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and out:
            out[pos % len(out)] = draw(st.sampled_from([0x00, 0xFF, 0x7F, 0x80, 0x01, draw(st.integers(0, 255))]))
        elif op == "truncate":
            del out[pos:]
        elif op == "insert":
            out[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del out[pos : pos + draw(st.integers(1, 16))]
    return bytes(out)


def test_byte_level_mutations_load_or_fail_in_one_line(seed, worker, tmp_path):
    header_end = len(seed) - len(parse(seed).data)
    outcomes = Outcomes()

    @settings(max_examples=fuzz_examples(ci=120))
    @given(st.data())
    def run(data):
        check_file(mutate_bytes(data.draw, seed, header_end), tmp_path / "mutated.gguf", worker, outcomes)

    run()
    print(f"byte level: {outcomes}")
    assert outcomes.refused_by_header and outcomes.ran  # both ends were reached


# -- field level --------------------------------------------------------------------------------
def value_of_type(draw, type_id: int):
    """A value for `type_id` (and the element type, for an array)."""
    if type_id == STRING:
        return draw(raw_bytes), None
    if type_id == ARRAY:
        element = draw(st.sampled_from([UINT32, INT32, FLOAT32, STRING, BOOL, 0, 10, ARRAY, 13, 99]))
        count = draw(st.integers(0, 6))
        return [value_of_type(draw, element)[0] if element in range(13) and element != ARRAY else 0
                for _ in range(count)], element
    if type_id in (FLOAT32, 12):
        return draw(floats), None
    return draw(ints), None


ALL_KINDS = ["count", "length", "type", "value", "key", "key", "key", "per_layer", "remove", "duplicate", "tokens",
             "tensor_dims", "tensor_type", "tensor_offset", "tensor_name", "tensor_order", "data", "version"]
# changes that keep the file's structure sound, so that most examples reach what the values mean
METADATA_KINDS = ["value", "key", "key", "key", "per_layer", "tokens", "remove"]


def mutate_fields(draw, g: Gguf, kinds: list[str] = ALL_KINDS) -> None:
    kind = draw(st.sampled_from(kinds))
    kv = draw(st.sampled_from(g.kvs)) if g.kvs else None
    tensor = draw(st.sampled_from(g.tensors)) if g.tensors else None
    if kind == "count":
        setattr(g, draw(st.sampled_from(["n_kv_lie", "n_tensors_lie"])), draw(ints))
    elif kind == "length" and kv is not None and kv.type_id in (STRING, ARRAY):
        kv.length_lie = draw(ints)
    elif kind == "type" and kv is not None:
        kv.type_id = draw(st.one_of(st.integers(0, 12), ints))
        kv.value, kv.element_type = value_of_type(draw, kv.type_id)
    elif kind == "value" and kv is not None:
        if kv.type_id == ARRAY and isinstance(kv.value, list) and kv.value:
            edit = draw(st.sampled_from(["drop", "cut", "repeat", "replace"]))
            i = draw(st.integers(0, len(kv.value) - 1))
            if edit == "drop":
                del kv.value[i]
            elif edit == "cut":
                del kv.value[i:]
            elif edit == "repeat":
                kv.value.insert(i, kv.value[draw(st.integers(0, len(kv.value) - 1))])
            else:
                kv.value[i] = value_of_type(draw, kv.element_type)[0] if kv.element_type != ARRAY else 0
        elif kv.type_id in range(13) and kv.type_id != ARRAY:
            kv.value = value_of_type(draw, kv.type_id)[0]
    elif kind == "key":
        mutate_known_key(draw, g)
    elif kind == "per_layer":
        key = f"llama.{draw(st.sampled_from(['attention.head_count', 'attention.head_count_kv', 'feed_forward_length', 'expert_used_count']))}"
        element = draw(st.sampled_from([UINT32, INT32, FLOAT32]))
        g.set(key, ARRAY, draw(st.lists(small_ints, max_size=4)), element)
    elif kind == "remove" and kv is not None:
        g.kvs.remove(kv)
    elif kind == "duplicate" and kv is not None:
        g.kvs.insert(draw(st.integers(0, len(g.kvs))), kv)
    elif kind == "tokens":
        mutate_tokens(draw, g)
    elif kind == "tensor_dims" and tensor is not None:
        tensor.dims = draw(st.lists(st.one_of(small_ints, ints), min_size=0, max_size=5))
        if draw(st.booleans()):
            relayout(g)  # the offsets that fit the new shape, so the layout check is not all it meets
    elif kind == "tensor_type" and tensor is not None:
        tensor.type_id = draw(st.one_of(st.integers(0, 40), ints))
        if draw(st.booleans()):
            relayout(g)
    elif kind == "tensor_offset" and tensor is not None:
        other = draw(st.sampled_from(g.tensors))
        tensor.offset = draw(st.one_of(ints, st.just(other.offset), st.integers(-64, 64).map(lambda d: tensor.offset + d)))
    elif kind == "tensor_name" and tensor is not None:
        tensor.name = draw(st.one_of(raw_bytes, st.just(b"x" * 64), st.sampled_from([t.name for t in g.tensors])))
    elif kind == "tensor_order" and tensor is not None:
        g.tensors.remove(tensor)
        if draw(st.booleans()):  # move it rather than drop it
            g.tensors.insert(draw(st.integers(0, len(g.tensors))), tensor)
    elif kind == "data":
        cut = draw(st.integers(0, len(g.data)))
        g.data = g.data[:cut] if draw(st.booleans()) else g.data + bytes(draw(st.integers(1, 4096)))
    elif kind == "version":
        g.version = draw(st.one_of(st.sampled_from([1, 2, 3, 4]), ints))


def mutate_known_key(draw, g: Gguf) -> None:
    """Set one key llama.cpp or edgelm reads to a hostile (or harmless) value of a likely type."""
    which = draw(st.sampled_from(["arch", "float", "token_id", "architecture", "alignment", "model", "pre",
                                  "template", "add_bos", "scaling"]))
    type_id = draw(st.sampled_from([UINT32, UINT32, UINT32, INT32, 10, 11, FLOAT32, STRING, BOOL]))
    if which == "arch":
        g.set(f"llama.{draw(st.sampled_from(ARCH_KEYS))}", type_id, *value_of_type(draw, type_id))
    elif which == "float":
        g.set(f"llama.{draw(st.sampled_from(FLOAT_KEYS))}", FLOAT32, draw(floats))
    elif which == "token_id":
        key = f"tokenizer.ggml.{draw(st.sampled_from(TOKEN_ID_KEYS))}_token_id"
        g.set(key, type_id, *value_of_type(draw, type_id))
    elif which == "architecture":
        g.set("general.architecture", STRING, draw(st.sampled_from(ARCHITECTURES)).encode())
    elif which == "alignment":
        g.set("general.alignment", type_id, *value_of_type(draw, type_id))
        alignment = g.find("general.alignment").value
        if isinstance(alignment, int) and alignment in (1, 8, 16, 64, 128):
            g.alignment = alignment  # sometimes a layout that honours the new alignment
    elif which == "model":
        g.set("tokenizer.ggml.model", STRING, draw(st.sampled_from(TOKENIZER_MODELS)).encode())
    elif which == "pre":
        g.set("tokenizer.ggml.pre", STRING, draw(st.sampled_from(["default", "llama-bpe", "gpt-2", "nonsense"])).encode())
    elif which == "template":
        g.set("tokenizer.chat_template", STRING, draw(st.sampled_from(
            [b"", b"{{ bos_token }}{{ messages[0]['content'] }}", b"{% for", b"{{ 1/0 }}", b"\xff\xfe"])))
    elif which == "add_bos":
        g.set("tokenizer.ggml.add_bos_token", type_id, *value_of_type(draw, type_id))
    else:
        g.set("llama.rope.scaling.type", STRING, draw(texts).encode("utf-8", "surrogatepass"))


def mutate_tokens(draw, g: Gguf) -> None:
    tokens = g.find("tokenizer.ggml.tokens")
    if tokens is None or not isinstance(tokens.value, list) or not tokens.value:
        return  # an earlier mutation changed its type
    i = draw(st.integers(0, len(tokens.value) - 1))
    edit = draw(st.sampled_from(["repeat", "empty", "drop_last", "append", "bytes", "all_arrays"]))
    if edit == "repeat":
        tokens.value[i] = tokens.value[draw(st.integers(0, len(tokens.value) - 1))]
    elif edit == "empty":
        tokens.value[i] = b""
    elif edit == "drop_last":
        tokens.value.pop()
    elif edit == "append":
        tokens.value.append(draw(raw_bytes))
    elif edit == "bytes":
        tokens.value[i] = draw(raw_bytes)
    else:
        for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
            kv = g.find(key)
            if kv is not None and isinstance(kv.value, list):
                del kv.value[draw(st.integers(0, len(kv.value))):]


@pytest.mark.parametrize("vocabulary, kinds", [("spm", "any"), ("bpe", "any"), ("spm", "metadata"),
                                               ("bpe", "metadata")])
def test_field_level_mutations_load_or_fail_in_one_line(seed, bpe_seed, worker, tmp_path, vocabulary, kinds):
    outcomes = Outcomes()
    start = seed if vocabulary == "spm" else bpe_seed

    @settings(max_examples=fuzz_examples(ci=100 if kinds == "any" else 60, long=1000 if kinds == "any" else 500))
    @given(st.data())
    def run(data):
        g = parse(start)
        for _ in range(data.draw(st.integers(1, 3))):
            mutate_fields(data.draw, g, ALL_KINDS if kinds == "any" else METADATA_KINDS)
        check_file(write(g), tmp_path / "mutated.gguf", worker, outcomes)

    run()
    print(f"field level ({vocabulary}, {kinds}): {outcomes}")
    assert outcomes.refused_by_header and outcomes.ran


def test_the_seeds_and_their_rewrite_run(seed, bpe_seed, worker, tmp_path):
    """The fuzz tests mean something only if the unmutated files run, and the re-writer is exact."""
    assert write(parse(seed)) == seed
    outcomes = Outcomes()
    check_file(seed, tmp_path / "seed.gguf", worker, outcomes)
    check_file(bpe_seed, tmp_path / "bpe.gguf", worker, outcomes)
    assert outcomes.ran == 2
