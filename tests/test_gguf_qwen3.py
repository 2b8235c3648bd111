"""Qwen3 -> GGUF: per-head q/k RMSNorm, head_dim wider than hidden / heads, tied embeddings, ChatML."""

from __future__ import annotations

import json

import pytest
from gguf_fixtures import check
from tiny_archs import build_tiny_qwen3

from conftest import export_to
from edgelm.errors import UnsupportedModelError
from edgelm.export import export
from edgelm.export.options import ExportOptions
from llama_fixtures import copy_folder

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def qwen3_source(tmp_path_factory):
    return build_tiny_qwen3(tmp_path_factory.mktemp("qwen3") / "source")


@pytest.fixture(scope="module")
def qwen3_f32(qwen3_source, tmp_path_factory):
    return export_to(qwen3_source, tmp_path_factory.mktemp("qwen3") / "f32", quant="f32")


def test_f32_matches_torch_with_qk_norms(qwen3_f32):
    from edgelm.artifact import read_manifest

    manifest = read_manifest(qwen3_f32)
    assert (manifest.family, manifest.format, manifest.quant) == ("qwen3", "gguf", "f32")
    assert manifest.validation_passed and check(manifest, "max_abs_logit_diff_vs_torch").value <= 1e-4
    assert check(manifest, "tokenizer_parity").value == 1.0
    assert check(manifest, "chat_template_parity").value == 1.0
    reader = gguf.GGUFReader(qwen3_f32 / "model.gguf")
    fields = {n: f.contents() for n, f in reader.fields.items() if not n.startswith("tokenizer.ggml.token")}
    tensors = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    assert fields["general.architecture"] == "qwen3" and fields["tokenizer.ggml.pre"] == "qwen2"
    assert fields["qwen3.attention.key_length"] == 32 and fields["qwen3.rope.dimension_count"] == 32
    assert tensors["blk.0.attn_q_norm.weight"] == (32,) and tensors["blk.1.attn_k_norm.weight"] == (32,)
    assert tensors["blk.0.attn_q.weight"] == (64, 4 * 32)  # 4 heads of 32 from a 64-wide stream
    assert "output.weight" not in tensors  # tied


def test_q8_0_validates(qwen3_source, tmp_path):
    manifest = export(qwen3_source, tmp_path / "q8", ExportOptions(quant="q8_0"))
    assert manifest.validation_passed and check(manifest, "mean_kl_vs_torch").passed


def test_chat_runs_through_edgelm(qwen3_f32):
    import edgelm

    with edgelm.load(qwen3_f32, threads=1) as model:
        reply = model.chat([{"role": "user", "content": "What is a list?"}], max_tokens=8, temperature=0)
    assert isinstance(reply, str)


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"attention_bias": True}, "attention biases"),
])
def test_what_llama_cpp_computes_differently_is_refused(qwen3_source, tmp_path, change, message):
    folder = copy_folder(qwen3_source, tmp_path / "src")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UnsupportedModelError, match=message) as info:
        export(folder, tmp_path / "a", ExportOptions(validate=False))
    assert "\n" not in str(info.value) and not (tmp_path / "a").exists()
