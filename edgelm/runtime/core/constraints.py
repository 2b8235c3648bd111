"""Constrained generation: a token mask, computed by llguidance, applied before sampling.

A constraint (a JSON Schema, a regex, a Lark grammar, "any JSON object", or a tool call) is
compiled once per call into llguidance's grammar form and checked before any decoding. Each
sequence then gets its own `GrammarMask`, which `Continuation` consults on every token: the
logits of tokens the grammar forbids become -inf before the sampler sees them, so greedy,
temperature, top-k/top-p/min-p, repetition penalty and stop strings keep their meaning on top.
The same mask serves every decoder (RNN, LSTM, GPT-2, LLaMA), since edgelm owns the sampler.

llguidance needs every token's bytes; constraint_vocab.py builds them once per model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgelm.errors import EdgelmError, InputError, UsageError
from edgelm.runtime.core.constraint_limits import (
    check_grammar,
    check_regex,
    check_schema,
    compile_on_big_stack,
    limit_meaning,
    llg_message,
    parser_limits,
)

CONSTRAINT_PARAMS = ("json_schema", "regex", "grammar", "json_object")
# Compact JSON (no optional whitespace): a model cannot pad its output with endless blanks, and
# the text is what json.dumps(separators=(",", ":")) writes. A schema's "x-guidance" overrides it.
JSON_DEFAULTS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class Constraint:
    """A grammar in llguidance's serialised form, checked to compile; `kind` names its source."""

    grammar: str
    kind: str  # "json_schema", "regex", "grammar", "json_object" or "tools"


def pop_constraint(params: dict[str, Any]) -> Constraint | None:
    """Take the constraint keyword arguments out of `params` and compile the one given."""
    given = {name: params.pop(name) for name in CONSTRAINT_PARAMS if name in params}
    # json_object=False means "no constraint"; json_schema=False is the schema nothing satisfies
    given = {name: value for name, value in given.items()
             if value is not None and not (name == "json_object" and value is False)}
    if len(given) > 1:
        raise UsageError(f"give at most one constraint per call, got {', '.join(sorted(given))}")
    if not given:
        return None
    (name, value), = given.items()
    if name == "json_object":
        if value is not True:
            raise UsageError(f"json_object must be True or False, got {value!r}")
        return json_schema_constraint({"type": "object"}, kind="json_object")
    if name == "json_schema":
        return json_schema_constraint(value)
    if name == "regex":
        return regex_constraint(value)
    return lark_constraint(value)


def json_schema_constraint(schema: Mapping[str, Any] | str | bytes | bool, kind: str = "json_schema",
                           what: str = "json_schema") -> Constraint:
    """A JSON Schema (a dict, a bool, or its JSON text) as a constraint; an InputError if it passes
    a limit (constraint_limits.py) or does not compile. `true` is any JSON value."""
    return schema_grammar(check_schema(schema, what), kind, what)


