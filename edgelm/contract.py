"""The typed sections of the manifest: one frozen dataclass per section, one spelling per concept.

`edgelm.json` is read from untrusted folders, so every field is checked here, by its declared
type and range, before any code uses it: a wrong type or range is an ArtifactError naming the
field ("generation.stop must be a list of strings, got 3"), never a KeyError later.

Where each concept lives (schema 2):
- `tokenizer`: the tokenizer file and every special id (bos, eos, pad, unk, mask): they are ids
  of the tokenizer's vocabulary, whichever task uses them.
- `generation`: how a generator uses them (add_bos, stop strings and ids, chat template).
- `model`: the model file, its graph inputs and outputs, geometry, and `context_length` (the
  longest sequence it takes: a decoder's context, an encoder's maximum length; None: unbounded).
  Its fields depend on the kind of model, so there is one class per kind: `RecurrentModel`,
  `KvDecoderModel`, `EncoderModel` and `GgufModel` (picked by format, then family).
- `source`: where the export came from; `sha256` is always a {file name: hex digest} mapping.

Schema 1 manifests are migrated into this shape by `upgrade_v1`.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from edgelm.errors import ArtifactError

MAX_REPR = 60  # how much of a wrong value an error message shows


def spec(default: Any = None, *, minimum: int | None = 0, required: bool = False, factory: Any = None) -> Any:
    """A field with its range (integers only) and whether a loaded manifest must give it."""
    metadata = {"minimum": minimum, "required": required}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Section:
    """A manifest section: every field is checked against its declared type when it is made."""

    section: typing.ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            checked = _check(value, hints[f.name], f"{self.section}.{f.name}", f.metadata.get("minimum", 0))
            if checked is not value:  # lists become tuples, so a section stays immutable
                object.__setattr__(self, f.name, checked)


@dataclass(frozen=True)
class TokenizerSection(Section):
    section: typing.ClassVar[str] = "tokenizer"
    file: str | None = spec(required=True)  # for GGUF: the model file, whose vocabulary it is
    kind: str | None = None  # char, bpe, byte-level-bpe, wordpiece, spm
    vocab_size: int | None = spec(minimum=1)
    bos_id: int | None = None
    eos_id: int | None = None
    pad_id: int | None = None  # fills batch rows; padded positions are masked out
    unk_id: int | None = None
    mask_id: int | None = None
    mask_token: str | None = None
    lowercase: bool = False  # sentence-transformers lower-cases before tokenising
    pre: str | None = None  # llama.cpp's pre-tokenizer name (byte-level BPE in GGUF)
    notes: tuple[str, ...] = ()

    def special_ids(self) -> dict[str, int]:
        names = ("bos_id", "eos_id", "pad_id", "unk_id", "mask_id")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


@dataclass(frozen=True)
class GenerationSection(Section):
    section: typing.ClassVar[str] = "generation"
    add_bos: bool = False
    chat_template: str | None = None
    stop: tuple[str, ...] = ()  # default stop strings
    stop_ids: tuple[int, ...] = ()  # ids that end a generation like eos (end-of-turn)


@dataclass(frozen=True)
class SourceSection(Section):
    section: typing.ClassVar[str] = "source"
    path: str | None = None
    revision: str | None = None
    sha256: dict[str, str] = spec(factory=dict)  # weight file name -> sha256
    architectures: tuple[str, ...] = ()
    training: dict[str, Any] | None = None  # edgelm-trained models: steps, seq_len, ...
    bare_gguf: bool = False  # a .gguf from elsewhere: this manifest was made from its header


@dataclass(frozen=True)
class MachineSection(Section):
    """The machine that exported and validated the artifact (edgelm/machine.py): its kernel paths."""

    section: typing.ClassVar[str] = "machine"
    cpu: str | None = None
    arch: str | None = None
    os: str | None = None
    isa: tuple[str, ...] = ()  # the kernel-selecting instruction sets present (avx2, avx512_vnni, dotprod, ...)
    vnni: bool = False  # int8 dot products summed in 32 bits (VNNI, AMX, arm dot product)
    onnxruntime: str | None = None
    llama_cpp_python: str | None = None
    threads: int | None = spec(minimum=1)

    MAX_TEXT: typing.ClassVar[int] = 200  # a CPU brand string or a version; printed on verify's one line
    MAX_ISA: typing.ClassVar[int] = 64  # edgelm knows a few dozen kernel-selecting features

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.isa) > self.MAX_ISA:
            raise FieldError(f"machine.isa must list at most {self.MAX_ISA} features, got {len(self.isa)}")
        texts = {"cpu": self.cpu, "arch": self.arch, "os": self.os, "onnxruntime": self.onnxruntime,
                 "llama_cpp_python": self.llama_cpp_python, **{f"isa[{i}]": v for i, v in enumerate(self.isa)}}
        for name, value in texts.items():
            if value is not None and len(value) > self.MAX_TEXT:
                raise FieldError(f"machine.{name} must be at most {self.MAX_TEXT} characters, got {len(value)}")


@dataclass(frozen=True)
class ModelSection(Section):
    """What every model kind has."""

    section: typing.ClassVar[str] = "model"
    file: str | None = spec(required=True)
    inputs: tuple[str, ...] = ()  # graph input names (ONNX), in the graph's order
    outputs: tuple[str, ...] = ()
    num_layers: int | None = spec(minimum=1)
    hidden_size: int | None = spec(minimum=1)
    vocab_size: int | None = spec(minimum=1)  # the logits' width / embedding rows
    context_length: int | None = spec(minimum=1)  # None: unbounded (recurrent models)
    # ONNX weight-only quantization (MatMulNBits): bits per weight, weights per scale, compute type
    weight_bits: int | None = spec(minimum=1)
    block_size: int | None = spec(minimum=1)
    accuracy_level: int | None = None  # 0: fp32 compute; 4: activations to int8 per block inside the kernel
    ort_file: str | None = None  # --target mobile: the same graph in onnxruntime's ORT format
    ort_operators: str | None = None  # ... and the operator config a reduced onnxruntime build needs


@dataclass(frozen=True)
class RecurrentModel(ModelSection):
    """RNN/LSTM: state inputs after input_ids, each (num_layers, batch, hidden_size)."""

    num_layers: int | None = spec(minimum=1, required=True)
    hidden_size: int | None = spec(minimum=1, required=True)
    inputs: tuple[str, ...] = spec((), required=True)
    outputs: tuple[str, ...] = spec((), required=True)


@dataclass(frozen=True)
class KvDecoderModel(ModelSection):
    """A decoder-with-past graph (GPT-2): pasts and presents (batch, num_heads, length, head_dim)."""

    num_layers: int | None = spec(minimum=1, required=True)
    context_length: int | None = spec(minimum=1, required=True)
    num_heads: int | None = spec(minimum=1, required=True)
    head_dim: int | None = spec(minimum=1, required=True)
    inputs: tuple[str, ...] = spec((), required=True)
    outputs: tuple[str, ...] = spec((), required=True)
    past_names: tuple[str, ...] = spec((), required=True)  # key, value per layer, fed back from...
    present_names: tuple[str, ...] = spec((), required=True)  # ... these outputs, in the same order
    # "optimum": the cache grows by concatenation each step; "fused-gqa": edgelm's graph, one
    # preallocated buffer per cache tensor shared by past and present (export/gpt2_graph.py)
    graph: str = "optimum"


@dataclass(frozen=True)
class EncoderModel(ModelSection):
    """A BERT encoder; pooling happens outside the graph, as the fields say."""

    context_length: int | None = spec(minimum=1, required=True)
    pooling: tuple[str, ...] = ()  # embed: modes concatenated in order
    normalize: bool = False
    dim: int | None = spec(minimum=1)  # embed: the sentence vector's width
    sentence_transformers: bool = False
    id2label: dict[str, str] = spec(factory=dict)  # classify
    problem_type: str | None = None
    fp32_matmuls: tuple[str, ...] = ()  # int8: MatMuls deliberately kept in fp32


@dataclass(frozen=True)
class GgufModel(ModelSection):
    architecture: str | None = None  # GGUF general.architecture ("llama")
    num_heads: int | None = spec(minimum=1)
    num_kv_heads: int | None = spec(minimum=1)
    head_dim: int | None = spec(minimum=1)
    tied_embeddings: bool = False
    rope_scaling: dict[str, Any] | None = None
    tensor_types: dict[str, int] = spec(factory=dict)  # ggml type name -> tensor count
    fallbacks: tuple[dict[str, Any], ...] = ()  # tensors llama.cpp stored in another type
    fallback_count: int = 0
    tensors: int | None = None  # bare .gguf files: tensor count from the header


@dataclass(frozen=True)
class GgufEncoderModel(GgufModel):
    """A BERT embedder in GGUF: llama.cpp pools (the file's pooling_type); edgelm normalises."""

    context_length: int | None = spec(minimum=1, required=True)
    pooling: tuple[str, ...] = ()  # one mode llama.cpp implements: mean or cls
    normalize: bool = False
    dim: int | None = spec(minimum=1)
    sentence_transformers: bool = False


ENCODER_FAMILIES = ("bert",)
RECURRENT_FAMILIES = ("rnn", "lstm")
KV_DECODER_FAMILIES = ("gpt2",)
# what each encoder task needs beyond the common fields
TASK_REQUIRES = {"embed": ("model.pooling", "model.dim"), "classify": ("model.id2label",),
                 "fill-mask": ("tokenizer.mask_id", "tokenizer.mask_token")}


def model_class(family: str, fmt: str) -> type[ModelSection]:
    """The model section's class: by format (a GGUF file says its own geometry), then by family."""
    if fmt == "gguf":
        return GgufEncoderModel if family in ENCODER_FAMILIES else GgufModel
    if family in RECURRENT_FAMILIES:
        return RecurrentModel
    if family in KV_DECODER_FAMILIES:
        return KvDecoderModel
    if family in ENCODER_FAMILIES:
        return EncoderModel
    return ModelSection


# -- checking JSON values against the declared types -------------------------------------------
class FieldError(ArtifactError):
    """A field that does not have its declared type; `parse_section` adds the file's name."""


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def show_value(value: Any) -> str:
    text = repr(value)  # repr escapes control characters: safe to print to a terminal
    return text if len(text) <= MAX_REPR else text[: MAX_REPR - 3] + "..."


def key_text(key: Any) -> str:
    """A key from a file as part of a field name: as is when printable, else escaped by repr."""
    return key if isinstance(key, str) and key.isprintable() and key else repr(key)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(value: Any, hint: Any, name: str, minimum: int | None) -> Any:
    """`value` converted to the declared type (lists become tuples), or a FieldError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(value, inner, name, minimum)
    if hint is bool:
        if not isinstance(value, bool):
            raise FieldError(f"{name} must be true or false, got {show_value(value)}")
        return value
    if hint is int:
        if not _is_int(value) or (minimum is not None and value < minimum):
            bound = f" >= {minimum}" if minimum is not None else ""
            raise FieldError(f"{name} must be an integer{bound}, got {show_value(value)}")
        return value
    if hint is float:
        if not (_is_int(value) or isinstance(value, float)):  # validation numbers may be NaN
            raise FieldError(f"{name} must be a number, got {show_value(value)}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise FieldError(f"{name} must be a string, got {show_value(value)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise FieldError(f"{name} must be a list, got {show_value(value)}")
        return tuple(_check(v, args[0], f"{name}[{i}]", minimum) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise FieldError(f"{name} must be an object, got {show_value(value)}")
        return {k: _check(v, args[1], f"{name}.{key_text(k)}", minimum) for k, v in value.items()}
    raise TypeError(f"unsupported field type {hint!r}")  # a bug in a declaration, not in a file


def parse_section(cls: type, data: Any, name: str, where: str = "manifest", required: bool = True) -> Any:
    """An instance of `cls` from a JSON object, each field checked; ArtifactError naming the field.

    Unknown keys are ignored, so that additions made by a newer edgelm within the same schema
    version do not break reading; a missing required field is an error when `required` (a file
    being loaded), not while code builds a manifest step by step.
    """
    if dataclasses.is_dataclass(data):
        data = dataclasses.asdict(data)
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: {name or 'manifest'} must be an object, got {show_value(data)}")
    hints = _hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        dotted = f"{name}.{f.name}" if name else f.name
        needed = required and f.metadata.get("required")
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if (f.name not in data and (needed or no_default)) or (needed and data.get(f.name) is None):
            raise ArtifactError(f"{where}: {dotted} is missing")
        if f.name not in data:
            continue
        try:
            values[f.name] = _check(data[f.name], hints[f.name], dotted, f.metadata.get("minimum", 0))
        except FieldError as err:
            raise ArtifactError(f"{where}: {err}") from None
    try:
        return cls(**values)
    except FieldError as err:  # a section's own check (the same rules, so not expected here)
        raise ArtifactError(f"{where}: {err}") from None


def require(section: Any, field_name: str, where: str, why: str = "") -> Any:
    """A field this artifact's task cannot do without, or an ArtifactError naming it."""
    value = getattr(section, field_name.split(".")[-1], None)  # absent from this model kind: missing too
    if value is None or value == () or value == {}:
        reason = f" ({why})" if why else ""
        raise ArtifactError(f"{where}: {field_name} is missing{reason}")
    return value


def check_task_fields(task: str, tokenizer: TokenizerSection, model: ModelSection, where: str) -> None:
    for dotted in TASK_REQUIRES.get(task, ()):
        section = tokenizer if dotted.startswith("tokenizer.") else model
        require(section, dotted, where, f"a {task} artifact needs it")


# -- schema 1 -> 2 -----------------------------------------------------------------------------
RENAMED_V1 = {"n_layers": "num_layers", "n_heads": "num_heads", "n_kv_heads": "num_kv_heads"}
V1_WEIGHTS = "model.safetensors"  # schema 1 kept a bare digest for this file
MAX_V1_LAYERS = 10_000


def upgrade_v1(data: dict[str, Any]) -> dict[str, Any]:
    """A schema 1 manifest's dict in schema 2's shape (non-dict sections are left for the checks)."""
    data = dict(data)
    sections = {k: dict(data[k]) if isinstance(data.get(k), dict) else data.get(k, {})
                for k in ("tokenizer", "generation", "model", "source")}
    tokenizer, generation, model, source = (sections[k] for k in ("tokenizer", "generation", "model", "source"))
    if isinstance(generation, dict) and isinstance(tokenizer, dict):
        for key in ("bos_id", "eos_id", "pad_id"):
            if key in generation:
                value = generation.pop(key)
                if tokenizer.get(key) is None:  # BERT kept pad_id in the tokenizer section already
                    tokenizer[key] = value
    if isinstance(model, dict):
        for old, new in RENAMED_V1.items():
            if old in model:
                model.setdefault(new, model.pop(old))
        if isinstance(generation, dict) and "context_length" in generation:
            model.setdefault("context_length", generation.pop("context_length"))
        if isinstance(tokenizer, dict) and "max_length" in tokenizer:
            model.setdefault("context_length", tokenizer.pop("max_length"))
        _upgrade_model_v1(model, source, data.get("family"), data.get("format"))
    if isinstance(source, dict):
        _upgrade_source_v1(source)
    data.update(tokenizer=tokenizer, generation=generation, model=model, source=source)
    return data


def _upgrade_model_v1(model: dict, source: Any, family: Any, fmt: Any) -> None:
    layers = model.get("num_layers")
    if family in KV_DECODER_FAMILIES and fmt == "onnx" and _is_int(layers) and 0 < layers <= MAX_V1_LAYERS:
        # schema 1 rebuilt these names in code from optimum's convention (bounded: the count comes from a file)
        layers = range(model["num_layers"])
        model.setdefault("past_names", [f"past_key_values.{i}.{kv}" for i in layers for kv in ("key", "value")])
        model.setdefault("present_names", [f"present.{i}.{kv}" for i in layers for kv in ("key", "value")])
    if fmt == "gguf" and isinstance(source, dict) and not source.get("bare_gguf"):
        # schema 1 wrote the source's class name here; schema 2 keeps GGUF's own architecture
        arch = model.get("architecture")
        if isinstance(arch, str) and "For" in arch:  # a class name such as LlamaForCausalLM
            source.setdefault("architectures", [arch])
            model["architecture"] = "llama" if family == "llama" else None


def _upgrade_source_v1(source: dict) -> None:
    digest = source.pop("sha256", None)
    weights = source.pop("weights", None)
    if isinstance(digest, str):
        source["sha256"] = {V1_WEIGHTS: digest}
    elif digest is not None:
        source["sha256"] = digest
    elif weights is not None:
        source["sha256"] = weights
    arch = source.pop("architecture", None)
    if isinstance(arch, str):
        source.setdefault("architectures", [arch])
    if source.get("architectures") is None:
        source.pop("architectures", None)
