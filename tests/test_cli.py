"""The CLI: the core commands, and one-line errors with exit codes for what users get wrong."""

from __future__ import annotations

import json

import pytest
from cli_helpers import assert_one_line_error, invoke


def test_train_export_info_run(tmp_path):
    model, art = tmp_path / "m", tmp_path / "a"
    trained = invoke("train", "rnn", "--out", model, "--hidden", 32, "--steps", 20, "--seq-len", 32,
                     "--batch-size", 8)
    assert trained.exit_code == 0, trained.output
    assert "held-out perplexity" in trained.output
    exported = invoke("export", model, "--out", art, "--quant", "int8")
    assert exported.exit_code == 0, exported.output
    assert "held_out_perplexity_ratio_int8_vs_fp32" in exported.output
    shown = invoke("info", art, "--json")
    manifest = json.loads(shown.output)
    assert manifest["validation_passed"] is True and manifest["quant"] == "int8"
    ran = invoke("run", art, "The ", "--max-tokens", 12, "--temperature", 0, "--json")
    completion = json.loads(ran.output)
    assert completion["completion_tokens"] == 12 and completion["finish_reason"] == "length"
    streamed = invoke("run", art, "The ", "--max-tokens", 12, "--temperature", 0)
    assert streamed.output.rstrip("\n") == completion["text"].rstrip("\n")


def test_missing_artifact(tmp_path):
    assert_one_line_error(invoke("run", tmp_path / "nope", "hi"), 1, "no such artifact")


def test_bad_flag_value(lstm_artifact):
    assert_one_line_error(invoke("run", lstm_artifact, "hi", "--top-p", 3), 2, "top_p must be in (0, 1]")


def test_unavailable_provider_is_an_error_not_a_fallback(lstm_artifact):
    assert_one_line_error(invoke("run", lstm_artifact, "hi", "--provider", "cuda"), 1, "not available")


def test_corrupt_artifact(lstm_artifact, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(lstm_artifact, broken)
    with open(broken / "model.onnx", "ab") as handle:
        handle.write(b"garbage")
    assert_one_line_error(invoke("run", broken, "hi"), 1, "does not match the manifest")
    (broken / "edgelm.json").write_text("[]")
    assert_one_line_error(invoke("info", broken), 1, "not a JSON object")


def test_same_size_corrupt_model_is_caught_by_verify_and_at_load(lstm_artifact, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(lstm_artifact, broken)
    size = (broken / "model.onnx").stat().st_size
    (broken / "model.onnx").write_bytes(b"\0" * size)
    assert_one_line_error(invoke("info", broken, "--verify"), 1, "sha256 does not match")
    assert_one_line_error(invoke("run", broken, "hi", "--verify"), 1, "sha256 does not match")
    assert_one_line_error(invoke("run", broken, "hi"), 1, "not a valid ONNX file")  # caught before onnxruntime


def test_unsupported_model_lists_families(tmp_path):
    folder = tmp_path / "other"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "t5"}))
    result = invoke("export", folder, "--out", tmp_path / "a")
    assert_one_line_error(result, 1, "'t5' is not supported; supported families: rnn")
    assert not (tmp_path / "a").exists()


def test_folder_without_config(tmp_path):
    assert_one_line_error(invoke("export", tmp_path, "--out", tmp_path / "a"), 1, "no config.json")


def test_missing_weights_and_mismatched_weights(lstm_model, tmp_path):
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(lstm_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["hidden_size"] = config["embed_size"] = 48
    (folder / "config.json").write_text(json.dumps(config))
    assert_one_line_error(invoke("export", folder, "--out", tmp_path / "a"), 1, "weights do not fit config.json")
    (folder / "model.safetensors").unlink()
    assert_one_line_error(invoke("export", folder, "--out", tmp_path / "a"), 1, "missing model.safetensors")


def test_bad_quant_and_bad_train_value(lstm_model, tmp_path):
    assert_one_line_error(invoke("export", lstm_model, "--out", tmp_path / "a", "--quant", "q4"), 2,
                          "quant 'q4' is not available for onnx")
    assert_one_line_error(invoke("train", "lstm", "--out", tmp_path / "m", "--steps", 0), 2, "steps must be")


def test_debug_reraises_the_typed_error_and_without_it_there_is_one_line(tmp_path):
    from edgelm.errors import ArtifactError

    # CliRunner keeps what escaped the command: with --debug the ArtifactError itself (a traceback
    # in a terminal; tests/test_cli_limits.py checks that in a real process), without it a clean exit
    result = invoke("--debug", "run", tmp_path / "nope", "hi")
    assert isinstance(result.exception, ArtifactError) and result.exc_info[2] is not None
    assert "no such artifact" in str(result.exception)
    quiet = invoke("run", tmp_path / "nope", "hi")
    assert isinstance(quiet.exception, SystemExit) and quiet.exit_code == 1
    assert_one_line_error(quiet, 1, "no such artifact")


@pytest.mark.parametrize("args", [["--help"], ["run", "--help"], ["export", "--help"], ["train", "--help"]])
def test_help(args):
    assert invoke(*args).exit_code == 0


def test_train_text_that_is_not_utf8_or_too_short(tmp_path):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(b"\xff\xfe\x00\x81" * 100)
    assert_one_line_error(invoke("train", "lstm", "--out", tmp_path / "m", "--text", binary), 1,
                          "blob.txt is not valid UTF-8 (byte 0xff at offset 0)")
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    assert_one_line_error(invoke("train", "lstm", "--out", tmp_path / "m", "--text", short), 2, "too short")
    assert not (tmp_path / "m").exists()
