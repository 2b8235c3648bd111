"""Opening an artifact's files and checking them against its manifest before anything runs.

The manifest is typed and range-checked when it is read; here it meets the files themselves:
the graph's inputs and outputs and the geometry they imply, the tokenizer's size and the special
ids, the logits' width. A mismatch is an ArtifactError naming the manifest field, so a replaced
or edited model file fails at load, not with a shape error (or a crash) mid-generation.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgelm.artifact import MANIFEST_NAME, Manifest, artifact_file
from edgelm.contract import ModelSection
from edgelm.errors import ArtifactError
from edgelm.runtime.device import RuntimeOptions, onnx_session
from edgelm.runtime.ort.onnx_refs import OnnxRefs, read_refs
from edgelm.runtime.ort.tokenizer import load_tokenizer

# learned position embeddings, as edgelm's and optimum's GPT-2 graphs name them
POSITION_TABLES = ("wpe", "transformer.wpe.weight", "wpe.weight")


def manifest_where(folder: str | Path) -> str:
    return str(Path(folder) / MANIFEST_NAME)


def open_onnx(folder: Path, manifest: Manifest, options: RuntimeOptions) -> tuple[Any, Any]:
    """The onnxruntime session and tokenizer of an ONNX artifact, both checked against the manifest."""
    if options.model_format == "ort":
        if manifest.model.ort_file is None:
            raise ArtifactError(f"{manifest_where(folder)}: this artifact has no ORT-format model "
                                "(export it with --target mobile)")
        model_path = artifact_file(folder, manifest, manifest.model.ort_file, "model.ort_file")
        refs = None  # the ORT format keeps no external data; its .onnx twin was checked at export
    else:
        model_path = artifact_file(folder, manifest, manifest.model.file, "model.file")
        refs = check_external_data(folder, manifest, model_path)
    tokenizer_path = artifact_file(folder, manifest, manifest.tokenizer.file, "tokenizer.file")
    session = onnx_session(model_path, options)
    # padding and truncation a tokenizer.json carries are dropped there: the runtime decides both
    tokenizer = load_tokenizer(tokenizer_path, manifest.model.vocab_size)
    where = manifest_where(folder)
    if manifest.model.inputs or manifest.model.outputs:  # schema 1 encoders named none
        check_graph_io(session, manifest.model, where)
    check_tokenizer(tokenizer.get_vocab_size(), manifest, where)
    if refs is not None:
        check_position_table(refs, manifest.model, where)
    return session, tokenizer


def check_external_data(folder: Path, manifest: Manifest, model_path: Path) -> OnnxRefs:
    """Every external-data file the ONNX graph names must be one the manifest lists."""
    refs = read_refs(model_path)
    for location in sorted(refs.locations):
        if location not in manifest.files:
            raise ArtifactError(f"{model_path}: the graph reads external data from {location!r}, "
                                "which is not a file the manifest lists")
        artifact_file(folder, manifest, location, "external data of model.file")
    return refs


def check_position_table(refs: OnnxRefs, model: ModelSection, where: str) -> None:
    """A decoder's context may not exceed its learned position table: later positions index past it."""
    table = next((refs.initializers[n] for n in POSITION_TABLES if n in refs.initializers), None)
    if table and model.context_length is not None and model.context_length > table[0]:
        raise ArtifactError(f"{where}: model.context_length {model.context_length} exceeds the graph's position "
                            f"table of {table[0]} positions")


def check_graph_io(session: Any, model: ModelSection, where: str) -> None:
    """The graph's input and output names must be exactly those the manifest promises."""
    for kind, nodes, expected in (("inputs", session.get_inputs(), model.inputs),
                                  ("outputs", session.get_outputs(), model.outputs)):
        names = [node.name for node in nodes]
        if sorted(names) != sorted(expected):
            raise ArtifactError(f"{where}: model.{kind} {list(expected)} do not match the graph's {names}; "
                                "the model file was replaced or edited")


def static_dim(node: Any, axis: int) -> int | None:
    """A graph input/output's size along `axis` when fixed in the file (None when symbolic)."""
    shape = node.shape or []
    size = shape[axis] if -len(shape) <= axis < len(shape) else None
    return size if isinstance(size, int) and size > 0 else None


