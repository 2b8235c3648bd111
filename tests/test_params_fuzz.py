"""Generation parameters and the sampler under property-based fuzzing.

Any value of any type, floats including NaN, infinities and subnormals: GenerationParams either
builds or raises UsageError, never anything else; a built one samples a valid token id from any
logits row that has one finite value (rows with -inf, NaN, +inf and huge values included) and its
probabilities are never NaN.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import fuzz_examples  # noqa: E402
from edgelm.errors import ArtifactError, UsageError  # noqa: E402
from edgelm.runtime.core.params import GenerationParams  # noqa: E402
from edgelm.runtime.core.sampler import Sampler, filtered_probs  # noqa: E402

SUBNORMAL = 5e-324
FLOATS = st.floats(allow_nan=True, allow_infinity=True, allow_subnormal=True)
ANYTHING = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70), FLOATS,
    st.text(max_size=5), st.binary(max_size=4), st.lists(st.integers(), max_size=3),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), SUBNORMAL, -0.0, sys.float_info.min, 1e308,
                     np.float64("nan"), np.float32(0.5), np.int64(3), object()]),
)
FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "seed", "stop", "truncate")
LOGIT = st.one_of(st.floats(width=32, allow_nan=False, allow_infinity=False),
                  st.sampled_from([float("-inf"), float("inf"), float("nan"), 3.4e38, -3.4e38, 0.0]))

# each example is a dictionary build plus one small sampling run: cheap, so many examples fit in CI
# (EDGELM_FUZZ=long runs 2000 each; the profiles are in conftest.py)
FAST = settings(max_examples=fuzz_examples(ci=400))


def logits_row(draw_values: list[float], vocab: int) -> np.ndarray:
    row = np.array((draw_values * (vocab // len(draw_values) + 1))[:vocab], dtype=np.float32)
    if not np.isfinite(row).any():
        row[vocab // 2] = 0.0  # a row with one finite value; all-non-finite is tested on its own
    return row


@FAST
@given(st.dictionaries(st.sampled_from(FIELDS), ANYTHING, max_size=5), st.lists(LOGIT, min_size=1, max_size=8),
       st.integers(min_value=1, max_value=64), st.lists(st.integers(-5, 80), max_size=6))
def test_any_parameters_build_or_raise_usage_error_and_sample_a_valid_id(fields, values, vocab, seen):
    try:
        params = GenerationParams(**fields)
    except UsageError as err:
        assert "\n" not in str(err)
        return
    assert math.isfinite(params.temperature) and math.isfinite(params.repetition_penalty)
    row = logits_row(values, vocab)
    token = Sampler(params)(row, seen)
    assert isinstance(token, int) and 0 <= token < vocab
    if params.temperature > 0:
        probs = filtered_probs(row, params)
        assert not np.isnan(probs).any() and abs(probs.sum() - 1) < 1e-9


@FAST
@given(st.one_of(st.just(0.0), st.floats(min_value=sys.float_info.min, max_value=1e300)),
       st.floats(min_value=sys.float_info.min, max_value=1e300), st.integers(0, 100),
       st.floats(min_value=0.0, max_value=1.0, exclude_min=True), st.floats(min_value=0.0, max_value=1.0, exclude_max=True),
       st.lists(LOGIT, min_size=1, max_size=8), st.integers(1, 64), st.lists(st.integers(0, 63), max_size=6))
def test_every_value_in_range_builds_and_samples(temperature, penalty, top_k, top_p, min_p, values, vocab, seen):
    params = GenerationParams(temperature=temperature, repetition_penalty=penalty, top_k=top_k, top_p=top_p,
                              min_p=min_p, seed=0)
    row = logits_row(values, vocab)
    assert 0 <= Sampler(params)(row, seen) < vocab
    if temperature > 0:
        assert not np.isnan(filtered_probs(row, params)).any()


@FAST
@given(FLOATS)
def test_temperature_is_finite_and_never_subnormal(value):
    try:
        params = GenerationParams(temperature=value)
    except UsageError:
        assert not math.isfinite(value) or value < 0 or 0 < value < sys.float_info.min
        return
    assert params.temperature == 0 or params.temperature >= sys.float_info.min


@pytest.mark.parametrize("fields, fragment", [
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=SUBNORMAL), "not vanishingly small"),
    (dict(repetition_penalty=SUBNORMAL), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "finite"),
    (dict(top_p=float("nan")), "top_p must be a finite number"),
    (dict(min_p=-float("inf")), "min_p"),
    (dict(max_tokens=True), "max_tokens must be an integer"),
    (dict(max_tokens=8.0), "max_tokens must be an integer"),
    (dict(max_tokens=10**12), "max_tokens must be between"),
    (dict(top_k=False), "top_k must be an integer"),
    (dict(seed=2**64), "seed must be between"),
    (dict(seed=-1), "seed must be between"),
    (dict(temperature="0.7"), "temperature must be a number"),
    (dict(stop=["ok", "\udcff"]), "valid UTF-8"),
    (dict(stop=[""]), "non-empty"),
    (dict(stop=5), "stop must be a string or a list"),
    (dict(truncate="yes"), "truncate must be true or false"),
])
def test_hostile_values_are_named_in_one_line(fields, fragment):
    with pytest.raises(UsageError, match=fragment) as caught:
        GenerationParams(**fields)
    assert "\n" not in str(caught.value)


def test_numpy_numbers_are_accepted_as_numbers():
    params = GenerationParams(temperature=np.float32(0.5), top_k=np.int64(3), seed=np.uint64(7))
    assert (params.temperature, params.top_k, params.seed) == (0.5, 3, 7)
    assert type(params.top_k) is int and type(params.temperature) is float


def test_the_sampler_survives_extreme_logits_and_tiny_temperatures():
    row = np.array([-np.inf, 3.4e38, np.nan, -3.4e38, 1.0], dtype=np.float32)
    for temperature in (sys.float_info.min, 1e-30, 1.0, 1e30):
        params = GenerationParams(temperature=temperature, repetition_penalty=1e300, seed=0)
        assert Sampler(params)(row, seen=[1, 4]) in (1, 4)
    certain = np.array([0.0, np.inf, 5.0, np.inf], dtype=np.float32)
    picks = {Sampler(GenerationParams(seed=s))(certain) for s in range(20)}
    assert picks == {1, 3}  # +inf is certain; two of them share the mass
    assert Sampler(GenerationParams(temperature=0))(np.array([np.nan, 1.0, 2.0], dtype=np.float32)) == 2
    # found by the fuzzer: a huge penalty on a row of seen negative logits must not leave nothing to pick
    only_seen = np.array([-1.4e9], dtype=np.float32)
    for temperature in (0.0, 1.0):
        assert Sampler(GenerationParams(temperature=temperature, repetition_penalty=1.26e299))(only_seen, [0]) == 0
    masked = np.array([-np.inf, -5.0], dtype=np.float32)  # a masked token stays masked under any penalty
    assert Sampler(GenerationParams(temperature=1.0, repetition_penalty=1e-300, seed=0))(masked, [0, 1]) == 1


def test_a_row_without_any_finite_logit_is_one_line():
    with pytest.raises(ArtifactError, match="no finite logit"):
        Sampler(GenerationParams(seed=0))(np.array([np.nan, -np.inf], dtype=np.float32))


def test_the_python_api_refuses_nan_and_subnormal_temperature(lstm_artifact):
    from edgelm.runtime import load

    with load(lstm_artifact, threads=1) as model:
        for bad in (float("nan"), SUBNORMAL, float("inf")):
            with pytest.raises(UsageError, match="temperature"):
                model.generate("The ", temperature=bad, max_tokens=2)
        assert model.generate("The ", temperature=sys.float_info.min, max_tokens=2, seed=0)
