"""One generation-parameters type, shared by every decoder and backend.

Every value is checked when the parameters are built, so nothing odd reaches the sampler: floats
must be real finite numbers in range (NaN passes every `<` test, so ranges alone are not enough),
and the two that divide logits (temperature, repetition penalty) must not be subnormal, whose
reciprocal overflows to infinity. Integers must be real integers, not bools or floats.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
from dataclasses import dataclass, field
from typing import Any

from edgelm.errors import UsageError
from edgelm.safe_text import has_lone_surrogates

MAX_TOKENS = 1 << 20  # far beyond any context edgelm runs; a bound keeps a typo from running for days
MAX_SEED = 2**64 - 1  # numpy's seeds are unsigned 64-bit words
MAX_STOPS = 64
MAX_STOP_CHARS = 1024
TINY = sys.float_info.min  # the smallest normal double; below it, 1/x overflows


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: int = 128
    temperature: float = 0.8  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    min_p: float = 0.0  # 0 disables
    repetition_penalty: float = 1.0  # 1 disables
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    truncate: bool = False  # drop the start of a prompt that does not fit, and say so

    def __post_init__(self) -> None:
        problems: list[str] = []
        checked = {
            "max_tokens": _integer(self.max_tokens, "max_tokens", 1, MAX_TOKENS, problems),
            "top_k": _integer(self.top_k, "top_k", 0, None, problems),
            "temperature": _real(self.temperature, "temperature", problems, divides=True, zero_ok=True),
            "top_p": _real(self.top_p, "top_p", problems, low=0.0, high=1.0, low_open=True),
            "min_p": _real(self.min_p, "min_p", problems, low=0.0, high=1.0, high_open=True),
            "repetition_penalty": _real(self.repetition_penalty, "repetition_penalty", problems, divides=True),
            "seed": None if self.seed is None else _integer(self.seed, "seed", 0, MAX_SEED, problems),
            "stop": _stops(self.stop, problems),
        }
        if not isinstance(self.truncate, bool):
            problems.append(f"truncate must be true or false, got {_shown(self.truncate)}")
        if problems:
            raise UsageError("; ".join(problems))
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_kwargs(cls, base: GenerationParams | None = None, **kwargs: Any) -> GenerationParams:
        """Build from keyword arguments, rejecting names that are not parameters."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise UsageError(
                f"unknown generation parameter(s): {', '.join(map(str, unknown))} (known: {', '.join(sorted(names))})"
            )
        given = {k: v for k, v in kwargs.items() if v is not None}
        return dataclasses.replace(base or cls(), **given)


def _shown(value: Any) -> str:
    text = repr(value) if isinstance(value, (int, float, str)) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _integer(value: Any, name: str, low: int, high: int | None, problems: list[str]) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        problems.append(f"{name} must be an integer, got {_shown(value)}")
        return 0
    value = int(value)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f">= {low}"
        problems.append(f"{name} must be {bound}, got {value if abs(value) < 10**20 else 'a huge number'}")
    return value


def _real(value: Any, name: str, problems: list[str], *, low: float = 0.0, high: float | None = None,
          low_open: bool = False, high_open: bool = False, divides: bool = False, zero_ok: bool = False) -> float:
    """A finite float in range; `divides`: positive and not subnormal (0 allowed with zero_ok)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        problems.append(f"{name} must be a number, got {_shown(value)}")
        return 0.0
    try:
        number = float(value)
    except (OverflowError, ValueError):  # an integer too large for a float
        problems.append(f"{name} must be a finite number, got {_shown(value)}")
        return 0.0
    if not math.isfinite(number):
        problems.append(f"{name} must be a finite number, got {number}")
    elif divides and not (number >= TINY or (zero_ok and number == 0.0)):
        kind = ">= 0" if zero_ok else "> 0"
        problems.append(f"{name} must be {kind} and not vanishingly small (at least {TINY:.3g}), got {number}")
    elif divides:
        pass
    elif number < low or (low_open and number == low) or (high is not None and (
            number > high or (high_open and number == high))):
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        problems.append(f"{name} must be in {left}{low:g}, {high:g}{right}, got {number}")
    return number


def _stops(value: Any, problems: list[str]) -> tuple[str, ...]:
    stops = (value,) if isinstance(value, str) else value
    if stops is None:
        return ()
    try:
        stops = tuple(stops)
    except TypeError:
        problems.append(f"stop must be a string or a list of strings, got {_shown(value)}")
        return ()
    if len(stops) > MAX_STOPS:
        problems.append(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
    elif any(not isinstance(s, str) or not s or len(s) > MAX_STOP_CHARS for s in stops):
        problems.append(f"stop strings must be non-empty strings of at most {MAX_STOP_CHARS} characters")
    elif any(has_lone_surrogates(s) for s in stops):
        problems.append("stop strings must be valid UTF-8 text (one holds an undecodable byte)")
    return stops


def check_token_ids(ids: Any, vocab_size: int, where: str) -> list[int]:
    """Token ids given from outside as a list of ints, each within [0, vocab_size)."""
    from edgelm.errors import InputError

    checked = []
    for i, token in enumerate(ids):
        if isinstance(token, bool) or not isinstance(token, numbers.Integral) or not 0 <= token < vocab_size:
            raise InputError(f"{where}: token {i} is {_shown(token)}, not an id in [0, {vocab_size})")
        checked.append(int(token))
    return checked
