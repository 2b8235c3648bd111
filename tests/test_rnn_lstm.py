"""RNN and LSTM end to end: train, export fp32/int8, validate, load and generate."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import TINY, export_to, train_tiny
from edgelm.artifact import read_manifest
from edgelm.errors import ContextOverflowError, ValidationError
from edgelm.runtime import load


def test_same_seed_gives_the_same_weights(tmp_path):
    runs = {name: train_tiny(tmp_path / name, "lstm", steps=8, seed=seed)
            for name, seed in (("a", 0), ("b", 0), ("c", 1))}
    weights = {name: (folder / "model.safetensors").read_bytes() for name, folder in runs.items()}
    assert weights["a"] == weights["b"]
    assert weights["a"] != weights["c"]


def test_trained_folder_holds_config_safetensors_and_tokenizer(lstm_model):
    config = json.loads((lstm_model / "config.json").read_text())
    assert config["model_type"] == "edgelm-lstm" and config["hidden_size"] == TINY["hidden"]
    assert config["training"]["held_out_perplexity"] > 1
    assert {p.name for p in lstm_model.iterdir()} >= {"config.json", "model.safetensors", "tokenizer.json"}


@pytest.mark.parametrize("quant", ["none", "int8"])
def test_export_validates_and_generates(recurrent_model, tmp_path, quant):
    out = export_to(recurrent_model, tmp_path / f"art-{quant}", quant=quant)
    manifest = read_manifest(out, verify=True)
    assert manifest.validation_passed
    names = {c.name: c for c in manifest.validation}
    if quant == "none":
        assert names["max_abs_logit_diff_vs_torch"].value <= 1e-4
        assert names["max_abs_state_diff_vs_torch"].value <= 1e-4
        assert names["held_out_perplexity"].value == pytest.approx(names["held_out_perplexity_torch"].value, rel=1e-4)
    else:
        assert 0.5 < names["top1_agreement_vs_torch"].value <= 1.0
        assert names["held_out_perplexity_ratio_int8_vs_fp32"].threshold == 1.02
    with load(out) as generator:
        text = generator.generate("The ", max_tokens=20, temperature=0)
        assert isinstance(text, str) and text
        assert generator.complete("The ", max_tokens=20, temperature=0).completion_tokens == 20


def test_prefill_then_step_equals_torch_on_the_full_sequence(lstm_model, lstm_artifact):
    import torch

    from edgelm.models.recurrent import load_model

    model = load_model(lstm_model)
    ids = [5, 9, 2, 14, 3, 7, 7, 1, 20, 11]
    with torch.no_grad():
        full = model(torch.tensor([ids]), *model.initial_state(1))[0][0].numpy()  # (T, V)
    with load(lstm_artifact) as generator:
        decoder = generator.decoder
        rows = [decoder.prefill(ids[:4])] + [decoder.step(t) for t in ids[4:]]
    np.testing.assert_allclose(np.stack(rows), full[3:], atol=1e-4)


def test_a_broken_export_fails_validation_and_leaves_no_artifact(lstm_model, tmp_path, monkeypatch):
    import onnx

    from edgelm.export import recurrent

    original = recurrent._write_onnx

    def write_then_corrupt(model, path):
        original(model, path)
        graph = onnx.load(str(path))
        head = next(t for t in graph.graph.initializer if t.dims and t.dims[0] == model.config.vocab_size and len(t.dims) == 1)
        values = np.frombuffer(head.raw_data, np.float32).copy() + 0.01  # a tiny bias shift
        head.raw_data = values.tobytes()
        onnx.save(graph, str(path))

    monkeypatch.setattr(recurrent, "_write_onnx", write_then_corrupt)
    out = tmp_path / "broken"
    with pytest.raises(ValidationError, match="max_abs_logit_diff_vs_torch"):
        export_to(lstm_model, out)
    assert not out.exists() and not list(tmp_path.glob(".broken*"))
    skipped = export_to(lstm_model, tmp_path / "unchecked", validate=False)
    assert read_manifest(skipped).validation_skipped


def test_streamed_pieces_join_to_the_generated_text(lstm_bpe_artifact):
    with load(lstm_bpe_artifact) as generator:
        params = dict(max_tokens=40, temperature=1.0, seed=3)
        pieces = list(generator.stream("The ", **params))
        assert len(pieces) > 1
        assert "".join(pieces) == generator.generate("The ", **params)
        assert generator.generate("The ", **params) != generator.generate("The ", max_tokens=40, temperature=1.0, seed=4)


def test_stop_string_ends_generation_without_leaking(lstm_artifact):
    with load(lstm_artifact) as generator:
        free = generator.generate("The ", max_tokens=60, temperature=0)
        stop = free[20:23]  # three characters that greedy decoding really produces
        result = generator.complete("The ", max_tokens=60, temperature=0, stop=[stop])
    assert stop not in result.text
    assert result.text == free[: free.index(stop)]
    assert result.finish_reason == "stop"


def test_unicode_prompt_and_unknown_characters_do_not_break(lstm_bpe_artifact, lstm_artifact):
    # char tokenizer: emoji and CJK are unseen (<unk>); byte-level BPE: they span several tokens
    for artifact in (lstm_bpe_artifact, lstm_artifact):
        with load(artifact) as generator:
            params = dict(max_tokens=10, temperature=0.9, seed=1)
            result = generator.complete("😀 日本 ", **params)
            assert result.prompt_tokens >= 3 and result.completion_tokens == 10
            assert "".join(generator.stream("😀 日本 ", **params)) == result.text


def test_recurrent_models_have_no_context_limit(lstm_artifact):
    with load(lstm_artifact) as generator:
        assert generator.decoder.context_length is None
        generator.decoder.context_length = 8  # a decoder with a limit: the shared policy applies
        with pytest.raises(ContextOverflowError, match="exceeds the context length 8"):
            generator.generate("The quick fox", max_tokens=4)
        result = generator.complete("The quick fox", max_tokens=4, truncate=True)
        assert result.truncated_prompt_tokens == 9 and result.prompt_tokens == 4


def test_public_api_export_is_callable_even_after_submodule_imports(lstm_model, tmp_path):
    import edgelm
    import edgelm.export.options  # noqa: F401  (binding the subpackage must not shadow the call)

    manifest = edgelm.export(lstm_model, tmp_path / "a", quant="int8")
    assert manifest.quant == "int8" and manifest.validation_passed
    with edgelm.load(tmp_path / "a") as model:
        assert model.generate("The ", max_tokens=5, temperature=0)


def test_a_closed_model_says_so(lstm_artifact):
    from edgelm.errors import InputError

    with load(lstm_artifact) as generator:
        pass
    with pytest.raises(InputError, match="closed"):
        generator.generate("The ", max_tokens=3)
