"""OpenAI's `response_format` and `tools` mapped onto edgelm's constrained generation.

`response_format` {"type": "json_object"} becomes `json_object=True`; {"type": "json_schema",
"json_schema": {"name", "schema", "strict"?, "description"?}} becomes `json_schema=schema` (the
output always matches the schema, whatever `strict` says); {"type": "text"} changes nothing.
`tools` and `tool_choice` pass to `chat_stream`, which constrains a call to valid arguments; a
reply that calls a tool comes back as `tool_calls` with finish_reason "tool_calls".
A runtime without constrained generation leaves these fields to schema.unsupported (a 400).
"""

from __future__ import annotations

import inspect
from typing import Any

from edgelm.errors import EdgelmError
from edgelm.runtime.capabilities import ChatModel, TextModel
from edgelm.serve.errors import ApiError
from edgelm.serve.schema import Check, bad, boolean, checked_fields, text


def _schema_object(value: Any, name: str) -> dict:
    if not isinstance(value, dict):
        raise bad(name, "a JSON Schema object")
    return value


JSON_SCHEMA_FIELDS = {"name": text(64, empty=False), "schema": _schema_object, "strict": boolean,
                      "description": text()}


def response_format(value: Any, name: str) -> dict[str, Any]:
    """The constraint keyword arguments a response_format asks for."""
    if not isinstance(value, dict):
        raise bad(name, "an object with a 'type'")
    kind = value.get("type")
    allowed = {"text": {"type"}, "json_object": {"type"}, "json_schema": {"type", "json_schema"}}
    if kind not in allowed:
        raise bad(f"{name}.type", "text, json_object or json_schema")
    extra = sorted(set(value) - allowed[kind])
    if extra:
        raise ApiError(400, f"unknown field '{name}.{extra[0][:64]}'", param=f"{name}.{extra[0][:64]}",
                       code="unknown_field")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_object": True}
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad(f"{name}.json_schema", "an object with 'name' and 'schema'")
    spec = checked_fields(spec, JSON_SCHEMA_FIELDS, prefix=f"{name}.json_schema.")
    if "schema" not in spec:
        raise ApiError(400, f"'{name}.json_schema.schema' is required", param=f"{name}.json_schema.schema",
                       code="missing_field")
    return {"json_schema": spec["schema"]}


def tools_list(value: Any, name: str) -> list:
    from edgelm.runtime.chat.tools import check_tools

    try:
        return check_tools(value)
    except EdgelmError as err:
        raise ApiError(400, str(err), param=name, code="invalid_value") from None


def tool_choice(value: Any, name: str) -> Any:
    if value in ("auto", "none", "required"):
        return value
    function = value.get("function") if isinstance(value, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or set(value) - {"type",
                                                                                                  "function"}:
        raise bad(name, '"auto", "none", "required" or {"type": "function", "function": {"name": ...}}')
    return value


def _parallel(value: Any, name: str) -> None:
    boolean(value, name)  # either way at most one call is made, which both values allow


def supports_tools(task: Any) -> bool:
    return isinstance(task, ChatModel) and "tools" in inspect.signature(task.chat_stream).parameters


def supports_constraints() -> bool:
    try:
        from edgelm.runtime.core.constraints import CONSTRAINT_PARAMS
    except ImportError:
        return False
    return {"json_schema", "json_object"} <= set(CONSTRAINT_PARAMS)


def chat_fields(task: Any) -> dict[str, Check] | None:
    """Checks for the constrained-generation fields `task.chat_stream` accepts; None: it accepts none."""
    fields: dict[str, Check] = {}
    if supports_constraints():
        fields["response_format"] = response_format
    if supports_tools(task):
        fields.update({"tools": tools_list, "tool_choice": tool_choice, "parallel_tool_calls": _parallel})
    return fields or None


def completion_fields(task: Any) -> dict[str, Check] | None:
    """`response_format` on /v1/completions too (an edgelm extension: every generator can be constrained)."""
    return {"response_format": response_format} if supports_constraints() and isinstance(task, TextModel) else None


def options(extra: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments for `stream` / `chat_stream` from the checked fields."""
    out = dict(extra.get("response_format") or {})
    if "tools" in extra:
        out["tools"] = extra["tools"]
    if "tool_choice" in extra:
        if "tools" not in extra:
            raise ApiError(400, "'tool_choice' needs 'tools'", param="tool_choice")
        out["tool_choice"] = extra["tool_choice"]
    return out
