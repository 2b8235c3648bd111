"""`edgelm eval`: llama-perplexity's protocol through the loaded artifact, and --base comparisons."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from trained_fixtures import train_tiny_hf

from conftest import export_to
from edgelm import metrics
from edgelm.cli import main
from edgelm.errors import InputError


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory):
    """A tiny trained GPT-2 as ONNX fp32 and its GGUF F32 twin."""
    folder = tmp_path_factory.mktemp("gpt2")
    source = train_tiny_hf(folder / "model", "gpt2")
    return export_to(source, folder / "onnx", quant="none"), export_to(source, folder / "gguf", format="gguf",
                                                                       quant="f32")


def run_json(*args) -> dict:
    result = CliRunner().invoke(main, ["eval", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_onnx_and_gguf_twins_agree_within_half_a_percent(gpt2_pair):
    onnx, gguf = gpt2_pair
    a, b = run_json(onnx, "--chunks", "4"), run_json(gguf, "--chunks", "4")
    assert a["tokens_scored"] == b["tokens_scored"] == 4 * 31  # ctx 64: positions 32..62 of each chunk
    assert abs(a["perplexity"] / b["perplexity"] - 1) < 0.005
    assert set(a) == {"perplexity", "perplexity_error", "tokens_scored"}


def test_base_against_itself_is_kl_zero_and_top1_one(gpt2_pair):
    onnx, gguf = gpt2_pair
    same = run_json(onnx, "--base", onnx, "--chunks", "2")
    assert same["kl_divergence"] == pytest.approx(0, abs=1e-12) and same["top1_agreement"] == 1.0
    assert same["perplexity_ratio"] == pytest.approx(1.0)
    twin = run_json(gguf, "--base", onnx, "--chunks", "2")
    assert 0 <= twin["kl_divergence"] < 1e-6 and twin["kl_divergence_p99"] >= twin["kl_divergence"] * 0.5


def test_text_shorter_than_two_chunks_is_one_line(gpt2_pair, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("A few words only.", encoding="utf-8")
    result = CliRunner().invoke(main, ["eval", str(gpt2_pair[0]), "--text", str(text)])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "two chunks" in result.output


def test_base_with_another_tokenizer_is_refused(gpt2_pair, tmp_path):
    other = export_to(train_tiny_hf(tmp_path / "m", "gpt2", vocab_size=300), tmp_path / "a")
    result = CliRunner().invoke(main, ["eval", str(gpt2_pair[0]), "--base", str(other), "--chunks", "1"])
    assert result.exit_code == 1 and "do not share a tokenizer" in result.output


def test_ctx_beyond_the_model_is_a_usage_error(gpt2_pair):
    result = CliRunner().invoke(main, ["eval", str(gpt2_pair[0]), "--ctx", "65"])
    assert result.exit_code == 2 and "context length 64" in result.output


def test_recurrent_models_are_scored_the_same_way(lstm_artifact):
    result = run_json(lstm_artifact, "--ctx", "32", "--chunks", "3")
    assert result["tokens_scored"] == 3 * 15 and result["perplexity"] > 1


# -- the metrics module ---------------------------------------------------------------------------
def test_chunks_drop_the_tail_and_start_with_bos():
    chunks = metrics.perplexity_chunks(list(range(10, 30)), 8, bos_id=1)
    assert chunks == [[1, *range(11, 18)], [1, *range(19, 26)]]
    assert list(metrics.scored_positions(8)) == [4, 5, 6]
    with pytest.raises(InputError, match="two chunks"):
        metrics.perplexity_chunks(list(range(15)), 8)


def test_perplexity_error_is_llama_perplexity_formula():
    nll = np.array([1.0, 2.0, 3.0, 4.0])
    ppl = np.exp(2.5)
    assert metrics.perplexity(nll) == pytest.approx(ppl)
    assert metrics.perplexity_error(nll) == pytest.approx(np.sqrt(1.25 / 3) * ppl)


def test_kl_and_top1_on_known_distributions():
    p = np.log(np.array([[0.5, 0.5], [0.9, 0.1]]))
    q = np.log(np.array([[0.5, 0.5], [0.1, 0.9]]))
    kl = metrics.kl_divergence(p, q)
    assert kl[0] == pytest.approx(0) and kl[1] == pytest.approx(0.8 * np.log(9))
    assert metrics.top1_agreement(p, q) == 0.5
    result = metrics.compare(q, [0, 1], base_logits=p)
    assert result.perplexity_ratio == pytest.approx(np.exp((np.log(2) + np.log(1 / 0.9)) / 2 - np.log(2) / 2
                                                           - np.log(10) / 2))


def test_coarsened_kl_on_a_hand_computed_case():
    """p = (.5, .3, .2), q = (.2, .3, .5): the reference's top-k tokens kept, the rest one bucket."""
    p, q = np.log([[0.5, 0.3, 0.2]]), np.log([[0.2, 0.3, 0.5]])
    expected = {1: 0.5 * np.log(0.5 / 0.2) + 0.5 * np.log(0.5 / 0.8),
                2: 0.5 * np.log(0.5 / 0.2) + 0.3 * np.log(1.0) + 0.2 * np.log(0.2 / 0.5),
                3: float(metrics.kl_divergence(p, q)[0])}
    for k, value in expected.items():
        ids, logp = metrics.top_k_log_probs(p, k)
        assert ids.dtype == np.int32 and logp.dtype == np.float32 and ids[0].tolist() == [0, 1, 2][:k]
        assert metrics.mean_coarsened_kl(ids, logp, q) == pytest.approx(value, rel=1e-6)


def test_top_k_keeps_argmax_first_on_ties():
    ids, logp = metrics.top_k_log_probs(np.array([[1.0, 3.0, 3.0, 0.0]]), 3)
    assert ids[0].tolist() == [1, 2, 0] and ids[0, 0] == np.argmax([1.0, 3.0, 3.0, 0.0])


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 40), st.floats(0.01, 8.0), st.floats(0.0, 3.0))
def test_coarsened_kl_is_a_lower_bound_equal_at_full_vocabulary(seed, vocab, scale, noise):
    rng = np.random.default_rng(seed)
    p = rng.normal(size=(4, vocab)) * scale
    q = p + rng.normal(size=(4, vocab)) * noise
    full = metrics.kl_divergence(p, q)
    for k in range(1, vocab + 1):
        ids, logp = metrics.top_k_log_probs(p, k)
        assert (metrics.coarsened_kl(ids, logp, q) <= full + 1e-5 + 1e-4 * full).all(), k
    ids, logp = metrics.top_k_log_probs(p, vocab)
    np.testing.assert_allclose(metrics.coarsened_kl(ids, logp, q), full, rtol=1e-4, atol=1e-5)


def test_a_held_out_text_linked_out_of_the_source_folder_is_refused(tmp_path):
    from types import SimpleNamespace

    from edgelm.commands.eval import default_text

    secret = tmp_path / "elsewhere.txt"
    secret.write_text("not the source's text", encoding="utf-8")
    source = tmp_path / "source"
    source.mkdir()
    (source / "held_out.txt").symlink_to(secret)
    manifest = SimpleNamespace(source=SimpleNamespace(path=str(source)))
    with pytest.raises(InputError, match="held_out.txt"):
        default_text(manifest)
    (source / "held_out.txt").unlink()
    (source / "held_out.txt").write_text("the source's own text", encoding="utf-8")
    assert default_text(manifest).text == "the source's own text"
