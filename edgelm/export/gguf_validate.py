"""Prove a GGUF export against its source: logits vs transformers, tokenizer and template parity.

llama.cpp runs with an F32 KV cache and every position's logits; transformers runs in F32.
F32 files must match to 1e-4; F16/BF16 must pick the same top token wherever torch's choice is
decisive; quantized files are judged by mean KL divergence and held-out perplexity change.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgelm.artifact import Check, Manifest
from edgelm.errors import ExportError, first_line
from edgelm.export.checks import max_abs_diff, top1_agreement
from edgelm.export.options import ExportOptions
from edgelm.families import QuantType, family_named
from edgelm.metrics import mean_kl, perplexity_of

HELD_OUT_TOKENS = 256  # at most; fewer when the model's context is shorter
PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def square(x):\n    return x * x\n\nprint(square(12))",
    "Ünïcödé text, emoji 🙂 and 中文 in one prompt.",
)


def validate_gguf(path: Path, source: Path, manifest: Manifest, options: ExportOptions) -> list[Check]:
    from edgelm.export.gguf_parity import chat_template_checks, tokenizer_checks

    options.progress("validate", 0, 3)
    quant = family_named(manifest.family).spec("gguf").quant(manifest.quant)  # its bounds
    torch_model, hf_tokenizer = _load_source(source)
    held_out_tokens = min(HELD_OUT_TOKENS, int(manifest.model.context_length or HELD_OUT_TOKENS))
    llm = open_llama_for_logits(path, held_out_tokens + 8)
    try:
        add_bos = manifest.generation.add_bos
        bos = manifest.tokenizer.bos_id
        prompts = [_ids(hf_tokenizer, text, bos if add_bos else None) for text in PROMPTS]
        held_out = _ids(hf_tokenizer, held_out_text(), bos if add_bos else None)[:held_out_tokens]
        pairs = [(_torch_logits(torch_model, ids), _llama_logits(llm, ids)) for ids in [*prompts, held_out]]
        exact = _ggml_activation_reference(torch_model, manifest, quant, [*prompts, held_out])
        options.progress("validate", 1, 3)
        checks = logit_checks(quant, pairs, held_out, exact)
        checks += tokenizer_checks(llm, source, manifest)
        options.progress("validate", 2, 3)
    finally:
        llm.close()
    checks += chat_template_checks(source, manifest)
    options.progress("validate", 3, 3)
    return checks


def _ggml_activation_reference(model, manifest: Manifest, quant: QuantType, inputs: list[list[int]]):
    """For exact (F32) files of GELU models: torch's logits with llama.cpp's own GELU, else None.

    ggml's CPU GELU reads a table indexed by the F16-rounded input and returns F16 values, so even
    an exact F32 file differs from torch by that rounding (about 1e-4 on a tiny random GPT-2,
    more on larger logits). The exactness check runs against torch computing that same GELU; the
    difference to plain torch is reported beside it.
    """
    from edgelm.export.gguf_arch import ARCHS

    spec = ARCHS.get(family_named(manifest.family).spec("gguf").gguf_arch or "")
    if spec is None or not spec.ggml_gelu or "max_abs_logit_diff_vs_torch" not in quant.bounds:
        return None
    import torch
    from transformers.activations import NewGELUActivation

    class GgmlGelu(torch.nn.Module):
        def forward(self, x):  # ggml: 0 below -10, identity above 10, else F16(gelu(F16(x)))
            table = NewGELUActivation()(x.half().float()).half().float()
            return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))

    swapped = []
    for module in model.modules():
        if isinstance(getattr(module, "act", None), NewGELUActivation):
            swapped.append((module, module.act))
            module.act = GgmlGelu()
    try:
        return [_torch_logits(model, ids) for ids in inputs]
    finally:
        for module, act in swapped:
            module.act = act


def _load_source(source: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(source)


def open_llama_for_logits(path: Path, n_ctx: int):
    """llama.cpp with every position's logits and an F32 KV cache (type 0 = GGML_TYPE_F32)."""
    import llama_cpp

    from edgelm.runtime.llama_log import captured_llama_log, log_lines

    with captured_llama_log() as log:
        try:
            return llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx,
                                   logits_all=True, type_k=0, type_v=0, verbose=False)
        except (ValueError, RuntimeError) as err:
            reason = next((line for line in log_lines(log) if "error" in line.lower()), first_line(err))
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
