"""GPT-2 (ONNX): cached decoding, teacher-forced held-out text and greedy continuations vs the reference.

fp32: logits within the bound at every cached step of the prompts and every stored held-out row,
and greedy continuations equal to torch's `generate()`. int8/int4: top-1 agreement with torch over
the held-out text, and held-out perplexity against the fp32 graph's (measured at export and stored,
the fp32 graph is not part of the artifact); mean KL to torch is reported.

For every held-out position the reference keeps torch's top-k ids and log-probs and its
log-probability of the actual next token, a few hundred KiB at any vocabulary: top-1 and
perplexity are exact, KL is over the top-k plus one bucket for the rest (a lower bound of the full
KL, metrics.coarsened_kl). Full logits rows are kept only where the fp32 check compares them: the
prompts' and the first held-out positions', as many as the budget allows (store.rows_within_budget).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgelm.artifact import Check, Manifest
from edgelm.errors import ArtifactError
from edgelm.families import family_named
from edgelm.metrics import (
    max_abs_diff,
    mean_coarsened_kl,
    perplexity,
    perplexity_of,
    teacher_forced_nll,
    top_k_log_probs,
)
from edgelm.reference.store import (
    TOP_K,
    Field,
    check_log_probs,
    check_perplexities,
    check_top_k,
    expect_shape,
    padded,
    scalar,
)

SCHEMA = {
    "prompts": Field("int", 2),  # (prompts, longest), right-padded with 0
    "prompt_lengths": Field("int", 1),
    "prompt_logits": Field("float", 2, required=False),  # fp32: torch's rows of every prompt, concatenated
    "greedy": Field("int", 2, required=False),  # fp32: torch's greedy continuation per prompt, padded
    "greedy_lengths": Field("int", 1, required=False),  # shorter where generate() stopped at eos
    "held_out": Field("int", 1),
    "held_out_top_ids": Field("int", 2),  # (positions, k): torch's most likely next tokens, most likely first
    "held_out_top_logp": Field("float", 2),  # their log-probs
    "held_out_logp": Field("float", 1),  # torch's log p of each held-out token after the first
    "held_out_logits": Field("float", 2, required=False),  # fp32: torch's rows of the first positions (budgeted)
    "held_out_perplexity_fp32": Field("float", 0, required=False),  # quantized: the fp32 graph's, at export
}
MAX_PROMPTS = 16
FP32_ONLY = ("prompt_logits", "greedy", "greedy_lengths", "held_out_logits")


def reference_arrays(prompts: list[list[int]], held_out: list[int], held_out_logits: np.ndarray, rows: int,
                     prompt_logits: list[np.ndarray] | None, greedy: list[list[int]] | None,
                     ppl_fp32: float | None, k: int = TOP_K) -> dict[str, np.ndarray]:
    """`held_out_logits`: torch's full rows (T, vocab), reduced to the top-k; `rows` of them kept (fp32)."""
    table, lengths = padded(prompts)
    top_ids, top_logp = top_k_log_probs(held_out_logits, k)
    arrays = {"prompts": table, "prompt_lengths": lengths, "held_out": np.asarray(held_out, np.int64),
              "held_out_top_ids": top_ids, "held_out_top_logp": top_logp,
              "held_out_logp": (-teacher_forced_nll(held_out_logits, held_out)).astype(np.float32)}
    if prompt_logits is not None and greedy is not None:
        arrays["held_out_logits"] = np.asarray(held_out_logits[:rows], np.float32)
        arrays["prompt_logits"] = np.concatenate(prompt_logits).astype(np.float32)
        arrays["greedy"] = padded([g or [0] for g in greedy])[0]  # an empty continuation still has a row
        arrays["greedy_lengths"] = np.asarray([len(g) for g in greedy], np.int64)
    if ppl_fp32 is not None:
        arrays["held_out_perplexity_fp32"] = np.float64(float(ppl_fp32))
    return arrays


def check_arrays(arrays: dict[str, np.ndarray], manifest: Manifest, path: Path) -> None:
    vocab, context = manifest.model.vocab_size, manifest.model.context_length
    lengths, held_out = arrays["prompt_lengths"], arrays["held_out"]
    if not 1 <= len(lengths) <= MAX_PROMPTS:
        raise ArtifactError(f"{path}: array 'prompt_lengths' must list 1..{MAX_PROMPTS} prompts")
    expect_shape(arrays, "prompts", (len(lengths), None), path)
    if (lengths < 1).any() or (lengths > arrays["prompts"].shape[1]).any():
        raise ArtifactError(f"{path}: array 'prompt_lengths' does not fit the prompts")
    if not 2 <= len(held_out) <= context:
        raise ArtifactError(f"{path}: array 'held_out' must hold 2..{context} tokens")
    check_top_k(arrays, "held_out_top_ids", "held_out_top_logp", len(held_out), vocab, path)
    expect_shape(arrays, "held_out_logp", (len(held_out) - 1,), path)
    check_log_probs(arrays, "held_out_logp", path)
    for name in ("prompts", "held_out", "greedy"):
        if name in arrays and not ((arrays[name] >= 0) & (arrays[name] < vocab)).all():
            raise ArtifactError(f"{path}: array {name!r} holds token ids outside the vocabulary of {vocab}")
    if manifest.quant == "none":
        _check_fp32_arrays(arrays, vocab, context, path)
    elif "held_out_perplexity_fp32" not in arrays:
        raise ArtifactError(f"{path}: reference file has no array 'held_out_perplexity_fp32'")
    check_perplexities(arrays, path, "held_out_perplexity_fp32")


