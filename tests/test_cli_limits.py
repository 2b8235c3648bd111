"""The CLI with hostile input: NaN flags, thread counts, bytes that are not UTF-8, terminal escapes
in a manifest, and a bug deep inside: each ends in one line, never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from cli_helpers import assert_one_line_error, invoke


@pytest.mark.parametrize("flag, value, fragment", [
    ("--temperature", "nan", "temperature must be a finite number"),
    ("--temperature", "inf", "temperature must be a finite number"),
    ("--temperature", "5e-324", "not vanishingly small"),
    ("--repetition-penalty", "-inf", "repetition_penalty"),
    ("--top-p", "nan", "top_p must be a finite number"),
    ("--threads", "-1", "threads must be between 1 and"),
    ("--threads", "10000", "threads must be between 1 and"),
])
def test_hostile_flag_values_are_one_line_usage_errors(lstm_artifact, flag, value, fragment):
    assert_one_line_error(invoke("run", lstm_artifact, "The ", flag, value), 2, fragment)


def test_a_prompt_file_that_is_not_utf8_is_named(lstm_artifact, tmp_path):
    latin1 = tmp_path / "prompt.txt"
    latin1.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    result = invoke("run", lstm_artifact, "--prompt-file", latin1)
    assert_one_line_error(result, 1, "prompt file")
    assert "prompt.txt is not valid UTF-8 (byte 0xe9 at offset 3)" in result.output
    good = tmp_path / "good.txt"
    good.write_text("The ", encoding="utf-8")
    ran = invoke("run", lstm_artifact, "--prompt-file", good, "--max-tokens", 3, "--temperature", 0)
    assert ran.exit_code == 0, ran.output
    assert_one_line_error(invoke("run", lstm_artifact, "The ", "--prompt-file", good), 2, "not both")


def test_a_prompt_argument_with_undecodable_bytes_is_refused(lstm_artifact):
    # what Linux hands Python for `edgelm run a $'\xff'`: the byte as a lone surrogate
    assert_one_line_error(invoke("run", lstm_artifact, "bad \udcff byte"), 1, "the PROMPT argument is not valid UTF-8")


def test_the_python_api_refuses_lone_surrogates(lstm_artifact):
    from edgelm.errors import InputError
    from edgelm.runtime import load

    with load(lstm_artifact, threads=1) as model, pytest.raises(InputError, match="the prompt is not valid UTF-8"):
        model.generate("bad \udcff byte", max_tokens=2)


def test_escape_sequences_in_a_manifest_are_shown_escaped(lstm_artifact, tmp_path):
    hostile = shutil.copytree(lstm_artifact, tmp_path / "hostile")
    manifest = json.loads((hostile / "edgelm.json").read_text())
    manifest["created"] = "2026\x1b]0;owned\x07\x1b[2J\u202e"
    manifest["versions"]["edgelm"] = "1.0\x9b31m"
    (hostile / "edgelm.json").write_text(json.dumps(manifest))
    shown = invoke("info", hostile)
    assert shown.exit_code == 0, shown.output
    assert "\x1b" not in shown.output and "\x07" not in shown.output and "\x9b" not in shown.output
    assert "\u202e" not in shown.output
    assert "2026\\x1b]0;owned\\x07\\x1b[2J\\u202e" in shown.output and "1.0\\x9b31m" in shown.output
    as_json = invoke("info", hostile, "--json")
    assert "\x1b" not in as_json.output and "\x9b" not in as_json.output
    assert json.loads(as_json.output)["created"] == manifest["created"]  # escaped, still the same JSON


def test_an_unexpected_exception_is_one_line_and_debug_reraises(lstm_artifact, monkeypatch):
    import edgelm.commands.info

    def broken(*args, **kwargs):
        raise RuntimeError("boom in a library\n  with a second line \x1b[2J")

    monkeypatch.setattr(edgelm.commands.info, "describe", broken)
    result = invoke("info", lstm_artifact)
    assert result.exit_code == 1
    assert result.output == "error: internal error (RuntimeError): boom in a library; rerun with --debug\n"
    debug = invoke("--debug", "info", lstm_artifact)
    assert isinstance(debug.exception, RuntimeError) and debug.exit_code == 1


def test_debug_shows_a_real_traceback_and_without_it_there_is_none(tmp_path):
    command = [sys.executable, "-m", "edgelm.cli", "run", str(tmp_path / "nope"), "hi"]
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=120)
    loud = subprocess.run(command[:3] + ["--debug"] + command[3:], capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 1 and "Traceback" not in quiet.stderr
    assert quiet.stderr.strip().splitlines() == [quiet.stderr.strip()] and "no such artifact" in quiet.stderr
    assert loud.returncode == 1 and "Traceback (most recent call last)" in loud.stderr
    assert "edgelm.errors.ArtifactError" in loud.stderr


def test_train_out_over_a_foreign_folder_is_refused(tmp_path):
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "llama"}')
    (foreign / "model.safetensors").write_bytes(b"their weights")
    result = invoke("train", "rnn", "--out", foreign, "--steps", 1)
    assert_one_line_error(result, 2, "not a model edgelm trained")
    assert (foreign / "model.safetensors").read_bytes() == b"their weights"


def test_chat_lines_that_are_not_utf8_are_refused_and_the_chat_goes_on(tmp_path):
    from test_llama_runtime import write_tiny_gguf

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    result = invoke("chat", gguf, "--threads", 1, "--max-tokens", 2, "--temperature", 0,
                    input=b"caf\xe9\nhello\n/exit\n")
    assert result.exit_code == 0, result.output
    assert "error: that line is not valid UTF-8 (byte 0xe9 at offset 3); type it again" in result.output
    assert "(reply cut at --max-tokens 2)" in result.output  # the next line was still read and answered
    assert "Traceback" not in result.output


def test_a_text_file_over_the_limit_is_refused_without_loading_it(tmp_path):
    from edgelm.errors import InputError
    from edgelm.safe_text import read_text

    big = tmp_path / "big.txt"
    big.write_bytes(b"a" * 101)
    with pytest.raises(InputError, match="big.txt: larger than 100 bytes"):
        read_text(big, "the prompt file", limit=100)
    assert read_text(big, "the prompt file", limit=101) == "a" * 101
