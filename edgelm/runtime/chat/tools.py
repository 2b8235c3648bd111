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

import copy
import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

from edgelm.errors import InputError, UsageError
from edgelm.escaping import printable
from edgelm.runtime.core.constraint_limits import (
    MAX_SCHEMA_BYTES,
    MAX_TOOLS,
    TOOL_NAME,
    check_json_values,
    check_schema,
    limit_error,
    subschemas,
)
from edgelm.runtime.core.constraints import Constraint, compiled_grammar, schema_grammar

COMPACT = {"x-guidance": {"whitespace_flexible": False}}
EMPTY_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
MAX_ARGUMENT_STRING = 1024  # characters of a free string argument whose schema sets no maxLength
TOOL_DEFINITIONS = "edgelm-tool-"  # root $defs key of each tool's parameters in the call schema
_OPEN_OBJECT_KEYS = ("additionalProperties", "patternProperties", "unevaluatedProperties")
_STRING_BOUNDS = ("maxLength", "enum", "const", "pattern", "format")


def check_tools(tools: Any) -> list[dict[str, Any]]:
    """Tools as OpenAI gives them: [{"type": "function", "function": {"name", "description"?,
    "parameters"?}}]; an InputError naming the first problem. Names follow OpenAI's rule (letters,
    digits, _ and -, at most 64); each `parameters` passes the constraint limits (a boolean schema
    takes its JSON Schema meaning)."""
    if isinstance(tools, (str, bytes, Mapping)) or not isinstance(tools, Sequence) or not tools:
        raise InputError('tools must be a non-empty list of {"type": "function", "function": {...}} dicts')
    if len(tools) > MAX_TOOLS:
        raise limit_error("tools", f"more than {MAX_TOOLS} tools")
    check_json_values(list(tools), "tools")
    if len(json.dumps(list(tools), ensure_ascii=False).encode("utf-8")) > MAX_SCHEMA_BYTES:
        raise limit_error("tools", f"larger than {MAX_SCHEMA_BYTES} bytes as JSON")
    checked, names = [], set()
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(tool, Mapping) or tool.get("type", "function") != "function" or not isinstance(
                function, Mapping):
            raise InputError(f'tool {i} is not {{"type": "function", "function": {{...}}}}')
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name) or name in names:
            shown = printable(name[:80]) if isinstance(name, str) else type(name).__name__
            raise InputError(f"tool {i} needs a unique, non-empty function name of letters, digits, _ or - "
                             f"(at most 64), got {shown!r}")
        parameters = check_schema(function.get("parameters", EMPTY_PARAMETERS), f"tool {name!r} parameters")
        names.add(name)
        checked.append({"type": "function", "function": {**function, "parameters": parameters}})
    return checked


def call_schema(tools: list[dict[str, Any]], name: str | None = None) -> dict[str, Any]:
    """The JSON Schema of one call to any of `tools` (or to the one named).

    Each tool's parameters move whole into the root's `$defs` (their own `$defs` and every `$ref`
    inside rewritten to the new place), so pointers stay valid under `arguments`. Where a schema
    does not say otherwise, an object allows only its declared properties (each at most once) and
    a free string at most MAX_ARGUMENT_STRING characters: the call ends."""
    chosen = [t for t in tools if name is None or t["function"]["name"] == name]
    definitions = {TOOL_DEFINITIONS + t["function"]["name"]: closed_arguments(t["function"]["parameters"],
                                                                             TOOL_DEFINITIONS + t["function"]["name"])
                   for t in chosen}
    shapes = [
        {"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                          "arguments": {"$ref": f"#/$defs/{TOOL_DEFINITIONS}{t['function']['name']}"}},
         "required": ["name", "arguments"], "additionalProperties": False}
        for t in chosen
    ]
    return {**(shapes[0] if len(shapes) == 1 else {"anyOf": shapes}), "$defs": definitions, **COMPACT}


def closed_arguments(parameters: Any, key: str) -> Any:
    """A copy of a tool's parameters as they sit at `#/$defs/<key>`: local `$ref`s rewritten, open
    objects closed and free strings bounded (unless the schema says otherwise)."""
    if not isinstance(parameters, Mapping):
        return parameters
    root = copy.deepcopy(dict(parameters))  # depth already bounded by check_schema
    stack = [root]
    while stack:
        schema = stack.pop()
        ref = schema.get("$ref")
        if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
            schema["$ref"] = f"#/$defs/{key}{ref[1:]}"
        types = schema.get("type")
        types = {types} if isinstance(types, str) else set(types) if isinstance(types, list) else set()
        if isinstance(schema.get("properties"), Mapping) and not any(k in schema for k in _OPEN_OBJECT_KEYS):
            schema["additionalProperties"] = False
        if "string" in types and not any(k in schema for k in _STRING_BOUNDS):
            schema["maxLength"] = MAX_ARGUMENT_STRING
        stack += [sub for _, sub in subschemas(schema) if isinstance(sub, dict)]
    return root


def tool_constraint(tools: list[dict[str, Any]], tool_choice: Any) -> Constraint | None:
    """The constraint a tool_choice puts on the reply: None for "none"."""
    if tool_choice is None or tool_choice == "auto":
        text = json.dumps(call_schema(tools), ensure_ascii=False)
        # plain text (its first non-blank character is not "{"), or a call
        lark = f"start: call | TEXT\ncall: %json {text}\nTEXT: /\\s*[^{{\\s][\\s\\S]*/\n"
        return compiled_grammar(lark, kind="tools", what="tools")
    if tool_choice == "none":
        return None
    if tool_choice == "required":
        return schema_grammar(call_schema(tools), "tools", "tools")
    name = _named_choice(tool_choice)
    if name not in {t["function"]["name"] for t in tools}:
        raise UsageError(f"tool_choice names {printable(name[:80])!r}, which is not among the tools given")
    return schema_grammar(call_schema(tools, name), "tools", "tools")


def describe_tools(tools: list[dict[str, Any]]) -> str:
    """The tools in words, for a chat template with no tools section of its own (it never reads
    `tools`): how a call is written, then one JSON line per function."""
    lines = ["You can call these tools. To call one, reply with only a JSON object "
             '{"name": <tool name>, "arguments": {<argument>: <value>, ...}}; otherwise reply in plain text.',
             "Tools:"]
    for tool in tools:
        function = {k: tool["function"][k] for k in ("name", "description", "parameters") if k in tool["function"]}
        lines.append(json.dumps(function, ensure_ascii=False, separators=(",", ":")))
    return "\n".join(lines)


def with_tool_description(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation with the tools described at the top of its system message (one is added
    when there is none)."""
    description = describe_tools(tools)
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": f"{description}\n\n{messages[0]['content']}"}, *messages[1:]]
    return [{"role": "system", "content": description}, *messages]


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
