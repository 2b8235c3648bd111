"""GPT-2 -> GGUF (llama.cpp's gpt2 architecture): a custom-trained byte-level BPE, F32 and Q8_0
validated against torch, greedy equal to llama-cpp-python direct, refusals in one line."""

from __future__ import annotations

import json
import shutil

import pytest
from gguf_fixtures import check

from conftest import export_to
from edgelm.errors import UnsupportedModelError
from edgelm.export import export
from edgelm.export.options import ExportOptions

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def gpt2_gguf_f32(gpt2_source, tmp_path_factory):
    return export_to(gpt2_source, tmp_path_factory.mktemp("gguf") / "f32", format="gguf", quant="f32")


def header(path):
    reader = gguf.GGUFReader(path)
    fields = {n: f.contents() for n, f in reader.fields.items() if not n.startswith("tokenizer.ggml.token")}
    tensors = {t.name: tuple(int(d) for d in t.shape) for t in reader.tensors}
    return fields, tensors


def test_f32_matches_torch_with_gpt2_layout_and_tokenizer(gpt2_gguf_f32, gpt2_source):
    from edgelm.artifact import read_manifest

    manifest = read_manifest(gpt2_gguf_f32)
    assert (manifest.family, manifest.format, manifest.quant) == ("gpt2", "gguf", "f32")
    assert manifest.validation_passed
    assert check(manifest, "max_abs_logit_diff_vs_torch").value <= 1e-4
    assert check(manifest, "tokenizer_parity").value == 1.0
    fields, tensors = header(gpt2_gguf_f32 / "model.gguf")
    config = json.loads((gpt2_source / "config.json").read_text())
    assert fields["general.architecture"] == "gpt2"
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert len(fields["tokenizer.ggml.merges"]) > 0
    assert fields["gpt2.context_length"] == config["n_positions"]
    assert fields["gpt2.feed_forward_length"] == 4 * config["n_embd"]  # n_inner is null
    width = config["n_embd"]
    # ggml order (row length first): Conv1D weights transposed, the fused q|k|v kept as one tensor
    assert tensors["blk.0.attn_qkv.weight"] == (width, 3 * width)
    assert tensors["blk.0.ffn_up.weight"] == (width, 4 * width)
    assert tensors["blk.0.ffn_down.weight"] == (4 * width, width)
    assert tensors["position_embd.weight"] == (width, config["n_positions"])
    assert "blk.0.attn_norm.bias" in tensors and "output_norm.bias" in tensors
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd


def test_q8_0_validates_by_kl_and_perplexity(gpt2_source, tmp_path):
    manifest = export(gpt2_source, tmp_path / "q8", ExportOptions(format="gguf", quant="q8_0"))
    assert manifest.validation_passed
    from edgelm.families import FAMILIES

    bound = FAMILIES["gpt2"].spec("gguf").quant("q8_0").bound("mean_kl_vs_torch")  # the calibrated table's
    assert check(manifest, "mean_kl_vs_torch").threshold == bound
    assert check(manifest, "held_out_perplexity_ratio_vs_torch").passed
    _, tensors = header(tmp_path / "q8" / "model.gguf")
    reader = gguf.GGUFReader(tmp_path / "q8" / "model.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_qkv.weight"] == "Q8_0"


def test_f16_picks_torchs_token_wherever_torch_is_decisive(gpt2_source, tmp_path):
    manifest = export(gpt2_source, tmp_path / "f16", ExportOptions(format="gguf", quant="f16"))
    decisive = check(manifest, "top1_agreement_decisive_vs_torch")
    assert manifest.validation_passed and decisive.value == 1.0 and "top-2 logit margin >= 0.05" in decisive.note
    assert manifest.model.tensor_types["F16"] > 0


def test_greedy_through_edgelm_equals_llama_cpp_python_direct(gpt2_gguf_f32):
    import llama_cpp

    import edgelm

    prompt, n = "The function returns", 12
    with edgelm.load(gpt2_gguf_f32, threads=1) as model:
        ours = model.encode(prompt)
        text = model.generate(prompt, max_tokens=n, temperature=0)
    llm = llama_cpp.Llama(str(gpt2_gguf_f32 / "model.gguf"), n_ctx=128, n_threads=1, verbose=False)
    try:
        tokens = llm.tokenize(prompt.encode(), add_bos=False, special=True)
        assert list(ours) == list(tokens)
        theirs = []
        for token in llm.generate(tokens, temp=0.0, repeat_penalty=1.0, top_k=1):
            if llm.token_eos() == token or len(theirs) == n:
                break
            theirs.append(token)
        expected = llm.detokenize(theirs).decode("utf-8", errors="replace")
    finally:
        llm.close()
    assert len(theirs) > 3 and text == expected


