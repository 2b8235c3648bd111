"""Constraint inputs as untrusted input: each class found open is refused before decoding, in one
line naming the limit, through the API, the CLI and the server alike (constraint_limits.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
from cli_helpers import assert_one_line_error, invoke
from starlette.testclient import TestClient
from test_llama_runtime import write_tiny_gguf

from edgelm.errors import InputError
from edgelm.runtime import load
from edgelm.runtime.core import constraint_limits as limits
from edgelm.serve import create_app


def deep_schema(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def rule_chain(rules: int) -> str:
    """A Lark grammar whose rules each refer to the next: llguidance recurses once per rule."""
    body = "\n".join(f'r{i}: "x" r{i + 1} | "y"' for i in range(rules))
    return f'start: r0\n{body}\nr{rules}: "z"\n'


RECURSIVE = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
REFUSED = [  # (constraint, words in the one-line error)
    (dict(json_schema=deep_schema(100_000)), "nested deeper than 64 levels"),
    (dict(json_schema="[" * 100_000 + "]" * 100_000), "nested deeper than 64 levels"),
    (dict(json_schema='{"a":' * 3000 + "1" + "}" * 3000), "nested deeper than 64 levels"),
    (dict(json_schema=False), "false, which no output satisfies"),
    (dict(json_schema="false"), "false, which no output satisfies"),
    (dict(json_schema=RECURSIVE), "requires itself without end"),
    (dict(json_schema={"$ref": "#"}), "requires itself without end"),
    (dict(json_schema={"type": "array", "items": {"$ref": "#"}, "minItems": 1}), "requires itself without end"),
    (dict(json_schema={"enum": list(range(5000))}), "more than 4096 enum values"),
    (dict(json_schema={"anyOf": [{"const": i} for i in range(300)]}), "more than 256 anyOf alternatives"),
    (dict(json_schema={"type": "object", "properties": {f"p{i}": {} for i in range(1001)}}), "more than 1000 properties"),
    (dict(json_schema={"type": "string", "pattern": "a{1000000}"}), "counted repetition"),
    (dict(json_schema={"type": "string", "maxLength": 10**9}), "maxLength over"),
    (dict(json_schema={"type": "integer", "minimum": -(10**30)}), "an integer beyond"),
    (dict(json_schema='{"type": "number", "maximum": NaN}'), "not valid JSON"),
    (dict(json_schema={"description": "\ud800"}), "lone surrogate"),
    (dict(json_schema=json.dumps({"enum": ["x" * 600_000]})), "larger than 524288 bytes"),
    (dict(regex="a{1000000}"), "counted repetition of more than 10000"),
    (dict(regex="(a{100}){101}"), "nested counts multiply"),
    (dict(regex="a{100}{101}"), "nested counts multiply"),
    (dict(regex="(" * 100 + "a" + ")" * 100), "groups nested deeper than 64"),
    (dict(regex="caf\udce9"), "lone surrogate"),
    (dict(grammar='start: "\ud800"'), "lone surrogate"),
    (dict(grammar='start: "a"\n' + "x" * 200_000), "larger than 131072 bytes"),
    (dict(grammar="start: " + " | ".join(f'"x{i}"' for i in range(16_000))), "larger than 131072 bytes"),
    (dict(grammar="start: " + "(" * 100 + '"a"' + ")" * 100), "nested deeper than 64"),
    (dict(grammar="start: A\nA: /b{99999}/"), "counted repetition"),
    (dict(grammar='start: "a"~100000'), "repetition (~)"),
]


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("limits") / "tiny.gguf")


@pytest.fixture(scope="module")
def model(gguf_path):
    with load(gguf_path, threads=1) as loaded:
        yield loaded


@pytest.fixture
def no_decoding(model, monkeypatch):
    def refuse(*_):
        raise AssertionError("decoding started")

    monkeypatch.setattr(model.decoder, "prefill", refuse)


@pytest.mark.parametrize("constraint, words", REFUSED, ids=[str(i) for i in range(len(REFUSED))])
def test_each_class_is_one_line_before_decoding(model, no_decoding, constraint, words):
    with pytest.raises(InputError) as caught:
        model.complete("The ", max_tokens=8, **constraint)
    message = str(caught.value)
    assert words in message and "\n" not in message and len(message) < 400, message
    assert "vocabulary" not in message and "panicked" not in message and "<state>" not in message


def test_true_is_any_json_value(model):
    for schema in (True, "true", {}):
        done = model.complete("The ", max_tokens=24, temperature=0, json_schema=schema)
        if not done.constraint_incomplete:
            json.loads(done.text)


def test_a_deep_rule_chain_compiles_on_the_big_stack_in_any_thread(model):
    """3000 chained rules ended the process (a native stack overflow) on the main thread; on a
    256 KiB thread a few hundred did. Now the compile runs on edgelm's own thread."""
    import threading

    results = []

    def run():
        results.append(model.complete("The ", max_tokens=4, temperature=0, grammar=rule_chain(4000)).text)

    previous = threading.stack_size(256 * 1024)
    try:
        thread = threading.Thread(target=run)
        thread.start()
    finally:
        threading.stack_size(previous)
    thread.join(120)
    assert results and set(results[0]) <= {"x", "y", "z"}
    definitions = {"$ref": "#/$defs/d0", "$defs": {f"d{i}": {"$ref": f"#/$defs/d{i + 1}"} for i in range(1900)}}
    definitions["$defs"]["d1900"] = {"type": "integer"}
    done = model.complete("The ", max_tokens=8, temperature=0, json_schema=definitions)
    assert done.constraint_incomplete or isinstance(json.loads(done.text), int)


