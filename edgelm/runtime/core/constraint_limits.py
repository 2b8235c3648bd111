"""Bounds on constraint inputs (JSON Schemas, regexes, Lark grammars, tool lists), checked before
llguidance sees them.

Constraints arrive from strangers: a client of `edgelm serve`, a plugin inside a desktop app.
llguidance compiles them in Rust, where some inputs do not fail cleanly: a deep chain of rules or
`$ref`s overflows the native stack (the process dies), a grammar past 65535 symbols panics
mid-generation, a counted repetition like `a{1000000}` exhausts the lexer after decoding began,
and a schema that requires itself without end (`{"properties": {"a": {"$ref": "#"}},
"required": ["a"]}`) fails on its first tokens. So every input is walked here first, iteratively
(a 100000-deep schema costs a loop, never Python's recursion), against the limits below; past
one, a one-line InputError names it. llguidance then compiles with its own limits set well below
where it breaks (`parser_limits`), on a thread with a stack large enough for any input these
limits let through (`compile_on_big_stack`).
"""

from __future__ import annotations

import json
import math
import queue
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from edgelm.errors import InputError, first_line
from edgelm.safe_text import has_lone_surrogates

MAX_SCHEMA_BYTES = 512 * 1024  # a JSON Schema or a tool list, as compact JSON text
MAX_DEPTH = 64  # nesting of a schema's JSON (objects and arrays), and of groups in a regex or grammar
MAX_NODES = 20_000  # JSON values in one schema document
MAX_PROPERTIES = 1_000  # entries of one "properties" (or "patternProperties") object
MAX_ALTERNATIVES = 256  # branches of one anyOf / oneOf / allOf, and types in one "type" list
MAX_ENUM = 4_096  # values of one enum
MAX_DEFINITIONS = 2_000  # entries of "$defs" plus "definitions"
MAX_INTEGER = 2**63 - 1  # llguidance builds integer ranges in 64 bits
MAX_REGEX_BYTES = 16 * 1024  # a regex, and each "pattern" inside a schema
MAX_REPEAT = 10_000  # a counted repetition {n,m}, and the product of nested ones: the lexer unrolls them
MAX_GRAMMAR_BYTES = 128 * 1024  # a Lark grammar
MAX_GRAMMAR_RULES = 5_000  # rule and terminal definitions in a Lark grammar
MAX_GRAMMAR_SYMBOLS = 50_000  # llguidance's grammar size after compiling; its own hard limit is 65535
MAX_TOOLS = 128
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
COMPILE_STACK_BYTES = 256 * 1024 * 1024  # virtual; llguidance recurses a few KiB per rule or $ref


def limit_error(what: str, problem: str) -> InputError:
    return InputError(f"{what}: {problem} (edgelm's limit for a constraint)")


def check_string(text: str, what: str) -> str:
    """A constraint's text, refused when it holds lone surrogates (bytes that were not UTF-8)."""
    if has_lone_surrogates(text):
        raise InputError(f"{what} is not valid UTF-8 text (it holds a lone surrogate)")
    return text


# -- JSON text ----------------------------------------------------------------------------------
_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def json_depth(text: str) -> int:
    """The deepest nesting of [ and { in JSON text, strings skipped; a loop, never recursion."""
    depth = deepest = 0
    for char in re.sub(r"[^\[\]{}]", "", _JSON_STRING.sub("", text)):
        depth = depth + 1 if char in "[{" else depth - 1
        deepest = max(deepest, depth)
    return deepest


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_text(text: str | bytes, what: str) -> Any:
    """JSON text from outside as Python values: size and depth checked before json.loads runs (its
    C parser recurses once per level), NaN and Infinity refused."""
    if isinstance(text, bytes):
        if len(text) > MAX_SCHEMA_BYTES:
            raise limit_error(what, f"larger than {MAX_SCHEMA_BYTES} bytes")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{what} is not valid UTF-8 (byte offset {err.start})") from None
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SCHEMA_BYTES:
        raise limit_error(what, f"larger than {MAX_SCHEMA_BYTES} bytes")
    check_string(text, what)
    if json_depth(text) > MAX_DEPTH:
        raise limit_error(what, f"nested deeper than {MAX_DEPTH} levels")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:
        raise InputError(f"{what} is not valid JSON ({first_line(err, 120)})") from None


