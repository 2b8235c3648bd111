"""The device side: load an artifact and run it. Never imports torch, transformers or optimum."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgelm.artifact import Manifest, read_manifest
from edgelm.families import family_named
from edgelm.library import resolve_model
from edgelm.runtime.device import RuntimeOptions


def load(path: str | Path, *, threads: int | None = None, provider: str = "cpu",
         n_gpu_layers: int = 0, n_ctx: int | None = None, verify: bool = False, model_format: str = "onnx",
         parallel: int | None = None) -> Any:
    """Load an artifact folder (or a bare .gguf file), or a model of the library by name, and
    return its task object.

    Text generators have generate()/stream(); every task object is a context manager that
    frees its backend session on exit. model_format="ort" runs the ORT-format copy of an ONNX
    artifact exported with --target mobile.

    Every text generator's calls (generate/stream/chat/chat_stream and their asyncio forms) may
    come from several threads at once: each is one sequence of the model's scheduler thread.
    parallel=N (GGUF text generators, GPT-2 on edgelm's fused ONNX graph): N sequence slots over
    one KV cache, so concurrent calls share batched steps; each slot can hold a whole context.
    Without it, or for other models, there is one slot and calls take turns in arrival order.
    """
    options = RuntimeOptions(threads=threads, provider=provider, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx,
                             verify=verify, model_format=model_format, parallel=parallel)
    path = resolve_model(path)  # a path that exists wins over a library name
    if path.is_file() and path.suffix == ".gguf":
        return load_bare_gguf(path, options)
    manifest = read_manifest(path, verify=verify)
    runtime = family_named(manifest.family).runtime_fn(manifest.format)
    return runtime(path, manifest, options)


def info(path: str | Path, verify: bool = False) -> Manifest:
    """The manifest of an artifact folder, or the stand-in manifest of a bare .gguf file."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from edgelm.runtime.gguf.metadata import read_gguf_header
        from edgelm.runtime.gguf.parser import manifest_from_header

        return manifest_from_header(path, read_gguf_header(path))
    return read_manifest(path, verify=verify)


def load_bare_gguf(path: Path, options: RuntimeOptions) -> Any:
    """Run a GGUF file that came without an edgelm.json (from elsewhere): checked, then loaded.
    It lives here, beside load(), so the header parser never imports the loaders it guards."""
    from edgelm.runtime.gguf.metadata import read_gguf_header
    from edgelm.runtime.gguf.parser import manifest_from_header

    manifest = manifest_from_header(path, read_gguf_header(path))
    if manifest.task == "embed":
        from edgelm.runtime.llamacpp.embed import load_gguf_embedder

        return load_gguf_embedder(path.parent, manifest, options)
    from edgelm.runtime.llamacpp.model import load_llama

    return load_llama(path.parent, manifest, options)
