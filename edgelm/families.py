"""Every model family, declared in one place: how to recognise a source, how to export and run it.

A family has one `ExportSpec` per format it exports to (the first is its default). Each spec
holds the one table of quantization types for that (family, format) pair: the `--quant` name,
how it is made (a llama.cpp ftype or an ONNX method) and the validation thresholds the export
must meet. The CLI's choices, the exporters' thresholds and the manifest's recorded types are
all read from here.

Entries name their code by "module:function" strings so that this registry imports nothing
heavy: the CLI and the runtime read it without pulling in torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from edgelm.errors import ArtifactError, UnsupportedModelError, UsageError

# llama.cpp's llama_ftype values (llama.h) by the names edgelm uses; also names bare files' types
LLAMA_FTYPES = {
    "f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "q5_1": 9, "q2_k": 10,
    "q3_k_s": 11, "q3_k_m": 12, "q3_k_l": 13, "q4_k_s": 14, "q4_k_m": 15, "q5_k_s": 16,
    "q5_k_m": 17, "q6_k": 18, "bf16": 32,
}
FLOAT_GGUF = ("f32", "f16", "bf16")  # written by edgelm's converter; the rest by llama.cpp's quantizer


@dataclass(frozen=True)
class QuantType:
    """One --quant choice of a (family, format) pair and the bounds its validation must meet."""

    name: str
    method: str  # "float" / "llama.cpp" (GGUF); "fp32" / "dynamic-int8" / "weight-only-int8"/"-int4" (ONNX)
    bounds: dict[str, float] = field(default_factory=dict)  # check name (or parameter) -> threshold

    @property
    def ftype(self) -> int | None:
        """llama.cpp's llama_ftype for a GGUF type; None for ONNX."""
        return LLAMA_FTYPES.get(self.name) if self.method in ("float", "llama.cpp") else None

    def bound(self, name: str) -> float:
        try:
            return self.bounds[name]
        except KeyError:
            raise KeyError(f"quant type {self.name!r} declares no bound {name!r}") from None


def _gguf(name: str, **bounds: float) -> QuantType:
    return QuantType(name, "float" if name in FLOAT_GGUF else "llama.cpp", bounds)


# GGUF decoders: F32 exact, F16/BF16 decisive top-1 (margin: torch's top-2 gap below which rounding
# may honestly pick either token), quantized types by mean KL and held-out perplexity ratio vs torch
GGUF_DECODER_QUANTS = (
    _gguf("f32", max_abs_logit_diff_vs_torch=1e-4),
    _gguf("f16", top1_agreement_decisive_vs_torch=1.0, decisive_margin=0.05),
    _gguf("bf16", top1_agreement_decisive_vs_torch=1.0, decisive_margin=0.3),
    # quantized bounds from benchmarks/calibrate_quants.py on trained GPT-2 and LLaMA (README,
    # "Quantization calibration"): 10x the worst measured mean KL; PPL ratio 1 + 2x that, at least 1.01
    # q8_0 raised from 0.002: the real SmolLM2-135M (576 wide) measured 0.0036 vs torch, where the
    # tiny calibration models stayed far lower (Q8_0 matmuls round activations to 8 bits too)
    _gguf("q8_0", mean_kl_vs_torch=0.006, held_out_perplexity_ratio_vs_torch=1.01),
    _gguf("q6_k", mean_kl_vs_torch=0.007, held_out_perplexity_ratio_vs_torch=1.02),
    _gguf("q5_k_m", mean_kl_vs_torch=0.02, held_out_perplexity_ratio_vs_torch=1.04),
    _gguf("q4_k_m", mean_kl_vs_torch=0.05, held_out_perplexity_ratio_vs_torch=1.1),
    _gguf("q4_0", mean_kl_vs_torch=0.08, held_out_perplexity_ratio_vs_torch=1.16),
)
GGUF_EMBEDDER_QUANTS = (  # f16 first: the default, as for the decoders
    _gguf("f16", min_cosine_vs_torch=0.999),
    _gguf("f32", min_cosine_vs_torch=0.9999),
    _gguf("q8_0", min_cosine_vs_torch=0.99),
)
RECURRENT_ONNX_QUANTS = (
    QuantType("none", "fp32", {"max_abs_logit_diff_vs_torch": 1e-4, "max_abs_state_diff_vs_torch": 1e-4}),
    QuantType("int8", "dynamic-int8", {"held_out_perplexity_ratio_int8_vs_fp32": 1.02}),
)