def _check_fp32_arrays(arrays: dict[str, np.ndarray], vocab: int, context: int, path: Path) -> None:
    missing = next((name for name in FP32_ONLY if name not in arrays), None)
    if missing:
        raise ArtifactError(f"{path}: reference file has no array {missing!r}")
    lengths, greedy = arrays["prompt_lengths"], arrays["greedy_lengths"]
    expect_shape(arrays, "prompt_logits", (int(lengths.sum()), vocab), path)
    rows = arrays["held_out_logits"].shape[0]
    if not 1 <= rows <= len(arrays["held_out"]):
        raise ArtifactError(f"{path}: array 'held_out_logits' must have 1..{len(arrays['held_out'])} rows")
    expect_shape(arrays, "held_out_logits", (rows, vocab), path)
    expect_shape(arrays, "greedy", (len(lengths), None), path)
    expect_shape(arrays, "greedy_lengths", (len(lengths),), path)
    if (greedy < 0).any() or (greedy > arrays["greedy"].shape[1]).any() or (lengths + greedy > context).any():
        raise ArtifactError(f"{path}: array 'greedy_lengths' does not fit the continuations or the context")


def run_checks(folder: Path, manifest: Manifest, arrays: dict[str, np.ndarray], options: Any) -> list[Check]:
    from edgelm.runtime.loading import manifest_where, open_onnx
    from edgelm.runtime.ort.kv_decoder import make_decoder

    session, _ = open_onnx(folder, manifest, options)
    decoder = make_decoder(session, manifest, manifest_where(folder))
    held_out = arrays["held_out"].tolist()
    logits = decoder.score(held_out)  # (T, vocab): position t predicts token t+1
    quant = family_named("gpt2").spec("onnx").quant(manifest.quant)  # bounds: edgelm/families.py
    if manifest.quant == "none":
        rows = arrays["held_out_logits"]
        prompts = prompt_rows(arrays)
        cached = max(_cached_logit_diff(decoder, ids, ref) for ids, ref in prompts)
        same = sum(_greedy(decoder, ids, len(expected)) == expected for (ids, _), expected in
                   zip(prompts, greedy_rows(arrays)))
        return [
            Check.at_most("max_abs_logit_diff_vs_torch", max(cached, max_abs_diff(logits[: len(rows)], rows)),
                          quant.bound("max_abs_logit_diff_vs_torch")),  # over every checked position
            Check.at_least("greedy_32_identical_prompts", same, len(prompts)),
        ]
    ratio_name = f"held_out_perplexity_ratio_{quant.name}_vs_fp32"
    ppl_quant, ppl_fp32 = perplexity_of(logits, held_out), scalar(arrays, "held_out_perplexity_fp32")
    top_ids, top_logp = arrays["held_out_top_ids"], arrays["held_out_top_logp"]
    agreement = float(np.mean(np.argmax(logits, axis=-1) == top_ids[:, 0]))
    return [
        Check.at_least("top1_agreement_vs_torch", agreement, quant.bound("top1_agreement_vs_torch")),
        Check.measured("mean_kl_vs_torch", mean_coarsened_kl(top_ids, top_logp, logits),
                       f"over torch's top-{top_ids.shape[1]} tokens and one bucket for the rest: a lower bound"),
        Check.measured("held_out_perplexity_torch", perplexity(-arrays["held_out_logp"])),
        Check.measured("held_out_perplexity_fp32", ppl_fp32, "the fp32 graph's, on the exporting machine"),
        Check.measured(f"held_out_perplexity_{quant.name}", ppl_quant),
        Check.at_most(ratio_name, ppl_quant / ppl_fp32, quant.bound(ratio_name)),
    ]


def prompt_rows(arrays: dict[str, np.ndarray]) -> list[tuple[list[int], np.ndarray]]:
    """Each prompt's ids with torch's logits rows for it."""
    out, start = [], 0
    for row, length in zip(arrays["prompts"], arrays["prompt_lengths"].tolist()):
        out.append((row[:length].tolist(), arrays["prompt_logits"][start : start + length]))
        start += length
    return out


def greedy_rows(arrays: dict[str, np.ndarray]) -> list[list[int]]:
    return [row[:length].tolist() for row, length in zip(arrays["greedy"], arrays["greedy_lengths"].tolist())]


def _cached_logit_diff(decoder: Any, ids: list[int], reference: np.ndarray) -> float:
    """Prefill half the prompt, step through the rest: each step must equal torch's full recomputation."""
    half = max(1, len(ids) // 2)
    diffs = [max_abs_diff(decoder.prefill(ids[:half]), reference[half - 1])]
    for position in range(half, len(ids)):
        diffs.append(max_abs_diff(decoder.step(ids[position]), reference[position]))
    return max(diffs)


def _greedy(decoder: Any, ids: list[int], count: int) -> list[int]:
    if count == 0:
        return []
    ours = [int(np.argmax(decoder.prefill(ids)))]
    while len(ours) < count:
        ours.append(int(np.argmax(decoder.step(ours[-1]))))
    return ours
