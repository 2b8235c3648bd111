"""Tool calls for chat models: OpenAI-shaped tools in, a constrained call out, an OpenAI-shaped
assistant message back.

The reply that calls a tool is one JSON object, `{"name": "<function>", "arguments": {...}}`,
with `arguments` valid against that function's `parameters` schema: the output is constrained
to exactly that. It is the shape of OpenAI's function call and of the tool-call examples that
Llama 3.1 style templates write, it needs no model-specific tag, and it parses with json.loads.
With tool_choice "auto" the reply is either plain text or such a call; a reply whose first
non-blank character is "{" is the call (so plain text cannot start with "{").
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from edgelm.errors import InputError, UsageError
from edgelm.runtime.core.constraints import Constraint, json_schema_constraint, lark_constraint

COMPACT = {"x-guidance": {"whitespace_flexible": False}}
EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """Tools as OpenAI gives them: [{"type": "function", "function": {"name", "description"?,
    "parameters"?}}]; an InputError naming the first problem."""
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence) or not tools:
        raise InputError('tools must be a non-empty list of {"type": "function", "function": {...}} dicts')
    checked, names = [], set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function" or not isinstance(
                function, Mapping):
            raise InputError(f'tool {i} is not {{"type": "function", "function": {{...}}}}')
        name = function.get("name")
        if not isinstance(name, str) or not name or name in names:
            raise InputError(f"tool {i} needs a unique, non-empty function name, got {name!r}")
        parameters = function.get("parameters", EMPTY_PARAMETERS)
        if not isinstance(parameters, Mapping):
            raise InputError(f"tool {name!r}: parameters must be a JSON Schema object")
        names.add(name)
        checked.append({"type": "function", "function": {**function, "parameters": dict(parameters)}})
    return checked


def call_schema(tools: list[dict[str, Any]], name: str | None = None) -> dict[str, Any]:
    """The JSON Schema of one call to any of `tools` (or to the one named)."""
    shapes = [
        {"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                          "arguments": t["function"]["parameters"]},
         "required": ["name", "arguments"], "additionalProperties": False}
        for t in tools if name is None or t["function"]["name"] == name
    ]
    return {**(shapes[0] if len(shapes) == 1 else {"anyOf": shapes}), **COMPACT}


def tool_constraint(tools: list[dict[str, Any]], tool_choice: Any) -> Constraint | None:
    """The constraint a tool_choice puts on the reply: None for "none"."""
    if tool_choice is None or tool_choice == "auto":
        schema = json.dumps(call_schema(tools), ensure_ascii=False)
        # plain text (its first non-blank character is not "{"), or a call
        grammar = lark_constraint(f"start: call | TEXT\ncall: %json {schema}\nTEXT: /\\s*[^{{\\s][\\s\\S]*/\n")
        return Constraint(grammar.grammar, "tools")
    if tool_choice == "none":
        return None
    if tool_choice == "required":
        return json_schema_constraint(call_schema(tools), kind="tools")
    name = _named_choice(tool_choice)
    if name not in {t["function"]["name"] for t in tools}:
        raise UsageError(f"tool_choice names {name!r}, which is not among the tools given")
    return json_schema_constraint(call_schema(tools, name), kind="tools")


def _named_choice(tool_choice: Any) -> str | None:
    function = tool_choice.get("function") if isinstance(tool_choice, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise UsageError('tool_choice must be "auto", "none", "required" or '
                         '{"type": "function", "function": {"name": ...}}')
    return function["name"]


def parse_tool_calls(text: str) -> list[dict[str, Any]] | None:
    """The OpenAI-shaped tool calls in a constrained reply; None when the reply is plain text
    (or a call cut short by max_tokens, which is not JSON)."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        call = json.loads(text)
    except ValueError:
        return None
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or "arguments" not in call:
        return None
    arguments = json.dumps(call["arguments"], ensure_ascii=False, separators=(",", ":"))
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call["name"], "arguments": arguments}}]


def assistant_message(text: str, tool_calls: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The reply as an OpenAI chat message dict."""
    if tool_calls:
        return {"role": "assistant", "content": None, "tool_calls": tool_calls}
    return {"role": "assistant", "content": text}


def messages_for_template(messages: Any) -> Any:
    """Messages as Hugging Face templates expect them: an assistant message that made tool calls
    has content "" rather than None, and each call's `arguments` is a dict, not JSON text
    (templates write it with `tojson`). Anything else passes through to check_messages."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        return messages
    return [_for_template(m) if isinstance(m, Mapping) and m.get("tool_calls") else m for m in messages]


def _for_template(message: Mapping[str, Any]) -> dict[str, Any]:
    calls = message["tool_calls"]
    if not isinstance(calls, Sequence) or isinstance(calls, (str, bytes)):
        raise InputError("an assistant message's tool_calls must be a list")
    shaped = []
    for call in calls:
        function = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(function, Mapping):
            raise InputError('each tool call must be {"id", "type": "function", "function": {"name", "arguments"}}')
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise InputError(f"tool call {function.get('name')!r}: arguments is not JSON") from None
        shaped.append({**call, "function": {**function, "arguments": arguments}})
    content = message.get("content")
    return {**message, "content": "" if content is None else content, "tool_calls": shaped}
