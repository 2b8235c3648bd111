"""Hugging Face LLaMA (and Mistral, same layout) -> GGUF, written by edgelm with the gguf package.

The float file is written first, streaming one tensor at a time from safetensors; a quantized
export then runs llama.cpp's quantizer on it. Validation against transformers runs by default
(edgelm/export/gguf_validate.py) and its numbers go into the manifest.
"""

from __future__ import annotations

from pathlib import Path

from edgelm.artifact import Manifest, sha256_of, write_artifact
from edgelm.errors import UnsupportedModelError
from edgelm.export.checks import validate_into
from edgelm.export.gguf_tensors import (
    FLOAT_TYPES,
    Shape,
    TensorPlan,
    nbytes,
    plan_tensors,
    rope_freqs_plan,
    stream_converted,
    weight_files,
)
from edgelm.export.gguf_vocab import Vocab, end_of_turn_ids, read_vocab, special_vocab, write_vocab
from edgelm.export.options import ExportOptions

MODEL_FILE = "model.gguf"
FLOAT_SCRATCH = "float.gguf.part"  # the float file a quantized export starts from; removed after
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
FILE_TYPES = {"f32": 0, "f16": 1, "bf16": 32}  # gguf.LlamaFileType values


def export_gguf(source: Path, config: dict, out: Path, options: ExportOptions) -> Manifest:
    _check_supported(source, config)
    shape = Shape.from_config(config)
    quant = options.quant or "f16"
    vocab = read_vocab(source, shape.vocab_size)
    special = special_vocab(source, vocab)
    special.add_special_token.setdefault("bos", vocab.kind == "spm")  # llama.cpp's own defaults,
    special.add_special_token.setdefault("eos", False)  # written out so nobody has to guess
    manifest = _manifest(source, config, shape, vocab, special, quant)
    with write_artifact(out, manifest) as tmp:
        float_type = quant if quant in FLOAT_TYPES else _intermediate_type(config)
        float_path = tmp / (MODEL_FILE if quant in FLOAT_TYPES else FLOAT_SCRATCH)
        write_float_gguf(float_path, source, config, shape, vocab, special, float_type, options)
        target = tmp / MODEL_FILE
        if quant not in FLOAT_TYPES:
            from edgelm.export.gguf_quantize import quantize_gguf

            options.progress("quantize", 0, 1)
            report = quantize_gguf(float_path, target, quant)
            float_path.unlink()
            manifest.model["fallbacks"] = report.fallbacks
            manifest.model["fallback_count"] = report.fallback_count
            if report.fallback_count:
                _warn_fallbacks(report.fallbacks, report.fallback_count, quant)
            options.progress("quantize", 1, 1)
        from edgelm.export.gguf_quantize import tensor_type_counts

        manifest.model["tensor_types"] = tensor_type_counts(target)
        validate_into(manifest, options.validate, lambda: _validate(target, source, manifest, options))
    return manifest


def _validate(target: Path, source: Path, manifest: Manifest, options: ExportOptions) -> list:
    from edgelm.export.gguf_validate import validate_gguf  # torch + llama.cpp, only when validating

    return validate_gguf(target, source, manifest, options)


def _warn_fallbacks(fallbacks: list[dict], count: int, quant: str) -> None:
    """Said out loud as well as recorded: part of the file is not the type the user asked for."""
    import warnings

    shown = ", ".join(f"{f['tensor']} -> {f['used']}" for f in fallbacks[:3])
    more = f" and {count - 3} more" if count > 3 else ""
    warnings.warn(f"llama.cpp stored {count} tensor(s) in another type than {quant} because their rows "
                  f"do not fit its block size ({shown}{more}); listed in the manifest under model.fallbacks",
                  stacklevel=3)


def _check_supported(source: Path, config: dict) -> None:
    archs = config.get("architectures") or ["LlamaForCausalLM"]
    if not set(archs) & set(ARCHITECTURES):
        raise UnsupportedModelError(f"{source}: architecture {archs[0]} is not a LLaMA causal LM")
    if config.get("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{source}: hidden_act {config['hidden_act']!r}; llama.cpp's LLaMA uses silu")
    if config.get("mlp_bias"):
        raise UnsupportedModelError(f"{source}: MLP biases are not part of llama.cpp's LLaMA graph")
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    if kind not in (None, "default", "linear", "llama3"):
        raise UnsupportedModelError(f"{source}: rope scaling {kind!r} is not converted (linear and llama3 are)")