def schema_grammar(schema: Mapping[str, Any], kind: str, what: str) -> Constraint:
    """A schema already checked (or built by edgelm from checked parts, as a tool call's) compiled."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema, ensure_ascii=False),
                                                     defaults=JSON_DEFAULTS)
    except (ValueError, TypeError) as err:
        raise InputError(f"{what} cannot be used: {llg_message(str(err))}") from None
    return _checked(grammar, kind, what)


def regex_constraint(pattern: str) -> Constraint:
    from llguidance import LLMatcher

    return _checked(LLMatcher.grammar_from_regex(check_regex(pattern)), "regex", "regex")


def lark_constraint(text: str) -> Constraint:
    return compiled_grammar(check_grammar(text), "grammar", "grammar")


def compiled_grammar(lark: str, kind: str, what: str) -> Constraint:
    """Lark text edgelm built itself from checked parts (the tools' grammar), compiled and validated."""
    from llguidance import LLMatcher

    return _checked(LLMatcher.grammar_from_lark(lark), kind, what)


def _checked(grammar: str, kind: str, what: str) -> Constraint:
    """llguidance reports problems as text rather than raising; make them one-line InputErrors."""
    from llguidance import LLMatcher

    problem = _llg_call(lambda: LLMatcher.validate_grammar(grammar, limits=parser_limits()), what)
    if problem:
        raise InputError(f"{what} cannot be used: {llg_message(problem)}")
    return Constraint(grammar, kind)


def _llg_call(work, what: str):
    """Run an llguidance compile on the big-stack thread; a Rust panic (a BaseException from pyo3)
    becomes a one-line InputError, never a backtrace."""
    try:
        return compile_on_big_stack(work)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except EdgelmError:
        raise
    except BaseException as err:  # noqa: B036 - pyo3's PanicException derives from BaseException
        raise InputError(f"{what} cannot be used: {llg_message(str(err))}") from None


class GrammarMask:
    """One sequence's position in a grammar: which tokens may come next, and whether it is done.

    `vocabulary` gives the model's llguidance vocabulary (constraint_vocab.py). The matcher is
    built, and the first mask computed, when the mask is made: before the sequence is submitted,
    so a grammar that cannot start with this vocabulary fails before any decoding.
    """

    def __init__(self, constraint: Constraint, vocabulary: Callable[[], Any]):
        self.constraint = constraint
        self.vocabulary = vocabulary
        self.matcher = None
        self.size = 0  # the model's own ids; the bitmask may hold a virtual end token past them
        self.bitmask: np.ndarray | None = None  # (words,) int32, 32 tokens per word
        self.consumed = 0
        self._fresh = False  # the bitmask already holds the mask for the next token
        self._start()

    def _start(self) -> None:
        from llguidance import LLMatcher

        vocabulary = self.vocabulary()
        self.size = vocabulary.size
        self.bitmask = np.zeros(((vocabulary.tokenizer.vocab_size + 31) // 32,), np.int32)

        def build():  # compiling recurses natively: on the big-stack thread, as the checks did
            matcher = LLMatcher(vocabulary.tokenizer, self.constraint.grammar, log_level=0, limits=parser_limits())
            if not matcher.is_error():
                matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
            return matcher

        self.matcher = _llg_call(build, f"the {self.constraint.kind} constraint")
        self._check_error()
        self._fresh = True

    def allowed(self, width: int) -> np.ndarray:
        """A boolean (width,) array over the logits: the tokens the grammar allows next. Logits
        past the vocabulary (padded embeddings) are never allowed."""
        if not self._fresh:
            self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
            self._check_error()
        self._fresh = False
        bits = np.unpackbits(self.bitmask.view(np.uint8), bitorder="little").view(bool)  # token i is bit i
        if width <= self.size:
            return bits[:width]
        allowed = np.zeros(width, bool)
        allowed[: self.size] = bits[: self.size]
        return allowed

    def apply(self, logits: np.ndarray) -> tuple[np.ndarray | None, int | None]:
        """(a copy of `logits` with every forbidden token at -inf, the token when it is the only
        one allowed). The logits are None when no token is allowed, which happens when only the
        end of the text may follow and the model has no end token."""
        allowed = self.allowed(logits.shape[-1])
        count = np.count_nonzero(allowed)
        if count == 0:
            if self.accepting:
                return None, None
            raise InputError(f"the {self.constraint.kind} constraint cannot be continued with this model's "
                             "vocabulary (no token it allows exists)")
        forced = int(np.flatnonzero(allowed)[0]) if count == 1 else None
        return np.where(allowed, logits, np.float32(-np.inf)), forced

    def consume(self, token: int) -> None:
        self._fresh = False
        if not self.matcher.consume_token(token):
            self._fail(vocabulary_reason=True)
        self.consumed += 1

    @property
    def accepting(self) -> bool:
        return self.matcher is not None and self.matcher.is_accepting()

    @property
    def stopped(self) -> bool:
        """No further text is possible: the grammar is finished."""
        return self.matcher is not None and self.matcher.is_stopped()

    def _check_error(self) -> None:
        if self.matcher.is_error():
            self._fail(vocabulary_reason=False)

    def _fail(self, vocabulary_reason: bool) -> None:
        """One line for a matcher in its error state: a limit llguidance reached is named as such
        (never blamed on the vocabulary); a token the grammar refused after the mask allowed it
        means the grammar needs text the vocabulary cannot spell."""
        message = self.matcher.get_error()
        meaning = limit_meaning(message)
        kind = self.constraint.kind
        if meaning is not None:
            raise InputError(f"the {kind} constraint stopped after {self.consumed} tokens: {meaning}; simplify it")
        if vocabulary_reason:
            # the mask allowed this token, so the grammar needs text the vocabulary cannot spell (an
            # unknown-character token stood in for it)
            raise InputError(f"the {kind} constraint cannot be continued with this model's vocabulary "
                             f"({llg_message(message)})")
        raise InputError(f"the {kind} constraint failed: {llg_message(message)}")
