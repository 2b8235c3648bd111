"""BERT (ONNX and GGUF): probe texts and torch's vectors or logits rows, against the runtime's.

The texts go through edgelm's own task objects (tokenizer, truncation, pooling, normalisation),
so what is compared is what a user gets. Checks: the minimum cosine over probes, and for heads
the top-1 agreement, each against its bound in edgelm/families.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgelm.artifact import Check, Manifest
from edgelm.errors import ArtifactError
from edgelm.families import family_named
from edgelm.metrics import cosine_rows, top1_agreement
from edgelm.reference.store import Field, expect_shape

SCHEMA = {"texts": Field("text", 1), "outputs": Field("float", 2)}
MAX_TEXTS = 256  # exporters store a dozen probes; each one is a run of the model on this machine
MAX_TEXT_CHARS = 1 << 20  # the long probe is max_length + 20 words


def reference_arrays(texts: list[str], outputs: np.ndarray) -> dict[str, np.ndarray]:
    """What the export stores: the probes as raw strings, torch's output row for each."""
    return {"texts": np.asarray(texts, dtype=str), "outputs": np.asarray(outputs, np.float32)}


def check_arrays(arrays: dict[str, np.ndarray], manifest: Manifest, path: Path) -> None:
    texts = arrays["texts"]
    if not 1 <= len(texts) <= MAX_TEXTS or texts.dtype.itemsize > 4 * MAX_TEXT_CHARS:
        raise ArtifactError(f"{path}: array 'texts' must hold 1..{MAX_TEXTS} texts of at most {MAX_TEXT_CHARS} "
                            "characters")
    width = {"embed": manifest.model.dim, "fill-mask": manifest.model.vocab_size,
             "classify": len(getattr(manifest.model, "id2label", {}) or {}) or None}.get(manifest.task)
    expect_shape(arrays, "outputs", (len(texts), width), path)


def run_checks(folder: Path, manifest: Manifest, arrays: dict[str, np.ndarray], options: Any) -> list[Check]:
    texts = [str(t) for t in arrays["texts"]]
    runtime = family_named(manifest.family).runtime_fn(manifest.format)
    with runtime(folder, manifest, options) as task:
        if manifest.task == "embed":
            ours = task.embed(texts)
            truncated: int | None = len(ours.truncated)
        elif manifest.task == "fill-mask":
            ours, truncated = task.mask_logits(texts), None
        else:
            ours, truncated = task.logits(texts), None
    return compare(np.asarray(ours), arrays["outputs"], manifest, truncated)


def compare(ours: np.ndarray, reference: np.ndarray, manifest: Manifest, truncated: int | None) -> list[Check]:
    """Per-probe cosine (minimum over probes), and for heads also top-1 agreement."""
    a = ours.astype(np.float64)
    b = reference.astype(np.float64)
    cosines = cosine_rows(a, b)
    # thresholds: edgelm/families.py (int8 may flip near-ties between the two best candidates, rarely more)
    bound = family_named(manifest.family).spec(manifest.format).quant(manifest.quant).bound
    checks = [
        Check.at_least("min_cosine_vs_torch", float(cosines.min()), bound("min_cosine_vs_torch")),
        Check.measured("max_abs_diff_vs_torch", float(np.abs(a - b).max())),
    ]
    if manifest.task != "embed":
        agreement = top1_agreement(a, b)
        checks.append(Check.at_least("top1_agreement_vs_torch", agreement, bound("top1_agreement_vs_torch")))
    checks.append(Check.measured("probe_texts", len(a), "probes compared"))
    if truncated is not None:
        checks.append(Check.measured("probe_texts_truncated", truncated, "probes longer than max_length"))
    return checks