@dataclass(frozen=True)
class ExportSpec:
    """What one (family, format) pair exports: its code, tasks and quantization table."""

    format: str  # "onnx" or "gguf"
    exporter: str  # "module:function" (source, config, out, ExportOptions) -> Manifest
    runtime: str  # "module:function" (folder, manifest, RuntimeOptions) -> task object
    tasks: tuple[str, ...]
    quants: tuple[QuantType, ...]  # the first is the default --quant
    gguf_arch: str | None = None  # llama.cpp's general.architecture written (GGUF only)

    @property
    def quant_names(self) -> tuple[str, ...]:
        return tuple(q.name for q in self.quants)

    def quant(self, name: str | None) -> QuantType:
        """The table entry for --quant `name` (None: the default), or a usage error listing the choices."""
        if name is None:
            return self.quants[0]
        for quant in self.quants:
            if quant.name == name:
                return quant
        raise UsageError(f"quant {name!r} is not available for {self.format}; choose one of: "
                         f"{', '.join(self.quant_names)}")


@dataclass(frozen=True)
class Family:
    name: str
    summary: str
    model_types: tuple[str, ...]  # config.json "model_type" values that belong to this family
    exports: tuple[ExportSpec, ...]  # the first is the default format

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(spec.format for spec in self.exports)

    @property
    def tasks(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(task for spec in self.exports for task in spec.tasks))

    def spec(self, fmt: str | None = None) -> ExportSpec:
        if fmt is None:
            return self.exports[0]
        for spec in self.exports:
            if spec.format == fmt:
                return spec
        raise UsageError(f"family {self.name} exports to {', '.join(self.formats)}, not {fmt}")

    def export_fn(self, fmt: str | None = None) -> Callable[..., Any]:
        return _resolve(self.spec(fmt).exporter)

    def runtime_fn(self, fmt: str) -> Callable[..., Any]:
        if fmt not in self.formats:
            raise ArtifactError(f"family {self.name!r} has no runtime for format {fmt!r}")
        return _resolve(self.spec(fmt).runtime)


