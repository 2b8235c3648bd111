"""Request bodies: parsed strictly, checked field by field, every problem one 400 naming its field.

Type confusion is refused, not coerced: a boolean is not an integer, a string is not a number.
Fields OpenAI defines that edgelm does not implement are accepted only with their neutral value
(`n: 1`, `logprobs: false`, `presence_penalty: 0`, ...); any other value is a 400 naming the
field, and a field nobody defines is a 400 too. Nothing is silently ignored.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from edgelm.serve.errors import ApiError, quoted

MAX_INT = 2**31 - 1
MAX_SEED = 2**63 - 1
MAX_STOPS = 16
MAX_STOP_CHARS = 500  # a stop string is matched against held-back text at every token
MAX_INPUTS = 2048  # texts in one embeddings request, as OpenAI allows
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")

Check = Callable[[Any, str], Any]


def bad(name: str, what: str) -> ApiError:
    return ApiError(400, f"'{name}' must be {what}", param=name, code="invalid_value")


# -- parsing -------------------------------------------------------------------------------------
def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text) > 40:  # far beyond any field's range; int() of huge digit strings is slow
        raise ValueError(f"the integer {text[:20]}... is out of range")
    return int(text)


def parse_json(body: bytes) -> Any:
    """Decode a JSON body; NaN, Infinity, out-of-range numbers and lone surrogates are refused."""
    try:
        value = json.loads(body, parse_constant=_refuse_constant, parse_float=_finite_float,
                           parse_int=_bounded_int)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply", code="invalid_json") from None
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = str(err).split(":", 1)[0] if isinstance(err, json.JSONDecodeError) else str(err)
        raise ApiError(400, f"the request body is not valid JSON ({reason})", code="invalid_json") from None
    if SURROGATE_ESCAPE.search(body):
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, "the request body holds a string with an unpaired UTF-16 surrogate",
                           code="invalid_json") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {_json_type(value)}", code="invalid_json")
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null",
             int: "a number", float: "a number"}
    return names.get(type(value), "a value")


# -- field checks --------------------------------------------------------------------------------
def text(max_chars: int | None = None, empty: bool = True) -> Check:
    def check(value: Any, name: str) -> str:
        if not isinstance(value, str):
            raise bad(name, f"a string, not {_json_type(value)}")
        if not empty and not value:
            raise bad(name, "a non-empty string")
        if max_chars is not None and len(value) > max_chars:
            raise bad(name, f"at most {max_chars} characters long")
        return value
    return check


def integer(low: int, high: int) -> Check:
    def check(value: Any, name: str) -> int:
        if type(value) is not int:
            raise bad(name, f"an integer, not {_json_type(value)}")
        if not low <= value <= high:
            raise bad(name, f"an integer from {low} to {high}, got {value}")
        return value
    return check


def number() -> Check:
    def check(value: Any, name: str) -> float:
        if type(value) not in (int, float) or not math.isfinite(value):
            raise bad(name, f"a number, not {_json_type(value)}")
        return float(value)
    return check


def boolean(value: Any, name: str) -> bool:
    if type(value) is not bool:
        raise bad(name, f"true or false, not {_json_type(value)}")
    return value


def one_or_many(item: Check, max_items: int, min_items: int = 1) -> Check:
    """A single value or a list of them; always returns a list."""
    def check(value: Any, name: str) -> list:
        values = value if isinstance(value, list) else [value]
        if not min_items <= len(values) <= max_items:
            raise bad(name, "one value (one request per prompt)" if max_items == 1 else
                      f"a value or a list of {min_items} to {max_items} values")
        return [item(v, f"{name}[{i}]" if isinstance(value, list) else name) for i, v in enumerate(values)]
    return check


def obj(fields: dict[str, Check]) -> Check:
    def check(value: Any, name: str) -> dict:
        if not isinstance(value, dict):
            raise bad(name, f"an object, not {_json_type(value)}")
        return checked_fields(value, fields, prefix=f"{name}.")
    return check


def checked_fields(body: dict, fields: dict[str, Check], prefix: str = "") -> dict:
    """Every known field checked (null means absent); an unknown field is a 400 naming it."""
    out = {}
    for key, value in body.items():
        check = fields.get(key)
        if check is None:
            shown = key if len(key) <= 64 else key[:61] + "..."
            raise ApiError(400, f"unknown field {quoted(prefix + shown)}", param=prefix + shown,
                           code="unknown_field")
        if value is not None:
            out[key] = check(value, prefix + key)
    return out


# neutral values of fields edgelm does not implement: accepted because they change nothing
NEUTRAL = {
    "n": (1,), "best_of": (1,), "logprobs": (False,), "top_logprobs": (0,), "echo": (False,), "suffix": ("",),
    "logit_bias": ({},), "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "store": (False,),
    "parallel_tool_calls": (True, False), "tools": ([],), "tool_choice": ("none",), "functions": ([],),
    "response_format": ({"type": "text"},), "dimensions": (), "service_tier": ("auto", "default"),
}


def unsupported(names: tuple[str, ...]) -> dict[str, Check]:
    """Checks for fields edgelm does not implement: their neutral value passes, anything else is a 400."""
    def make(name: str) -> Check:
        def check(value: Any, label: str) -> None:
            if not any(type(value) is type(n) and value == n for n in NEUTRAL.get(name, ())):
                raise ApiError(400, f"'{label}' is not supported by edgelm's server", param=label,
                               code="unsupported_parameter")
        return check
    return {name: make(name) for name in names}


# -- the endpoints' bodies -------------------------------------------------------------------------
MODEL_ID = text(256, empty=False)
SAMPLING = {
    "model": MODEL_ID,
    "max_tokens": integer(1, MAX_INT),
    "temperature": number(),
    "top_p": number(),
    "seed": integer(0, MAX_SEED),
    "stop": one_or_many(text(MAX_STOP_CHARS, empty=False), MAX_STOPS, min_items=0),
    "stream": boolean,
    "stream_options": obj({"include_usage": boolean}),
    "user": text(256),  # an end-user label for the caller's own logs; it changes nothing here
    # edgelm's own sampling fields (the openai SDK sends them through `extra_body`)
    "top_k": integer(0, MAX_INT),
    "min_p": number(),
    "repetition_penalty": number(),
    "truncate": boolean,
}
COMMON_UNSUPPORTED = ("n", "logprobs", "top_logprobs", "logit_bias", "presence_penalty", "frequency_penalty",
                      "service_tier", "store")


@dataclass
class GenerationRequest:
    """What a completions or chat request asks for, checked."""

    model: str
    params: dict[str, Any]  # GenerationParams keyword arguments
    stream: bool = False
    include_usage: bool = False
    prompt: str | None = None
    messages: list[dict[str, Any]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # response_format, tools, ...


def _generation(body: dict, fields: dict[str, Check]) -> tuple[dict, GenerationRequest]:
    values = checked_fields(body, fields)
    if "model" not in values:
        raise ApiError(400, "'model' is required", param="model", code="missing_field")
    if "stream_options" in values and not values.get("stream"):
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true", param="stream_options")
    params = {k: values[k] for k in ("max_tokens", "temperature", "top_p", "seed", "top_k", "min_p",
                                     "repetition_penalty", "truncate") if k in values}
    if "stop" in values:
        params["stop"] = tuple(values["stop"])
    request = GenerationRequest(model=values["model"], params=params, stream=values.get("stream", False),
                                include_usage=values.get("stream_options", {}).get("include_usage", False))
    return values, request


def completion_request(body: dict, extra_fields: dict[str, Check] | None = None) -> GenerationRequest:
    """A completions body; `extra_fields` adds `response_format` where the runtime can constrain output."""
    fields = {**SAMPLING, "prompt": one_or_many(text(), 1),
              **unsupported(COMMON_UNSUPPORTED + ("best_of", "echo", "suffix", "response_format")),
              **(extra_fields or {})}
    values, request = _generation(body, fields)
    if "prompt" not in values:
        raise ApiError(400, "'prompt' is required", param="prompt", code="missing_field")
    request.prompt = values["prompt"][0]
    request.extra = {k: values[k] for k in (extra_fields or {}) if k in values}
    return request


ROLES = ("system", "developer", "user", "assistant", "tool")
CONTENT_PART = obj({"type": text(), "text": text()})
TOOL_CALL = obj({"id": text(256), "type": text(), "function": obj({"name": text(256), "arguments": text()})})


def message_content(value: Any, name: str) -> str:
    """A message's content: a string, or a list of text parts (joined by newlines)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise bad(name, f"a string or a list of text parts, not {_json_type(value)}")
    texts = []
    for i, part in enumerate(value):
        part = CONTENT_PART(part, f"{name}[{i}]")
        if part.get("type") != "text" or "text" not in part:
            raise ApiError(400, f"'{name}[{i}]' must be a text part; edgelm serves text only",
                           param=f"{name}[{i}]", code="unsupported_content")
        texts.append(part["text"])
    return "\n".join(texts)


