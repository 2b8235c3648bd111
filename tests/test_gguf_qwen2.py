"""Qwen2 -> GGUF: attention biases, tied embeddings, rope theta, Qwen2's split rule and ChatML."""

from __future__ import annotations

import json

import pytest
from gguf_fixtures import build_tiny_qwen2, check

from conftest import export_to
from edgelm.errors import UnsupportedModelError
from edgelm.export import export
from edgelm.export.options import ExportOptions
from llama_fixtures import copy_folder

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def qwen2_source(tmp_path_factory):
    return build_tiny_qwen2(tmp_path_factory.mktemp("qwen2") / "source")


@pytest.fixture(scope="module")
def qwen2_f32(qwen2_source, tmp_path_factory):
    return export_to(qwen2_source, tmp_path_factory.mktemp("qwen2") / "f32", quant="f32")


def test_f32_matches_torch_with_biases_tied_head_and_qwen2_tokenizer(qwen2_f32):
    from edgelm.artifact import read_manifest

    manifest = read_manifest(qwen2_f32)
    assert (manifest.family, manifest.format, manifest.quant) == ("qwen2", "gguf", "f32")
    assert manifest.validation_passed and check(manifest, "max_abs_logit_diff_vs_torch").value <= 1e-4
    assert check(manifest, "tokenizer_parity").value == 1.0
    assert check(manifest, "chat_template_parity").value == 1.0
    reader = gguf.GGUFReader(qwen2_f32 / "model.gguf")
    fields = {n: f.contents() for n, f in reader.fields.items() if not n.startswith("tokenizer.ggml.token")}
    tensors = {t.name for t in reader.tensors}
    assert fields["general.architecture"] == "qwen2" and fields["tokenizer.ggml.pre"] == "qwen2"
    assert fields["qwen2.rope.freq_base"] == 1000000.0
    assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= tensors
    assert "output.weight" not in tensors  # tied


def test_q8_0_validates(qwen2_source, tmp_path):
    manifest = export(qwen2_source, tmp_path / "q8", ExportOptions(quant="q8_0"))
    assert manifest.validation_passed and check(manifest, "mean_kl_vs_torch").passed


def test_chat_greedy_equals_llama_cpp_python_direct(qwen2_f32):
    import llama_cpp

    import edgelm

    messages = [{"role": "user", "content": "What is a list?"}]
    with edgelm.load(qwen2_f32, threads=1) as model:
        reply = model.chat(messages, max_tokens=10, temperature=0)
        prompt_ids = model.encode("<|im_start|>user\nWhat is a list?<|im_end|>\n<|im_start|>assistant\n")
    llm = llama_cpp.Llama(str(qwen2_f32 / "model.gguf"), n_ctx=128, n_threads=1, verbose=False)
    try:
        theirs = []
        for token in llm.generate(prompt_ids, temp=0.0, repeat_penalty=1.0, top_k=1):
            if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):  # <|im_end|> ends the reply
                break
            theirs.append(token)
            if len(theirs) == 10:
                break
        expected = llm.detokenize(theirs).decode("utf-8", errors="replace")
    finally:
        llm.close()
    assert reply == expected


def test_yarn_and_sliding_window_are_refused(qwen2_source, tmp_path):
    for change, message in (({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn'"),
                            ({"use_sliding_window": True}, "use_sliding_window")):
        folder = copy_folder(qwen2_source, tmp_path / message.split()[0].strip("'"))
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(UnsupportedModelError, match=message) as info:
            export(folder, tmp_path / "a", ExportOptions(validate=False))
        assert "\n" not in str(info.value)
