"""GPT-2: export with a KV cache (fp32, int8), parity with torch, the decoder loop, bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from gpt2_fixtures import EOS, make_gpt2_source

from conftest import export_to
from edgelm.artifact import MANIFEST_NAME, sha256_of
from edgelm.errors import ArtifactError, ContextOverflowError, InputError, UnsupportedModelError

PROMPTS = ["The function returns", "class A:\n    def", "Lists and tuples are sequences, but"]


@pytest.fixture(scope="session")
def gpt2_optimum(tmp_path_factory) -> Path:
    """head_dim 12 is not one GroupQueryAttention's CPU kernel takes: optimum's graph is exported."""
    source = make_gpt2_source(tmp_path_factory.mktemp("gpt2-hd12") / "source", n_head=4, n_embd=48)
    return export_to(source, tmp_path_factory.mktemp("art") / "gpt2-optimum")


def torch_greedy_text(source: Path, prompt: str, max_tokens: int) -> str:
    """What transformers' greedy generate() continues the prompt with."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(source)
    model = GPT2LMHeadModel.from_pretrained(source).eval()
    encoded = tokenizer(prompt, return_tensors="pt")
    encoded.pop("token_type_ids", None)  # GPT-2's generate() rejects them
    with torch.no_grad():
        out = model.generate(
            **encoded,
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_NAME).read_text())


# -- export and validation ---------------------------------------------------------------
def test_fp32_export_validates_and_records_the_graph(gpt2_fp32):
    manifest = manifest_of(gpt2_fp32)
    assert manifest["family"] == "gpt2" and manifest["quant"] == "none"
    assert manifest["validation_passed"]
    checks = {c["name"]: c for c in manifest["validation"]}
    assert checks["max_abs_logit_diff_vs_torch"]["value"] <= 1e-4
    assert checks["greedy_32_identical_prompts"]["passed"]
    model = manifest["model"]
    assert (model["num_layers"], model["num_heads"], model["head_dim"]) == (2, 2, 32)
    assert model["inputs"][0] == "input_ids" and "past_key_values.1.value" in model["inputs"]
    assert model["context_length"] == 128 and manifest["schema_version"] == 2
    assert model["past_names"][-1] == "past_key_values.1.value" and model["present_names"][0] == "present.0.key"
    eos = manifest["tokenizer"]["eos_id"]
    assert eos is not None and manifest["tokenizer"]["bos_id"] == eos
    assert sorted(manifest["files"]) == ["model.onnx", "reference.npz", "tokenizer.json"]


def test_int8_export_validates_and_is_smaller(gpt2_int8, gpt2_fp32):
    manifest = manifest_of(gpt2_int8)
    assert manifest["quant"] == "int8" and manifest["validation_passed"]
    checks = {c["name"]: c["value"] for c in manifest["validation"]}
    assert checks["top1_agreement_vs_torch"] >= 0.9
    assert checks["held_out_perplexity_ratio_int8_vs_fp32"] <= 1.05
    assert (gpt2_int8 / "model.onnx").stat().st_size < (gpt2_fp32 / "model.onnx").stat().st_size


# -- runtime -----------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_greedy_generation_equals_transformers(gpt2_fp32, gpt2_source, prompt):
    import edgelm

    with edgelm.load(gpt2_fp32) as model:
        ours = model.generate(prompt, temperature=0, max_tokens=24)
    assert ours == torch_greedy_text(gpt2_source, prompt, 24)


def full_recompute_logits(session, ids: list[int]) -> np.ndarray:
    """Every position's logits from one call with an empty cache (optimum's graph)."""
    feed = {
        i.name: np.zeros((1, 4, 0, 12), np.float32)
        for i in session.get_inputs()
        if "past" in i.name
    }
    feed.update(
        input_ids=np.asarray([ids]),
        attention_mask=np.ones((1, len(ids)), np.int64),
        position_ids=np.arange(len(ids))[None],
    )
    return session.run(["logits"], feed)[0][0]


