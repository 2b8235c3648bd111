"""Prove a GGUF export against its source: logits vs transformers, tokenizer and template parity.

llama.cpp runs with an F32 KV cache and every position's logits; transformers runs in F32.
F32 files must match to 1e-4; F16/BF16 must pick the same top token wherever torch's choice is
decisive; quantized files are judged by mean KL divergence and held-out perplexity change, over
the prompts and HELD_OUT_TOKENS of held-out text at any vocabulary size (the reference keeps
torch's top-k per position, not full rows: edgelm/reference/gguf_decoder.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgelm.artifact import Check, Manifest
from edgelm.export.options import ExportOptions
from edgelm.families import QuantType, family_named

HELD_OUT_TOKENS = 256  # at most; fewer when the model's context is shorter
PROMPTS = (
    "The quick brown fox jumps over the lazy dog.",
    "def square(x):\n    return x * x\n\nprint(square(12))",
    "Ünïcödé text, emoji 🙂 and 中文 in one prompt.",
)


def validate_gguf(path: Path, source: Path, manifest: Manifest, options: ExportOptions) -> list[Check]:
    """transformers' logits become the reference file and llama.cpp is checked against it as `edgelm verify`
    does; tokenizer and chat-template parity need the source's own libraries, so they run here only."""
    from edgelm.export.checks import checks_from_reference
    from edgelm.export.gguf_parity import chat_template_checks, tokenizer_checks
    from edgelm.reference.gguf_decoder import needs_full_rows, open_llama_for_logits, reference_arrays
    from edgelm.reference.store import rows_within_budget

    options.progress("validate", 0, 3)
    quant = family_named(manifest.family).spec("gguf").quant(manifest.quant)  # its bounds
    torch_model, hf_tokenizer = _load_source(source)
    bos = manifest.tokenizer.bos_id if manifest.generation.add_bos else None
    prompts = [_ids(hf_tokenizer, text, bos) for text in PROMPTS]
    held_out_tokens = min(HELD_OUT_TOKENS, int(manifest.model.context_length or HELD_OUT_TOKENS))
    held_out = _ids(hf_tokenizer, held_out_text(), bos)[:held_out_tokens]
    inputs = [*prompts, held_out]
    logits = [_torch_logits(torch_model, ids) for ids in inputs]
    exact = _ggml_activation_reference(torch_model, manifest, quant, inputs)
    # the reference stores every position's top-k; full rows only for F32's exactness check, budgeted
    width = int(torch_model.config.vocab_size) * (1 if exact is None else 2)
    full_rows = rows_within_budget(sum(len(ids) for ids in inputs), width, 1) if needs_full_rows(quant) else 0
    options.progress("validate", 1, 3)
    arrays = reference_arrays(prompts, held_out, logits, exact, full_rows)
    checks = checks_from_reference(path.parent, manifest, arrays)
    llm = open_llama_for_logits(path, max(len(ids) for ids in inputs) + 8)
    try:
        checks += tokenizer_checks(llm, source, manifest)
    finally:
        llm.close()
    options.progress("validate", 2, 3)
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
    from transformers import activations
    from transformers.activations import NewGELUActivation

    # the tanh GELU under the names transformers has used for it (GELUTanh since 4.57)
    tanh_gelus = tuple(getattr(activations, n) for n in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh")
                       if hasattr(activations, n))

    class GgmlGelu(torch.nn.Module):
        def forward(self, x):  # ggml: 0 below -10, identity above 10, else F16(gelu(F16(x)))
            table = NewGELUActivation()(x.half().float()).half().float()
            return torch.where(x <= -10, torch.zeros_like(x), torch.where(x >= 10, x, table))

    swapped = []  # GPT-2's MLP calls it act, Gemma's act_fn; both are the tanh GELU
    for module in model.modules():
        for attr in ("act", "act_fn"):
            if isinstance(getattr(module, attr, None), tanh_gelus):
                swapped.append((module, attr, getattr(module, attr)))
                setattr(module, attr, GgmlGelu())
    try:
        return [_torch_logits(model, ids) for ids in inputs]
    finally:
        for module, attr, act in swapped:
            setattr(module, attr, act)


def _load_source(source: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(source)


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
