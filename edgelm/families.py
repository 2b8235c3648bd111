"""Every model family, declared in one place: how to recognise a source, how to export and run it.

Entries name their code by "module:function" strings so that this registry imports nothing
heavy: the CLI and the runtime read it without pulling in torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable

from edgelm.errors import ArtifactError, UnsupportedModelError


@dataclass(frozen=True)
class Family:
    name: str
    summary: str
    model_types: tuple[str, ...]  # config.json "model_type" values that belong to this family
    formats: tuple[str, ...]  # export formats, the first is the default
    tasks: tuple[str, ...]
    exporter: str  # "module:function" (source, config, out, ExportOptions) -> Manifest
    runtimes: dict[str, str]  # format -> "module:function" (folder, manifest, RuntimeOptions) -> task

    def export_fn(self) -> Callable[..., Any]:
        return _resolve(self.exporter)

    def runtime_fn(self, fmt: str) -> Callable[..., Any]:
        if fmt not in self.runtimes:
            raise ArtifactError(f"family {self.name!r} has no runtime for format {fmt!r}")
        return _resolve(self.runtimes[fmt])


def _resolve(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="rnn",
            summary="Elman RNN language model trained by edgelm",
            model_types=("edgelm-rnn",),
            formats=("onnx",),
            tasks=("text-generation",),
            exporter="edgelm.export.recurrent:export_recurrent",
            runtimes={"onnx": "edgelm.runtime.recurrent:load_recurrent"},
        ),
        Family(
            name="lstm",
            summary="LSTM language model trained by edgelm",
            model_types=("edgelm-lstm",),
            formats=("onnx",),
            tasks=("text-generation",),
            exporter="edgelm.export.recurrent:export_recurrent",
            runtimes={"onnx": "edgelm.runtime.recurrent:load_recurrent"},
        ),
        Family(
            name="gpt2",
            summary="GPT-2 (GPT2LMHeadModel) with a key/value cache",
            model_types=("gpt2",),
            formats=("onnx",),
            tasks=("text-generation",),
            exporter="edgelm.export.gpt2:export_gpt2",
            runtimes={"onnx": "edgelm.runtime.kv_decoder:load_gpt2"},
        ),
        Family(
            name="llama",
            summary="LLaMA-family causal LM (LlamaForCausalLM, Mistral) to GGUF, run by llama.cpp",
            model_types=("llama", "mistral"),
            formats=("gguf",),
            tasks=("text-generation",),
            exporter="edgelm.export.gguf:export_gguf",
            runtimes={"gguf": "edgelm.runtime.llama:load_llama"},
        ),
        Family(
            name="bert",
            summary="BERT encoders: sentence embeddings, fill-mask, sequence classification",
            model_types=("bert",),
            formats=("onnx",),
            tasks=("embed", "fill-mask", "classify"),
            exporter="edgelm.export.bert:export_bert",
            runtimes={"onnx": "edgelm.runtime.encoders:load_encoder"},
        ),
    )
}


def supported_summary() -> str:
    return ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES.values())


def family_for_config(config: dict[str, Any], where: str) -> Family:
    """The family a source folder's config.json belongs to, or an error listing what is supported."""
    model_type = config.get("model_type")
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    raise UnsupportedModelError(
        f"{where}: model_type {model_type!r} is not supported; supported families: {supported_summary()}"
    )


def family_named(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ArtifactError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}") from None
