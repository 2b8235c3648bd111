"""GGUF decoders (llama, qwen2, phi3, gpt2): llama.cpp's logits against the transformers reference.

llama.cpp runs with an F32 KV cache and every position's logits. F32 files must match to the
bound (for GELU models, against torch computing ggml's F16-table GELU, stored beside the plain
reference); F16/BF16 must pick torch's top token wherever torch's choice is decisive; quantized
files are judged by mean KL divergence and held-out perplexity against torch.

What is stored stays small at any vocabulary: for every position (prompts and held-out text)
torch's top-k ids and log-probs, and for every held-out token torch's log-probability of it. So
perplexity, top-1 agreement and the decisive margin are exact; mean KL is computed over torch's
top-k tokens plus one bucket for the rest (metrics.coarsened_kl), a lower bound of the full KL.
Full logits rows are kept only for the F32 exactness check, at as many positions as the budget
allows (store.rows_within_budget), spread evenly over the prompts and the held-out text so late
positions (where a wrong rotary table shows most) are among them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgelm.artifact import Check, Manifest, artifact_file
from edgelm.errors import ArtifactError, first_line
from edgelm.families import QuantType, family_named
from edgelm.metrics import (
    log_softmax,
    max_abs_diff,
    mean_coarsened_kl,
    perplexity,
    perplexity_of,
    teacher_forced_nll,
    top_k_log_probs,
)
from edgelm.reference.store import TOP_K, Field, check_log_probs, check_top_k, expect_shape, padded

SCHEMA = {
    "prompts": Field("int", 2),  # (prompts, longest), right-padded with 0
    "prompt_lengths": Field("int", 1),
    "held_out": Field("int", 1),
    "top_ids": Field("int", 2),  # (positions, k): torch's k most likely next tokens, prompts then held-out
    "top_logp": Field("float", 2),  # their log-probs, most likely first
    "held_out_logp": Field("float", 1),  # torch's log p of each held-out token after the first, given its prefix
    "logits": Field("float", 2, required=False),  # F32 files: torch's full rows at some positions
    "logits_positions": Field("int", 1, required=False),  # which: indices into the positions, increasing
    "exact_logits": Field("float", 2, required=False),  # the same with ggml's GELU (F32 files of GELU models)
}
MAX_PROMPTS = 16
MAX_SEQUENCE = 1024  # tokens per prompt or held-out text (exporters write 256): llama.cpp keeps n_ctx x vocab logits


def needs_full_rows(quant: QuantType) -> bool:
    """Only the exactness check (F32) compares whole logits rows; every other check reads the top-k."""
    return "max_abs_logit_diff_vs_torch" in quant.bounds


def reference_arrays(prompts: list[list[int]], held_out: list[int], logits: list[np.ndarray],
                     exact: list[np.ndarray] | None, full_rows: int, k: int = TOP_K) -> dict[str, np.ndarray]:
    """torch's rows per input (prompts, then held-out) reduced to what the checks read."""
    table, lengths = padded(prompts)
    rows = np.concatenate(logits)
    top_ids, top_logp = top_k_log_probs(rows, k)
    arrays = {"prompts": table, "prompt_lengths": lengths, "held_out": np.asarray(held_out, np.int64),
              "top_ids": top_ids, "top_logp": top_logp,
              "held_out_logp": (-teacher_forced_nll(logits[-1], held_out)).astype(np.float32)}
    if full_rows:
        where = spread(len(rows), full_rows)
        arrays["logits"], arrays["logits_positions"] = rows[where].astype(np.float32), where
        if exact is not None:
            arrays["exact_logits"] = np.concatenate(exact)[where].astype(np.float32)
    return arrays


def spread(positions: int, count: int) -> np.ndarray:
    """`count` positions out of `positions`, evenly spaced, the first and the last among them."""
    return np.unique(np.linspace(0, positions - 1, min(count, positions)).round().astype(np.int64))


