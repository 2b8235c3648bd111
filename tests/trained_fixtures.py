"""Tiny GPT-2, LLaMA and BERT folders from `edgelm train`'s own code: a few steps on a corpus slice.

Sizes stay small for speed; the hidden size of 64 makes llama.cpp's K-quants fall back per tensor,
which these tests do not need (calibration runs on the default sizes, in benchmarks/).
"""

from __future__ import annotations

from pathlib import Path

TINY_HF = dict(hidden=64, layers=1, heads=2, vocab_size=400, seq_len=64, batch_size=2, steps=3)
TEXT_CHARS = 40_000


def training_text() -> str:
    from edgelm.models.corpus import builtin_text

    return builtin_text()[:TEXT_CHARS]


def train_tiny_hf(out: Path, family: str, **overrides) -> Path:
    from edgelm.models.hf_train import HfTrainOptions, train_hf

    train_hf(out, HfTrainOptions(family=family, **{**TINY_HF, **overrides}), training_text())
    return out
