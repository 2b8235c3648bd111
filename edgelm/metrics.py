"""Fidelity numbers, written once: log-softmax, perplexity, KL divergence (full and over a stored
top-k), and top-1 agreement.

Used by `edgelm eval`, the exporters' validation, training and the benchmarks. numpy only, so
the runtime may import it. Perplexity follows llama.cpp's `llama-perplexity`: the text is
tokenized once and cut into chunks of n_ctx tokens (the tail dropped), BOS replaces each chunk's
first token where the model uses one, and only the second half of each chunk is scored, so every
scored token sees at least n_ctx/2 tokens of context. Its error is the standard error of the mean
negative log-likelihood, scaled by the perplexity, as llama.cpp prints it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from edgelm.errors import InputError


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """log p over the last axis, in float64 (stable for any finite logits)."""
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def token_nll(logits: np.ndarray, targets: Sequence[int]) -> np.ndarray:
    """-log p(target) per row: logits (T, V), targets (T,) -> (T,)."""
    logp = log_softmax(logits)
    return -logp[np.arange(len(targets)), np.asarray(targets, np.int64)]


def teacher_forced_nll(logits: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """Each position's logits predicting the next id: logits (T, V), ids (T,) -> (T-1,)."""
    return token_nll(np.asarray(logits)[:-1], list(ids)[1:])


def perplexity(nll: np.ndarray) -> float:
    return float(np.exp(np.mean(nll)))


def perplexity_error(nll: np.ndarray) -> float:
    """llama-perplexity's "+/-": sqrt(var(nll) / (n - 1)) * PPL."""
    nll = np.asarray(nll, np.float64)
    if len(nll) < 2:
        return 0.0
    variance = float(np.mean(nll**2) - np.mean(nll) ** 2)
    return float(np.sqrt(variance / (len(nll) - 1)) * perplexity(nll)) if variance > 0 else 0.0


def perplexity_of(logits: np.ndarray, ids: Sequence[int]) -> float:
    """Teacher-forced perplexity of ids[1:] given each prefix."""
    return perplexity(teacher_forced_nll(logits, ids))


