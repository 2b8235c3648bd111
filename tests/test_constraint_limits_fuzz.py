"""Property: any schema or grammar, however generated, ends in output that validates (or a prefix of
it, when max_tokens ran out) or in a typed one-line InputError raised before decoding, within a
per-example deadline. Never a RecursionError, a panic, a crash or an error mid-generation."""

from __future__ import annotations

import json
from datetime import timedelta

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_llama_runtime import write_tiny_gguf

from conftest import fuzz_examples
from edgelm.errors import EdgelmError, InputError
from edgelm.runtime import load

TEXT = st.text(alphabet=st.sampled_from(["a", "b", "z", "0", " ", "\u00e9", "\ud800", "\udfff", '"', "\\"]),
               max_size=6)
NAMES = st.sampled_from(["a", "b", "c", "name", "x y", "$ref", ""]) | TEXT
FORMATS = st.sampled_from(["date", "time", "date-time", "email", "uuid", "ipv4", "uri", "hostname", "nonsense"])
REFS = st.sampled_from(["#", "#/$defs/d", "#/$defs/missing", "#/properties/a", "other.json#", "#/definitions/d"])


def leaf():
    return st.one_of(
        st.booleans(),
        st.just({}),
        st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "number", "boolean", "null"])},
                              optional={"minLength": st.integers(0, 3), "maxLength": st.integers(0, 20_000),
                                        "minimum": st.integers(-10**20, 10), "maximum": st.integers(-5, 10**20),
                                        "format": FORMATS, "pattern": st.sampled_from(["^[a-c]+$", "a{2,3}",
                                                                                       "(a{10}){2000}", "(("])}),
        st.fixed_dictionaries({"enum": st.lists(st.one_of(st.integers(-3, 3), TEXT, st.none()), max_size=5)}),
        st.fixed_dictionaries({"const": st.one_of(st.integers(), TEXT)}),
        st.fixed_dictionaries({"$ref": REFS}),
    )


def extend(inner):
    return st.one_of(
        st.fixed_dictionaries({"type": st.just("object"),
                               "properties": st.dictionaries(NAMES, inner, max_size=3)},
                              optional={"required": st.lists(NAMES, max_size=3),
                                        "additionalProperties": st.one_of(st.booleans(), inner)}),
        st.fixed_dictionaries({"type": st.just("array"), "items": inner},
                              optional={"minItems": st.integers(0, 3), "maxItems": st.integers(0, 5)}),
        st.sampled_from(["anyOf", "oneOf", "allOf"]).flatmap(
            lambda key: st.fixed_dictionaries({key: st.lists(inner, min_size=1, max_size=3)})),
        st.fixed_dictionaries({"$defs": st.fixed_dictionaries({"d": inner}), "$ref": REFS}),
    )


SCHEMAS = st.recursive(leaf(), extend, max_leaves=10)


def nest(schema, depth: int):
    for _ in range(depth):
        schema = {"type": "array", "items": schema}
    return schema


GRAMMAR_PIECES = st.sampled_from(['"a"', '"b"', "r", "r2", "A", "/[a-c]{1,3}/", "/a{100}{200}/", "(", ")", "|",
                                  "*", "+", "?", '"\ud800"', "%json {}", "~ 3", "~ 99999", "start"])


@st.composite
def grammars(draw):
    rules = draw(st.lists(st.lists(GRAMMAR_PIECES, min_size=1, max_size=6), min_size=1, max_size=4))
    names = ["start", "r", "r2", "A"]
    return "\n".join(f"{names[i]}: {' '.join(body)}" for i, body in enumerate(rules)) + "\n"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    with load(write_tiny_gguf(tmp_path_factory.mktemp("fuzz-limits") / "tiny.gguf"), threads=1) as loaded:
        yield loaded


def run_or_refuse(model, **constraint):
    """The completion, or None when the constraint was refused (typed, one line) before decoding."""
    steps = []
    original = model.decoder.prefill

    def counted(ids):
        steps.append(len(ids))
        return original(ids)

    model.decoder.prefill = counted
    try:
        return model.complete("The ", max_tokens=12, temperature=1.0, seed=0, **constraint)
    except InputError as err:
        message = str(err)
        assert "\n" not in message and len(message) < 500, message
        assert not steps, f"refused after decoding began: {message}"
        return None
    finally:
        model.decoder.prefill = original


def valid_json_prefix(text: str) -> bool:
    return text == "" or text[0] in '{["-0123456789tfn'


SETTINGS = dict(max_examples=fuzz_examples(60), deadline=timedelta(seconds=10),
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@settings(**SETTINGS)
@given(schema=SCHEMAS, depth=st.sampled_from([0, 0, 0, 30, 70, 5000]), as_text=st.booleans())
def test_any_schema_validates_or_is_refused_before_decoding(model, schema, depth, as_text):
    schema = nest(schema, depth)
    given = schema
    if as_text:
        try:
            given = json.dumps(schema)
        except (RecursionError, ValueError):  # json.dumps itself cannot write a 5000-deep value
            given = "[" * depth + "]" * depth
    done = run_or_refuse(model, json_schema=given)
    if done is None:
        return
    if done.constraint_incomplete:
        assert valid_json_prefix(done.text)
        return
    value = json.loads(done.text)
    if isinstance(schema, dict) and not any(k in json.dumps(schema) for k in ("$ref", "format", "pattern")):
        # refs, formats and patterns: jsonschema's reading may differ from llguidance's
        jsonschema.Draft202012Validator(schema).validate(value)


@settings(**SETTINGS)
@given(grammar=grammars())
def test_any_grammar_runs_or_is_refused_before_decoding(model, grammar):
    run_or_refuse(model, grammar=grammar)


@settings(**SETTINGS)
@given(name=NAMES, parameters=SCHEMAS)
def test_any_tool_list_calls_or_is_refused_before_decoding(model, name, parameters):
    tools = [{"type": "function", "function": {"name": name, "parameters": parameters}}]
    try:
        done = model.chat_complete([{"role": "user", "content": "hi"}], tools=tools, tool_choice="required",
                                   max_tokens=24, temperature=1.0, seed=0)
    except EdgelmError as err:
        assert "\n" not in str(err)
        return
    if done.tool_calls:
        assert done.tool_calls[0]["function"]["name"] == name
        json.loads(done.tool_calls[0]["function"]["arguments"])
    else:
        assert done.finish_reason == "length" and done.text == ""  # a call cut short is no content