def check_arrays(arrays: dict[str, np.ndarray], manifest: Manifest, path: Path) -> None:
    lengths, held_out = arrays["prompt_lengths"], arrays["held_out"]
    if not 1 <= len(lengths) <= MAX_PROMPTS:
        raise ArtifactError(f"{path}: array 'prompt_lengths' must list 1..{MAX_PROMPTS} prompts")
    expect_shape(arrays, "prompts", (len(lengths), None), path)
    context = min(manifest.model.context_length or MAX_SEQUENCE, MAX_SEQUENCE)
    longest = max(int(lengths.max()), len(held_out))
    if (lengths < 1).any() or (lengths > arrays["prompts"].shape[1]).any() or len(held_out) < 2 or longest > context:
        raise ArtifactError(f"{path}: arrays 'prompt_lengths' or 'held_out' do not fit the prompts or the context")
    vocab = manifest.model.vocab_size or arrays["top_ids"].shape[1]
    positions = int(lengths.sum()) + len(held_out)
    check_top_k(arrays, "top_ids", "top_logp", positions, vocab, path)
    expect_shape(arrays, "held_out_logp", (len(held_out) - 1,), path)
    check_log_probs(arrays, "held_out_logp", path)
    _check_full_rows(arrays, manifest, positions, vocab, path)
    for name in ("prompts", "held_out"):
        if not ((arrays[name] >= 0) & (arrays[name] < vocab)).all():
            raise ArtifactError(f"{path}: array {name!r} holds token ids outside the vocabulary of {vocab}")


def _check_full_rows(arrays: dict[str, np.ndarray], manifest: Manifest, positions: int, vocab: int,
                     path: Path) -> None:
    if "logits" not in arrays:
        if needs_full_rows(family_named(manifest.family).spec("gguf").quant(manifest.quant)):
            raise ArtifactError(f"{path}: reference file has no array 'logits' (an F32 file is checked on full rows)")
        if "exact_logits" in arrays or "logits_positions" in arrays:
            raise ArtifactError(f"{path}: arrays 'exact_logits' or 'logits_positions' come without 'logits'")
        return
    where = arrays.get("logits_positions")
    if where is None or not 1 <= len(where) <= positions:
        raise ArtifactError(f"{path}: array 'logits_positions' must list 1..{positions} positions")
    if where[0] < 0 or where[-1] >= positions or (np.diff(where) <= 0).any():
        raise ArtifactError(f"{path}: array 'logits_positions' must be increasing positions below {positions}")
    rows = len(where)
    expect_shape(arrays, "logits", (rows, vocab), path)
    if "exact_logits" in arrays:
        expect_shape(arrays, "exact_logits", (rows, vocab), path)


def inputs_of(arrays: dict[str, np.ndarray]) -> list[list[int]]:
    """The token sequences in the order their rows are stored: the prompts, then the held-out text."""
    prompts = [row[:n].tolist() for row, n in zip(arrays["prompts"], arrays["prompt_lengths"].tolist())]
    return [*prompts, arrays["held_out"].tolist()]


def run_checks(folder: Path, manifest: Manifest, arrays: dict[str, np.ndarray], options: Any) -> list[Check]:
    from edgelm.runtime.device import thread_count
    from edgelm.runtime.gguf.metadata import read_gguf_header

    path = artifact_file(folder, manifest, manifest.model.file, "model.file")
    read_gguf_header(path)  # the header is checked in Python before llama.cpp opens the file
    inputs = inputs_of(arrays)
    llm = open_llama_for_logits(path, max(len(ids) for ids in inputs) + 8, thread_count(options.threads))
    try:
        ours = [llama_logits(llm, ids) for ids in inputs]
    finally:
        llm.close()
    quant = family_named(manifest.family).spec("gguf").quant(manifest.quant)  # its bounds
    return logit_checks(quant, arrays, ours, inputs[-1])


def open_llama_for_logits(path: Path, n_ctx: int, threads: int | None = None):
    """llama.cpp with every position's logits and an F32 KV cache (type 0 = GGML_TYPE_F32)."""
    import llama_cpp

    from edgelm.runtime.llamacpp.log import captured_llama_log, log_lines

    threaded = {"n_threads": threads, "n_threads_batch": threads} if threads else {}
    with captured_llama_log() as log:
        try:
            return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                   logits_all=True, type_k=0, type_v=0, verbose=False, **threaded)
        except (ValueError, RuntimeError) as err:
            reason = next((line for line in log_lines(log) if "error" in line.lower()), first_line(err))
            raise ArtifactError(f"{path}: llama.cpp could not load the model ({reason})") from None


def llama_logits(llm: Any, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)  # (T, V)


