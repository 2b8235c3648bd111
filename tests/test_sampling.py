"""Generation parameters and the shared numpy sampler."""

from __future__ import annotations

import numpy as np
import pytest

from edgelm.errors import UsageError
from edgelm.runtime.core.params import GenerationParams
from edgelm.runtime.core.sampler import Sampler, apply_repetition_penalty, filtered_probs

LOGITS = np.array([2.0, 1.0, 0.5, -1.0, 3.0], dtype=np.float32)


@pytest.mark.parametrize("bad", [
    {"max_tokens": 0}, {"temperature": -0.1}, {"top_k": -1}, {"top_p": 0.0}, {"top_p": 1.5},
    {"min_p": 1.0}, {"repetition_penalty": 0.0}, {"seed": -3}, {"stop": [""]},
])
def test_invalid_values_are_rejected(bad):
    with pytest.raises(UsageError):
        GenerationParams(**bad)


def test_unknown_parameter_names_are_rejected():
    with pytest.raises(UsageError, match="unknown generation parameter.*temprature"):
        GenerationParams.from_kwargs(temprature=0.5)


def test_temperature_zero_is_greedy():
    assert Sampler(GenerationParams(temperature=0))(LOGITS) == 4


def test_same_seed_same_draws_and_other_seed_differs():
    sampler_a = Sampler(GenerationParams(temperature=1.5, seed=7))
    sampler_b = Sampler(GenerationParams(temperature=1.5, seed=7))
    a = [sampler_a(LOGITS) for _ in range(50)]
    b = [sampler_b(LOGITS) for _ in range(50)]
    assert a == b
    sampler_c = Sampler(GenerationParams(temperature=1.5, seed=8))
    assert [sampler_c(LOGITS) for _ in range(50)] != a


def test_top_k_keeps_only_the_k_most_likely():
    probs = filtered_probs(LOGITS, GenerationParams(temperature=1.0, top_k=2))
    assert set(np.flatnonzero(probs)) == {0, 4}
    assert probs.sum() == pytest.approx(1.0)


def test_top_p_keeps_the_smallest_set_reaching_the_mass():
    probs = filtered_probs(LOGITS, GenerationParams(temperature=1.0, top_p=0.5))
    assert set(np.flatnonzero(probs)) == {4}  # the top token alone holds more than half the mass
    wide = filtered_probs(LOGITS, GenerationParams(temperature=1.0, top_p=0.9))
    assert set(np.flatnonzero(wide)) == {0, 4, 1}


def test_min_p_drops_tokens_far_below_the_best():
    probs = filtered_probs(LOGITS, GenerationParams(temperature=1.0, min_p=0.3))
    # exp(2-3)=0.37 survives a 0.3 cut, exp(1-3)=0.14 does not
    assert set(np.flatnonzero(probs)) == {0, 4}


def test_repetition_penalty_lowers_seen_tokens_both_signs():
    out = apply_repetition_penalty(LOGITS, [4, 3], 2.0)
    assert out[4] == pytest.approx(1.5) and out[3] == pytest.approx(-2.0)
    assert out[0] == LOGITS[0]
    assert Sampler(GenerationParams(temperature=0, repetition_penalty=4.0))(LOGITS, seen=[4]) == 0