def _intermediate_type(config: dict) -> str:
    """The float type a quantized export starts from: bf16 sources stay bf16 (f16 could overflow)."""
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
    return "bf16" if "bfloat16" in dtype else "f16"


def context_length(config: dict) -> int:
    length = int(config.get("max_position_embeddings") or 2048)
    window = config.get("sliding_window")
    # llama.cpp's LLaMA graph has no sliding window: beyond it the results would differ
    return min(length, int(window)) if config.get("model_type") == "mistral" and window else length


def write_float_gguf(path: Path, source: Path, config: dict, shape: Shape, vocab: Vocab,
                     special, float_type: str, options: ExportOptions) -> list[TensorPlan]:
    """The whole float GGUF, tensors streamed from safetensors one at a time."""
    import gguf
    import numpy as np

    plans = plan_tensors(source, shape, float_type)
    if freqs := rope_freqs_plan(config, shape):
        plans.append(freqs)
    writer = gguf.GGUFWriter(path, "llama")
    _write_model_keys(writer, source, config, shape, float_type)
    write_vocab(writer, vocab)
    special.add_to_gguf(writer, quiet=True)
    eot = [i for i in end_of_turn_ids(source, vocab, special.special_token_ids.get("eos"))
           if i != special.special_token_ids.get("eos")]
    if eot:
        writer.add_eot_token_id(eot[0])
    for plan in plans:
        if plan.storage == "bf16":  # BF16 travels as raw bytes: the writer needs the byte shape
            byte_shape = (*plan.shape[:-1], plan.shape[-1] * 2)
            writer.add_tensor_info(plan.gguf_name, byte_shape, np.dtype(np.uint8), nbytes(plan),
                                   raw_dtype=gguf.GGMLQuantizationType.BF16)
        else:
            dtype = np.dtype(np.float16 if plan.storage == "f16" else np.float32)
            writer.add_tensor_info(plan.gguf_name, plan.shape, dtype, nbytes(plan))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    options.progress("convert", 0, len(plans))
    for done, data in enumerate(stream_converted(plans, config, shape), start=1):
        writer.write_tensor_data(data)
        del data  # keep at most one converted tensor alive
        options.progress("convert", done, len(plans))
    writer.close()
    return plans


def _write_model_keys(writer, source: Path, config: dict, shape: Shape, float_type: str) -> None:
    import gguf

    writer.add_name(source.resolve().name)
    writer.add_context_length(context_length(config))
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(shape.n_heads)
    writer.add_head_count_kv(shape.n_kv_heads)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(shape.head_dim)
    if shape.head_dim != shape.hidden // shape.n_heads:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)
    writer.add_vocab_size(shape.vocab_size)
    scaling = config.get("rope_scaling") or {}
    if (scaling.get("rope_type") or scaling.get("type")) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_file_type(FILE_TYPES[float_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _manifest(source: Path, config: dict, shape: Shape, vocab: Vocab, special, quant: str) -> Manifest:
    ids = special.special_token_ids
    template = special.chat_template
    if isinstance(template, list):  # named templates: the default one is the chat template
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    stop_ids = end_of_turn_ids(source, vocab, ids.get("eos"))
    return Manifest(
        family="llama", task="text-generation", format="gguf", quant=quant,
        tokenizer={"kind": vocab.kind, "file": MODEL_FILE, "pre": vocab.pre,
                   "vocab_size": len(vocab.tokens), "notes": vocab.notes},
        generation={
            "bos_id": ids.get("bos"), "eos_id": ids.get("eos"), "pad_id": ids.get("pad"),
            "add_bos": bool(special.add_special_token.get("bos")),
            "context_length": context_length(config), "chat_template": template,
            "stop": [vocab.tokens[i] for i in stop_ids], "stop_ids": stop_ids,
        },
        model={
            "file": MODEL_FILE, "architecture": (config.get("architectures") or ["LlamaForCausalLM"])[0],
            "n_layers": shape.n_layers, "n_heads": shape.n_heads, "n_kv_heads": shape.n_kv_heads,
            "hidden_size": shape.hidden, "head_dim": shape.head_dim, "vocab_size": shape.vocab_size,
            "tied_embeddings": bool(config.get("tie_word_embeddings")),
            "rope_scaling": config.get("rope_scaling"), "tensor_types": {}, "fallbacks": [],
        },
        source={"path": str(source.resolve()), "revision": None,
                "weights": {f.name: sha256_of(f) for f in weight_files(source)}},
    )
