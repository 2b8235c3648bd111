"""Constrained generation on random-weight models: only the mask can make their output valid.

Every generator edgelm runs is covered: a tiny RNN and LSTM (ONNX, character vocabulary, no end token),
a tiny GPT-2 (ONNX, byte-level BPE) and a tiny LLaMA (GGUF through llama.cpp, SentencePiece
with byte fallback). Each constraint runs over 20 seeds with sampling and over several prompts
greedily; every output that finished must parse and validate, and most must finish.
"""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest
from test_llama_runtime import write_tiny_gguf

from conftest import export_to, train_tiny
from edgelm.errors import InputError, UsageError
from edgelm.runtime import load

SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
            "point": {"type": "object", "additionalProperties": False, "required": ["x", "y"],
                      "properties": {"x": {"type": "integer", "minimum": -5, "maximum": 5},
                                     "y": {"type": "integer", "minimum": 0, "maximum": 120}}},
        },
        "required": ["name", "point"],
        "additionalProperties": False,
    },
    "array": {
        "type": "object",
        "properties": {"tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 3}},
        "required": ["tags"],
        "additionalProperties": False,
    },
    "enum": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                       "size": {"type": "integer", "minimum": 10, "maximum": 250}},
        "required": ["color", "ok", "size"],
        "additionalProperties": False,
    },
    "top-level integer": {"type": "integer", "minimum": 3, "maximum": 42},
}
DATE = r"(19|20)[0-9]{2}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
LARK = """
start: call
call: NAME "(" (arg ("," arg)?)? ")"
arg: NUMBER | inner
inner: NAME "(" (NUMBER ("," NUMBER)?)? ")"
NAME: /[a-z]{1,2}/
NUMBER: /[0-9]{1,2}/
"""
NUMBERS = r"(?:[0-9]{1,2}(?:,[0-9]{1,2})?)?"
ARG = rf"(?:[0-9]{{1,2}}|[a-z]{{1,2}}\({NUMBERS}\))"
CALL = rf"[a-z]{{1,2}}\((?:{ARG}(?:,{ARG})?)?\)"  # what LARK accepts, as a regex: at most 23 characters
SEEDS = range(20)
PROMPTS = ["The ", "a", "Lists and", "x = ", "def"]


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    with load(write_tiny_gguf(tmp_path_factory.mktemp("llama") / "tiny.gguf"), threads=1) as model:
        yield model


