"""Time and size limits for chat templates, enforced inside jinja2's sandbox.

A chat template is a program from a model file. jinja2's sandbox stops it from reaching Python
internals, but not from looping for hours (`range` nested three deep) or from building a string
larger than memory (doubling one in a loop). Killing a thread is impossible in Python, so the
limits are checked from inside the render, at the points every such template must pass through:

- the parsed template is rewritten so that every `for` loop iterates through `guard_iter`, every
  piece of output (in the page, a macro or a `{% set %}` block) goes through `guard_output`, and
  every `~` concatenation through `guard_concat`;
- the sandbox's hooks (`call`, `getattr`, `getitem`, and the `+ * % **` operators) check the
  clock and refuse an operation whose result would exceed the size limit before it is built;
- every filter is wrapped the same way (filters are called directly, not through `call`).

The budget (deadline, size limit, characters emitted) lives in a context variable, so one
compiled template can render in several threads at once.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

RENDER_SECONDS = 1.0  # a real template renders in milliseconds
MIN_OUTPUT_CHARS = 1_000_000  # a prompt may be longer when the conversation itself is
OUTPUT_PER_INPUT_CHAR = 8
MAX_EXPONENT_BITS = 100_000  # `**` on integers: a larger result takes long even to print
_WIDTH = re.compile(r"\d{7,}")  # a format width or precision of a million or more


class TemplateLimitError(Exception):
    """A template went past its time or size budget; turned into an ArtifactError."""


@dataclass
class Budget:
    deadline: float
    max_chars: int
    emitted: int = 0
    sizes: dict[int, tuple[Any, int]] = field(default_factory=dict)  # id -> (container, size_of)

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateLimitError(f"it ran longer than {RENDER_SECONDS:g} s")

    def fits(self, size: int, what: str) -> None:
        if size > self.max_chars:
            raise TemplateLimitError(f"{what} would be {size:,} characters, over the limit of {self.max_chars:,}")


_BUDGET: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("edgelm_template_budget", default=None)


@contextlib.contextmanager
def budget(input_chars: int) -> Iterator[Budget]:
    """Limits for one render: RENDER_SECONDS of time and an output size that grows with the input."""
    spent = Budget(time.monotonic() + RENDER_SECONDS, max(MIN_OUTPUT_CHARS, OUTPUT_PER_INPUT_CHAR * input_chars))
    token = _BUDGET.set(spent)
    try:
        yield spent
    finally:
        _BUDGET.reset(token)


def current() -> Budget:
    spent = _BUDGET.get()
    if spent is None:  # BudgetedTemplate opens one for every render; this is only a backstop
        raise TemplateLimitError("rendered without a budget")
    return spent


def budgeted_template_class():
    """A jinja2 Template whose every render runs under a budget (the default one unless the
    caller opened a larger one for a long conversation)."""
    from jinja2 import Template

    class BudgetedTemplate(Template):
        def render(self, *args: Any, **kwargs: Any) -> str:
            if _BUDGET.get() is not None:
                return super().render(*args, **kwargs)
            with budget(0):
                return super().render(*args, **kwargs)

    return BudgetedTemplate


def size_of(value: Any) -> int:
    """Characters a value holds, strings inside lists, tuples and dicts included at any depth.

    The walk stops once past the size limit, and a container's size is remembered for the rest
    of the render (with a reference, so its id cannot be reused), so passing the same long
    conversation to a filter in every loop step costs its walk once."""
    if isinstance(value, (str, range)):
        return len(value)
    if not isinstance(value, (list, tuple, dict, set, frozenset)):
        return 0
    spent = current()
    known = spent.sizes.get(id(value))
    if known is not None and known[0] is value:
        return known[1]
    total, stack = 0, [value]
    while stack and total <= spent.max_chars:
        item = stack.pop()
        if isinstance(item, (str, range)):
            total += len(item)
        elif isinstance(item, dict):
            total += len(item)
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            total += len(item)
            stack.extend(item)
        else:
            total += 1
    spent.sizes[id(value)] = (value, total)
    return total


def check_arguments(args: tuple, kwargs: dict, what: str) -> None:
    """Refuse an operation given a huge integer (a width, a count) or a value over the limit."""
    spent = current()
    spent.tick()
    for value in (*args, *kwargs.values()):
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > spent.max_chars:
            raise TemplateLimitError(f"{what} was given the number {value if value < 10**20 else 'huge'}")
        spent.fits(size_of(value), f"an argument of {what}")


def check_result(value: Any, what: str) -> Any:
    current().fits(size_of(value), f"the result of {what}")
    return value


# str methods a chat template may call; the others (translate, expandtabs, encode, ...) are refused
STR_METHODS = frozenset({
    "capitalize", "casefold", "center", "count", "endswith", "find", "format", "index", "isalnum",
    "isalpha", "isascii", "isdecimal", "isdigit", "isidentifier", "islower", "isnumeric", "isprintable",
    "isspace", "istitle", "isupper", "join", "ljust", "lower", "lstrip", "partition", "removeprefix",
    "removesuffix", "replace", "rfind", "rindex", "rjust", "rpartition", "rsplit", "rstrip", "split",
    "splitlines", "startswith", "strip", "swapcase", "title", "upper", "zfill",
})


def estimate_str_method(obj: Any, args: tuple) -> int:
    """Result size of the str methods that can multiply their input, before they run."""
    obj = getattr(obj, "__wrapped__", obj)  # the sandbox hands out str.format behind a wrapper
    name = getattr(obj, "__name__", "")
    owner = getattr(obj, "__self__", None)
    if not isinstance(owner, str):
        return 0
    if name == "join" and args:
        return join_size(args[0], owner)
    if name == "replace" and len(args) >= 2:
        return replace_size(owner, args[0], args[1])
    if name in ("format", "format_map"):
        return format_size(owner, args)
    if name in ("center", "ljust", "rjust", "zfill") and args and isinstance(args[0], int):
        return max(len(owner), args[0])
    return 0


def replace_size(text: Any, old: Any, new: Any) -> int:
    if not (isinstance(text, str) and isinstance(old, str) and isinstance(new, str)):
        return 0
    hits = text.count(old) if old else len(text) + 1
    return len(text) + hits * len(new)


def format_size(template: Any, args: Any) -> int:
    """`template.format(*args)` or `template % args`: each field can hold the largest argument."""
    if not isinstance(template, str):
        return 0
    if _WIDTH.search(template) or "*" in template:
        return 1 << 62  # a width of a million or more, or one taken from the arguments
    values = args if isinstance(args, (tuple, list)) else (args,)
    largest = max((size_of(v) if not isinstance(v, (int, float)) else 32 for v in values), default=0)
    if isinstance(args, dict):
        largest = max((size_of(v) for v in args.values()), default=0)
    return len(template) + (template.count("{") + template.count("%")) * largest


def filter_size(name: str, function: Any, args: tuple, kwargs: dict) -> int:
    """Result size of the filters that can multiply their input, from their bound arguments."""
    if name not in ("join", "indent", "center", "wordwrap", "replace", "format"):
        return 0
    try:
        given = inspect.signature(function).bind(*args, **kwargs).arguments
    except TypeError:
        return 0  # the filter itself will say what is wrong with the call
    text = given.get("s", given.get("value"))
    if name == "join":
        return join_size(text, given.get("d", ""))
    if name == "replace":
        return replace_size(text, given.get("old"), given.get("new"))
    if name == "format":
        return format_size(text, given.get("kwargs") or given.get("args", ()))
    if not isinstance(text, str):
        return 0
    if name == "center":
        width = given.get("width", 80)
        return max(len(text), width) if isinstance(width, int) else 0
    lines = text.count("\n") + 1
    if name == "indent":
        width = given.get("width", 4)
        return len(text) + lines * (width if isinstance(width, int) else len(str(width)))
    wrap = given.get("wrapstring") or "\n"  # wordwrap: at worst a wrap after every character
    return len(text) * (1 + len(wrap)) if isinstance(wrap, str) else 0


def join_size(items: Any, separator: Any) -> int:
    """Size of `separator.join(items)` for a sized iterable (a range too), without joining."""
    if not isinstance(separator, str) or not hasattr(items, "__len__"):
        return 0
    return len(separator) * len(items) + size_of(items)


def binop_size(operator: str, left: Any, right: Any) -> int:
    """The size `left <operator> right` would have, computed without building it."""
    if operator == "*":
        seq, count = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(count, int) and isinstance(seq, (str, list, tuple)):
            return size_of(seq) * max(count, 0)
    elif operator == "+" and isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
        return size_of(left) + size_of(right)
    elif operator == "%" and isinstance(left, str):
        return format_size(left, right)
    elif operator == "**" and isinstance(left, int) and isinstance(right, int):
        if right > 64 or max(left.bit_length(), 1) * max(right, 0) > MAX_EXPONENT_BITS:
            raise TemplateLimitError(f"{left if left < 10**20 else 'a huge number'} ** {right} is too large")
    return 0


def guarded_filter(name: str, function: Any) -> Any:
    """A filter that checks its arguments and its result against the budget."""

    @functools.wraps(function)  # keeps jinja's pass_context/pass_environment marker
    def guarded(*args: Any, **kwargs: Any) -> Any:
        check_arguments(args, kwargs, f"the filter {name}")
        current().fits(filter_size(name, function, args, kwargs), f"the filter {name}")
        return check_result(function(*args, **kwargs), f"the filter {name}")

    return guarded


def guard_iter(iterable: Any, **_: Any) -> Iterator[Any]:
    """The items of a `for` loop's iterable, checking the clock at every step."""
    spent = current()
    for item in iterable:
        spent.tick()
        yield item