# -- JSON Schema --------------------------------------------------------------------------------
def check_schema(schema: Any, what: str = "json_schema") -> Any:
    """A JSON Schema (a dict, a bool, or its JSON text) checked against every limit above; returns
    the schema as Python values, with `true` as `{}` (any JSON value). `false` is refused: nothing
    satisfies it. So is a schema that requires itself without end."""
    if isinstance(schema, (str, bytes)):
        schema = parse_json_text(schema, what)
    if schema is True:
        return {}
    if schema is False:
        raise InputError(f"{what} is false, which no output satisfies")
    if not isinstance(schema, Mapping):
        raise InputError(f"{what} must be a JSON object (a dict) or a boolean, got {type(schema).__name__}")
    check_json_values(schema, what)
    text = json.dumps(schema, ensure_ascii=False, separators=(",", ":"))
    if len(text.encode("utf-8")) > MAX_SCHEMA_BYTES:
        raise limit_error(what, f"larger than {MAX_SCHEMA_BYTES} bytes as JSON")
    _check_keywords(schema, what)
    where = unproductive(schema)
    if where is not None:
        raise InputError(f"{what} cannot be satisfied by any finite JSON value: {where} requires itself "
                         "without end, or is false")
    return schema


def check_json_values(value: Any, what: str) -> None:
    """Plain JSON all the way down, walked with an explicit stack: depth, count, key and value types,
    finite numbers, integers in 64 bits, no lone surrogates."""
    stack = [(value, 1)]
    nodes = 0
    while stack:
        node, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES:
            raise limit_error(what, f"more than {MAX_NODES} JSON values")
        if isinstance(node, Mapping) or isinstance(node, list):
            if depth > MAX_DEPTH:
                raise limit_error(what, f"nested deeper than {MAX_DEPTH} levels")
            items = node.items() if isinstance(node, Mapping) else enumerate(node)
            for key, item in items:
                if isinstance(node, Mapping):
                    if not isinstance(key, str):
                        raise InputError(f"{what}: an object key is a {type(key).__name__}, not a string")
                    check_string(key, f"{what} (a key)")
                stack.append((item, depth + 1))
        elif isinstance(node, str):
            check_string(node, f"{what} (a string value)")
        elif isinstance(node, bool) or node is None:
            pass
        elif isinstance(node, int):
            if abs(node) > MAX_INTEGER:
                raise limit_error(what, f"an integer beyond +-{MAX_INTEGER}")
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise InputError(f"{what}: {node} is not a JSON number")
        else:
            raise InputError(f"{what}: a {type(node).__name__} is not a JSON value")


_ALTERNATIVES = ("anyOf", "oneOf", "allOf")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONES = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
                "unevaluatedProperties", "unevaluatedItems", "additionalItems")


