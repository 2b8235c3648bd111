"""Shared fixtures: tiny seeded recurrent models, trained for seconds, and their artifacts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Property-based fuzzing: a short "ci" profile by default, EDGELM_FUZZ=long for thousands of
# examples. Deadlines are per example inside the tests that need one (a shared machine's timing
# is too noisy for hypothesis's own).
try:
    from hypothesis import HealthCheck, settings

    settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("long", max_examples=2000, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.load_profile(os.environ.get("EDGELM_FUZZ", "ci"))
except ImportError:  # hypothesis is in the dev extra; without it only the fuzz tests are skipped
    pass


def fuzz_examples(ci: int, long: int = 2000) -> int:
    """How many examples a fuzz test runs under the profile chosen by EDGELM_FUZZ."""
    return long if os.environ.get("EDGELM_FUZZ") == "long" else ci


TINY = dict(hidden=32, layers=2, steps=40, seq_len=32, batch_size=8, lr=1e-2, seed=0)


def corpus_slice(chars: int = 40_000) -> str:
    from edgelm.models.corpus import builtin_text

    return builtin_text()[:chars]


def train_tiny(out: Path, cell: str, **overrides) -> Path:
    from edgelm.models.train import TrainOptions, train

    train(out, TrainOptions(cell=cell, **{**TINY, **overrides}), corpus_slice())
    return out


@pytest.fixture(scope="session", params=["rnn", "lstm"])
def recurrent_model(request, tmp_path_factory) -> Path:
    """A tiny trained model folder of each recurrent family (char tokenizer)."""
    return train_tiny(tmp_path_factory.mktemp(request.param) / "model", request.param)


@pytest.fixture(scope="session")
def lstm_model(tmp_path_factory) -> Path:
    return train_tiny(tmp_path_factory.mktemp("lstm") / "model", "lstm")


@pytest.fixture(scope="session")
def lstm_bpe_model(tmp_path_factory) -> Path:
    """Byte-level BPE: its tokens can split a multi-byte character."""
    return train_tiny(tmp_path_factory.mktemp("lstm-bpe") / "model", "lstm", tokenizer="bpe", vocab_size=400)


def export_to(source: Path, out: Path, **options) -> Path:
    """Export through the public API (`edgelm.export`) and return the artifact folder."""
    import edgelm

    edgelm.export(source, out, **options)
    return out


@pytest.fixture(scope="session")
def lstm_artifact(lstm_model, tmp_path_factory) -> Path:
    return export_to(lstm_model, tmp_path_factory.mktemp("art") / "lstm-fp32")


@pytest.fixture(scope="session")
def lstm_int8_artifact(lstm_model, tmp_path_factory) -> Path:
    return export_to(lstm_model, tmp_path_factory.mktemp("art") / "lstm-int8", quant="int8")


@pytest.fixture(scope="session")
def lstm_bpe_artifact(lstm_bpe_model, tmp_path_factory) -> Path:
    return export_to(lstm_bpe_model, tmp_path_factory.mktemp("art") / "lstm-bpe")


# The tiny random LLaMA GGUF of test_llama_runtime with a 256-token context, written once per
# session for the batched decoder's and the scheduler's tests.
@pytest.fixture(scope="session")
def tiny_gguf_256(tmp_path_factory) -> Path:
    from test_llama_runtime import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("tiny_gguf") / "tiny.gguf", context=256)


# The tiny GPT-2 (tests/gpt2_fixtures.py), built once per session for every module that uses it.
@pytest.fixture(scope="session")
def gpt2_source(tmp_path_factory) -> Path:
    """A tiny random GPT-2 folder, saved as transformers saves real checkpoints."""
    from gpt2_fixtures import make_gpt2_source

    return make_gpt2_source(tmp_path_factory.mktemp("gpt2") / "source")


@pytest.fixture(scope="session")
def gpt2_fp32(gpt2_source, tmp_path_factory) -> Path:
    return export_to(gpt2_source, tmp_path_factory.mktemp("art") / "gpt2-fp32")


@pytest.fixture(scope="session")
def gpt2_int8(gpt2_source, tmp_path_factory) -> Path:
    return export_to(gpt2_source, tmp_path_factory.mktemp("art") / "gpt2-int8", quant="int8")
