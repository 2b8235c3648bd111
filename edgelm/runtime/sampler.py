"""The numpy sampler every ONNX decoder shares: penalties, temperature, top-k, top-p, min-p."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgelm.runtime.params import GenerationParams


def apply_repetition_penalty(logits: np.ndarray, seen: Sequence[int], penalty: float) -> np.ndarray:
    """Make already-seen tokens less likely: positive logits are divided, negative multiplied."""
    if penalty == 1.0 or not len(seen):
        return logits
    logits = logits.copy()
    ids = np.unique(np.asarray(seen, dtype=np.int64))
    picked = logits[ids]
    logits[ids] = np.where(picked > 0, picked / penalty, picked * penalty)
    return logits


def filtered_probs(logits: np.ndarray, params: GenerationParams) -> np.ndarray:
    """Probabilities after temperature, top-k, top-p and min-p; zero outside the kept set."""
    scaled = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < scaled.size:
        kth = np.partition(scaled, -params.top_k)[-params.top_k]
        scaled = np.where(scaled >= kth, scaled, -np.inf)
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        cut = int(np.searchsorted(cumulative, params.top_p)) + 1
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[:cut]] = True
        probs = np.where(mask, probs, 0.0)
    if params.min_p > 0.0:
        probs = np.where(probs >= params.min_p * probs.max(), probs, 0.0)
    return probs / probs.sum()


class Sampler:
    """Picks the next token from one row of logits; the seed makes the sequence repeatable."""

    def __init__(self, params: GenerationParams):
        self.params = params
        self.rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray, seen: Sequence[int] = ()) -> int:
        logits = apply_repetition_penalty(np.asarray(logits, dtype=np.float32), seen, self.params.repetition_penalty)
        if self.params.temperature == 0:
            return int(np.argmax(logits))
        probs = filtered_probs(logits, self.params)
        return int(self.rng.choice(probs.size, p=probs))
