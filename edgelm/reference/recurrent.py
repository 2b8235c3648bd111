"""RNN / LSTM: chunked rollouts carrying the state, and held-out perplexity, against the stored reference.

The reference holds random token ids fed in chunks of untraced lengths (batch > 1), torch's
logits at every position and its final state, and the held-out ids with torch's perplexity and,
for int8, the fp32 graph's perplexity on the exporting machine (the bound is a ratio to it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgelm.artifact import Check, Manifest
from edgelm.errors import ArtifactError
from edgelm.families import family_named
from edgelm.metrics import max_abs_diff, token_nll, top1_agreement
from edgelm.reference.store import Field, check_perplexities, expect_shape, scalar

SCHEMA = {
    "chunks": Field("int", 1),  # lengths fed one call each, the state carried between them
    "ids": Field("int", 2),  # (batch, sum of chunks)
    "logits": Field("float", 3),  # torch's (batch, positions, vocab)
    "states": Field("float", 4),  # torch's final (h[, c]) stacked: (states, layers, batch, hidden)
    "held_out": Field("int", 1),
    "held_out_perplexity_torch": Field("float", 0),
    "held_out_perplexity_fp32": Field("float", 0, required=False),  # int8: the fp32 graph's, at export
}
MAX_CHUNKS, MAX_BATCH, MAX_HELD_OUT = 64, 16, 100_000  # the reference's work stays small on any device


def reference_arrays(chunks: list[int], ids: np.ndarray, logits: np.ndarray, states: list[np.ndarray],
                     held_out: np.ndarray, ppl_torch: float, ppl_fp32: float | None) -> dict[str, np.ndarray]:
    arrays = {"chunks": np.asarray(chunks, np.int64), "ids": np.asarray(ids, np.int64),
              "logits": np.asarray(logits, np.float32), "states": np.stack(states).astype(np.float32),
              "held_out": np.asarray(held_out, np.int64), "held_out_perplexity_torch": np.float64(float(ppl_torch))}
    if ppl_fp32 is not None:
        arrays["held_out_perplexity_fp32"] = np.float64(float(ppl_fp32))
    return arrays


def check_arrays(arrays: dict[str, np.ndarray], manifest: Manifest, path: Path) -> None:
    chunks, ids, held_out = arrays["chunks"], arrays["ids"], arrays["held_out"]
    model = manifest.model
    if not 1 <= len(chunks) <= MAX_CHUNKS or (chunks < 1).any() or int(chunks.sum()) != ids.shape[1]:
        raise ArtifactError(f"{path}: array 'chunks' must be 1..{MAX_CHUNKS} positive lengths summing to "
                            f"ids' {ids.shape[1]} positions")
    if not 1 <= ids.shape[0] <= MAX_BATCH or not 2 <= len(held_out) <= MAX_HELD_OUT:
        raise ArtifactError(f"{path}: arrays 'ids' or 'held_out' are outside the reference's size limits")
    for name in ("ids", "held_out"):
        if arrays[name].size and not ((arrays[name] >= 0) & (arrays[name] < model.vocab_size)).all():
            raise ArtifactError(f"{path}: array {name!r} holds token ids outside the vocabulary of {model.vocab_size}")
    expect_shape(arrays, "logits", (*ids.shape, model.vocab_size), path)
    expect_shape(arrays, "states", (len(model.inputs) - 1, model.num_layers, ids.shape[0], model.hidden_size), path)
    if manifest.quant != "none" and "held_out_perplexity_fp32" not in arrays:
        raise ArtifactError(f"{path}: reference file has no array 'held_out_perplexity_fp32'")
    check_perplexities(arrays, path, "held_out_perplexity_torch", "held_out_perplexity_fp32")


def run_checks(folder: Path, manifest: Manifest, arrays: dict[str, np.ndarray], options: Any) -> list[Check]:
    from edgelm.runtime.loading import open_onnx

    session, _ = open_onnx(folder, manifest, options)
    logits, states = rollout(session, arrays["ids"], arrays["chunks"])
    logit_diff = max_abs_diff(arrays["logits"], logits)
    state_diff = max(max_abs_diff(a, b) for a, b in zip(arrays["states"], states))
    ppl_onnx = onnx_perplexity(session, arrays["held_out"])
    ppl_torch = scalar(arrays, "held_out_perplexity_torch")
    bound = family_named(manifest.family).spec("onnx").quant(manifest.quant).bound  # edgelm/families.py
    if manifest.quant == "none":
        return [
            Check.at_most("max_abs_logit_diff_vs_torch", logit_diff, bound("max_abs_logit_diff_vs_torch")),
            Check.at_most("max_abs_state_diff_vs_torch", state_diff, bound("max_abs_state_diff_vs_torch")),
            Check.measured("held_out_perplexity", ppl_onnx),
            Check.measured("held_out_perplexity_torch", ppl_torch),
        ]
    ppl_fp32 = scalar(arrays, "held_out_perplexity_fp32")
    ratio = f"held_out_perplexity_ratio_{manifest.quant}_vs_fp32"
    return [
        Check.measured("top1_agreement_vs_torch", top1_agreement(arrays["logits"], logits)),
        Check.measured("max_abs_logit_diff_vs_torch", logit_diff),
        Check.measured("held_out_perplexity_fp32", ppl_fp32, "the fp32 graph's, on the exporting machine"),
        Check.measured("held_out_perplexity_torch", ppl_torch),
        Check.at_most(ratio, ppl_onnx / ppl_fp32, bound(ratio)),
    ]


def rollout(session: Any, ids: np.ndarray, chunks: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """Feed `ids` chunk by chunk from a zero state; every position's logits and the final state."""
    inputs = [i.name for i in session.get_inputs()]
    layers, _, size = session.get_inputs()[1].shape  # (L, batch, H); L and H are fixed
    state = [np.zeros((layers, ids.shape[0], size), np.float32) for _ in inputs[1:]]
    start, rows = 0, []
    ids = ids.astype(np.int64)
    for length in chunks.tolist():
        logits, *state = session.run(None, dict(zip(inputs, [ids[:, start : start + length], *state])))
        rows.append(logits)
        start += length
    return np.concatenate(rows, 1), state


def onnx_perplexity(session: Any, ids: np.ndarray, chunk: int = 256) -> float:
    """Per-token perplexity of an exported recurrent graph, carrying the state across chunks."""
    inputs = [i.name for i in session.get_inputs()]
    layers, _, size = session.get_inputs()[1].shape
    state = [np.zeros((layers, 1, size), np.float32) for _ in inputs[1:]]
    ids = ids.astype(np.int64)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        y = ids[start + 1 : start + chunk + 1]
        x = ids[start : start + len(y)][None, :]
        logits, *state = session.run(None, dict(zip(inputs, [x, *state])))
        total += token_nll(logits[0], y).sum()
        count += len(y)
    return float(np.exp(total / max(count, 1)))
