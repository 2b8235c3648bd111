"""GGUF decoders (llama, qwen2, phi3, gpt2): llama.cpp's logits against the transformers reference.

llama.cpp runs with an F32 KV cache and every position's logits. F32 files must match to the
bound (for GELU models, against torch computing ggml's F16-table GELU, stored beside the plain
reference); F16/BF16 must pick torch's top token wherever torch's choice is decisive; quantized
files are judged by mean KL divergence and held-out perplexity against torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgelm.artifact import Check, Manifest, artifact_file
from edgelm.errors import ArtifactError, first_line
from edgelm.families import QuantType, family_named
from edgelm.metrics import max_abs_diff, mean_kl, perplexity_of, top1_agreement
from edgelm.reference.gpt2 import padded
from edgelm.reference.store import Field, expect_shape

SCHEMA = {
    "prompts": Field("int", 2),  # (prompts, longest), right-padded with 0
    "prompt_lengths": Field("int", 1),
    "held_out": Field("int", 1),
    "logits": Field("float", 2),  # torch's rows: every prompt's, then the held-out text's, concatenated
    "exact_logits": Field("float", 2, required=False),  # the same with ggml's GELU (F32 files of GELU models)
}
MAX_PROMPTS = 16


def reference_arrays(prompts: list[list[int]], held_out: list[int], logits: list[np.ndarray],
                     exact: list[np.ndarray] | None) -> dict[str, np.ndarray]:
    table, lengths = padded(prompts)
    arrays = {"prompts": table, "prompt_lengths": lengths, "held_out": np.asarray(held_out, np.int64),
              "logits": np.concatenate(logits).astype(np.float32)}
    if exact is not None:
        arrays["exact_logits"] = np.concatenate(exact).astype(np.float32)
    return arrays


def check_arrays(arrays: dict[str, np.ndarray], manifest: Manifest, path: Path) -> None:
    lengths, held_out = arrays["prompt_lengths"], arrays["held_out"]
    if not 1 <= len(lengths) <= MAX_PROMPTS:
        raise ArtifactError(f"{path}: array 'prompt_lengths' must list 1..{MAX_PROMPTS} prompts")
    expect_shape(arrays, "prompts", (len(lengths), None), path)
    context = manifest.model.context_length or 1 << 20
    longest = max(int(lengths.max()), len(held_out))
    if (lengths < 1).any() or (lengths > arrays["prompts"].shape[1]).any() or len(held_out) < 2 or longest > context:
        raise ArtifactError(f"{path}: arrays 'prompt_lengths' or 'held_out' do not fit the prompts or the context")
    vocab = manifest.model.vocab_size or arrays["logits"].shape[1]
    expect_shape(arrays, "logits", (int(lengths.sum()) + len(held_out), vocab), path)
    if "exact_logits" in arrays:
        expect_shape(arrays, "exact_logits", arrays["logits"].shape, path)
    for name in ("prompts", "held_out"):
        if not ((arrays[name] >= 0) & (arrays[name] < vocab)).all():
            raise ArtifactError(f"{path}: array {name!r} holds token ids outside the vocabulary of {vocab}")


def inputs_of(arrays: dict[str, np.ndarray]) -> list[list[int]]:
    """The token sequences in the order their rows are stored: the prompts, then the held-out text."""
    prompts = [row[:n].tolist() for row, n in zip(arrays["prompts"], arrays["prompt_lengths"].tolist())]
    return [*prompts, arrays["held_out"].tolist()]


def split_rows(rows: np.ndarray, inputs: list[list[int]]) -> list[np.ndarray]:
    bounds = np.cumsum([len(ids) for ids in inputs])[:-1]
    return np.split(rows, bounds)


def run_checks(folder: Path, manifest: Manifest, arrays: dict[str, np.ndarray], options: Any) -> list[Check]:
    from edgelm.runtime.device import thread_count
    from edgelm.runtime.gguf_file import read_gguf_header

    path = artifact_file(folder, manifest, manifest.model.file, "model.file")
    read_gguf_header(path)  # the header is checked in Python before llama.cpp opens the file
    inputs = inputs_of(arrays)
    llm = open_llama_for_logits(path, max(len(ids) for ids in inputs) + 8, thread_count(options.threads))
    try:
        pairs = list(zip(split_rows(arrays["logits"], inputs), (llama_logits(llm, ids) for ids in inputs)))
    finally:
        llm.close()
    exact = split_rows(arrays["exact_logits"], inputs) if "exact_logits" in arrays else None
    quant = family_named(manifest.family).spec("gguf").quant(manifest.quant)  # its bounds
    return logit_checks(quant, pairs, inputs[-1], exact)


def open_llama_for_logits(path: Path, n_ctx: int, threads: int | None = None):
    """llama.cpp with every position's logits and an F32 KV cache (type 0 = GGML_TYPE_F32)."""
    import llama_cpp

    from edgelm.runtime.llama_log import captured_llama_log, log_lines

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