def _resolve(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


GGUF_EXPORTER = "edgelm.export.gguf:export_gguf"
LLAMA_CPP_RUNTIME = "edgelm.runtime.llamacpp.model:load_llama"
RECURRENT_RUNTIME = "edgelm.runtime.ort.recurrent:load_recurrent"
TEXT = ("text-generation",)


def _gguf_decoder(arch: str, f32: QuantType = GGUF_DECODER_QUANTS[0]) -> ExportSpec:
    return ExportSpec("gguf", GGUF_EXPORTER, LLAMA_CPP_RUNTIME, TEXT,
                      (GGUF_DECODER_QUANTS[1], f32, *GGUF_DECODER_QUANTS[2:]), arch)


# Gemma 3's gated GELU runs through ggml's F16 table: inputs a rounding apart can land on adjacent
# F16 steps, so torch itself in F32 and in F64 (both with that table) differed by 1.3e-4 on the tiny
# test model, whose embeddings are scaled by sqrt(hidden). Its F32 bound is 10x that jitter.
GEMMA3_F32 = _gguf("f32", max_abs_logit_diff_vs_torch=1.3e-3)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family("rnn", "Elman RNN language model trained by edgelm", ("edgelm-rnn",), (
            ExportSpec("onnx", "edgelm.export.recurrent:export_recurrent", RECURRENT_RUNTIME,
                       TEXT, RECURRENT_ONNX_QUANTS),
        )),
        Family("lstm", "LSTM language model trained by edgelm", ("edgelm-lstm",), (
            ExportSpec("onnx", "edgelm.export.recurrent:export_recurrent", RECURRENT_RUNTIME,
                       TEXT, RECURRENT_ONNX_QUANTS),
        )),
        Family("gpt2", "GPT-2 (GPT2LMHeadModel): ONNX with a key/value cache, or GGUF run by llama.cpp",
               ("gpt2",), (
            ExportSpec("onnx", "edgelm.export.gpt2:export_gpt2", "edgelm.runtime.ort.kv_decoder:load_gpt2", TEXT, (
                QuantType("none", "fp32", {"max_abs_logit_diff_vs_torch": 1e-4}),
                # weight-only MatMulNBits (block scales, int8 activation blocks inside the kernel)
                # PPL-ratio bounds calibrated as the GGUF types' (README, "Quantization calibration")
                QuantType("int8", "weight-only-int8", {"top1_agreement_vs_torch": 0.90,
                                                       "held_out_perplexity_ratio_int8_vs_fp32": 1.01}),
                QuantType("int4", "weight-only-int4", {"top1_agreement_vs_torch": 0.80,
                                                       "held_out_perplexity_ratio_int4_vs_fp32": 1.14}),
            )),
            _gguf_decoder("gpt2"),
        )),
        Family("llama", "LLaMA-family causal LM (LlamaForCausalLM, Mistral) to GGUF, run by llama.cpp",
               ("llama", "mistral"), (_gguf_decoder("llama"),)),
        Family("qwen2", "Qwen2 / Qwen2.5 causal LM (Qwen2ForCausalLM) to GGUF, run by llama.cpp",
               ("qwen2",), (_gguf_decoder("qwen2"),)),
        Family("phi3", "Phi-3 causal LM (Phi3ForCausalLM) to GGUF, run by llama.cpp",
               ("phi3",), (_gguf_decoder("phi3"),)),
        Family("qwen3", "Qwen3 causal LM (Qwen3ForCausalLM: per-head q/k norms) to GGUF, run by llama.cpp",
               ("qwen3",), (_gguf_decoder("qwen3"),)),
        Family("gemma3", "Gemma 3 text causal LM (Gemma3ForCausalLM) to GGUF, run by llama.cpp",
               ("gemma3_text",), (_gguf_decoder("gemma3", GEMMA3_F32),)),
        Family("bert", "BERT encoders: sentence embeddings, fill-mask, sequence classification", ("bert",), (
            ExportSpec("onnx", "edgelm.export.bert:export_bert", "edgelm.runtime.ort.encoders:load_encoder",
                       ("embed", "fill-mask", "classify"), (
                QuantType("none", "fp32", {"min_cosine_vs_torch": 0.99999, "top1_agreement_vs_torch": 1.0}),
                QuantType("int8", "dynamic-int8", {"min_cosine_vs_torch": 0.99, "top1_agreement_vs_torch": 0.9}),
            )),
            # llama.cpp runs BERT for embeddings only: fill-mask and classify stay ONNX
            ExportSpec("gguf", "edgelm.export.gguf_bert:export_gguf_bert",
                       "edgelm.runtime.llamacpp.embed:load_gguf_embedder", ("embed",), GGUF_EMBEDDER_QUANTS, "bert"),
        )),
    )
}


def all_quant_names() -> tuple[str, ...]:
    """Every --quant name some (family, format) pair offers, in table order."""
    return tuple(dict.fromkeys(q.name for f in FAMILIES.values() for s in f.exports for q in s.quants))


def quant_help() -> str:
    """The --quant help text, per format, from the tables."""
    by_format: dict[str, dict[str, None]] = {}
    for family in FAMILIES.values():
        for spec in family.exports:
            by_format.setdefault(spec.format, {}).update(dict.fromkeys(spec.quant_names))
    return "; ".join(f"{'|'.join(names)} ({fmt.upper()})" for fmt, names in by_format.items())


def quant_name_of_ftype(ftype: int | None) -> str:
    """The name of a GGUF file's general.file_type, as a bare file's stand-in manifest records it."""
    if ftype is None:
        return "unknown"
    return next((name for name, value in LLAMA_FTYPES.items() if value == ftype), f"file_type {ftype}")


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


def family_for_gguf_arch(arch: str) -> Family | None:
    """The family whose GGUF export writes this llama.cpp architecture, if edgelm has one."""
    for family in FAMILIES.values():
        if any(spec.gguf_arch == arch for spec in family.exports):
            return family
    return None


def family_named(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ArtifactError(f"unknown family {name!r}; known: {', '.join(FAMILIES)}") from None
