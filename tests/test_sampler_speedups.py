"""The sampler's fast paths give exactly what the plain computations give: the nucleus found
among a few candidates equals the one from sorting the whole row (ties included), and drawing
from the cumulative distribution equals numpy's Generator.choice for the same seed."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edgelm.runtime.core.sampler import draw, nucleus


def nucleus_by_full_sort(probs: np.ndarray, top_p: float) -> np.ndarray:
    order = np.argsort(-probs, kind="stable")
    cut = int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1
    mask = np.zeros(probs.shape, dtype=bool)
    mask[order[:cut]] = True
    return mask


rows = st.tuples(st.integers(1, 3000), st.integers(0, 2**32 - 1), st.floats(0.05, 8.0), st.integers(0, 50))


@settings(max_examples=300, deadline=None)
@given(row=rows, top_p=st.floats(0.01, 0.999))
def test_the_nucleus_equals_a_full_sort(row, top_p):
    size, seed, spread, tie_levels = row
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(size) * spread
    if tie_levels:  # many exact ties, as quantized logits have
        logits = np.round(logits * tie_levels) / tie_levels
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    assert (nucleus(probs, top_p) == nucleus_by_full_sort(probs, top_p)).all()


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 5000), seed=st.integers(0, 2**32 - 1))
def test_draw_equals_generator_choice(size, seed):
    probs = np.random.default_rng(seed).dirichlet(np.full(size, 0.3))
    probs /= probs.sum()
    ours, numpys = np.random.default_rng(seed + 1), np.random.default_rng(seed + 1)
    for _ in range(5):
        assert draw(ours, probs) == int(numpys.choice(size, p=probs))