def decisive_agreement(reference: np.ndarray, other: np.ndarray, margin: float) -> tuple[float, int]:
    """Top-1 agreement over positions where the reference's top-2 margin is at least `margin`."""
    top2 = np.sort(reference, axis=-1)[:, -2:]  # (T, 2)
    decisive = (top2[:, 1] - top2[:, 0]) >= margin
    if not decisive.any():
        return 1.0, 0
    same = np.argmax(reference, -1) == np.argmax(other, -1)
    return float(same[decisive].mean()), int(decisive.sum())


def logit_checks(quant: QuantType, pairs: list[tuple[np.ndarray, np.ndarray]], held_out: list[int],
                 exact_reference: list[np.ndarray] | None = None) -> list[Check]:
    """The checks of `quant`'s kind, each against the bound its table entry declares.

    `exact_reference`: torch's logits computed with llama.cpp's own activation, for the F32 check.
    """
    torch_all = np.concatenate([t for t, _ in pairs])  # (sum T, V)
    gguf_all = np.concatenate([g for _, g in pairs])
    torch_seq, gguf_seq = pairs[-1]
    ppl_torch, ppl_gguf = perplexity_of(torch_seq, held_out), perplexity_of(gguf_seq, held_out)
    kl = mean_kl(torch_seq, gguf_seq)
    measured = [
        Check.measured("top1_agreement_vs_torch", top1_agreement(torch_all, gguf_all)),
        Check.measured("held_out_perplexity_torch", ppl_torch),
        Check.measured("held_out_perplexity_gguf", ppl_gguf),
    ]
    bounds = quant.bounds
    if "max_abs_logit_diff_vs_torch" in bounds:  # exact types (F32)
        plain = max_abs_diff(torch_all, gguf_all)
        reference = torch_all if exact_reference is None else np.concatenate(exact_reference)
        exact = Check.at_most("max_abs_logit_diff_vs_torch", max_abs_diff(reference, gguf_all),
                              bounds["max_abs_logit_diff_vs_torch"])
        extra = []
        if exact_reference is not None:
            exact.note = "torch with ggml's F16-table GELU, which llama.cpp computes"
            extra = [Check.measured("max_abs_logit_diff_vs_plain_torch", plain,
                                    "reported: ggml's GELU rounds through F16")]
        return [exact, *extra, *measured, Check.measured("mean_kl_vs_torch", kl)]
    if "decisive_margin" in bounds:  # F16 / BF16: rounding may flip near-ties only
        margin = bounds["decisive_margin"]
        share, count = decisive_agreement(torch_all, gguf_all, margin)
        decisive = Check.at_least("top1_agreement_decisive_vs_torch", share,
                                  bounds["top1_agreement_decisive_vs_torch"])
        decisive.note = f"{count} of {len(torch_all)} positions where torch's top-2 logit margin >= {margin}"
        return [decisive, *measured, Check.measured("max_abs_logit_diff_vs_torch", max_abs_diff(torch_all, gguf_all)),
                Check.measured("mean_kl_vs_torch", kl)]
    return [Check.at_most("mean_kl_vs_torch", kl, bounds["mean_kl_vs_torch"]),
            Check.at_most("held_out_perplexity_ratio_vs_torch", ppl_gguf / ppl_torch,
                          bounds["held_out_perplexity_ratio_vs_torch"]),
            *measured]
