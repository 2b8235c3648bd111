"""Prove a GGUF export against its source: logits vs transformers, tokenizer and template parity.

llama.cpp runs with an F32 KV cache and every position's logits; transformers runs in F32.
F32 files must match to 1e-4; F16/BF16 must pick the same top token wherever torch's choice is
decisive; quantized files are judged by mean KL divergence and held-out perplexity change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgelm.artifact import Check, Manifest
from edgelm.errors import ExportError
from edgelm.export.checks import max_abs_diff, top1_agreement
from edgelm.export.options import ExportOptions

F32_MAX_ABS = 1e-4
# torch's top-2 logit margin below which F16/BF16 rounding may honestly pick either token
DECISIVE_MARGIN = {"f16": 0.05, "bf16": 0.3}
# (mean KL divergence vs torch, perplexity ratio vs torch): upper bounds per quantized type
QUANT_BOUNDS = {"q8_0": (0.005, 1.01), "q6_k": (0.01, 1.02), "q5_k_m": (0.03, 1.04),
                "q4_k_m": (0.06, 1.08), "q4_0": (0.12, 1.15)}
HELD_OUT_TOKENS = 256
PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def square(x):\n    return x * x\n\nprint(square(12))",
    "Ünïcödé text, emoji 🙂 and 中文 in one prompt.",
)


def validate_gguf(path: Path, source: Path, manifest: Manifest, options: ExportOptions) -> list[Check]:
    from edgelm.export.gguf_parity import chat_template_checks, tokenizer_checks

    options.progress("validate", 0, 3)
    torch_model, hf_tokenizer = _load_source(source)
    llm = open_llama_for_logits(path, HELD_OUT_TOKENS + 8)
    try:
        add_bos = bool(manifest.generation.get("add_bos"))
        bos = manifest.generation.get("bos_id")
        prompts = [_ids(hf_tokenizer, text, bos if add_bos else None) for text in PROMPTS]
        held_out = _ids(hf_tokenizer, held_out_text(), bos if add_bos else None)[:HELD_OUT_TOKENS]
        pairs = [(_torch_logits(torch_model, ids), _llama_logits(llm, ids)) for ids in [*prompts, held_out]]
        options.progress("validate", 1, 3)
        checks = logit_checks(manifest.quant, pairs, held_out)
        checks += tokenizer_checks(llm, source, manifest)
        options.progress("validate", 2, 3)
    finally:
        llm.close()
    checks += chat_template_checks(source, manifest)
    options.progress("validate", 3, 3)
    return checks


def _load_source(source: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(source)


def open_llama_for_logits(path: Path, n_ctx: int):
    """llama.cpp with every position's logits and an F32 KV cache (type 0 = GGML_TYPE_F32)."""
    import llama_cpp

    from edgelm.export.gguf_quantize import captured_llama_log

    with captured_llama_log() as log:
        try:
            return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                   logits_all=True, type_k=0, type_v=0, verbose=False)
        except (ValueError, RuntimeError) as err:
            reason = next((line.strip() for line in log if "error" in line.lower()), str(err))
            raise ExportError(f"{path}: llama.cpp could not load the exported file ({reason})") from None


def held_out_text() -> str:
    from edgelm.models.corpus import builtin_text, split_held_out

    return split_held_out(builtin_text())[1][:HELD_OUT_TOKENS * 8]


def _ids(tokenizer, text: str, bos: int | None) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ([bos] if bos is not None else []) + list(ids)


def _torch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()  # (T, V)


def _llama_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)  # (T, V)


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z.astype(np.float64) - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def mean_kl(reference: np.ndarray, other: np.ndarray) -> float:
    """Mean over positions of KL(reference || other), in nats."""
    p_log, q_log = log_softmax(reference), log_softmax(other)
    return float(np.mean(np.sum(np.exp(p_log) * (p_log - q_log), axis=-1)))


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """Teacher-forced perplexity of ids[1:] given each prefix."""
    logp = log_softmax(logits[:-1])
    targets = np.asarray(ids[1:])
    return float(np.exp(-logp[np.arange(len(targets)), targets].mean()))


def decisive_agreement(reference: np.ndarray, other: np.ndarray, margin: float) -> tuple[float, int]:
    """Top-1 agreement over positions where the reference's top-2 margin is at least `margin`."""
    top2 = np.sort(reference, axis=-1)[:, -2:]  # (T, 2)
    decisive = (top2[:, 1] - top2[:, 0]) >= margin
    if not decisive.any():
        return 1.0, 0
    same = np.argmax(reference, -1) == np.argmax(other, -1)
    return float(same[decisive].mean()), int(decisive.sum())


def logit_checks(quant: str, pairs: list[tuple[np.ndarray, np.ndarray]], held_out: list[int]) -> list[Check]:
    torch_all = np.concatenate([t for t, _ in pairs])  # (sum T, V)
    gguf_all = np.concatenate([g for _, g in pairs])
    torch_seq, gguf_seq = pairs[-1]
    ppl_torch, ppl_gguf = perplexity(torch_seq, held_out), perplexity(gguf_seq, held_out)
    kl = mean_kl(torch_seq, gguf_seq)
    measured = [
        Check.measured("top1_agreement_vs_torch", top1_agreement(torch_all, gguf_all)),
        Check.measured("held_out_perplexity_torch", ppl_torch),
        Check.measured("held_out_perplexity_gguf", ppl_gguf),
    ]
    if quant == "f32":
        return [Check.at_most("max_abs_logit_diff_vs_torch", max_abs_diff(torch_all, gguf_all), F32_MAX_ABS),
                *measured, Check.measured("mean_kl_vs_torch", kl)]
    if quant in DECISIVE_MARGIN:
        share, count = decisive_agreement(torch_all, gguf_all, DECISIVE_MARGIN[quant])
        decisive = Check.at_least("top1_agreement_decisive_vs_torch", share, 1.0)
        decisive.note = (f"{count} of {len(torch_all)} positions where torch's top-2 logit margin "
                         f">= {DECISIVE_MARGIN[quant]}")
        return [decisive, *measured, Check.measured("max_abs_logit_diff_vs_torch", max_abs_diff(torch_all, gguf_all)),
                Check.measured("mean_kl_vs_torch", kl)]
    kl_bound, ppl_bound = QUANT_BOUNDS[quant]
    return [Check.at_most("mean_kl_vs_torch", kl, kl_bound),
            Check.at_most("held_out_perplexity_ratio_vs_torch", ppl_gguf / ppl_torch, ppl_bound),
            *measured]