def check_dim(where: str, field: str, promised: int | None, actual: int | None, what: str) -> None:
    if promised is not None and actual is not None and promised != actual:
        raise ArtifactError(f"{where}: {field} is {promised}, but the graph's {what} says {actual}")


def node_named(nodes: Iterable[Any], name: str) -> Any:
    return next(n for n in nodes if n.name == name)


def check_cache_geometry(session: Any, model: Any, step_inputs: tuple[str, ...], where: str) -> None:
    """A KV-cache decoder's graph against its manifest: pasts and presents pair up, one key and one
    value per layer, (B, heads, T, head_dim) each; `step_inputs` and logits (vocab wide) are present."""
    if len(model.past_names) != 2 * model.num_layers or len(model.present_names) != len(model.past_names):
        raise ArtifactError(f"{where}: model.past_names and model.present_names must hold a key and a value "
                            f"per layer (model.num_layers {model.num_layers})")
    missing = [n for n in (*step_inputs, *model.past_names) if n not in model.inputs]
    missing += [n for n in ("logits", *model.present_names) if n not in model.outputs]
    if missing:
        raise ArtifactError(f"{where}: model.inputs/outputs lack {missing[0]!r}")
    for name in model.past_names:
        node = node_named(session.get_inputs(), name)
        check_dim(where, "model.num_heads", model.num_heads, static_dim(node, 1), f"{name} shape")
        check_dim(where, "model.head_dim", model.head_dim, static_dim(node, 3), f"{name} shape")
    logits = node_named(session.get_outputs(), "logits")
    check_dim(where, "model.vocab_size", model.vocab_size, static_dim(logits, -1), "logits width")


def check_tokenizer(tokenizer_size: int, manifest: Manifest, where: str) -> None:
    """Vocabulary size and special ids against the tokenizer file and the model's logits."""
    section, model = manifest.tokenizer, manifest.model
    if section.vocab_size is not None and section.vocab_size != tokenizer_size:
        raise ArtifactError(f"{where}: tokenizer.vocab_size is {section.vocab_size}, "
                            f"but the tokenizer file has {tokenizer_size} tokens")
    if model.vocab_size is not None and tokenizer_size > model.vocab_size:
        raise ArtifactError(f"{where}: the tokenizer has {tokenizer_size} tokens, more than model.vocab_size "
                            f"{model.vocab_size}; its ids beyond that would index past the embedding")
    check_ids(manifest, tokenizer_size, where)


def check_ids(manifest: Manifest, vocab_size: int, where: str) -> None:
    """Every special and stop id must be a token of the vocabulary (and a row of the logits)."""
    limit = min(vocab_size, manifest.model.vocab_size or vocab_size)
    named = {f"tokenizer.{k}": v for k, v in manifest.tokenizer.special_ids().items()}
    named.update({f"generation.stop_ids[{i}]": v for i, v in enumerate(manifest.generation.stop_ids)})
    for field, value in named.items():
        if value >= limit:
            raise ArtifactError(f"{where}: {field} {value} is outside the vocabulary of {limit} tokens")


def check_gguf(header: Any, manifest: Manifest, where: str) -> None:
    """Architecture, layer count, context length, vocabulary and special ids against the GGUF header."""
    from edgelm.runtime.gguf.parser import ArrayValue

    model = manifest.model
    arch = header.get("general.architecture")
    if getattr(model, "architecture", None) is not None and arch != model.architecture:
        raise ArtifactError(f"{where}: model.architecture is {model.architecture!r}, but the GGUF says {arch!r}")
    layers = header.get(f"{arch}.block_count")
    check_dim(where, "model.num_layers", model.num_layers, layers if _is_count(layers) else None, "block_count")
    trained = header.get(f"{arch}.context_length")
    if model.context_length is not None and _is_count(trained) and model.context_length > trained:
        raise ArtifactError(f"{where}: model.context_length {model.context_length} exceeds the GGUF's "
                            f"context_length {trained}")
    tokens = header.get("tokenizer.ggml.tokens")
    if isinstance(tokens, ArrayValue):
        size = manifest.tokenizer.vocab_size
        if size is not None and size != tokens.length:
            raise ArtifactError(f"{where}: tokenizer.vocab_size is {size}, but the GGUF holds {tokens.length} tokens")
        check_ids(manifest, tokens.length, where)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0
