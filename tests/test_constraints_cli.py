"""The constraint flags of `edgelm run` and `edgelm chat` on random-weight models."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from click.testing import CliRunner
from test_llama_runtime import write_tiny_gguf

from edgelm.cli import main

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["n", "word"],
          "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 50}, "word": {"enum": ["cat", "dog"]}}}
GRAMMAR = 'start: "yes" | "no" | "maybe " NUMBER\nNUMBER: /[0-9]{1,2}/\n'


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("llama-cli") / "tiny.gguf")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("constraint-files")
    (folder / "schema.json").write_text(json.dumps(SCHEMA))
    (folder / "grammar.lark").write_text(GRAMMAR)
    (folder / "bad.json").write_text('{"type": "object", "properties": {"a": {"type": "wrong"}}}')
    return folder


def run(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


@pytest.mark.parametrize("seed", range(3))
def test_run_json_schema_prints_valid_json(lstm_artifact, files, seed):
    result = run("run", lstm_artifact, "The ", "--json-schema", files / "schema.json", "--max-tokens", 40,
                 "--seed", seed, "--threads", 1)
    assert result.exit_code == 0, result.output
    jsonschema.validate(json.loads(result.stdout), SCHEMA)


def test_run_regex_grammar_and_json_object(lstm_artifact, gguf_path, files):
    date = run("run", gguf_path, "the", "--regex", r"20[0-9]{2}-0[1-9]", "--threads", 1, "--max-tokens", 12)
    assert date.exit_code == 0, date.output
    assert re.fullmatch(r"20[0-9]{2}-0[1-9]", date.stdout.strip())
    answer = run("run", lstm_artifact, "The ", "--grammar", files / "grammar.lark", "--max-tokens", 12, "--seed", 1)
    assert answer.exit_code == 0, answer.output
    assert re.fullmatch(r"yes|no|maybe [0-9]{1,2}", answer.stdout.strip())
    obj = run("run", gguf_path, "the", "--json-object", "--temperature", 0, "--threads", 1, "--max-tokens", 30)
    assert obj.exit_code == 0, obj.output
    assert isinstance(json.loads(obj.stdout), dict)


def test_run_json_output_reports_an_incomplete_constraint(lstm_artifact, files):
    result = run("run", lstm_artifact, "The ", "--json-schema", files / "schema.json", "--max-tokens", 3, "--json")
    assert result.exit_code == 0, result.output
    completion = json.loads(result.stdout)
    assert completion["finish_reason"] == "length" and completion["constraint_incomplete"] is True
    streamed = run("run", lstm_artifact, "The ", "--json-schema", files / "schema.json", "--max-tokens", 3)
    assert "incomplete for the constraint" in streamed.stderr


def test_bad_constraint_flags_are_one_line_errors(lstm_artifact, files):
    bad = run("run", lstm_artifact, "The ", "--json-schema", files / "bad.json")
    assert bad.exit_code == 1 and bad.output.count("\n") == 1 and "json_schema cannot be used" in bad.output
    missing = run("run", lstm_artifact, "The ", "--grammar", files / "nowhere.lark")
    assert missing.exit_code != 0 and missing.output.count("\n") == 1
    both = run("run", lstm_artifact, "The ", "--regex", "a", "--json-object")
    assert both.exit_code == 2 and "at most one constraint" in both.output


def test_chat_json_schema_constrains_every_reply(gguf_path, files):
    result = run("chat", gguf_path, "--json-schema", files / "schema.json", "--threads", 1, "--max-tokens", 40,
                 "--temperature", 0.9, "--seed", 2, input="hello\nthe cat\n/exit\n")
    assert result.exit_code == 0, result.output
    replies = [line.removeprefix("> ").strip() for line in result.stdout.splitlines() if "{" in line]
    assert len(replies) == 2
    for reply in replies:
        jsonschema.validate(json.loads(reply), SCHEMA)


def test_chat_refuses_a_bad_schema_before_the_first_prompt(gguf_path, files):
    result = run("chat", gguf_path, "--json-schema", files / "bad.json", "--threads", 1, input="hello\n")
    assert result.exit_code == 1 and "json_schema cannot be used" in result.output and "> " not in result.stdout
