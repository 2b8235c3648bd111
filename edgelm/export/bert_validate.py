"""Validation of a BERT artifact against torch, end to end: tokenizer, graph and pooling/heads.

Both sides see the same probe texts as raw strings: torch through transformers' tokenizer and
model, the artifact through edgelm's own runtime task objects. The probes vary in length and one
is longer than the model's maximum, so truncation is checked too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgelm.artifact import Check, Manifest, staged

TORCH_BATCH = 8
ORT_MAX_ABS = 1e-4  # the .ort copy runs the same kernels

PROBES = (
    "Ok",  # short inputs are mostly [CLS]/[SEP], whose outlier activations int8 holds worst
    "Thanks!",
    "Hello.",
    "The cat sat on the mat.",
    "A man is playing a guitar on the stage while the crowd sings along.",
    "Quantum computers use qubits, which can hold superpositions of zero and one.",
    "Python's list comprehensions build a new list by applying an expression to each item.",
    "I can't believe it's already December; the year went by so fast!",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates again.",
    "naïve café résumé — unicode, accents and dashes",
    "How do I reset my password if I no longer have access to the email address on my account?",
    "The mitochondria is the powerhouse of the cell, producing most of the chemical energy "
    "needed to power the cell's biochemical reactions, stored in adenosine triphosphate.",
    "Short one",
    "1234 5678 90 + - * / = ( ) [ ] { }",
)
LONG_PROBE_WORDS = "the quick brown fox jumps over the lazy dog near a quiet river bank".split()


def probe_texts(max_length: int, mask_token: str | None = None) -> list[str]:
    """The probe set; with a mask token, each probe gets one word replaced by it (near the start)."""
    words = (LONG_PROBE_WORDS * (max_length // len(LONG_PROBE_WORDS) + 2))[: max_length + 20]
    texts = [*PROBES, " ".join(words)]  # the last one is longer than the maximum: truncated
    if mask_token is None:
        return texts
    masked = []
    for text in texts:
        split = text.split() or ["word"]
        position = min(len(split) // 2, 5)  # near the start, so truncation cannot drop it
        split[position] = mask_token
        masked.append(" ".join(split))
    return masked


def validate_encoder(source: Path, folder: Path, manifest: Manifest) -> list[Check]:
    """torch's outputs for the probes become the reference file; the checks are `edgelm verify`'s."""
    from edgelm.export.checks import checks_from_reference
    from edgelm.reference.encoder import reference_arrays

    mask = manifest.tokenizer.mask_token if manifest.task == "fill-mask" else None
    texts = probe_texts(int(manifest.model.context_length), mask)
    reference = torch_outputs(source, manifest, texts)
    return checks_from_reference(folder, manifest, reference_arrays(texts, reference))


def ort_agreement(folder: Path, manifest: Manifest) -> Check:
    """The .ort copy (--target mobile) must give what the .onnx file gives on every probe."""
    from edgelm.runtime.device import RuntimeOptions
    from edgelm.runtime.ort.encoders import load_encoder

    mask = manifest.tokenizer.mask_token if manifest.task == "fill-mask" else None
    texts = probe_texts(int(manifest.model.context_length), mask)
    outputs = []
    for model_format in ("onnx", "ort"):
        with load_encoder(folder, staged(manifest, folder), RuntimeOptions(model_format=model_format)) as task:
            name = {"embed": "embed", "fill-mask": "mask_logits"}.get(manifest.task, "logits")
            outputs.append(np.asarray(getattr(task, name)(texts), np.float64))
    return Check.at_most("max_abs_diff_ort_vs_onnx", float(np.abs(outputs[0] - outputs[1]).max()), ORT_MAX_ABS)


def torch_outputs(source: Path, manifest: Manifest, texts: list[str]) -> np.ndarray:
    """What transformers in torch computes for the same texts: vectors, mask logits or class logits."""
    import torch
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    model = _torch_model(source, manifest.task)
    if manifest.tokenizer.lowercase:
        texts = [t.lower() for t in texts]
    rows = []
    with torch.no_grad():
        for start in range(0, len(texts), TORCH_BATCH):
            enc = tokenizer(texts[start : start + TORCH_BATCH], padding=True, truncation=True,
                            max_length=int(manifest.model.context_length), return_tensors="pt")
            out = model(**enc)
            rows.append(_torch_task_output(out, enc, manifest, tokenizer.mask_token_id))
    return np.concatenate(rows).astype(np.float32)


def _torch_model(source: Path, task: str):
    from transformers import AutoModel, AutoModelForMaskedLM, AutoModelForSequenceClassification

    loader = {"embed": AutoModel, "fill-mask": AutoModelForMaskedLM,
              "classify": AutoModelForSequenceClassification}[task]
    return loader.from_pretrained(str(source), local_files_only=True).eval()


def _torch_task_output(out, enc, manifest: Manifest, mask_id: int | None) -> np.ndarray:
    import torch

    if manifest.task == "classify":
        return out.logits.numpy()  # (B, labels)
    if manifest.task == "fill-mask":
        first_mask = (enc["input_ids"] == mask_id).int().argmax(dim=1)  # (B,)
        return out.logits[torch.arange(len(first_mask)), first_mask].numpy()  # (B, vocab)
    vectors = torch_pool(out.last_hidden_state, enc["attention_mask"], manifest.model.pooling)
    if manifest.model.normalize:
        vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
    return vectors.numpy()


def torch_pool(hidden, mask, modes):
    """The reference pooling, written in torch as sentence-transformers defines it; (B, T, H) -> (B, H*k)."""
    import torch

    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    counts = torch.clamp(weights.sum(dim=1), min=1e-9)  # (B, 1)
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            parts.append(hidden.masked_fill(weights == 0, -1e9).max(dim=1).values)
        elif mode == "mean":
            parts.append((hidden * weights).sum(dim=1) / counts)
        else:  # mean_sqrt_len
            parts.append((hidden * weights).sum(dim=1) / torch.sqrt(counts))
    return torch.cat(parts, dim=1)