def guard_output(value: Any, **_: Any) -> Any:
    """One piece of output; the characters emitted anywhere in the render count toward the limit."""
    spent = current()
    spent.tick()
    spent.emitted += len(value) if isinstance(value, str) else len(str(value))
    spent.fits(spent.emitted, "the rendered prompt")
    return value


def guard_concat(*parts: Any, **_: Any) -> str:
    """`a ~ b ~ ...` with the result's size checked before it is built."""
    texts = [str(part) for part in parts]
    current().fits(sum(map(len, texts)), "a `~` concatenation")
    return "".join(texts)


def rewrite(tree: Any, environment: Any) -> Any:
    """Route every loop, output and concatenation of a parsed template through the guards."""
    from jinja2 import nodes

    def call(name: str, node: Any, args: list) -> Any:
        new = nodes.Call(nodes.EnvironmentAttribute(name), args, [], None, None, lineno=node.lineno)
        return new.set_environment(environment)

    def walk(node: Any) -> Any:
        for name in node.fields:
            value = getattr(node, name, None)
            if isinstance(value, list):
                setattr(node, name, [walk(v) if isinstance(v, nodes.Node) else v for v in value])
            elif isinstance(value, nodes.Node):
                setattr(node, name, walk(value))
        if isinstance(node, nodes.For):
            node.iter = call("guard_iter", node, [node.iter])
        elif isinstance(node, nodes.Output):
            node.nodes = [call("guard_output", child, [child]) for child in node.nodes]
        elif isinstance(node, nodes.Concat):
            return call("guard_concat", node, list(node.nodes))
        return node

    return walk(tree)
