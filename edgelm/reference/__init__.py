"""The reference set every validated artifact carries, and the checks that run it (runtime only).

Export validation and `edgelm verify` share this path: the exporter computes torch's outputs,
writes them as the artifact's reference file, then calls `reference_checks` on the folder it is
writing; `verify` calls the same function on the finished artifact. So the two cannot disagree
on how a number is computed. Nothing here imports torch, transformers or optimum.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edgelm.artifact import Check, Manifest, artifact_file
from edgelm.errors import ArtifactError
from edgelm.reference.store import read_reference


def reference_module(manifest: Manifest) -> ModuleType:
    """The module that knows a (format, family)'s reference: its SCHEMA, check_arrays, run_checks."""
    if manifest.family == "bert":
        name = "encoder"
    elif manifest.format == "gguf":
        name = "gguf_decoder"
    elif manifest.family in ("rnn", "lstm"):
        name = "recurrent"
    elif manifest.family == "gpt2":
        name = "gpt2"
    else:
        raise ArtifactError(f"no reference checks for {manifest.family} {manifest.format} artifacts")
    return importlib.import_module(f"edgelm.reference.{name}")


def load_reference(folder: Path, manifest: Manifest) -> dict[str, np.ndarray]:
    """The artifact's reference arrays, each checked against its family's schema and the manifest."""
    if manifest.validation_reference is None:
        raise ArtifactError(f"{folder}: the artifact has no reference set (exported with --no-validate, or by an "
                            "older edgelm); export it again to verify it")
    module = reference_module(manifest)
    path = artifact_file(folder, manifest, manifest.validation_reference, "validation_reference")
    arrays = read_reference(path, module.SCHEMA)
    module.check_arrays(arrays, manifest, path)
    return arrays


def reference_checks(folder: Path, manifest: Manifest, options: Any) -> list[Check]:
    """Run the artifact's reference set through the runtime here; one Check per number, with its bound."""
    arrays = load_reference(folder, manifest)
    return reference_module(manifest).run_checks(Path(folder), manifest, arrays, options)