def tool_calls_list(value: Any, name: str) -> list[dict]:
    if not isinstance(value, list):
        raise bad(name, "a list of tool calls")
    return [TOOL_CALL(call, f"{name}[{i}]") for i, call in enumerate(value)]


MESSAGE_FIELDS = {"role": text(), "content": message_content, "tool_calls": tool_calls_list,
                  "tool_call_id": text(256)}


def messages_list(value: Any, name: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise bad(name, "a non-empty list of messages")
    out = []
    for i, item in enumerate(value):
        label = f"{name}[{i}]"
        message = obj(MESSAGE_FIELDS)(item, label)
        role = message.get("role")
        if role not in ROLES:
            raise bad(f"{label}.role", f"one of {', '.join(ROLES)}")
        if "tool_calls" in message and role != "assistant":
            raise ApiError(400, f"'{label}.tool_calls' belongs to assistant messages", param=f"{label}.tool_calls")
        if "content" not in message and "tool_calls" not in message:
            raise ApiError(400, f"'{label}.content' is required", param=f"{label}.content", code="missing_field")
        # "developer" is OpenAI's newer name for the system message
        checked = {"role": "system" if role == "developer" else role, "content": message.get("content")}
        checked.update({k: message[k] for k in ("tool_calls", "tool_call_id") if k in message})
        out.append(checked)
    return out


def chat_request(body: dict, extra_fields: dict[str, Check] | None = None) -> GenerationRequest:
    """A chat body; `extra_fields` adds the constrained-generation fields where the runtime has them."""
    names = COMMON_UNSUPPORTED + ("parallel_tool_calls", "functions", "function_call", "tools", "tool_choice",
                                  "response_format")
    fields = {**SAMPLING, "messages": messages_list, "max_completion_tokens": integer(1, MAX_INT),
              **unsupported(names), **(extra_fields or {})}
    values, request = _generation(body, fields)
    if "messages" not in values:
        raise ApiError(400, "'messages' is required", param="messages", code="missing_field")
    request.messages = values["messages"]
    if "max_completion_tokens" in values:
        if "max_tokens" in values and values["max_tokens"] != values["max_completion_tokens"]:
            raise ApiError(400, "'max_tokens' and 'max_completion_tokens' disagree; give one",
                           param="max_completion_tokens")
        request.params["max_tokens"] = values["max_completion_tokens"]
    request.extra = {k: values[k] for k in (extra_fields or {}) if k in values}
    return request


@dataclass
class EmbeddingRequest:
    model: str
    inputs: list[str]
    base64: bool


def embedding_request(body: dict) -> EmbeddingRequest:
    fields = {"model": MODEL_ID, "input": one_or_many(text(empty=False), MAX_INPUTS),
              "encoding_format": text(), "user": text(256), **unsupported(("dimensions",))}
    values = checked_fields(body, fields)
    for required in ("model", "input"):
        if required not in values:
            raise ApiError(400, f"'{required}' is required", param=required, code="missing_field")
    encoding = values.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise bad("encoding_format", "float or base64")
    return EmbeddingRequest(values["model"], values["input"], encoding == "base64")


@dataclass
class TokenizeRequest:
    model: str | None
    content: str | None = None
    tokens: list[int] | None = None
    add_special: bool = False
    with_pieces: bool = False


def tokenize_request(body: dict) -> TokenizeRequest:
    values = checked_fields(body, {"model": MODEL_ID, "content": text(), "add_special": boolean,
                                   "with_pieces": boolean})
    if "content" not in values:
        raise ApiError(400, "'content' is required", param="content", code="missing_field")
    return TokenizeRequest(values.get("model"), content=values["content"],
                           add_special=values.get("add_special", False), with_pieces=values.get("with_pieces", False))


def detokenize_request(body: dict) -> TokenizeRequest:
    token = integer(0, MAX_INT)
    values = checked_fields(body, {"model": MODEL_ID, "tokens": one_or_many(token, 1_000_000, min_items=0)})
    if "tokens" not in values:
        raise ApiError(400, "'tokens' is required", param="tokens", code="missing_field")
    if not isinstance(body["tokens"], list):
        raise bad("tokens", "a list of token ids")
    return TokenizeRequest(values.get("model"), tokens=values["tokens"])