def kl_divergence(reference: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(reference || other) per row, in nats: (T, V), (T, V) -> (T,)."""
    p_log, q_log = log_softmax(reference), log_softmax(other)
    return np.maximum(np.sum(np.exp(p_log) * (p_log - q_log), axis=-1), 0.0)


def mean_kl(reference: np.ndarray, other: np.ndarray) -> float:
    return float(np.mean(kl_divergence(reference, other)))


REST_NOISE = 1e-6  # a rest bucket this small is the rounding of float32 log-probs, not probability


def top_k_log_probs(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k most likely ids (int32) and their log-probs (float32), most likely first.

    Ties keep the lower id first, so column 0 is np.argmax's choice: the reference's top-1.
    """
    logp = log_softmax(logits)
    k = min(k, logp.shape[-1])
    ids = np.argsort(-logp, axis=-1, kind="stable")[:, :k]
    return ids.astype(np.int32), np.take_along_axis(logp, ids, -1).astype(np.float32)


def coarsened_kl(top_ids: np.ndarray, top_logp: np.ndarray, other: np.ndarray) -> np.ndarray:
    """KL(reference || other) per row over the reference's top-k tokens plus one bucket for the rest.

    Only the reference's top-k log-probs are stored (top_ids, top_logp: (T, k)); `other` is a full
    logits row (T, V). Merging tokens into one bucket can only lose divergence (the data-processing
    inequality), so this is a lower bound of the full KL, equal to it when k is the vocabulary.
    """
    p_top = np.exp(np.asarray(top_logp, np.float64))
    p_rest = 1.0 - p_top.sum(-1)
    p_rest = np.where(p_rest > REST_NOISE, p_rest, 0.0)  # below it: the float32 rounding of the stored log-probs
    q_log = log_softmax(other)
    q_top_log = np.take_along_axis(q_log, np.asarray(top_ids, np.int64), -1)
    rest_mask = np.ones(q_log.shape, bool)
    np.put_along_axis(rest_mask, np.asarray(top_ids, np.int64), False, -1)
    q_rest = np.maximum(np.where(rest_mask, np.exp(q_log), 0.0).sum(-1), 1e-300)  # summed, not 1 - top: exact
    top = np.sum(p_top * (np.asarray(top_logp, np.float64) - q_top_log), axis=-1)
    rest = np.where(p_rest > 0, p_rest * (np.log(np.maximum(p_rest, 1e-300)) - np.log(q_rest)), 0.0)
    return np.maximum(top + rest, 0.0)


def mean_coarsened_kl(top_ids: np.ndarray, top_logp: np.ndarray, other: np.ndarray) -> float:
    return float(np.mean(coarsened_kl(top_ids, top_logp, other)))


def top1_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Share of rows where both sides pick the same most likely token."""
    return float(np.mean(np.argmax(a, axis=-1) == np.argmax(b, axis=-1)))


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row pair: (N, D), (N, D) -> (N,)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    norms = np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    return (a * b).sum(axis=1) / norms


# -- llama-perplexity's chunking ----------------------------------------------------------------
def perplexity_chunks(ids: Sequence[int], n_ctx: int, bos_id: int | None = None) -> list[list[int]]:
    """Whole chunks of n_ctx tokens (the tail dropped), each starting with BOS where one is given.

    At least two chunks are needed, as llama-perplexity requires; fewer is a one-line InputError.
    """
    if n_ctx < 4:
        raise InputError(f"context {n_ctx} is too small to score (at least 4 tokens)")
    count = len(ids) // n_ctx
    if count < 2:
        raise InputError(f"the text has {len(ids)} tokens; perplexity at context {n_ctx} needs at least "
                         f"{2 * n_ctx} (two chunks): give a longer text or a smaller --ctx")
    chunks = [list(ids[i * n_ctx : (i + 1) * n_ctx]) for i in range(count)]
    if bos_id is not None:
        for chunk in chunks:
            chunk[0] = bos_id
    return chunks


def scored_positions(n_ctx: int) -> range:
    """Positions whose logits are scored: the second half, each predicting the next token."""
    return range(n_ctx // 2, n_ctx - 1)


@dataclass(frozen=True)
class Comparison:
    """A model's perplexity, and with a base model's logits on the same tokens, how far it moved."""

    perplexity: float
    perplexity_error: float
    tokens_scored: int
    kl_divergence: float | None = None
    kl_divergence_p99: float | None = None
    top1_agreement: float | None = None
    perplexity_ratio: float | None = None

    def as_dict(self) -> dict[str, float | int]:
        keys = ["perplexity", "perplexity_error", "tokens_scored"]
        if self.kl_divergence is not None:
            keys += ["kl_divergence", "kl_divergence_p99", "top1_agreement", "perplexity_ratio"]
        return {key: getattr(self, key) for key in keys}


class Scorer:
    """Collects per-token numbers chunk by chunk (so no (tokens, vocab) array of a whole text is held)."""

    def __init__(self) -> None:
        self.nll: list[np.ndarray] = []
        self.base_nll: list[np.ndarray] = []
        self.kl: list[np.ndarray] = []
        self.same_top1: list[np.ndarray] = []

    def add(self, logits: np.ndarray, targets: Sequence[int], base_logits: np.ndarray | None = None) -> None:
        """One chunk: logits (T, V) predicting targets (T,); base_logits (T, V) of a base model, if any."""
        self.nll.append(token_nll(logits, targets))
        if base_logits is not None:
            self.base_nll.append(token_nll(base_logits, targets))
            self.kl.append(kl_divergence(base_logits, logits))
            self.same_top1.append(np.argmax(base_logits, axis=-1) == np.argmax(logits, axis=-1))

    def result(self) -> Comparison:
        nll = np.concatenate(self.nll)
        if not self.kl:
            return Comparison(perplexity(nll), perplexity_error(nll), len(nll))
        kl, base_nll = np.concatenate(self.kl), np.concatenate(self.base_nll)
        return Comparison(perplexity(nll), perplexity_error(nll), len(nll), float(np.mean(kl)),
                          float(np.percentile(kl, 99)), float(np.mean(np.concatenate(self.same_top1))),
                          float(np.exp(np.mean(nll) - np.mean(base_nll))))


def compare(logits: np.ndarray, targets: Sequence[int], base_logits: np.ndarray | None = None) -> Comparison:
    """Perplexity of `logits` (T, V) on `targets` (T,); with `base_logits`, KL, top-1 and the ratio."""
    scorer = Scorer()
    scorer.add(logits, targets, base_logits)
    return scorer.result()


# -- scoring a loaded generator ------------------------------------------------------------------
def chunk_logits(decoder, chunk: Sequence[int]) -> tuple[np.ndarray, list[int]]:
    """(logits (n, V), targets (n,)) for a chunk's scored positions, through the decoder users run:
    the first half (and the first scored position) as one prompt, then one token at a time."""
    positions = scored_positions(len(chunk))
    rows = [np.array(decoder.prefill(chunk[: positions.start + 1]), np.float32)]  # copies: backends reuse buffers
    for position in positions[1:]:
        rows.append(np.array(decoder.step(chunk[position]), np.float32))
    return np.stack(rows), list(chunk[positions.start + 1 :])


def score_chunks(model, chunks: list[list[int]], base=None, progress=None) -> Comparison:
    """Perplexity of a loaded text generator over chunks; with `base` (another one), KL, top-1, ratio."""
    scorer = Scorer()
    for done, chunk in enumerate(chunks, 1):
        with model.exclusive():  # no scheduled sequence may step the decoder in between
            logits, targets = chunk_logits(model.decoder, chunk)
        base_logits = None
        if base is not None:
            with base.exclusive():
                base_logits = chunk_logits(base.decoder, chunk)[0]
        scorer.add(logits, targets, base_logits)
        if progress is not None:
            progress(done, len(chunks))
    return scorer.result()