def subschemas(schema: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(JSON pointer suffix, subschema) for every schema directly inside `schema`."""
    found: list[tuple[str, Any]] = []
    for key in _SCHEMA_MAPS:
        if isinstance(schema.get(key), Mapping):
            found += [(f"/{key}/{_escape(name)}", sub) for name, sub in schema[key].items()]
    for key in (*_ALTERNATIVES, "prefixItems"):
        if isinstance(schema.get(key), list):
            found += [(f"/{key}/{i}", sub) for i, sub in enumerate(schema[key])]
    for key in _SCHEMA_ONES:
        if key in schema:
            found.append((f"/{key}", schema[key]))
    if isinstance(schema.get("items"), list):  # draft 4-7 tuple form
        found = [(p, s) for p, s in found if p != "/items"]
        found += [(f"/items/{i}", sub) for i, sub in enumerate(schema["items"])]
    return [(pointer, sub) for pointer, sub in found if isinstance(sub, (Mapping, bool))]


def _escape(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


def _check_keywords(root: Mapping[str, Any], what: str) -> None:
    """Per-schema counts (properties, alternatives, enum values, definitions) and every regex inside."""
    definitions = sum(len(root[k]) for k in ("$defs", "definitions") if isinstance(root.get(k), Mapping))
    if definitions > MAX_DEFINITIONS:
        raise limit_error(what, f"more than {MAX_DEFINITIONS} definitions ($defs and definitions)")
    stack: list[tuple[str, Any]] = [("#", root)]
    while stack:
        pointer, schema = stack.pop()
        if not isinstance(schema, Mapping):
            continue
        where = f"{what} at {pointer}"
        for key in ("properties", "patternProperties"):
            if isinstance(schema.get(key), Mapping) and len(schema[key]) > MAX_PROPERTIES:
                raise limit_error(where, f"more than {MAX_PROPERTIES} {key}")
        for key in (*_ALTERNATIVES, "type"):
            if isinstance(schema.get(key), list) and len(schema[key]) > MAX_ALTERNATIVES:
                raise limit_error(where, f"more than {MAX_ALTERNATIVES} {key} alternatives")
        if isinstance(schema.get("enum"), list) and len(schema["enum"]) > MAX_ENUM:
            raise limit_error(where, f"more than {MAX_ENUM} enum values")
        if isinstance(schema.get("pattern"), str):
            check_regex(schema["pattern"], f"{where}/pattern")
        if isinstance(schema.get("patternProperties"), Mapping):
            for pattern in schema["patternProperties"]:
                check_regex(pattern, f"{where}/patternProperties")
        for key in ("minLength", "maxLength"):
            if isinstance(schema.get(key), int) and not isinstance(schema[key], bool) and schema[key] > MAX_REPEAT:
                raise limit_error(where, f"{key} over {MAX_REPEAT}; leave it out for longer strings")
        stack += [(pointer + suffix, sub) for suffix, sub in subschemas(schema)]


# -- satisfiability -----------------------------------------------------------------------------
def unproductive(root: Mapping[str, Any]) -> str | None:
    """Where a schema can produce no finite JSON value, as a JSON pointer; None when it can.

    A least fixed point over every subschema (as grammars find their productive rules): a schema
    is productive when the values it requires (its $ref, every allOf branch, one anyOf/oneOf
    branch, each required property, the first minItems items) are. A schema that needs itself,
    like `{"properties": {"a": {"$ref": "#"}}, "required": ["a"]}`, never becomes productive.
    Only what llguidance itself would expand is judged: anything else counts as productive."""
    nodes: dict[str, Any] = {}
    stack: list[tuple[str, Any]] = [("#", root)]
    while stack:
        pointer, schema = stack.pop()
        if pointer in nodes:
            continue
        nodes[pointer] = schema
        if isinstance(schema, Mapping):
            stack += [(pointer + suffix, sub) for suffix, sub in subschemas(schema)]
    needs = {pointer: _needs(pointer, schema, nodes) for pointer, schema in nodes.items()}
    productive: set[str] = set()
    changed = True
    while changed:
        changed = False
        for pointer, (all_of, any_of) in needs.items():
            if pointer in productive or any(p not in productive for p in all_of):
                continue
            if all(any(p in productive for p in group) for group in any_of):
                productive.add(pointer)
                changed = True
    return None if "#" in productive else next((p for p in sorted(needs) if p not in productive), "#")


_Needs = tuple[list[str], list[list[str]]]  # (all needed, groups of which one each is needed)


def _needs(pointer: str, schema: Any, nodes: dict[str, Any]) -> _Needs:
    if schema is False:
        return [], [[]]  # one group with no member: never satisfied
    if not isinstance(schema, Mapping):
        return [], []
    all_of: list[str] = []
    any_of: list[list[str]] = []
    ref = schema.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")) and ref in nodes:
        all_of.append(ref)
    if isinstance(schema.get("allOf"), list):
        all_of += [f"{pointer}/allOf/{i}" for i in range(len(schema["allOf"]))]
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            any_of.append([f"{pointer}/{key}/{i}" for i in range(len(schema[key]))])
    types = schema.get("type")
    types = {types} if isinstance(types, str) else set(types) if isinstance(types, list) else None
    if types is not None and types <= {"object", "array"}:
        # only a value of these types can satisfy the schema: whichever is chosen must be finite
        object_needs = _object_needs(pointer, schema) if "object" in types else None
        array_needs = _array_needs(pointer, schema) if "array" in types else None
        choices = [n for n in (object_needs, array_needs) if n is not None]
        if len(choices) == 1:
            all_of += choices[0]
    return [p for p in all_of if p in nodes], [[p for p in g if p in nodes] for g in any_of]


def _object_needs(pointer: str, schema: Mapping[str, Any]) -> list[str]:
    properties = schema.get("properties") if isinstance(schema.get("properties"), Mapping) else {}
    required = schema.get("required") if isinstance(schema.get("required"), list) else []
    return [f"{pointer}/properties/{_escape(name)}" for name in required if isinstance(name, str) and
            name in properties]


def _array_needs(pointer: str, schema: Mapping[str, Any]) -> list[str]:
    least = schema.get("minItems", 0)
    if not isinstance(least, int) or isinstance(least, bool) or least < 1:
        return []
    prefix = schema.get("prefixItems") if isinstance(schema.get("prefixItems"), list) else []
    needs = [f"{pointer}/prefixItems/{i}" for i in range(min(least, len(prefix)))]
    if least > len(prefix) and isinstance(schema.get("items"), (Mapping, bool)):
        needs.append(f"{pointer}/items")
    return needs


# -- regexes and grammars -----------------------------------------------------------------------
_COUNTED = re.compile(r"\{\s*(\d*)\s*(?:,\s*(\d*)\s*)?\}")


def check_regex(pattern: str, what: str = "regex") -> str:
    """A regex's size, group nesting and counted repetitions (each, and nested ones multiplied)."""
    if not isinstance(pattern, str) or not pattern:
        raise InputError(f"{what} must be a non-empty string")
    check_string(pattern, what)
    if len(pattern.encode("utf-8")) > MAX_REGEX_BYTES:
        raise limit_error(what, f"longer than {MAX_REGEX_BYTES} bytes")
    _check_repetition(pattern, what)
    return pattern


def _check_repetition(pattern: str, what: str) -> None:
    """Scan a regex once: escapes and character classes skipped, groups tracked on a stack. Each
    group's weight is the largest count inside it; a count after a group multiplies its weight."""
    stack = [1]  # the largest repetition product inside each open group
    last = 1  # the weight of the atom just read (a group's, once it closes)
    i = 0
    while i < len(pattern):
        char = pattern[i]
        if char == "\\":
            i, last = i + 2, 1
            continue
        if char == "[":
            i, last = _skip_class(pattern, i), 1
            continue
        if char == "(":
            stack.append(1)
            if len(stack) > MAX_DEPTH:
                raise limit_error(what, f"groups nested deeper than {MAX_DEPTH} levels")
        elif char == ")" and len(stack) > 1:
            last = stack.pop()
            i += 1
            continue
        elif char == "{" and (match := _COUNTED.match(pattern, i)):
            low, high = match.group(1), match.group(2)
            count = max(int(low or 0), int(high or 0)) if len(low or "") < 9 and len(high or "") < 9 else MAX_REPEAT + 1
            weight = last * max(count, 1)
            if weight > MAX_REPEAT:
                raise limit_error(what, f"a counted repetition of more than {MAX_REPEAT} (nested counts multiply)")
            stack[-1] = max(stack[-1], weight)
            i, last = match.end(), weight  # a count after a count multiplies again: a{100}{100}
            continue
        else:
            last = 1
        i += 1


def _skip_class(pattern: str, start: int) -> int:
    """The index just past a [...] class starting at `start` (a ] first inside is literal)."""
    i = start + 1
    if i < len(pattern) and pattern[i] == "^":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        i += 1
    while i < len(pattern) and pattern[i] != "]":
        i += 2 if pattern[i] == "\\" else 1
    return i + 1


_LARK_DEFINITION = re.compile(r"^\s*[?!]?[A-Za-z_][A-Za-z0-9_]*(?:\.-?\d+)?\s*:", re.MULTILINE)
_LARK_REGEX = re.compile(r"/((?:[^/\\\n]|\\.)+)/[imslux]*")
_LARK_STRING = re.compile(r'"(?:[^"\\\n]|\\.)*"')


def check_grammar(text: str, what: str = "grammar") -> str:
    """A Lark grammar's size, number of definitions, nesting and the regexes in its terminals."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{what} must be a non-empty Lark grammar string")
    check_string(text, what)
    if len(text.encode("utf-8")) > MAX_GRAMMAR_BYTES:
        raise limit_error(what, f"larger than {MAX_GRAMMAR_BYTES} bytes")
    if len(_LARK_DEFINITION.findall(text)) > MAX_GRAMMAR_RULES:
        raise limit_error(what, f"more than {MAX_GRAMMAR_RULES} rule and terminal definitions")
    for regex in _LARK_REGEX.findall(text):
        _check_repetition(regex, f"{what} (the terminal /{first_line(regex, 40)}/)")
    depth = deepest = 0
    outside = _LARK_REGEX.sub("R", _LARK_STRING.sub("S", text))
    for char in re.sub(r"[^()\[\]]", "", outside):
        depth = depth + 1 if char in "([" else max(depth - 1, 0)
        deepest = max(deepest, depth)
    if deepest > MAX_DEPTH:
        raise limit_error(what, f"parentheses nested deeper than {MAX_DEPTH} levels")
    for count in re.findall(r"~\s*(\d+)(?:\s*\.\.\s*(\d+))?", outside):
        if max(int(n) for n in count if n) > MAX_REPEAT:
            raise limit_error(what, f"a repetition (~) of more than {MAX_REPEAT}")
    return text


# -- llguidance ---------------------------------------------------------------------------------
def parser_limits():
    """llguidance's limits for every compile and matcher: a grammar size well below where it panics
    (65535 symbols), and errors without the parser's state (it would echo the grammar)."""
    from llguidance import LLParserLimits

    return LLParserLimits(max_grammar_size=MAX_GRAMMAR_SYMBOLS, verbose_errors=False)


_LIMIT_WORDS = (("grammar size", f"the compiled grammar is over {MAX_GRAMMAR_SYMBOLS} symbols"),
                ("too many expressions", "a repetition or alternation too large for the lexer"),
                ("lexer", "too complex for the lexer"),
                ("fuel", "too complex for the lexer"),
                ("too many items", "too complex for the parser (a rule that requires itself, or too many choices)"),
                ("too deeply nested", f"nested too deeply (over {MAX_DEPTH} levels)"),
                ("recursion limit", f"nested too deeply (over {MAX_DEPTH} levels)"))


def limit_meaning(message: str) -> str | None:
    """What an llguidance message means in edgelm's words when it reports one of its limits."""
    lowered = message.lower()
    return next((meaning for words, meaning in _LIMIT_WORDS if words in lowered), None)


def llg_message(message: str) -> str:
    """One line of edgelm's own from an llguidance message: a known limit in edgelm's words, anything
    else with the grammar echo, caret lines and parser state dumps taken out."""
    meaning = limit_meaning(message)
    if meaning is not None:
        return meaning
    text = message.split("<state>")[0].split("<non-verbose/>")[0]
    lines = [line.strip() for line in text.splitlines()]
    kept = [line for line in lines if line and not set(line) <= {"^", " "} and not re.match(r"^\d+\s*\|", line)]
    return first_line(" ".join(kept), 240) or "rejected by llguidance"


T = TypeVar("T")
_compile_queue: queue.SimpleQueue | None = None
_compile_lock = threading.Lock()


def compile_on_big_stack(work: Callable[[], T]) -> T:
    """Run `work` (an llguidance compile) on edgelm's compile thread, whose stack holds the deepest
    grammar these limits allow. llguidance recurses natively per rule and per $ref; on a host's
    thread (512 KiB by default on macOS) a few hundred levels would end the process."""
    global _compile_queue
    with _compile_lock:
        if _compile_queue is None:
            jobs: queue.SimpleQueue = queue.SimpleQueue()
            previous = threading.stack_size(COMPILE_STACK_BYTES)
            try:  # set only while this one thread starts, then put back as it was
                threading.Thread(target=_compile_loop, args=(jobs,), name="edgelm-llguidance", daemon=True).start()
            finally:
                threading.stack_size(previous)
            _compile_queue = jobs
    done: queue.SimpleQueue = queue.SimpleQueue()
    _compile_queue.put((work, done))
    ok, value = done.get()
    if ok:
        return value
    raise value


def _compile_loop(jobs: queue.SimpleQueue) -> None:
    while True:
        work, done = jobs.get()
        try:
            done.put((True, work()))
        except BaseException as err:  # noqa: BLE001 - handed back to the caller's thread, raised there
            done.put((False, err))
