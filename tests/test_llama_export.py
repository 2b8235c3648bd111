"""LLaMA -> GGUF: conversion, F32 parity, every quantization, tokenizer and template parity, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from gguf_fixtures import check

from edgelm.artifact import read_manifest
from edgelm.errors import ExportError, UnsupportedModelError, ValidationError
from edgelm.export import export
from edgelm.export.gguf_tensors import interleave_rotary_rows
from edgelm.export.options import ExportOptions
from llama_fixtures import build_tiny_llama, copy_folder

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="session")
def bpe_llama(tmp_path_factory):
    """Byte-level BPE (llama3 split), hidden 256 so K-quants apply, GQA 4:2, untied."""
    return build_tiny_llama(tmp_path_factory.mktemp("llama") / "bpe", tokenizer="bpe")


@pytest.fixture(scope="session")
def spm_llama(tmp_path_factory):
    """SentencePiece, tied embeddings, llama3 rope scaling, template in chat_template.jinja."""
    return build_tiny_llama(tmp_path_factory.mktemp("llama") / "spm", tokenizer="spm",
                            tie_embeddings=True, rope_scaling="llama3", template_in_jinja_file=True)


@pytest.fixture(scope="session")
def narrow_mistral(tmp_path_factory):
    """Hidden 64 (rows too short for K-quants), Mistral's name, GPT-2 pre-tokenizer, linear rope."""
    return build_tiny_llama(tmp_path_factory.mktemp("llama") / "narrow", tokenizer="bpe", hidden=64,
                            heads=2, kv_heads=1, model_type="mistral", pretokenizer="gpt2")


def _gguf_fields(path):
    reader = gguf.GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("tokenizer.ggml.token")}
    return fields, {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape)) for t in reader.tensors}