@pytest.fixture(scope="module")
def rnn_artifact(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rnn")
    return export_to(train_tiny(folder / "model", "rnn"), folder / "rnn-fp32")


@pytest.fixture(scope="module", params=["rnn", "lstm", "gpt2", "llama"])
def model(request, gguf_model):
    if request.param == "llama":
        yield gguf_model
        return
    fixture = {"rnn": "rnn_artifact", "lstm": "lstm_artifact", "gpt2": "gpt2_fp32"}[request.param]
    with load(request.getfixturevalue(fixture), threads=1) as loaded:
        yield loaded


def outputs(model, max_tokens: int, **constraint):
    """(text, completion) over 20 sampling seeds and greedy decoding of several prompts."""
    runs = [model.complete("The ", max_tokens=max_tokens, temperature=1.0, seed=s, **constraint) for s in SEEDS]
    runs += [model.complete(p, max_tokens=max_tokens, temperature=0, **constraint) for p in PROMPTS]
    return runs


def check_finished(runs, valid, at_least: float = 0.75) -> None:
    finished = [c for c in runs if not c.constraint_incomplete]
    assert len(finished) >= at_least * len(runs), [c.text for c in runs if c.constraint_incomplete]
    for completion in finished:
        assert valid(completion.text), completion.text
    for completion in runs:  # without stop strings, only max_tokens can leave a text incomplete
        assert completion.finish_reason == ("length" if completion.constraint_incomplete else "stop") or (
            completion.finish_reason == "length" and not completion.constraint_incomplete)


def validates(schema):
    def valid(text: str) -> bool:
        jsonschema.validate(json.loads(text), schema)
        return True
    return valid


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_finished_output_validates_against_its_schema(model, name):
    check_finished(outputs(model, 48, json_schema=SCHEMAS[name]), validates(SCHEMAS[name]))


def test_json_object_gives_json_objects(model):
    # any keys and values: a random model's strings run long, so few objects close in time (the
    # schema tests bound their strings); every output is still an object's beginning
    runs = outputs(model, 32, json_object=True)
    check_finished(runs, lambda text: isinstance(json.loads(text), dict), at_least=0)
    assert all(c.text.startswith("{") for c in runs)


def test_a_regex_is_matched_whole(model):
    runs = outputs(model, 16, regex=DATE)
    check_finished(runs, lambda text: re.fullmatch(DATE, text) is not None)
    assert all(c.finish_reason == "stop" for c in runs)  # a date is at most 10 characters


def test_a_lark_grammar_is_followed(model):
    check_finished(outputs(model, 40, grammar=LARK), lambda text: re.fullmatch(CALL, text) is not None)


def test_max_tokens_cut_off_is_reported_incomplete(model):
    done = model.complete("The ", max_tokens=3, temperature=0, json_schema=SCHEMAS["nested"])
    assert done.finish_reason == "length" and done.constraint_incomplete
    assert done.completion_tokens == 3 and done.text.startswith('{"')
    plain = model.complete("The ", max_tokens=3, temperature=0)
    assert not plain.constraint_incomplete


def test_a_stop_string_still_cuts_constrained_text(model):
    schema = {"type": "object", "properties": {"a": {"enum": ["x"]}, "b": {"enum": ["y"]}},
              "required": ["a", "b"], "additionalProperties": False}
    whole = model.complete("The ", max_tokens=40, temperature=0, json_schema=schema)
    assert whole.text == '{"a":"x","b":"y"}' and whole.finish_reason == "stop" and not whole.constraint_incomplete
    cut = model.complete("The ", max_tokens=40, temperature=0, json_schema=schema, stop=[","])
    assert cut.text == '{"a":"x"' and cut.finish_reason == "stop" and cut.constraint_incomplete


def test_stream_gives_the_same_text_as_complete(model):
    stream = model.stream("The ", max_tokens=40, temperature=0.7, seed=5, json_schema=SCHEMAS["enum"])
    text = "".join(stream)
    assert text == stream.completion.text == model.complete(
        "The ", max_tokens=40, temperature=0.7, seed=5, json_schema=SCHEMAS["enum"]).text


@pytest.mark.parametrize("params", [dict(top_k=3), dict(top_p=0.5), dict(min_p=0.2), dict(repetition_penalty=1.5)])
def test_sampling_filters_apply_on_top_of_the_mask(gguf_model, params):
    for seed in range(5):
        done = gguf_model.complete("The ", max_tokens=48, temperature=1.0, seed=seed, json_schema=SCHEMAS["enum"],
                                   **params)
        if not done.constraint_incomplete:
            validates(SCHEMAS["enum"])(done.text)


@pytest.mark.parametrize("bad, words", [
    (dict(json_schema={"type": "nonsense"}), "json_schema cannot be used"),
    (dict(json_schema="{not json"), "json_schema is not valid JSON"),
    (dict(json_schema={"$ref": "#/nowhere"}), "json_schema cannot be used"),
    (dict(json_schema=[1, 2]), "must be a JSON object"),
    (dict(regex="(unclosed"), "regex cannot be used"),
    (dict(grammar="start: missing_rule"), "grammar cannot be used"),
])
def test_a_constraint_that_does_not_compile_is_one_line_before_decoding(gguf_model, monkeypatch, bad, words):
    def no_decoding(*_):
        raise AssertionError("decoding started")

    monkeypatch.setattr(gguf_model.decoder, "prefill", no_decoding)
    with pytest.raises(InputError) as caught:
        gguf_model.complete("The ", max_tokens=8, **bad)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_at_most_one_constraint_per_call(gguf_model):
    with pytest.raises(UsageError, match="at most one constraint"):
        gguf_model.complete("The ", regex="a+", json_object=True)
    with pytest.raises(UsageError, match="json_object must be True"):
        gguf_model.complete("The ", json_object="yes")


def test_batch_rows_are_each_constrained(gpt2_fp32):
    prompts = ["The ", "Lists and", "x", "def f"]
    with load(gpt2_fp32, threads=1) as gpt2:
        rows = gpt2.complete_batch(prompts, max_tokens=48, temperature=1.0, seed=7, json_schema=SCHEMAS["nested"])
        alone = [gpt2.complete(p, max_tokens=48, temperature=1.0, seed=7, json_schema=SCHEMAS["nested"])
                 for p in prompts]
    assert sum(not r.constraint_incomplete for r in rows) >= 3
    for row in rows:
        if not row.constraint_incomplete:
            validates(SCHEMAS["nested"])(row.text)
    # same seed, same prompt: a batch row draws what the lone generation draws (up to float ties)
    assert sum(r.text == a.text for r, a in zip(rows, alone)) >= 3


class PaddedLogits:
    """A decoder whose logits are wider than the vocabulary, as with embeddings padded to a
    multiple of 64; the padded ids get the highest logits, so only the mask keeps them out."""

    def __init__(self, inner, extra: int = 37):
        self.inner, self.extra = inner, extra
        self.context_length = inner.context_length

    def _pad(self, logits):
        return np.concatenate([logits, np.full(self.extra, 1e4, logits.dtype)])

    def prefill(self, ids):
        return self._pad(self.inner.prefill(ids))

    def step(self, token_id):
        return self._pad(self.inner.step(token_id))

    def close(self):
        self.inner.close()


def test_logits_wider_than_the_vocabulary_are_masked(lstm_artifact):
    with load(lstm_artifact, threads=1) as lstm:
        lstm.decoder = PaddedLogits(lstm.decoder)
        width = lstm.tokenizer.get_vocab_size()
        for seed in range(5):
            done = lstm.complete("The ", max_tokens=48, temperature=1.0, seed=seed, json_schema=SCHEMAS["enum"])
            assert not done.constraint_incomplete
            validates(SCHEMAS["enum"])(done.text)
        assert lstm.decoder.extra and width < len(lstm.decoder.prefill([1]))


def test_a_constraint_the_vocabulary_cannot_spell_is_an_error(lstm_artifact):
    with load(lstm_artifact, threads=1) as lstm:
        with pytest.raises(InputError, match="cannot be continued with this model's vocabulary"):
            lstm.complete("The ", max_tokens=8, regex="\u20ac\u20ac+")  # the training text has no euro sign