@pytest.mark.parametrize("io_binding", [True, False])
def test_cached_steps_equal_full_recomputation(gpt2_optimum, io_binding):
    import edgelm
    from edgelm.runtime.ort.kv_decoder import KvCacheDecoder

    assert manifest_of(gpt2_optimum)["model"]["graph"] == "optimum"
    with edgelm.load(gpt2_optimum) as model:
        decoder = KvCacheDecoder(model.decoder.session, model.manifest, io_binding=io_binding)
        ids = model.encode("Every object has an identity, a type and a value.")
        reference = full_recompute_logits(decoder.session, ids)
        stepped = [decoder.prefill(ids[:3])] + [decoder.step(t) for t in ids[3:]]
    np.testing.assert_allclose(np.stack(stepped), reference[2:], atol=1e-5)


@pytest.mark.parametrize("artifact", ["gpt2_optimum", "gpt2_fp32"])
def test_score_refuses_an_empty_or_over_long_sequence(artifact, request):
    import edgelm

    with edgelm.load(request.getfixturevalue(artifact)) as model:
        limit = model.decoder.context_length
        for ids in ([], [0] * (limit + 1)):
            with pytest.raises(InputError, match=f"score needs 1 to {limit} tokens, got {len(ids)}"):
                model.decoder.score(ids)
        assert model.decoder.score([0] * limit).shape[0] == limit


@pytest.mark.parametrize(
    "params", [{"temperature": 0}, {"temperature": 0.9, "seed": 7, "top_k": 50}]
)
def test_batch_generation_equals_one_by_one(gpt2_fp32, params):
    import edgelm

    with edgelm.load(gpt2_fp32) as model:
        batch = model.complete_batch(PROMPTS, max_tokens=12, **params)
        alone = [model.complete(p, max_tokens=12, **params) for p in PROMPTS]
    assert [c.text for c in batch] == [c.text for c in alone]
    assert [c.finish_reason for c in batch] == [c.finish_reason for c in alone]
    assert [c.completion_tokens for c in batch] == [c.completion_tokens for c in alone]


def test_batch_rows_stop_independently(gpt2_fp32):
    import edgelm

    with edgelm.load(gpt2_fp32) as model:
        free = model.generate(PROMPTS[1], temperature=0, max_tokens=12)
        stop = free[
            5:8
        ]  # a stop string that the second prompt is known to reach, the others maybe not
        batch = model.complete_batch(PROMPTS, max_tokens=12, temperature=0, stop=[stop])
        alone = [model.complete(p, max_tokens=12, temperature=0, stop=[stop]) for p in PROMPTS]
    assert batch[1].finish_reason == "stop" and stop not in batch[1].text
    assert [(c.text, c.finish_reason, c.completion_tokens) for c in batch] == [
        (c.text, c.finish_reason, c.completion_tokens) for c in alone
    ]


def test_sampling_is_repeatable_with_a_seed(gpt2_int8):
    import edgelm

    with edgelm.load(gpt2_int8) as model:
        first = model.generate(PROMPTS[0], temperature=1.0, seed=3, max_tokens=16)
        again = model.generate(PROMPTS[0], temperature=1.0, seed=3, max_tokens=16)
        other = model.generate(PROMPTS[0], temperature=1.0, seed=4, max_tokens=16)
    assert first == again
    assert first != other


def test_context_overflow_is_an_error_unless_truncating(gpt2_fp32):
    import edgelm

    with edgelm.load(gpt2_fp32) as model:
        prompt = "a, b, c. " * 60
        size = len(model.encode(prompt))
        assert size > 128
        with pytest.raises(
            ContextOverflowError, match=rf"{size} tokens.*max_tokens 10.*context length 128"
        ):
            model.complete(prompt, max_tokens=10)
        done = model.complete(prompt, max_tokens=10, temperature=0, truncate=True)
    assert done.truncated_prompt_tokens == size - 118
    assert done.prompt_tokens == 118


