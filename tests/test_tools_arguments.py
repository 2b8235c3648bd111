"""Tool arguments that end: $defs survive nesting under `arguments`, objects allow only their
declared properties (each once) unless the schema says otherwise, free strings are bounded, and a
call cut off by max_tokens is no call and no content. Tiny random-weight GGUF: only the grammar
can make its calls valid."""

from __future__ import annotations

import json

import jsonschema
import pytest
from test_llama_runtime import write_tiny_gguf
from test_tools import TOOL_TEMPLATE

from edgelm.errors import ContextOverflowError
from edgelm.runtime import load
from edgelm.runtime.chat.tools import MAX_ARGUMENT_STRING, call_schema, check_tools

PYDANTIC = {  # what pydantic's model_json_schema() writes for a nested model
    "$defs": {"Place": {"properties": {"city": {"title": "City", "type": "string", "maxLength": 8}},
                        "required": ["city"], "title": "Place", "type": "object"}},
    "properties": {"place": {"$ref": "#/$defs/Place"}, "days": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["place", "days"], "title": "Trip", "type": "object",
}
OPEN = {"type": "object", "properties": {"note": {"type": "string"}}, "additionalProperties": True}
ASK = [{"role": "user", "content": "hi"}]


def tool(name, parameters):
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    path = write_tiny_gguf(tmp_path_factory.mktemp("tool-args") / "tiny.gguf", template=TOOL_TEMPLATE)
    with load(path, threads=1) as model:
        yield model


def test_pydantic_defs_compile_and_every_call_validates(chat_model):
    finished = 0
    for seed in range(12):
        done = chat_model.chat_complete(ASK, tools=[tool("plan", PYDANTIC)], tool_choice="required",
                                        max_tokens=88, temperature=1.0, seed=seed)
        if done.tool_calls:
            finished += 1
            arguments = json.loads(done.tool_calls[0]["function"]["arguments"])
            jsonschema.validate(arguments, PYDANTIC)
            assert set(arguments) == {"place", "days"} and set(arguments["place"]) == {"city"}
    assert finished >= 6


def test_undeclared_properties_are_closed_and_strings_bounded():
    schema = call_schema(check_tools([tool("w", {"type": "object", "properties": {"city": {"type": "string"}}}),
                                      tool("o", OPEN)]))
    weather = schema["$defs"]["edgelm-tool-w"]
    assert weather["additionalProperties"] is False
    assert weather["properties"]["city"]["maxLength"] == MAX_ARGUMENT_STRING
    assert schema["$defs"]["edgelm-tool-o"]["additionalProperties"] is True  # the schema said otherwise
    # a ref to the parameters' own root still points at them
    nested = call_schema(check_tools([tool("t", {"type": "object", "properties": {"next": {"$ref": "#"}}})]))
    assert nested["$defs"]["edgelm-tool-t"]["properties"]["next"]["$ref"] == "#/$defs/edgelm-tool-t"


def test_each_property_at_most_once_and_none_undeclared(chat_model):
    weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    for seed in range(12):
        done = chat_model.chat_complete(ASK, tools=[tool("get_weather", weather)], tool_choice="required",
                                        max_tokens=88, temperature=1.0, seed=seed)
        text = done.text if done.tool_calls else ""
        assert text.count('"city"') <= 1 and "description" not in text
        if done.tool_calls:
            assert set(json.loads(done.tool_calls[0]["function"]["arguments"])) == {"city"}


def test_a_call_cut_off_by_max_tokens_is_length_with_no_content(chat_model):
    weather = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    done = chat_model.chat_complete(ASK, tools=[tool("get_weather", weather)], tool_choice="required",
                                    max_tokens=3, temperature=0)
    assert done.finish_reason == "length" and done.tool_calls is None and done.text == ""
    message = chat_model.chat(ASK, tools=[tool("get_weather", weather)], tool_choice="required", max_tokens=3,
                              temperature=0, return_message=True)
    assert message == {"role": "assistant", "content": ""}


def test_a_template_without_a_tools_section_gets_them_described(tmp_path):
    plain = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    path = write_tiny_gguf(tmp_path / "plain.gguf", template=plain)
    tools = [tool("get_weather", {"type": "object", "properties": {"city": {"type": "string"}}})]
    with load(path, threads=1) as model:
        seen = []
        original = model.chat_ids
        model.chat_ids = lambda messages, tools=None: seen.append(messages) or original(messages, tools)
        with pytest.raises(ContextOverflowError):  # the description is longer than the tiny model's context
            model.chat_complete(ASK, tools=tools, tool_choice="auto", max_tokens=2, temperature=0)
        assert seen[0][0]["role"] == "system" and '"name":"get_weather"' in seen[0][0]["content"]
        seen.clear()
        model.chat_complete(ASK, tools=tools, tool_choice="required", max_tokens=2, temperature=0)
        assert seen[0][0]["role"] == "user"  # the grammar writes the call: no context spent on words
