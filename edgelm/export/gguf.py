"""Hugging Face decoders (LLaMA/Mistral, GPT-2) -> GGUF, written by edgelm with the gguf package.

What differs per architecture (accepted options, keys, tensor layout) is its spec in gguf_arch.py.

The float file is written first, streaming one tensor at a time from safetensors; a quantized
export then runs llama.cpp's quantizer on it. Validation against transformers runs by default
(edgelm/export/gguf_validate.py) and its numbers go into the manifest.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from edgelm.artifact import Manifest, sha256_of, write_artifact
from edgelm.contract import GenerationSection, GgufModel, SourceSection, TokenizerSection
from edgelm.export.checks import validate_into
from edgelm.export.gguf_arch import ArchSpec, Shape, arch_for_config, config_values
from edgelm.export.gguf_tensors import (
    TensorPlan,
    nbytes,
    plan_tensors,
    rope_freqs_plan,
    stream_converted,
    weight_files,
)
from edgelm.export.gguf_tokenizer import check_pairing, choose_tokenizer, gguf_model_name
from edgelm.export.gguf_vocab import Vocab, added_rstrip, end_of_turn_ids, read_vocab, special_vocab, write_vocab
from edgelm.export.hf_source import check_source_links
from edgelm.export.options import ExportOptions
from edgelm.families import FLOAT_GGUF, LLAMA_FTYPES

MODEL_FILE = "model.gguf"
FLOAT_SCRATCH = "float.gguf.part"  # the float file a quantized export starts from; removed after


def export_gguf(source: Path, config: dict, out: Path, options: ExportOptions) -> Manifest:
    check_source_links(source)  # every file read below, by edgelm or gguf's SpecialVocab, stays inside
    spec = arch_for_config(source, config)
    shape = _shape(source, spec, config)
    quant = options.quant
    choice = choose_tokenizer(source)  # the tokenizer files decide the GGUF tokenizer, not the architecture
    check_pairing(source, choice, spec.name, spec.tokenizers)
    vocab = read_vocab(source, shape.vocab_size, choice)
    special = special_vocab(source, vocab)
    special.add_special_token.setdefault("bos", vocab.kind == "spm")  # llama.cpp's own defaults,
    special.add_special_token.setdefault("eos", False)  # written out so nobody has to guess
    manifest = _manifest(source, config, spec, shape, vocab, special, quant)
    with write_artifact(out, manifest) as tmp:
        target = write_model_file(tmp, manifest, source, config, spec, shape, vocab, special, options)
        validate_into(manifest, options.validate, lambda: _validate(target, source, manifest, options))
    return manifest


def write_model_file(tmp: Path, manifest: Manifest, source: Path, config: dict, spec: ArchSpec, shape: Shape,
                     vocab: Vocab, special, options: ExportOptions, extra_keys=None) -> Path:
    """model.gguf in `tmp`: the float file, quantized by llama.cpp when asked; its types into the manifest."""
    quant = manifest.quant
    float_type = quant if quant in FLOAT_GGUF else _intermediate_type(config)
    float_path = tmp / (MODEL_FILE if quant in FLOAT_GGUF else FLOAT_SCRATCH)
    write_float_gguf(float_path, source, config, spec, shape, vocab, special, float_type, options, extra_keys)
    target = tmp / MODEL_FILE
    if quant not in FLOAT_GGUF:
        from edgelm.export.gguf_quantize import quantize_gguf

        options.progress("quantize", 0, 1)
        report = quantize_gguf(float_path, target, quant)
        float_path.unlink()
        manifest.model = replace(manifest.model, fallbacks=tuple(report.fallbacks),
                                 fallback_count=report.fallback_count)
        if report.fallback_count:
            _warn_fallbacks(report.fallbacks, report.fallback_count, quant)
        options.progress("quantize", 1, 1)
    from edgelm.export.gguf_quantize import tensor_type_counts

    manifest.model = replace(manifest.model, tensor_types=tensor_type_counts(target))
    return target


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


def _shape(source: Path, spec: ArchSpec, config: dict) -> Shape:
    with config_values(source, spec.name):
        return spec.shape(config)


def write_arch_keys(writer, source: Path, spec: ArchSpec, config: dict, shape: Shape) -> None:
    """The architecture's keys from config.json; a value of the wrong type is one line, before any tensor."""
    with config_values(source, spec.name):
        spec.write_keys(writer, config, shape)


def _intermediate_type(config: dict) -> str:
    """The float type a quantized export starts from: bf16 sources stay bf16 (f16 could overflow)."""
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
    return "bf16" if "bfloat16" in dtype else "f16"


def write_float_gguf(path: Path, source: Path, config: dict, spec: ArchSpec, shape: Shape, vocab: Vocab,
                     special, float_type: str, options: ExportOptions, extra_keys=None) -> list[TensorPlan]:
    """The whole float GGUF, tensors streamed from safetensors one at a time.

    `extra_keys(writer)`: keys that need more than config.json (BERT's pooling from its folder).
    """
    import gguf
    import numpy as np

    plans = plan_tensors(source, spec, shape, float_type)
    if freqs := rope_freqs_plan(config, shape):
        plans.append(freqs)
    writer = gguf.GGUFWriter(path, spec.name)
    writer.add_name(gguf_model_name(source.resolve().name, vocab.tokens, added_rstrip(source)))
    write_arch_keys(writer, source, spec, config, shape)
    if extra_keys is not None:
        extra_keys(writer)
    writer.add_file_type(LLAMA_FTYPES[float_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
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


def _manifest(source: Path, config: dict, spec: ArchSpec, shape: Shape, vocab: Vocab, special,
              quant: str) -> Manifest:
    ids = special.special_token_ids
    template = special.chat_template
    if isinstance(template, list):  # named templates: the default one is the chat template
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    stop_ids = end_of_turn_ids(source, vocab, ids.get("eos"))
    return Manifest(
        family=spec.family, task="text-generation", format="gguf", quant=quant,
        tokenizer=TokenizerSection(
            kind=vocab.kind, file=MODEL_FILE, pre=vocab.pre, vocab_size=len(vocab.tokens), notes=tuple(vocab.notes),
            bos_id=ids.get("bos"), eos_id=ids.get("eos"), pad_id=ids.get("pad"),
        ),
        generation=GenerationSection(
            add_bos=bool(special.add_special_token.get("bos")), chat_template=template,
            stop=tuple(vocab.tokens[i] for i in stop_ids), stop_ids=tuple(stop_ids),
        ),
        model=GgufModel(
            file=MODEL_FILE, architecture=spec.name, context_length=shape.context,
            num_layers=shape.n_layers, num_heads=shape.n_heads, num_kv_heads=shape.n_kv_heads,
            hidden_size=shape.hidden, head_dim=shape.head_dim, vocab_size=shape.vocab_size,
            tied_embeddings=bool(config.get("tie_word_embeddings")), rope_scaling=config.get("rope_scaling"),
        ),
        source=SourceSection(
            path=str(source.resolve()), sha256={str(f.relative_to(source)): sha256_of(f) for f in weight_files(source)},
            architectures=tuple(str(a) for a in config.get("architectures") or spec.architectures[:1]),
        ),
    )
