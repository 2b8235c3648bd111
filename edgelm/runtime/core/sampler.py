"""The numpy sampler every decoder shares: penalties, temperature, top-k, top-p, min-p.

Logits come from model files edgelm did not write, so the sampler assumes nothing about them:
NaN counts as impossible, +inf as certain (ties shared), and the arithmetic runs in float64
after subtracting the maximum, so a huge logit or a tiny temperature cannot overflow into NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgelm.errors import ArtifactError
from edgelm.runtime.core.params import GenerationParams

FLOAT64_MAX = float(np.finfo(np.float64).max)


def apply_repetition_penalty(logits: np.ndarray, seen: Sequence[int], penalty: float) -> np.ndarray:
    """Make already-seen tokens less likely: positive logits are divided, negative multiplied."""
    if penalty == 1.0 or not len(seen):
        return logits
    logits = logits.astype(np.float64)  # a copy; float64 so that a large penalty does not overflow
    ids = np.unique(np.asarray(seen, dtype=np.int64))
    ids = ids[(ids >= 0) & (ids < logits.size)]  # ids beyond this row's vocabulary have no logit
    picked = logits[ids]
    with np.errstate(over="ignore"):
        penalized = np.where(picked > 0, picked / penalty, picked * penalty)
    # a finite logit stays finite however large the penalty: -inf would make it impossible, and a
    # row of only seen tokens would have nothing left to sample; masked (-inf) logits stay masked
    logits[ids] = np.where(np.isfinite(picked), np.clip(penalized, -FLOAT64_MAX, FLOAT64_MAX), penalized)
    return logits


def sanitized(logits: np.ndarray) -> np.ndarray:
    """float64 logits where NaN is -inf, and +inf (if any) is 0 against -inf for every other id."""
    row = np.asarray(logits, dtype=np.float64).reshape(-1)
    row = np.where(np.isnan(row), -np.inf, row)
    if np.isposinf(row).any():
        row = np.where(np.isposinf(row), 0.0, -np.inf)
    if not np.isfinite(row).any():
        raise ArtifactError("the model gave no finite logit for any token (all NaN or -inf)")
    return row


def filtered_probs(logits: np.ndarray, params: GenerationParams) -> np.ndarray:
    """Probabilities after temperature, top-k, top-p and min-p; zero outside the kept set."""
    row = sanitized(logits)
    with np.errstate(over="ignore", under="ignore"):
        scaled = (row - row.max()) / params.temperature  # <= 0, the best token exactly 0
    if 0 < params.top_k < scaled.size:
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    probs = np.exp(scaled)  # the best token gives 1, so the sum is at least 1
    probs /= probs.sum()
    if params.top_p < 1.0:
        probs = np.where(nucleus(probs, params.top_p), probs, 0.0)
    if params.min_p > 0.0:
        probs = np.where(probs >= params.min_p * probs.max(), probs, 0.0)
    return probs / probs.sum()


NUCLEUS_CANDIDATES = 64  # most tokens a nucleus is looked for among before sorting the whole row


def nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """The mask of the smallest set of most probable tokens whose mass reaches top_p (at least
    one token; ties in the order of their ids). Sorting a 50k vocabulary costs milliseconds per
    token; the nucleus nearly always lies among a few dozen tokens, so those are sorted alone
    whenever the tokens strictly more probable than the least of them already reach top_p (then
    no token outside can belong to the prefix, ties included), else the whole row is."""
    order = None
    if probs.size > NUCLEUS_CANDIDATES:
        candidates = np.argpartition(-probs, NUCLEUS_CANDIDATES - 1)[:NUCLEUS_CANDIDATES]
        floor = probs[candidates].min()
        above = candidates[probs[candidates] > floor]
        if probs[above].sum() >= top_p:
            order = above[np.lexsort((above, -probs[above]))]
    if order is None:
        order = np.argsort(-probs, kind="stable")
    cumulative = np.cumsum(probs[order])
    cut = int(np.searchsorted(cumulative, top_p)) + 1
    mask = np.zeros(probs.shape, dtype=bool)
    mask[order[:cut]] = True
    return mask


def draw(rng: np.random.Generator, probs: np.ndarray) -> int:
    """One id drawn with probabilities `probs` (they sum to 1): what `rng.choice(n, p=probs)`
    returns for the same generator state (the inverse of the cumulative distribution at one
    uniform draw), without its validation passes over the whole row."""
    cdf = np.cumsum(probs)
    cdf /= cdf[-1]
    return int(cdf.searchsorted(rng.random(), side="right"))


class Sampler:
    """Picks the next token from one row of logits; the seed makes the sequence repeatable."""

    def __init__(self, params: GenerationParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, seen: Sequence[int] = ()) -> int:
        logits = apply_repetition_penalty(np.asarray(logits, dtype=np.float32), seen, self.params.repetition_penalty)
        if self.params.temperature == 0:
            best = int(np.argmax(logits))  # NaN and +inf win argmax; only then is the row cleaned
            return best if np.isfinite(logits[best]) else int(np.argmax(sanitized(logits)))
        probs = filtered_probs(logits, self.params)
        return draw(self.rng, probs)
