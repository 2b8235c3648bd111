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

from edgelm.errors import InputError, UsageError, first_line

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
    given = {name: value for name, value in given.items() if value is not None and value is not False}
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


def json_schema_constraint(schema: Mapping[str, Any] | str | bool, kind: str = "json_schema") -> Constraint:
    """A JSON Schema (a dict or its JSON text) as a constraint; an InputError if it does not compile."""
    from llguidance import LLMatcher

    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as err:
            raise InputError(f"json_schema is not valid JSON ({err})") from None
    if not isinstance(schema, (Mapping, bool)):
        raise InputError(f"json_schema must be a JSON object (a dict), got {type(schema).__name__}")
    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_DEFAULTS)
    except (ValueError, TypeError) as err:
        raise InputError(f"json_schema cannot be used: {_one_line(str(err))}") from None
    return _checked(grammar, kind, "json_schema")


def regex_constraint(pattern: str) -> Constraint:
    from llguidance import LLMatcher

    if not isinstance(pattern, str) or not pattern:
        raise InputError("regex must be a non-empty string")
    return _checked(LLMatcher.grammar_from_regex(pattern), "regex", "regex")


def lark_constraint(text: str) -> Constraint:
    from llguidance import LLMatcher

    if not isinstance(text, str) or not text.strip():
        raise InputError("grammar must be a non-empty Lark grammar string")
    return _checked(LLMatcher.grammar_from_lark(text), "grammar", "grammar")


def _checked(grammar: str, kind: str, what: str) -> Constraint:
    """llguidance reports problems as text rather than raising; make them one-line InputErrors."""
    from llguidance import LLMatcher

    problem = LLMatcher.validate_grammar(grammar)
    if problem:
        raise InputError(f"{what} cannot be used: {_one_line(problem)}")
    return Constraint(grammar, kind)


def _one_line(message: str) -> str:
    """llguidance's messages echo the grammar with a caret under the fault; keep the words (all
    lines joined, unlike `first_line`, whose shortening and escaping they then go through)."""
    lines = [line.strip() for line in message.splitlines()]
    words = [line for line in lines if line and not set(line) <= {"^", " "} and "|" not in line[:6]]
    return first_line(" ".join(words), 300) or "rejected by llguidance"


class GrammarMask:
    """One sequence's position in a grammar: which tokens may come next, and whether it is done.

    `vocabulary` gives the model's llguidance vocabulary (constraint_vocab.py); it is asked for
    on the first call of `allowed`, so a constraint costs nothing until decoding starts.
    """

    def __init__(self, constraint: Constraint, vocabulary: Callable[[], Any]):
        self.constraint = constraint
        self.vocabulary = vocabulary
        self.matcher = None
        self.size = 0  # the model's own ids; the bitmask may hold a virtual end token past them
        self.bitmask: np.ndarray | None = None  # (words,) int32, 32 tokens per word

    def _start(self) -> None:
        from llguidance import LLMatcher

        vocabulary = self.vocabulary()
        self.matcher = LLMatcher(vocabulary.tokenizer, self.constraint.grammar, log_level=0)
        self._check_error()
        self.size = vocabulary.size
        self.bitmask = np.zeros(((vocabulary.tokenizer.vocab_size + 31) // 32,), np.int32)

    def allowed(self, width: int) -> np.ndarray:
        """A boolean (width,) array over the logits: the tokens the grammar allows next. Logits
        past the vocabulary (padded embeddings) are never allowed."""
        if self.matcher is None:
            self._start()
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.ctypes.data, self.bitmask.nbytes)
        self._check_error()
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
        if not self.matcher.consume_token(token):
            # the mask allowed this token, so the grammar needs text the vocabulary cannot spell (an
            # unknown-character token stood in for it)
            reason = self.matcher.get_error().split("<state>")[0]
            raise InputError(f"the {self.constraint.kind} constraint cannot be continued with this model's "
                             f"vocabulary ({_one_line(reason)})")

    @property
    def accepting(self) -> bool:
        return self.matcher is not None and self.matcher.is_accepting()

    @property
    def stopped(self) -> bool:
        """No further text is possible: the grammar is finished."""
        return self.matcher is not None and self.matcher.is_stopped()

    def _check_error(self) -> None:
        if self.matcher.is_error():
            raise InputError(f"the {self.constraint.kind} constraint failed: {_one_line(self.matcher.get_error())}")