def test_llguidance_messages_become_one_line_of_edgelms(model, no_decoding):
    for constraint in (dict(grammar="start: missing_rule"), dict(regex="(unclosed"),
                       dict(json_schema={"type": "string", "format": "no-such-format"})):
        with pytest.raises(InputError) as caught:
            model.complete("The ", max_tokens=8, **constraint)
        assert "\n" not in str(caught.value) and "|" not in str(caught.value)
    assert limits.llg_message("parser error: Too many items (limit 50000; ff_tokens)\n<state>...</state>") == (
        "too complex for the parser (a rule that requires itself, or too many choices)")


def test_llguidance_compiles_under_edgelms_symbol_limit():
    """Within the byte limits no grammar reaches llguidance's size limit; built text (the tools'
    grammar) is compiled under it too, far below the 65535 symbols where llguidance panics."""
    from edgelm.runtime.core.constraints import compiled_grammar

    big = "start: " + " | ".join(f"r{i}" for i in range(12_000)) + "\n"
    big += "\n".join(f'r{i}: "a" "b" "c" "d"' for i in range(12_000))
    with pytest.raises(InputError, match="over 50000 symbols"):
        compiled_grammar(big, "grammar", "grammar")


def test_recursive_schemas_that_can_end_are_allowed():
    tree = {"type": "object", "properties": {"children": {"type": "array", "items": {"$ref": "#"}}},
            "required": ["children"]}
    listed = {"$defs": {"node": {"anyOf": [{"type": "null"}, {"type": "object", "properties": {
        "next": {"$ref": "#/$defs/node"}}, "required": ["next"]}]}}, "$ref": "#/$defs/node"}
    for schema in (tree, listed, {"type": "object", "properties": {"a": {"$ref": "#"}}}):
        assert limits.unproductive(schema) is None
    assert limits.unproductive({"allOf": [{"$ref": "#/$defs/a"}], "$defs": {"a": {"$ref": "#"}}}) is not None


def test_the_cli_refuses_in_one_line(gguf_path, tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text(json.dumps(deep_schema(200)))  # json.dumps itself nests 200 levels fine
    assert_one_line_error(invoke("run", gguf_path, "The ", "--json-schema", deep), 1, "nested deeper than 64")
    false = tmp_path / "false.json"
    false.write_text("false")
    assert_one_line_error(invoke("run", gguf_path, "The ", "--json-schema", false), 1, "no output satisfies")
    grammar = tmp_path / "big.lark"
    grammar.write_text(rule_chain(6000))
    assert_one_line_error(invoke("run", gguf_path, "The ", "--grammar", grammar), 1, "larger than")


def test_the_cli_refuses_a_regex_argument_that_is_not_utf8(gguf_path):
    """Linux hands undecodable argument bytes over as lone surrogates; a real process, real bytes."""
    code = "import sys; from edgelm.cli import main; sys.argv = ['edgelm', *sys.argv[1:]]; main()"
    result = subprocess.run([sys.executable, "-c", code, "run", str(gguf_path), "The ", "--regex", b"caf\xe9+"],
                            capture_output=True, timeout=120)
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 1 and lines[-1].startswith("error:") and "UTF-8" in lines[-1], result.stderr
    assert b"Traceback" not in result.stderr


def test_the_server_answers_400(gguf_path):
    with load(gguf_path, threads=1) as chat, TestClient(create_app({"tiny": chat}), base_url="http://localhost") as client:
        for schema in (deep_schema(80), RECURSIVE, {"type": "string", "pattern": "a{1000000}"}):
            body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                    "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 400, response.text
            assert "\n" not in response.json()["error"]["message"]
        tools = [{"type": "function", "function": {"name": "bad name", "parameters": {}}}]
        response = client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": 4, "tools": tools,
                                                              "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 400 and "function name" in response.json()["error"]["message"]


def test_limits_are_checked_without_recursion():
    """A 100000-deep dict is walked by a loop: Python's recursion limit is never reached."""
    with pytest.raises(InputError, match="nested deeper"):
        limits.check_schema(deep_schema(100_000))
    assert limits.json_depth('{"a": "[[[[", "b": [[1]]}') == 3
    jsonschema.validate({"a": "x"}, limits.check_schema({"type": "object"}))
