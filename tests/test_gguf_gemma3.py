"""Gemma 3 text -> GGUF: (1 + w) norms, embedding scale, sliding-window layers and their pattern,
local and global rope bases, q/k norms, pre/post feed-forward norms, GELU-tanh, Gemma's tokenizer."""

from __future__ import annotations

import json

import pytest
from gguf_fixtures import check
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_archs import GEMMA3_WINDOW, build_tiny_gemma3

from conftest import export_to
from edgelm.errors import UnsupportedModelError
from edgelm.export import export
from edgelm.export.options import ExportOptions
from llama_fixtures import copy_folder

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def gemma3_source(tmp_path_factory):
    return build_tiny_gemma3(tmp_path_factory.mktemp("gemma3") / "source")


@pytest.fixture(scope="module")
def gemma3_f32(gemma3_source, tmp_path_factory):
    return export_to(gemma3_source, tmp_path_factory.mktemp("gemma3") / "f32", quant="f32")


def test_f32_matches_torch_across_sliding_and_global_layers(gemma3_f32):
    from edgelm.artifact import read_manifest
    from edgelm.families import GEMMA3_F32

    manifest = read_manifest(gemma3_f32)
    assert (manifest.family, manifest.format, manifest.quant) == ("gemma3", "gguf", "f32")
    diff = check(manifest, "max_abs_logit_diff_vs_torch")
    assert manifest.validation_passed and diff.value <= GEMMA3_F32.bound("max_abs_logit_diff_vs_torch")
    assert check(manifest, "top1_agreement_vs_torch").value >= 0.99
    assert check(manifest, "tokenizer_parity").value == 1.0
    assert check(manifest, "chat_template_parity").value == 1.0
    assert "<end_of_turn>" in manifest.generation.stop and manifest.generation.add_bos


def test_file_carries_gemma3s_keys_and_offset_norms(gemma3_source, gemma3_f32):
    import numpy as np
    from safetensors.numpy import load_file

    reader = gguf.GGUFReader(gemma3_f32 / "model.gguf")
    fields = {n: f.contents() for n, f in reader.fields.items() if not n.startswith("tokenizer.ggml.token")}
    assert fields["general.architecture"] == "gemma3"
    assert fields["gemma3.attention.sliding_window"] == GEMMA3_WINDOW
    assert fields["gemma3.attention.sliding_window_pattern"] == [True] * 5 + [False] + [True]  # 5:1
    assert fields["gemma3.rope.freq_base"] == 1000000.0 and fields["gemma3.rope.freq_base_swa"] == 10000.0
    assert fields["gemma3.attention.key_length"] == 32 and fields["tokenizer.ggml.add_space_prefix"] is False
    weights = load_file(gemma3_source / "model.safetensors")
    tensors = {t.name: np.asarray(t.data) for t in reader.tensors}
    for hf, ours in (("model.layers.0.post_feedforward_layernorm.weight", "blk.0.post_ffw_norm.weight"),
                     ("model.layers.0.self_attn.q_norm.weight", "blk.0.attn_q_norm.weight"),
                     ("model.norm.weight", "output_norm.weight")):
        np.testing.assert_allclose(tensors[ours], weights[hf] + 1.0, rtol=0, atol=1e-7)  # (1 + w)


def test_q8_0_validates(gemma3_source, tmp_path):
    manifest = export(gemma3_source, tmp_path / "q8", ExportOptions(quant="q8_0"))
    assert manifest.validation_passed and check(manifest, "mean_kl_vs_torch").passed


def test_chat_through_edgelm_equals_llama_cpp_python_direct(gemma3_f32):
    import llama_cpp

    import edgelm

    messages = [{"role": "user", "content": "What is a list?"}]
    with edgelm.load(gemma3_f32, threads=1) as model:
        reply = model.chat(messages, max_tokens=10, temperature=0)
        prompt_ids = model.encode("<start_of_turn>user\nWhat is a list?<end_of_turn>\n<start_of_turn>model\n")
    llm = llama_cpp.Llama(str(gemma3_f32 / "model.gguf"), n_ctx=128, n_threads=1, verbose=False)
    try:
        theirs = []
        for token in llm.generate(prompt_ids, temp=0.0, repeat_penalty=1.0, top_k=1):
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token) or len(theirs) == 10:
                break
            theirs.append(token)
        expected = llm.detokenize(theirs).decode("utf-8", errors="replace")
    finally:
        llm.close()
    assert reply == expected


@pytest.mark.parametrize("change, message", [
    ({"query_pre_attn_scalar": 64}, "query_pre_attn_scalar 64"),
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
    ({"architectures": ["Gemma3ForConditionalGeneration"]}, "not a Gemma 3 text model"),
])
def test_what_llama_cpp_computes_differently_is_refused(gemma3_source, tmp_path, change, message):
    folder = copy_folder(gemma3_source, tmp_path / "src")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UnsupportedModelError, match=message) as info:
        export(folder, tmp_path / "a", ExportOptions(validate=False))
    assert "\n" not in str(info.value) and not (tmp_path / "a").exists()


def test_memory_preflight_counts_sliding_layers_as_llama_cpp_allocates_them(gemma3_f32):
    """Seen in llama.cpp's log for this file at n_ctx 4096: the global layer 4096 cells; the six sliding
    layers 4096 cells with swa_full (llama-cpp-python's default), 768 without (window 8 + batch 512, padded)."""
    from edgelm.runtime.gguf.metadata import read_gguf_header
    from edgelm.runtime.llamacpp.memory import estimate_need

    header = read_gguf_header(gemma3_f32 / "model.gguf")
    per_cell = 1 * (32 + 32) * 2  # one KV head, key and value of 32, F16
    assert estimate_need(header, 0, 4096).kv_cache == 7 * 4096 * per_cell
    assert estimate_need(header, 0, 4096, swa_full=False).kv_cache == (4096 + 6 * 768) * per_cell


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=40), st.integers(1, 1 << 16), st.integers(1, 1 << 17),
       st.integers(1, 8), st.booleans())
def test_sliding_layers_never_count_more_than_a_full_cache(pattern, window, n_ctx, sequences, listed):
    from edgelm.runtime.gguf.parser import ArrayValue
    from edgelm.runtime.llamacpp.memory import estimate_need

    layers = len(pattern)
    header = {"general.architecture": "gemma3", "gemma3.block_count": layers, "gemma3.embedding_length": 64,
              "gemma3.attention.head_count": 4, "gemma3.attention.head_count_kv": 1,
              "gemma3.attention.sliding_window": window}
    if listed:
        header["gemma3.attention.sliding_window_pattern"] = ArrayValue("bool", layers, tuple(pattern))
    full = layers * sequences * n_ctx * 1 * (16 + 16) * 2
    assert estimate_need(header, 0, n_ctx, sequences).kv_cache == full  # swa_full: every layer at n_ctx
    windowed = estimate_need(header, 0, n_ctx, sequences, swa_full=False).kv_cache
    assert windowed <= full + layers * 255 * 64  # at most the padding to 256 cells above a full cache
    if not listed or not any(pattern):
        assert windowed == full  # nothing known to slide: nothing saved
