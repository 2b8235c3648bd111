"""Rendering a model's chat template into a prompt, in a sandbox.

Chat templates are Jinja2 source that arrives inside model files from anywhere, so they are
rendered in jinja2's ImmutableSandboxedEnvironment: no attribute access to Python internals,
no mutation of the values passed in. The environment is set up the way Hugging Face renders
templates (trim_blocks, lstrip_blocks, loop controls, a `tojson` that keeps non-ASCII text,
`raise_exception`, `strftime_now`) so that the same template gives the same prompt here as in
transformers' `apply_chat_template`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

from edgelm.errors import ArtifactError, InputError, first_line
from edgelm.safe_text import check_text

MAX_JSON_INDENT = 16  # an indent repeats per nesting level and line; templates use 2 or 4


class TemplateRaised(Exception):
    """What `raise_exception(...)` inside a template throws; turned into an InputError."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    if indent is not None and not (isinstance(indent, int) and 0 <= indent <= MAX_JSON_INDENT):
        raise ValueError(f"tojson indent must be an integer from 0 to {MAX_JSON_INDENT}")
    # jinja2's own tojson escapes HTML characters and non-ASCII text; templates expect plain JSON
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from edgelm.runtime.chat import template_limits as limits

    class ChatTemplateEnvironment(ImmutableSandboxedEnvironment):
        """The sandbox, plus a clock and a size limit checked at every call, lookup and operator."""

        intercepted_binops = frozenset({"**", "*", "+", "%"})
        template_class = limits.budgeted_template_class()
        guard_iter = staticmethod(limits.guard_iter)
        guard_output = staticmethod(limits.guard_output)
        guard_concat = staticmethod(limits.guard_concat)

        def _parse(self, source, name, filename):
            return limits.rewrite(super()._parse(source, name, filename), self)

        def call_binop(self, context, operator, left, right):
            limits.current().tick()
            limits.current().fits(limits.binop_size(operator, left, right), f"a `{operator}` result")
            return super().call_binop(context, operator, left, right)

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 - jinja's own signature
            if any(__obj is guard for guard in (limits.guard_iter, limits.guard_output, limits.guard_concat)):
                return __obj(*args, **kwargs)  # edgelm's own guards, already counted
            limits.check_arguments(args, kwargs, "a call")
            limits.current().fits(limits.estimate_str_method(__obj, args), "a string method's result")
            result = super().call(__context, __obj, *args, **kwargs)
            return limits.check_result(result, "a call")

        def is_safe_attribute(self, obj, attr, value):
            if isinstance(obj, str) and callable(value) and attr not in limits.STR_METHODS:
                return False  # str.translate, expandtabs, encode...: outputs that no template needs
            return super().is_safe_attribute(obj, attr, value)

        def getattr(self, obj, attribute):
            limits.current().tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj, argument):
            limits.current().tick()
            return super().getitem(obj, argument)

    env = ChatTemplateEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.filters = {name: limits.guarded_filter(name, f) for name, f in env.filters.items()}
    del env.globals["lipsum"]  # n paragraphs of filler text: no chat template needs it, and n is a multiplier
    return env


@lru_cache(maxsize=16)
def _compiled(template: str):
    """Compile once per template text; a syntax error becomes a one-line ArtifactError."""
    from jinja2 import TemplateSyntaxError

    env = _environment()
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except TemplateSyntaxError as err:
        raise ArtifactError(f"the chat template is not valid Jinja2 (line {err.lineno}: {err.message})") from None


@lru_cache(maxsize=16)
def reads_variable(template: str, name: str) -> bool:
    """Whether a chat template reads the variable `name` anywhere (a template with a tools section
    reads `tools`); False for a template that does not parse."""
    from jinja2 import meta

    try:
        return name in meta.find_undeclared_variables(_environment().parse(template))
    except Exception:  # noqa: BLE001 - a template that does not parse fails again, with its reason, in render_chat
        return False


def check_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Messages as plain dicts, each with a string role and content; an InputError otherwise."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InputError("messages must be a list of {'role': ..., 'content': ...} dicts")
    if not messages:
        raise InputError("messages is empty; give at least one message")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InputError(f"message {i} is a {type(message).__name__}, not a dict with role and content")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise InputError(f"message {i} has no 'role' string")
        if not isinstance(content, str):
            raise InputError(f"message {i} ({role}) has no 'content' string")
        check_text(role, f"message {i}'s role")
        check_text(content, f"message {i} ({role})")
        checked.append(dict(message))
    return checked


def render_chat(template: str, messages: list[dict], *, bos_token: str = "", eos_token: str = "",
                add_generation_prompt: bool = True, **variables: Any) -> str:
    """The prompt text a chat template makes of a conversation.

    `variables` are passed to the template as well (e.g. `unk_token`, `tools`). A template that
    calls `raise_exception` (roles out of order, say) gives an InputError; one that reaches for
    Python internals, runs past its time limit or builds output past its size limit
    (template_limits.py) gives an ArtifactError; neither runs any code outside the sandbox.
    """
    from jinja2.exceptions import SecurityError

    from edgelm.runtime.chat.template_limits import TemplateLimitError, budget

    if not isinstance(template, str) or not template.strip():
        raise ArtifactError("this model has no chat template; use generate() with a plain prompt")
    compiled = _compiled(template)
    checked = check_messages(messages)
    context = {**variables, "messages": checked, "bos_token": bos_token,
               "eos_token": eos_token, "add_generation_prompt": add_generation_prompt}
    try:
        given = sum(len(m["content"]) for m in checked) + len(repr(variables)) + len(bos_token) + len(eos_token)
        with budget(given):  # the output may grow with what the template is given (tools, documents)
            return compiled.render(**context)
    except TemplateRaised as err:
        raise InputError(f"the chat template refused the conversation: {first_line(err)}") from None
    except TemplateLimitError as err:
        raise ArtifactError(f"the chat template was stopped: {err}") from None
    except SecurityError as err:
        raise ArtifactError(f"the chat template tried an unsafe operation ({first_line(err)})") from None
    except MemoryError:
        raise ArtifactError("the chat template was stopped: it ran out of memory") from None
    except RecursionError:
        raise ArtifactError("the chat template was stopped: it recursed too deeply") from None
    except Exception as err:  # noqa: BLE001 - template code can raise anything; it is the file's fault
        raise ArtifactError(f"the chat template failed to render ({type(err).__name__}: {first_line(err)})") from None
