"""The llama.cpp backend: GGUF header checks, tokenizer, generation semantics, chat, `edgelm chat`.

Models are tiny GGUF files written here with the `gguf` writer (random weights, a hand-made
SentencePiece vocabulary), so these tests need neither torch nor the converter. Every model
runs on one thread: llama.cpp's spinning thread barrier slows to a crawl when a shared machine
is oversubscribed.
"""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from click.testing import CliRunner

from edgelm.artifact import Manifest
from edgelm.errors import ArtifactError, ContextOverflowError, InputError, ProviderError, UsageError
from edgelm.runtime import load
from edgelm.runtime.chat.template import render_chat
from edgelm.runtime.device import RuntimeOptions
from edgelm.runtime.gguf.metadata import read_gguf_header
from edgelm.runtime.gguf.parser import GGML_TYPES, parse_gguf_header
from edgelm.runtime.llamacpp.model import load_llama

WORDS = ["hello", "world", "the", "cat", "sat", "on", "mat", "and", "dog", "ran"]
SPECIALS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ONE_THREAD = RuntimeOptions(threads=1)


# -- tiny models ------------------------------------------------------------------------------
def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """unk/bos/eos, 256 byte pieces, chat specials (control), letters, every prefix of WORDS."""
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + SPECIALS
    types = [2, 3, 3] + [6] * 256 + [3] * len(SPECIALS)
    normal = ["\u2581", *"abcdefghijklmnopqrstuvwxyz.,!?"]
    normal += [f"\u2581{w[:n]}" for w in WORDS for n in range(1, len(w) + 1)]
    normal = list(dict.fromkeys(normal))
    scores = [0.0] * len(pieces) + [-1000.0 + len(p) for p in normal]  # longer pieces merge first
    return pieces + normal, scores, types + [1] * len(normal)


def write_tiny_gguf(path, *, hidden=64, layers=2, heads=4, kv_heads=2, ff=128, context=128, seed=0,
                    template=TEMPLATE, arch_key=True):
    import gguf

    pieces, scores, types = spm_vocab()
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    if arch_key:
        w.add_block_count(layers)
    w.add_context_length(context)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hidden // heads)
    w.add_vocab_size(len(pieces))
    w.add_file_type(0)
    w.add_tokenizer_model("llama")
    w.add_token_list(pieces)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)
    w.add_eot_token_id(pieces.index("<|end|>"))
    if template:
        w.add_chat_template(template)

    def mat(rows, cols, scale=1.0):  # (rows, cols): ggml takes HF's (out, in) as is
        return (rng.standard_normal((rows, cols)) * scale / np.sqrt(cols)).astype(np.float32)

    kv = kv_heads * hidden // heads
    w.add_tensor("token_embd.weight", mat(len(pieces), hidden, np.sqrt(hidden)))
    for i in range(layers):
        for name, shape in [("attn_q", (hidden, hidden)), ("attn_k", (kv, hidden)), ("attn_v", (kv, hidden)),
                            ("attn_output", (hidden, hidden)), ("ffn_gate", (ff, hidden)),
                            ("ffn_up", (ff, hidden)), ("ffn_down", (hidden, ff))]:
            w.add_tensor(f"blk.{i}.{name}.weight", mat(*shape))
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    w.add_tensor("output.weight", mat(len(pieces), hidden, 4.0))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("llama") / "tiny.gguf")


@pytest.fixture(scope="module")
def model(gguf_path):
    with load(gguf_path, threads=1) as generator:
        yield generator


# -- GGUF header checks -----------------------------------------------------------------------
def gguf_bytes(*, magic=b"GGUF", version=3, kvs=(), tensors=(), n_tensors=None, n_kv=None, data=b""):
    """A GGUF file from parts; kvs: (key, type id, packed value); tensors: (name, dims, type, offset)."""
    def string(s: str) -> bytes:
        raw = s.encode()
        return struct.pack("<Q", len(raw)) + raw

    out = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                              len(kvs) if n_kv is None else n_kv)
    for key, type_id, packed in kvs:
        out += string(key) + struct.pack("<I", type_id) + packed
    for name, dims, type_id, offset in tensors:
        out += string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", type_id, offset)
    return out + b"\0" * (-len(out) % 32) + data