def decisive_agreement(top_logp: np.ndarray, same: np.ndarray, margin: float) -> tuple[float, int]:
    """Top-1 agreement over positions where torch's top-2 margin is at least `margin`.

    The margin of log-probs is the margin of logits (log-softmax shifts a row by one constant).
    """
    decisive = (top_logp[:, 0].astype(np.float64) - top_logp[:, 1]) >= margin
    if not decisive.any():
        return 1.0, 0
    return float(same[decisive].mean()), int(decisive.sum())


def logit_checks(quant: QuantType, arrays: dict[str, np.ndarray], ours: list[np.ndarray],
                 held_out: list[int]) -> list[Check]:
    """The checks of `quant`'s kind, each against the bound its table entry declares.

    ours: llama.cpp's full rows per input (prompts, then the held-out text); the reference's top-k
    covers every one of those positions, its full rows (F32 only) the first ones.
    """
    ours_all, ours_seq = np.concatenate(ours), ours[-1]
    top_ids, top_logp = arrays["top_ids"], arrays["top_logp"]
    same = np.argmax(ours_all, axis=-1) == top_ids[:, 0]
    held = slice(len(ours_all) - len(held_out), None)
    ppl_torch, ppl_gguf = perplexity(-arrays["held_out_logp"]), perplexity_of(ours_seq, held_out)
    kl = Check.measured("mean_kl_vs_torch", mean_coarsened_kl(top_ids[held], top_logp[held], ours_seq))
    measured = [
        Check.measured("top1_agreement_vs_torch", float(same.mean())),
        Check.measured("held_out_perplexity_torch", ppl_torch),
        Check.measured("held_out_perplexity_gguf", ppl_gguf),
    ]
    bounds = quant.bounds
    if needs_full_rows(quant):  # exact types (F32)
        return [*_exact_checks(arrays, ours_all, bounds["max_abs_logit_diff_vs_torch"]), *measured, kl]
    if "decisive_margin" in bounds:  # F16 / BF16: rounding may flip near-ties only
        margin = bounds["decisive_margin"]
        share, count = decisive_agreement(top_logp, same, margin)
        decisive = Check.at_least("top1_agreement_decisive_vs_torch", share,
                                  bounds["top1_agreement_decisive_vs_torch"])
        decisive.note = f"{count} of {len(same)} positions where torch's top-2 logit margin >= {margin}"
        return [decisive, *measured, _top_k_logp_diff(top_ids, top_logp, ours_all), kl]
    kl = Check.at_most("mean_kl_vs_torch", kl.value, bounds["mean_kl_vs_torch"])
    kl.note = f"over torch's top-{top_ids.shape[1]} tokens and one bucket for the rest: a lower bound of the full KL"
    return [kl, Check.at_most("held_out_perplexity_ratio_vs_torch", ppl_gguf / ppl_torch,
                              bounds["held_out_perplexity_ratio_vs_torch"]), *measured]


def _exact_checks(arrays: dict[str, np.ndarray], ours_all: np.ndarray, bound: float) -> list[Check]:
    """F32: the stored full rows within the bound (with ggml's GELU where stored); the top-k of every
    position is reported beside them."""
    plain, ours = arrays["logits"], ours_all[arrays["logits_positions"]]
    reference = arrays.get("exact_logits", plain)
    exact = Check.at_most("max_abs_logit_diff_vs_torch", max_abs_diff(reference, ours), bound)
    exact.note = f"full rows at {len(plain)} of {len(ours_all)} positions, spread evenly"
    top_k = _top_k_logp_diff(arrays["top_ids"], arrays["top_logp"], ours_all)
    if "exact_logits" not in arrays:
        return [exact, top_k]
    exact.note += "; torch with ggml's F16-table GELU, which llama.cpp computes"
    return [exact, Check.measured("max_abs_logit_diff_vs_plain_torch", max_abs_diff(plain, ours),
                                  "reported: ggml's GELU rounds through F16"), top_k]


def _top_k_logp_diff(top_ids: np.ndarray, top_logp: np.ndarray, ours_all: np.ndarray) -> Check:
    """Reported for F16/BF16: how far llama.cpp's log-probs move at torch's top-k tokens, every position."""
    ours = np.take_along_axis(log_softmax(ours_all), top_ids.astype(np.int64), -1)
    return Check.measured("max_abs_logprob_diff_vs_torch_top_k", max_abs_diff(ours, top_logp),
                          f"at torch's top-{top_ids.shape[1]} tokens of every position")