def test_untied_head_and_n_inner_convert(tmp_path, gpt2_source):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "untied"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (gpt2_source / name).exists():
            shutil.copy(gpt2_source / name, folder / name)
    vocab = json.loads((gpt2_source / "config.json").read_text())["vocab_size"]
    torch.manual_seed(1)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=64, n_inner=96, n_positions=64, vocab_size=vocab,
                        tie_word_embeddings=False)
    GPT2LMHeadModel(config).save_pretrained(folder)
    manifest = export(folder, tmp_path / "a", ExportOptions(format="gguf", quant="f32"))
    assert manifest.validation_passed
    fields, tensors = header(tmp_path / "a" / "model.gguf")
    assert fields["gpt2.feed_forward_length"] == 96 and fields["gpt2.context_length"] == 64
    assert tensors["output.weight"] == (64, vocab)


def _rewrite_tokenizer(folder, change):
    data = json.loads((folder / "tokenizer.json").read_text())
    change(data)
    (folder / "tokenizer.json").write_text(json.dumps(data))


def test_a_split_rule_llama_cpp_lacks_is_refused_in_one_line(gpt2_source, tmp_path):
    folder = shutil.copytree(gpt2_source, tmp_path / "src")
    _rewrite_tokenizer(folder, lambda d: d.update(pre_tokenizer={"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"\d|[a-z]+|\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}))
    with pytest.raises(UnsupportedModelError, match="matches no llama.cpp pre-tokenizer") as info:
        export(folder, tmp_path / "a", ExportOptions(format="gguf", quant="f32"))
    assert "\n" not in str(info.value) and not (tmp_path / "a").exists()


@pytest.mark.parametrize("change, message", [
    ({"activation_function": "relu"}, "activation_function 'relu'"),
    ({"scale_attn_by_inverse_layer_idx": True}, "per-layer attention scaling"),
])
def test_options_llama_cpp_does_not_compute_are_refused(gpt2_source, tmp_path, change, message):
    folder = shutil.copytree(gpt2_source, tmp_path / "src")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(UnsupportedModelError, match=message):
        export(folder, tmp_path / "a", ExportOptions(format="gguf", quant="f32"))


def test_onnx_stays_the_default_format_for_gpt2():
    from edgelm.families import FAMILIES

    gpt2 = FAMILIES["gpt2"]
    assert gpt2.formats == ("onnx", "gguf")
    assert gpt2.spec("gguf").quant("q8_0").ftype == 7 and gpt2.spec("onnx").quant(None).name == "none"


def test_a_bare_gpt2_gguf_is_labelled_by_its_header_and_runs(gpt2_gguf_f32, tmp_path):
    import edgelm
    from edgelm.runtime import info

    bare = tmp_path / "downloaded.gguf"
    shutil.copy(gpt2_gguf_f32 / "model.gguf", bare)
    manifest = info(bare)
    assert (manifest.family, manifest.quant, manifest.model.architecture) == ("gpt2", "f32", "gpt2")
    with edgelm.load(bare, threads=1) as model, edgelm.load(gpt2_gguf_f32, threads=1) as exported:
        assert model.generate("The function", max_tokens=6, temperature=0) == \
            exported.generate("The function", max_tokens=6, temperature=0)


def test_an_architecture_edgelm_does_not_export_keeps_its_own_name(tmp_path):
    from edgelm.runtime.gguf.parser import GgufHeader, manifest_from_header

    header = GgufHeader(version=3, metadata={"general.architecture": "gemma2", "general.file_type": 15,
                                             "gemma2.context_length": 8192})
    manifest = manifest_from_header(tmp_path / "m.gguf", header)
    assert (manifest.family, manifest.quant, manifest.model.architecture) == ("gemma2", "q4_k_m", "gemma2")


def test_edgelm_run_streams_what_generate_returns(gpt2_gguf_f32):
    from click.testing import CliRunner

    import edgelm
    from edgelm.cli import main

    result = CliRunner().invoke(main, ["run", str(gpt2_gguf_f32), "The function", "--temperature", "0",
                                       "--max-tokens", "8", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    with edgelm.load(gpt2_gguf_f32, threads=1) as model:
        expected = model.generate("The function", max_tokens=8, temperature=0)
    assert json.loads(result.output)["text"] == expected