def test_rotary_rows_interleave_each_heads_halves():
    w = np.arange(2 * 8 * 3).reshape(16, 3)  # 2 heads of head_dim 8, 3 input columns
    out = interleave_rotary_rows(w, n_heads=2)
    # head 0: rows 0..3 are the first halves, 4..7 the second; pairs become adjacent
    assert [r // 3 for r in out[:, 0][:8]] == [0, 4, 1, 5, 2, 6, 3, 7]
    assert [r // 3 for r in out[:, 0][8:]] == [8, 12, 9, 13, 10, 14, 11, 15]


def test_f32_bpe_export_matches_torch_and_fills_the_contract(bpe_llama, tmp_path):
    seen = []
    options = ExportOptions(format="gguf", quant="f32", progress=lambda *a: seen.append(a))
    manifest = export(bpe_llama, tmp_path / "a", options)
    assert manifest.validation_passed
    assert check(manifest, "max_abs_logit_diff_vs_torch").value <= 1e-4
    assert check(manifest, "tokenizer_parity").value == 1.0
    assert check(manifest, "chat_template_parity").value == 1.0
    on_disk = read_manifest(tmp_path / "a", verify=True)
    assert (on_disk.family, on_disk.format, on_disk.quant) == ("llama", "gguf", "f32")
    tok, gen, model = on_disk.tokenizer, on_disk.generation, on_disk.model
    assert (tok.kind, tok.file, tok.pre) == ("bpe", "model.gguf", "llama-bpe")
    assert gen.add_bos is True and tok.bos_id == 507 and tok.eos_id == 508
    assert gen.stop == ("<|end_of_text|>", "<|eot_id|>") and model.context_length == 256
    assert "<|start_header_id|>" in gen.chat_template
    assert (model.num_kv_heads, model.num_heads, model.hidden_size) == (2, 4, 256)
    assert model.tensor_types == {"F32": 21} and model.fallbacks == ()
    convert = [a for a in seen if a[0] == "convert"]
    assert convert[-1] == ("convert", 21, 21) and len(convert) == 22  # one step per tensor
    fields, tensors = _gguf_fields(tmp_path / "a" / "model.gguf")
    assert fields["llama.attention.head_count_kv"] == 2 and fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert fields["tokenizer.ggml.eot_token_id"] == 509 and "output.weight" in tensors
    assert fields["general.file_type"] == 0


def test_spm_tied_llama3_rope_export_matches_torch(spm_llama, tmp_path):
    manifest = export(spm_llama, tmp_path / "a", ExportOptions(format="gguf", quant="f32"))
    assert manifest.validation_passed
    assert check(manifest, "max_abs_logit_diff_vs_torch").value <= 1e-4
    assert check(manifest, "tokenizer_parity").value == 1.0
    assert check(manifest, "chat_template_parity").value == 1.0  # template read from the .jinja file
    assert manifest.tokenizer.kind == "spm" and manifest.generation.stop == ("</s>",)
    fields, tensors = _gguf_fields(tmp_path / "a" / "model.gguf")
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd
    assert tensors["rope_freqs.weight"] == ("F32", (32,))
    assert fields["tokenizer.ggml.model"] == "llama" and fields["tokenizer.ggml.add_space_prefix"] is True


def test_rope_freqs_change_the_logits_when_left_out(spm_llama, tmp_path, monkeypatch):
    """Without the llama3 factors llama.cpp's rotary angles differ from torch: validation must fail."""
    import edgelm.export.gguf as gguf_export

    monkeypatch.setattr(gguf_export, "rope_freqs_plan", lambda config, shape: None)
    with pytest.raises(ValidationError, match="max_abs_logit_diff_vs_torch"):
        export(spm_llama, tmp_path / "a", ExportOptions(format="gguf", quant="f32"))
    assert not (tmp_path / "a").exists()


def test_missing_rotary_permutation_fails_validation(bpe_llama, tmp_path, monkeypatch):
    import edgelm.export.gguf_tensors as tensors

    monkeypatch.setattr(tensors, "interleave_rotary_rows", lambda w, n_heads: w)
    with pytest.raises(ValidationError, match="max_abs_logit_diff_vs_torch"):
        export(bpe_llama, tmp_path / "a", ExportOptions(format="gguf", quant="f32"))
    assert not (tmp_path / "a").exists() and not list(tmp_path.glob(".a.partial-*"))


def test_mistral_name_gpt2_pretokenizer_and_float16_through_the_cli(narrow_mistral, tmp_path):
    from edgelm.cli import main

    result = CliRunner().invoke(main, ["export", str(narrow_mistral), "--out", str(tmp_path / "a"),
                                       "--format", "gguf", "--quant", "f16"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(tmp_path / "a")
    assert manifest.tokenizer.pre == "gpt-2" and manifest.source.architectures == ("MistralForCausalLM",)
    assert check(manifest, "top1_agreement_decisive_vs_torch").value == 1.0
    assert check(manifest, "tokenizer_parity").value == 1.0
    assert manifest.model.tensor_types == {"F16": 16, "F32": 5}  # norms stay F32


@pytest.mark.parametrize("quant, expected", [
    ("bf16", {"BF16"}), ("q8_0", {"Q8_0"}), ("q6_k", {"Q6_K"}), ("q5_k_m", {"Q5_K", "Q6_K"}),
    ("q4_k_m", {"Q4_K", "Q6_K"}), ("q4_0", {"Q4_0"}),
])
def test_each_quantization_validates_with_its_real_types(bpe_llama, tmp_path, quant, expected):
    manifest = export(bpe_llama, tmp_path / quant, ExportOptions(format="gguf", quant=quant))
    assert manifest.validation_passed and manifest.quant == quant
    types = set(manifest.model.tensor_types) - {"F32"}  # norms stay F32
    assert types & expected, types
    assert types <= expected | {"Q6_K", "Q8_0"}, types  # llama.cpp's mixes keep some tensors higher
    assert manifest.model.fallbacks == ()  # hidden 256: every row fits the block size
    if quant != "bf16":
        assert check(manifest, "mean_kl_vs_torch").threshold is not None
        assert check(manifest, "held_out_perplexity_ratio_vs_torch").passed
    fields, _ = _gguf_fields(tmp_path / quant / "model.gguf")
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"  # vocabulary survives quantization


def test_k_quant_fallbacks_on_short_rows_are_recorded(narrow_mistral, tmp_path):
    with pytest.warns(UserWarning, match="stored .* tensor\\(s\\) in another type than q4_k_m"):
        manifest = export(narrow_mistral, tmp_path / "a", ExportOptions(format="gguf", quant="q4_k_m"))
    fallbacks = manifest.model.fallbacks
    assert fallbacks and manifest.model.fallback_count == len(fallbacks)
    for entry in fallbacks:
        assert entry["wanted"] in ("Q4_K", "Q6_K", "Q5_K") and entry["used"] not in (entry["wanted"], "unknown")
        assert "not a multiple of 256" in entry["reason"]
    assert "Q4_K" not in manifest.model.tensor_types


def test_quantizer_failure_is_one_clear_error(tmp_path):
    from edgelm.export.gguf_quantize import quantize_gguf

    broken = tmp_path / "broken.gguf"
    broken.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 40)
    with pytest.raises(ExportError, match="llama.cpp could not quantize to q8_0"):
        quantize_gguf(broken, tmp_path / "out.gguf", "q8_0")


def test_unknown_pretokenizer_is_refused_before_writing(bpe_llama, tmp_path):
    folder = copy_folder(bpe_llama, tmp_path / "src")
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = {"type": "Whitespace"}
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(UnsupportedModelError, match="matches no llama.cpp pre-tokenizer"):
        export(folder, tmp_path / "a", ExportOptions(format="gguf"))
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("change, message", [
    (lambda f: (f / "model.safetensors").rename(f / "pytorch_model.bin"), "only safetensors"),
    (lambda f: _edit_config(f, rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope scaling 'yarn'"),
    (lambda f: _edit_config(f, vocab_size=100), "only 100 embedding rows"),
])
def test_unsupported_sources_are_one_line_errors(bpe_llama, tmp_path, change, message):
    folder = copy_folder(bpe_llama, tmp_path / "src")
    change(folder)
    with pytest.raises(UnsupportedModelError, match=message) as info:
        export(folder, tmp_path / "a", ExportOptions(format="gguf", validate=False))
    assert "\n" not in str(info.value)


def _edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))
