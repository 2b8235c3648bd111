"""The device side: load an artifact and run it. Never imports torch, transformers or optimum."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgelm.artifact import Manifest, read_manifest
from edgelm.families import family_named
from edgelm.runtime.device import RuntimeOptions


def load(path: str | Path, *, threads: int | None = None, provider: str = "cpu",
         n_gpu_layers: int = 0, n_ctx: int | None = None, verify: bool = False, model_format: str = "onnx") -> Any:
    """Load an artifact folder (or a bare .gguf file) and return its task object.

    Text generators have generate()/stream(); every task object is a context manager that
    frees its backend session on exit. model_format="ort" runs the ORT-format copy of an ONNX
    artifact exported with --target mobile.
    """
    options = RuntimeOptions(threads=threads, provider=provider, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx,
                             verify=verify, model_format=model_format)
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from edgelm.runtime.gguf_file import load_bare_gguf

        return load_bare_gguf(path, options)
    manifest = read_manifest(path, verify=verify)
    runtime = family_named(manifest.family).runtime_fn(manifest.format)
    return runtime(path, manifest, options)


def info(path: str | Path, verify: bool = False) -> Manifest:
    """The manifest of an artifact folder, or the stand-in manifest of a bare .gguf file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from edgelm.runtime.gguf_file import manifest_from_header, read_gguf_header

        return manifest_from_header(path, read_gguf_header(path))
    return read_manifest(path, verify=verify)