ARCH = ("general.architecture", 8, struct.pack("<Q", 5) + b"llama")
F32_TENSOR = ("w", (8,), 0, 0)


def test_a_well_formed_header_reads_back(gguf_path):
    header = read_gguf_header(gguf_path)
    assert header.version == 3
    assert header.get("llama.block_count") == 2
    assert header.get("tokenizer.ggml.tokens").length == len(spm_vocab()[0])
    assert {t.name for t in header.tensors} >= {"token_embd.weight", "output.weight"}
    last = max(header.tensors, key=lambda t: t.offset)
    assert header.data_offset + last.offset + last.nbytes <= header.file_size
    small = gguf_bytes(kvs=[ARCH], tensors=[F32_TENSOR], data=b"\0" * 32)
    assert parse_gguf_header(small, len(small)).tensors[0].nbytes == 32


def test_ggml_block_sizes_match_the_gguf_package():
    import gguf

    for type_id, (name, block, nbytes) in GGML_TYPES.items():
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)] == (block, nbytes), name


BAD_FILES = {
    "magic": (gguf_bytes(magic=b"GGML"), "not a GGUF file"),
    "version": (gguf_bytes(version=7), "version 7"),
    "big-endian": (gguf_bytes(version=3 << 24), "big-endian"),
    "key count": (gguf_bytes(n_kv=1 << 60), "key-values"),
    "tensor count": (gguf_bytes(kvs=[ARCH], n_tensors=1 << 40), "tensor infos"),
    "string length": (gguf_bytes(kvs=[("k", 8, struct.pack("<Q", 1 << 50))]), "string value of 'k'"),
    "array length": (gguf_bytes(kvs=[("a", 9, struct.pack("<IQ", 6, 1 << 40))]), "array 'a'"),
    "string array": (gguf_bytes(kvs=[("a", 9, struct.pack("<IQ", 8, 1 << 40))]), "array 'a'"),
    "value type": (gguf_bytes(kvs=[("k", 99, b"")]), "unknown value type 99"),
    "duplicate key": (gguf_bytes(kvs=[ARCH, ARCH]), "appears twice"),
    "ggml type": (gguf_bytes(tensors=[("w", (8,), 77, 0)]), "unknown ggml type 77"),
    "dims": (gguf_bytes(tensors=[("w", (8,) * 5, 0, 0)]), "5 dimensions"),
    "block rows": (gguf_bytes(tensors=[("w", (16,), 8, 0)], data=b"\0" * 64), "not a multiple of 32"),
    "offset": (gguf_bytes(tensors=[("w", (8,), 0, 1 << 40)]), "truncated"),
    "misaligned": (gguf_bytes(tensors=[("w", (8,), 0, 4)], data=b"\0" * 64), "not aligned"),
    "overlap": (gguf_bytes(tensors=[("w", (16,), 0, 0), ("v", (8,), 0, 32)], data=b"\0" * 96), "overlap"),
    "alignment": (gguf_bytes(kvs=[("general.alignment", 4, struct.pack("<I", 3))]), "power of two"),
    "huge shape": (gguf_bytes(tensors=[("w", (1 << 32, 1 << 32), 0, 0)]), "impossible shape"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_malformed_gguf_gives_one_line_error(tmp_path, case):
    data, reason = BAD_FILES[case]
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(ArtifactError, match="not a valid GGUF file") as err:
        load(path, threads=1)
    assert reason in str(err.value) and "\n" not in str(err.value)


def test_truncated_model_never_reaches_llama_cpp(gguf_path, tmp_path):
    data = gguf_path.read_bytes()
    for cut in (0, 3, 10, 24, 100, 3300, 5000, len(data) // 2, len(data) - 1):  # 3300: inside the vocabulary
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        with pytest.raises(ArtifactError, match="not a valid GGUF file"):
            load(path, threads=1)


def test_info_reads_a_bare_gguf_file(gguf_path):
    from edgelm.cli import main

    shown = CliRunner().invoke(main, ["info", str(gguf_path), "--json"])
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.output)
    assert data["family"] == "llama" and data["format"] == "gguf"
    assert data["model"]["context_length"] == 128


def test_a_file_llama_cpp_refuses_is_an_artifact_error(tmp_path):
    # a well-formed file that lacks llama.block_count: only llama.cpp can see what is wrong
    path = write_tiny_gguf(tmp_path / "noblocks.gguf", arch_key=False)
    with pytest.raises(ArtifactError, match="llama.cpp could not load") as err:
        load(path, threads=1)
    assert "block_count" in str(err.value)


# -- tokenizer and generation -----------------------------------------------------------------
def test_tokenizer_round_trips_unicode_and_parses_special_tokens(model):
    text = "hello world, the cat  sat\n\non é 😀 中文 mat"
    ids = model.tokenizer.encode(text).ids
    assert model.tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # pieces merged, not all byte fallback
    chat_ids = model.tokenizer.encode("<|user|>hi<|end|>").ids
    end = spm_vocab()[0].index("<|end|>")
    assert chat_ids[0] == spm_vocab()[0].index("<|user|>") and chat_ids[-1] == end
    assert model.tokenizer.decode(chat_ids).strip() == "hi"  # SentencePiece adds a space prefix after a special
    assert model.tokenizer.decode(chat_ids, skip_special_tokens=False).replace(" ", "") == "<|user|>hi<|end|>"
    assert end in model.end_ids and 2 in model.end_ids


class RecordingDecoder:
    """Wraps a decoder and notes each token fed back, i.e. every generated token but the last."""

    def __init__(self, inner):
        self.inner, self.fed = inner, []
        self.context_length = inner.context_length

    def prefill(self, ids):
        self.fed = []
        return self.inner.prefill(ids)

    def step(self, token_id):
        self.fed.append(token_id)
        return self.inner.step(token_id)


def test_greedy_equals_llama_cpp_python_direct(gguf_path, model):
    import llama_cpp

    prompt, n = "the cat sat on the", 24
    recorder = RecordingDecoder(model.decoder)
    model.decoder = recorder
    try:
        completion = model.complete(prompt, max_tokens=n + 1, temperature=0)
    finally:
        model.decoder = recorder.inner
    ours = recorder.fed
    llm = llama_cpp.Llama(str(gguf_path), n_ctx=128, n_threads=1, verbose=False)
    try:
        tokens = llm.tokenize(prompt.encode(), add_bos=True, special=True)
        assert tokens == model.encode(prompt)
        theirs = []
        for token in llm.generate(tokens, temp=0.0, repeat_penalty=1.0, top_k=1):
            theirs.append(token)
            if len(theirs) == len(ours) + 1:
                break
    finally:
        llm.close()
    assert len(ours) >= 8, completion  # enough tokens to compare before any end-of-generation
    assert ours == theirs[: len(ours)]


def test_seed_repeats_and_stop_strings_never_leak(model):
    first = model.generate("the dog", max_tokens=16, temperature=1.0, seed=3)
    assert first == model.generate("the dog", max_tokens=16, temperature=1.0, seed=3)
    others = {model.generate("the dog", max_tokens=16, temperature=1.0, seed=s) for s in range(4, 8)}
    assert others - {first}
    greedy = model.generate("the cat", max_tokens=20, temperature=0)
    stop = greedy[len(greedy) // 2 : len(greedy) // 2 + 2]
    stopped = model.complete("the cat", max_tokens=20, temperature=0, stop=[stop])
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert greedy.startswith(stopped.text)


def test_context_policy_is_explicit(model):
    long_prompt = "the cat sat on the mat " * 30
    with pytest.raises(ContextOverflowError, match="context length 128"):
        model.generate(long_prompt, max_tokens=8)
    done = model.complete(long_prompt, max_tokens=8, temperature=0, truncate=True)
    assert done.truncated_prompt_tokens > 0 and done.prompt_tokens + 8 <= 128


def test_n_ctx_allocates_a_smaller_context_and_rejects_nonsense(gguf_path):
    with load(gguf_path, threads=1, n_ctx=64) as small:
        assert small.decoder.context_length == 64
        with pytest.raises(ContextOverflowError, match="context length 64"):
            small.generate("the cat sat on the mat " * 12, max_tokens=8)
    with pytest.raises(UsageError, match="n_ctx must be a positive integer"):
        load(gguf_path, threads=1, n_ctx=0)


def test_options_that_cannot_hold_are_refused(gguf_path):
    with pytest.raises(ProviderError, match="n-gpu-layers"):
        load(gguf_path, threads=1, provider="cuda")
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        with pytest.raises(ProviderError, match="no GPU"):
            load(gguf_path, threads=1, n_gpu_layers=8)


def test_artifact_folder_loads_through_the_family_registry(gguf_path, tmp_path):
    import shutil

    from edgelm.artifact import write_artifact

    end = spm_vocab()[0].index("<|end|>")
    manifest = Manifest(family="llama", task="text-generation", format="gguf", quant="f32",
                        tokenizer={"kind": "spm", "file": "model.gguf"}, model={"file": "model.gguf"},
                        generation={"bos_id": 1, "eos_id": 2, "pad_id": None, "add_bos": True,
                                    "context_length": 64, "chat_template": TEMPLATE, "stop": ["mat"],
                                    "stop_ids": [end]},
                        validation_skipped=True)
    with write_artifact(tmp_path / "art", manifest) as folder:
        shutil.copy(gguf_path, folder / "model.gguf")
    with load(tmp_path / "art", threads=1) as generator:
        assert generator.decoder.context_length == 64
        assert generator.defaults.stop == ("mat",) and end in generator.end_ids
        assert "mat" not in generator.generate("the cat sat on the", max_tokens=12, temperature=0)


# -- chat -------------------------------------------------------------------------------------
CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello cat"}]


def test_chat_prompt_is_the_template_with_one_bos(model):
    prompt = model.chat_prompt(CONVERSATION)
    assert prompt == render_chat(TEMPLATE, CONVERSATION, bos_token="<s>", eos_token="</s>")
    ids = model.chat_ids(CONVERSATION)
    assert ids[0] == 1 and ids[1] != 1  # the template wrote <s>; no second BOS added


def test_chat_and_chat_stream_agree_and_end_at_end_of_turn(model):
    reply = model.chat_complete(CONVERSATION, max_tokens=40, temperature=0)
    pieces = list(model.chat_stream(CONVERSATION, max_tokens=40, temperature=0))
    assert "".join(pieces) == reply.text == model.chat(CONVERSATION, max_tokens=40, temperature=0)
    assert "<|end|>" not in reply.text
    # hot sampling on random weights meets an end-of-turn or end-of-text token soon; it ends the reply
    ended = [model.chat_complete(CONVERSATION, max_tokens=90, temperature=2.0, seed=s) for s in range(6)]
    assert any(c.finish_reason == "eos" and c.completion_tokens < 90 for c in ended)


def test_reusing_the_cached_prefix_gives_the_same_logits(model):
    first = model.chat_ids(CONVERSATION)
    longer = model.chat_ids([*CONVERSATION, {"role": "assistant", "content": "the dog"},
                             {"role": "user", "content": "and the mat"}])
    decoder = model.decoder
    decoder.prefill(first)
    reused = decoder.prefill(longer).copy()
    decoder.prefill([3, 4, 5])  # nothing shared: the whole prompt is evaluated again
    fresh = decoder.prefill(longer).copy()
    np.testing.assert_allclose(reused, fresh, atol=1e-3)
    assert int(np.argmax(reused)) == int(np.argmax(fresh))


def test_long_conversations_drop_whole_old_turns(model):
    turn = "the cat sat on the mat and the dog ran " * 2
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(4):
        messages += [{"role": "user", "content": f"{turn} {i}"}, {"role": "assistant", "content": turn}]
    messages.append({"role": "user", "content": "hello"})
    with pytest.raises(ContextOverflowError, match="pass truncate"):
        model.chat(messages, max_tokens=16)
    kept, dropped, ids = model.fit_messages(messages, 16)
    assert dropped >= 2 and dropped % 2 == 0 and len(ids) + 16 <= 128
    assert kept[0]["role"] == "system" and kept[1]["role"] == "user" and kept[-1] == messages[-1]
    done = model.chat_complete(messages, max_tokens=16, temperature=0, truncate=True)
    assert done.truncated_prompt_tokens > 0
    with pytest.raises(ContextOverflowError, match="last message alone"):
        model.fit_messages([{"role": "user", "content": turn * 8}], 16)


def with_template(gguf_path, tmp_path, template):
    (tmp_path / "model.gguf").symlink_to(gguf_path)
    manifest = Manifest(family="llama", task="text-generation", format="gguf", quant="f32",
                        model={"file": "model.gguf"}, source={"bare_gguf": True},  # a stand-in manifest
                        generation={"bos_id": 1, "eos_id": 2, "add_bos": True, "chat_template": template})
    return load_llama(tmp_path, manifest, ONE_THREAD)


def test_a_template_cannot_escape_the_sandbox(gguf_path, tmp_path):
    escape = "{{ cycler.__init__.__globals__.os.system('touch " + str(tmp_path / "pwned") + "') }}"
    with with_template(gguf_path, tmp_path, escape) as generator, pytest.raises(ArtifactError, match="unsafe"):
        generator.chat(CONVERSATION, max_tokens=4)
    assert not (tmp_path / "pwned").exists()


def test_template_raise_exception_is_an_input_error(gguf_path, tmp_path):
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('start with a user turn') }}{% endif %}x"
    with with_template(gguf_path, tmp_path, strict) as generator:
        with pytest.raises(InputError, match="start with a user turn"):
            generator.chat(CONVERSATION, max_tokens=4)
        assert generator.chat(CONVERSATION[1:], max_tokens=4, temperature=0) is not None


# -- CLI --------------------------------------------------------------------------------------
def test_edgelm_chat_streams_resets_drops_and_exits(gguf_path):
    from edgelm.cli import main

    long = "the cat sat on the mat and the dog ran " * 3
    lines = ["hello cat", "/reset", "/nope", long, long, long, "/exit", "never read"]
    result = CliRunner().invoke(main, ["chat", str(gguf_path), "--threads", "1", "--temperature", "0",
                                       "--max-tokens", "16", "--system", "Be brief."],
                                input="\n".join(lines) + "\n")
    assert result.exit_code == 0, result.output
    assert "(conversation cleared)" in result.stderr
    assert "unknown command /nope" in result.stderr
    assert "dropped the 2 oldest messages" in result.stderr
    assert result.stdout.count("> ") >= 6  # one prompt per line read up to /exit


def test_edgelm_run_and_chat_errors_are_one_line(gguf_path, tmp_path):
    from edgelm.cli import main

    runner = CliRunner()
    ran = runner.invoke(main, ["run", str(gguf_path), "the cat", "--threads", "1", "--max-tokens", "5", "--seed", "0"])
    assert ran.exit_code == 0, ran.output
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(gguf_path.read_bytes()[:4000])
    failed = runner.invoke(main, ["chat", str(bad)], input="/exit\n")
    assert failed.exit_code == 1 and failed.stderr.count("\n") == 1 and "truncated" in failed.stderr
    plain = write_tiny_gguf(tmp_path / "plain.gguf", template=None)
    no_template = runner.invoke(main, ["chat", str(plain), "--threads", "1"], input="/exit\n")
    assert no_template.exit_code == 2 and "no chat template" in no_template.stderr


def test_running_a_gguf_imports_no_training_stack(gguf_path):
    import subprocess
    import sys

    code = (f"import sys, edgelm\nwith edgelm.load({str(gguf_path)!r}, threads=1) as m:\n"
            "    m.chat([{'role': 'user', 'content': 'hi'}], max_tokens=3)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'optimum', 'gguf')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
