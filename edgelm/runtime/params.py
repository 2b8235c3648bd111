"""One generation-parameters type, shared by every decoder and backend."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from edgelm.errors import UsageError


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
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        self._check()

    def _check(self) -> None:
        problems = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            problems.append(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if self.temperature < 0:
            problems.append(f"temperature must be >= 0, got {self.temperature}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            problems.append(f"min_p must be in [0, 1), got {self.min_p}")
        if self.repetition_penalty <= 0:
            problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            problems.append(f"seed must be a non-negative integer, got {self.seed!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            problems.append("stop strings must be non-empty strings")
        if problems:
            raise UsageError("; ".join(problems))

    @classmethod
    def from_kwargs(cls, base: GenerationParams | None = None, **kwargs: Any) -> GenerationParams:
        """Build from keyword arguments, rejecting names that are not parameters."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(kwargs) - names)
        if unknown:
            raise UsageError(
                f"unknown generation parameter(s): {', '.join(unknown)} (known: {', '.join(sorted(names))})"
            )
        given = {k: v for k, v in kwargs.items() if v is not None}
        return dataclasses.replace(base or cls(), **given)
