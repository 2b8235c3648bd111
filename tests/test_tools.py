"""Tool calls on a random-weight chat model (tiny LLaMA GGUF): tools reach the template, calls are
constrained to valid arguments, replies come back as OpenAI-shaped messages."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from test_llama_runtime import write_tiny_gguf

from edgelm.errors import InputError, UsageError
from edgelm.runtime import load

TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|end|>\n"
    "{% endif %}{% for m in messages %}<|{{ m['role'] }}|>\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}{{ c.function | tojson }}{% endfor %}"
    "{% else %}{{ m['content'] }}{% endif %}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "pattern": "^[a-z]{1,8}$"}, "unit": {"enum": ["c", "f"]}}}
ADD = {"type": "object", "additionalProperties": False, "required": ["a", "b"],
       "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                      "b": {"type": "integer", "minimum": 0, "maximum": 99}}}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "add", "parameters": ADD}},
]
SCHEMA_OF = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("llama-tools") / "tiny.gguf", template=TOOL_TEMPLATE)
    with load(path, threads=1) as model:
        yield model


def replies(model, tool_choice, **params):
    runs = [model.chat_complete(ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=60, temperature=1.0, seed=s,
                                **params) for s in range(20)]
    return runs + [model.chat_complete(ASK, tools=TOOLS, tool_choice=tool_choice, max_tokens=60, temperature=0)]


def check_call(call: dict, name: str | None = None) -> None:
    assert call["type"] == "function" and call["id"].startswith("call_")
    function = call["function"]
    assert function["name"] in SCHEMA_OF and (name is None or function["name"] == name)
    jsonschema.validate(json.loads(function["arguments"]), SCHEMA_OF[function["name"]])


def test_tools_are_passed_to_the_template(chat_model):
    prompt = chat_model.chat_prompt(ASK, tools=TOOLS)
    assert "Tools: get_weather add" in prompt
    assert "Tools:" not in chat_model.chat_prompt(ASK)


@pytest.mark.parametrize("choice, name", [("required", None),
                                          ({"type": "function", "function": {"name": "add"}}, "add")])
def test_a_required_or_named_call_is_always_a_valid_call(chat_model, choice, name):
    runs = replies(chat_model, choice)
    finished = [c for c in runs if not c.constraint_incomplete]
    assert len(finished) >= 0.75 * len(runs)
    for completion in finished:
        assert completion.finish_reason == "stop" and len(completion.tool_calls) == 1
        check_call(completion.tool_calls[0], name)
    for completion in runs:
        if completion.constraint_incomplete:
            assert completion.tool_calls is None and completion.finish_reason == "length"


def test_auto_gives_text_or_a_valid_call(chat_model):
    for completion in replies(chat_model, "auto"):
        if completion.tool_calls:
            check_call(completion.tool_calls[0])
        else:
            assert not completion.text.lstrip().startswith("{")


def test_auto_is_the_default_and_none_never_calls(chat_model):
    default = chat_model.chat_complete(ASK, tools=TOOLS, max_tokens=20, temperature=0)
    auto = chat_model.chat_complete(ASK, tools=TOOLS, tool_choice="auto", max_tokens=20, temperature=0)
    assert default.text == auto.text
    for seed in range(5):
        message = chat_model.chat(ASK, tools=TOOLS, tool_choice="none", return_message=True, max_tokens=12, seed=seed)
        assert set(message) == {"role", "content"} and isinstance(message["content"], str)


def test_return_message_shapes(chat_model):
    plain = chat_model.chat(ASK, return_message=True, max_tokens=8, seed=1)
    assert plain == {"role": "assistant", "content": chat_model.chat(ASK, max_tokens=8, seed=1)}
    called = chat_model.chat(ASK, tools=TOOLS, tool_choice="required", return_message=True, max_tokens=60, seed=3)
    assert called["role"] == "assistant" and called["content"] is None
    check_call(called["tool_calls"][0])


def test_a_streamed_call_is_read_at_the_end(chat_model):
    stream = chat_model.chat_stream(ASK, tools=TOOLS, tool_choice="required", max_tokens=60, temperature=0)
    text = "".join(stream)
    assert text == stream.completion.text and text.startswith('{"name":')
    check_call(stream.completion.tool_calls[0])


def test_tool_results_go_back_through_the_template(chat_model):
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a":1,"b":2}'}}
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "3"}]
    prompt = chat_model.chat_prompt(messages, tools=TOOLS)
    # the template receives the arguments as a dict, as Hugging Face templates expect
    assert '<|assistant|>\n{"name": "add", "arguments": {"a": 1, "b": 2}}<|end|>\n<|tool|>\n3<|end|>' in prompt
    assert isinstance(chat_model.chat(messages, tools=TOOLS, max_tokens=8, seed=0), str)
    assert messages[1]["content"] is None  # the caller's messages are not changed


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(tools="get_weather"), InputError, "tools must be a non-empty list"),
    (dict(tools=[{"type": "function", "function": {}}]), InputError, "unique, non-empty function name"),
    (dict(tools=[TOOLS[1], TOOLS[1]]), InputError, "unique"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "bogus"}}}]),
     InputError, "cannot be used"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), UsageError, "'nope'"),
    (dict(tools=TOOLS, tool_choice="sometimes"), UsageError, "tool_choice must be"),
    (dict(tool_choice="required"), UsageError, "tool_choice needs tools"),
    (dict(tools=TOOLS, json_schema=ADD), UsageError, "cannot both shape a reply"),
])
def test_bad_tools_are_one_line_errors(chat_model, kwargs, error, words):
    with pytest.raises(error) as caught:
        chat_model.chat(ASK, max_tokens=4, **kwargs)
    assert words in str(caught.value) and "\n" not in str(caught.value)


def test_a_constraint_with_tool_choice_none(chat_model):
    done = chat_model.chat_complete(ASK, tools=TOOLS, tool_choice="none", json_schema=ADD, max_tokens=40,
                                    temperature=0)
    jsonschema.validate(json.loads(done.text), ADD)
    assert done.tool_calls is None


class OpensWithBrace:
    """A decoder that makes "{" by far the likeliest first token, so "auto" takes the call branch."""

    def __init__(self, inner, brace_id: int):
        self.inner, self.brace_id = inner, brace_id
        self.context_length = inner.context_length

    def prefill(self, ids):
        logits = np.array(self.inner.prefill(ids))
        logits[self.brace_id] += 1000.0
        return logits

    def step(self, token_id):
        return self.inner.step(token_id)

    def close(self):
        self.inner.close()


def test_auto_reads_a_reply_that_opens_with_a_brace_as_a_call(chat_model):
    from test_llama_runtime import spm_vocab

    real = chat_model.decoder
    chat_model.decoder = OpensWithBrace(real, spm_vocab()[0].index("<0x7B>"))
    try:
        runs = [chat_model.chat_complete(ASK, tools=TOOLS, max_tokens=60, temperature=1.0, seed=s) for s in range(10)]
    finally:
        chat_model.decoder = real
    finished = [c for c in runs if not c.constraint_incomplete]
    assert len(finished) >= 7
    for completion in finished:
        check_call(completion.tool_calls[0])
