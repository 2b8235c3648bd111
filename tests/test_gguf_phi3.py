"""Phi-3 -> GGUF: fused qkv_proj and gate_up_proj, SentencePiece with added chat markers; longrope refused."""

from __future__ import annotations

import pytest
from gguf_fixtures import build_tiny_phi3, check

from conftest import export_to
from edgelm.errors import UnsupportedModelError
from edgelm.export import export
from edgelm.export.options import ExportOptions

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def phi3_source(tmp_path_factory):
    return build_tiny_phi3(tmp_path_factory.mktemp("phi3") / "source")


@pytest.fixture(scope="module")
def phi3_f32(phi3_source, tmp_path_factory):
    return export_to(phi3_source, tmp_path_factory.mktemp("phi3") / "f32", quant="f32")


def test_f32_matches_torch_with_fused_projections(phi3_f32):
    from edgelm.artifact import read_manifest

    manifest = read_manifest(phi3_f32)
    assert (manifest.family, manifest.format, manifest.quant) == ("phi3", "gguf", "f32")
    assert manifest.validation_passed and check(manifest, "max_abs_logit_diff_vs_torch").value <= 1e-4
    assert check(manifest, "tokenizer_parity").value == 1.0
    assert check(manifest, "chat_template_parity").value == 1.0
    reader = gguf.GGUFReader(phi3_f32 / "model.gguf")
    tensors = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert tensors["blk.0.attn_qkv.weight"] == (64, 64 + 2 * 32)  # q (4 heads) | k, v (2 KV heads) of 16
    assert tensors["blk.0.ffn_up.weight"] == (64, 2 * 128)  # gate | up, split by llama.cpp
    assert "<|end|>" in manifest.generation.stop


def test_q8_0_validates(phi3_source, tmp_path):
    manifest = export(phi3_source, tmp_path / "q8", ExportOptions(quant="q8_0"))
    assert manifest.validation_passed and check(manifest, "held_out_perplexity_ratio_vs_torch").passed


def test_greedy_equals_llama_cpp_python_direct(phi3_f32):
    import llama_cpp

    import edgelm

    prompt = "The function returns"
    with edgelm.load(phi3_f32, threads=1) as model:
        ids = model.encode(prompt)
        text = model.generate(prompt, max_tokens=10, temperature=0)
    llm = llama_cpp.Llama(str(phi3_f32 / "model.gguf"), n_ctx=128, n_threads=1, verbose=False)
    try:
        assert ids == llm.tokenize(prompt.encode(), add_bos=True, special=True)
        theirs = []
        for token in llm.generate(ids, temp=0.0, repeat_penalty=1.0, top_k=1):
            if token == llm.token_eos() or len(theirs) == 10:
                break
            theirs.append(token)
        expected = llm.detokenize(theirs).decode("utf-8", errors="replace")
    finally:
        llm.close()
    assert text == expected


def test_longrope_is_refused_in_one_line(tmp_path):
    scaling = {"type": "longrope", "long_factor": [1.0] * 8, "short_factor": [1.0] * 8}
    folder = build_tiny_phi3(tmp_path / "src", layers=1, rope_scaling=scaling)
    with pytest.raises(UnsupportedModelError, match="rope scaling 'longrope' is not converted") as info:
        export(folder, tmp_path / "a", ExportOptions(validate=False))
    assert "\n" not in str(info.value) and not (tmp_path / "a").exists()