# -- bad inputs ---------------------------------------------------------------------------
def copy_source(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def test_folder_without_tokenizer_is_refused_before_writing(gpt2_source, tmp_path):
    folder = copy_source(gpt2_source, tmp_path / "src")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(UnsupportedModelError, match="no tokenizer files"):
        export_to(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vocab_size_disagreeing_with_embedding_is_refused(gpt2_source, tmp_path):
    folder = copy_source(gpt2_source, tmp_path / "src")
    config = json.loads((folder / "config.json").read_text())
    real = config["vocab_size"]
    config["vocab_size"] = real + 7
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        UnsupportedModelError, match=rf"vocab_size {real + 7}.*embedding matrix.*{real} x 64"
    ):
        export_to(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vocab_and_merges_folder_exports_a_tokenizer_json(gpt2_source, tmp_path):
    """Older GPT-2 folders carry vocab.json + merges.txt only; the artifact still gets tokenizer.json."""
    from tokenizers import Tokenizer

    folder = copy_source(gpt2_source, tmp_path / "src")
    original = Tokenizer.from_file(str(folder / "tokenizer.json"))
    (folder / "tokenizer.json").unlink()
    original.model.save(str(folder))  # vocab.json, merges.txt
    config = {
        "tokenizer_class": "GPT2Tokenizer",
        "eos_token": EOS,
        "bos_token": EOS,
        "unk_token": EOS,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    art = export_to(folder, tmp_path / "out", validate=False)
    rebuilt = Tokenizer.from_file(str(art / "tokenizer.json"))
    text = "def f(x):\n    return x + 1  # naïve"
    assert rebuilt.encode(text).ids == original.encode(text).ids
    assert manifest_of(art)["validation_skipped"]


def test_onnx_inputs_not_matching_the_manifest_are_refused(gpt2_fp32, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    import edgelm

    art = shutil.copytree(gpt2_fp32, tmp_path / "art")
    x = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["b", "t"])
    y = helper.make_tensor_value_info("logits", TensorProto.INT64, ["b", "t"])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["logits"])], "other", [x], [y]
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), art / "model.onnx"
    )
    manifest = manifest_of(art)  # keep sizes and hashes honest so only the graph is wrong
    path = art / "model.onnx"
    manifest["files"]["model.onnx"] = {"size": path.stat().st_size, "sha256": sha256_of(path)}
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(
        ArtifactError, match=r"edgelm.json: model.inputs \[.*\] do not match the graph's \['input_ids'\]"
    ):
        edgelm.load(art)



@pytest.mark.parametrize(("field", "value", "message"), [
    ("num_heads", 4, "model.num_heads is 4, but the graph's past_key_values.0.key shape says 2"),
    ("head_dim", 16, "model.head_dim is 16, but the graph's past_key_values.0.key shape says 32"),
    ("past_names", ["past_key_values.0.key"], "model.past_names and model.present_names must hold a key and a value"),
    ("vocab_size", 100_000, "model.vocab_size is 100000, but the graph's logits width says"),
    ("context_length", 4096, "model.context_length 4096 exceeds the graph's position table of 128 positions"),
])
def test_cache_geometry_in_the_manifest_must_match_the_graph(gpt2_fp32, tmp_path, field, value, message):
    import edgelm

    art = shutil.copytree(gpt2_fp32, tmp_path / "art")
    manifest = manifest_of(art)
    manifest["model"][field] = value
    (art / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=message):
        edgelm.load(art)

# -- CLI ----------------------------------------------------------------------------------
def test_cli_run_streams_the_greedy_continuation(gpt2_fp32, gpt2_source):
    from click.testing import CliRunner

    from edgelm.cli import main

    result = CliRunner().invoke(
        main, ["run", str(gpt2_fp32), PROMPTS[2], "--temperature", "0", "--max-tokens", "16"]
    )
    assert result.exit_code == 0, result.output
    assert result.output == torch_greedy_text(gpt2_source, PROMPTS[2], 16) + "\n"


def test_cli_export_error_is_one_line(gpt2_source, tmp_path):
    from click.testing import CliRunner

    from edgelm.cli import main

    folder = copy_source(gpt2_source, tmp_path / "src")
    (folder / "model.safetensors").unlink()
    result = CliRunner().invoke(main, ["export", str(folder), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and result.output.count("\n") == 1
    assert "model.safetensors" in result.output


def test_running_a_gpt2_artifact_imports_no_training_stack(gpt2_int8):
    import subprocess
    import sys

    code = f"""
import sys, edgelm
with edgelm.load({str(gpt2_int8)!r}) as model:
    texts = model.generate_batch(["a", "bc d"], max_tokens=4, temperature=0)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "optimum")))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
