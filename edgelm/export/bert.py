"""BERT checkpoints to ONNX encoders for three tasks: embeddings, fill-mask, classification.

optimum-onnx writes the graph; edgelm copies the tokenizer, records the facts the runtime needs
(pooling, normalisation, maximum length, labels) in the manifest, and validates against torch.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgelm.artifact import Manifest, sha256_of, write_artifact
from edgelm.contract import EncoderModel, SourceSection, TokenizerSection
from edgelm.errors import ExportError, UnsupportedModelError, UsageError, first_line
from edgelm.export.checks import validate_into
from edgelm.export.hf_source import (
    check_source_links,
    config_int,
    require_tokenizer,
    source_file,
    tensor_shapes,
    weight_files,
)
from edgelm.export.options import ExportOptions
from edgelm.export.ort_format import write_ort
from edgelm.export.quiet import quiet_loggers
from edgelm.paths import read_source_json

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
TASKS = ("embed", "fill-mask", "classify")
OPTIMUM_TASKS = {"embed": "feature-extraction", "fill-mask": "fill-mask", "classify": "text-classification"}
# sentence-transformers pooling flags, in the order its Pooling module concatenates them
ST_POOLING = (("pooling_mode_cls_token", "cls"), ("pooling_mode_max_tokens", "max"),
              ("pooling_mode_mean_tokens", "mean"), ("pooling_mode_mean_sqrt_len_tokens", "mean_sqrt_len"))
ST_UNSUPPORTED_POOLING = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
ST_MODULES = {"sentence_transformers.models.Transformer", "sentence_transformers.models.Pooling",
              "sentence_transformers.models.Normalize"}


def export_bert(source: Path, config: dict, out: Path, options: ExportOptions) -> Manifest:
    task = infer_task(source, config, options.task)
    if not ((source / TOKENIZER_FILE).is_file() or (source / "vocab.txt").is_file()):
        raise UnsupportedModelError(f"{source}: missing vocab.txt or tokenizer.json, so it cannot be tokenised")
    check_source_links(source)  # transformers and optimum read the folder themselves
    require_tokenizer(source)  # every tokenizer file must lie inside the folder
    manifest = _manifest(source, config, task, options)
    with write_artifact(out, manifest) as tmp, tempfile.TemporaryDirectory() as scratch:
        options.progress("export", 0, 3)
        fp32 = _export_onnx(source, task, Path(scratch))
        options.progress("export", 1, 3)
        manifest.tokenizer = replace(manifest.tokenizer, **_write_tokenizer(source, tmp / TOKENIZER_FILE))
        if options.quant == "int8":
            feeds = calibration_feeds(tmp / TOKENIZER_FILE, fp32, manifest)
            kept = quantize_encoder_int8(fp32, tmp / MODEL_FILE, feeds)
            manifest.model = replace(manifest.model, fp32_matmuls=kept)
        else:
            (tmp / MODEL_FILE).write_bytes(fp32.read_bytes())
        manifest.model = replace(manifest.model, **graph_io(tmp / MODEL_FILE))
        if options.target == "mobile":
            ort_file, operators = write_ort(tmp / MODEL_FILE)
            manifest.model = replace(manifest.model, ort_file=ort_file, ort_operators=operators)
        options.progress("export", 2, 3)
        validate_into(manifest, options.validate, lambda: _validate(source, tmp, manifest))
        options.progress("export", 3, 3)
    return manifest


def _validate(source: Path, folder: Path, manifest: Manifest) -> list:
    from edgelm.export.bert_validate import ort_agreement, validate_encoder  # torch, only when validating

    checks = validate_encoder(source, folder, manifest)
    return [*checks, ort_agreement(folder, manifest)] if manifest.model.ort_file else checks


def infer_task(source: Path, config: dict, requested: str) -> str:
    """The task asked for, or the one the folder implies; refuse heads the weights do not have."""
    if requested not in ("auto", *TASKS):
        raise UsageError(f"task {requested!r} is not a BERT task; choose one of: auto, {', '.join(TASKS)}")
    architectures = " ".join(config.get("architectures") or [])
    has_mlm = "ForMaskedLM" in architectures or "ForPreTraining" in architectures
    has_classifier = "ForSequenceClassification" in architectures
    if requested == "fill-mask" and not has_mlm:
        raise UnsupportedModelError(f"{source}: fill-mask needs a masked-LM head; architectures are {architectures!r}")
    if requested == "classify" and not has_classifier:
        raise UnsupportedModelError(
            f"{source}: classify needs a sequence-classification head; architectures are {architectures!r}")
    if requested != "auto":
        return requested
    if (source / "modules.json").is_file() or architectures in ("", "BertModel"):
        return "embed"
    if has_classifier:
        return "classify"
    if has_mlm:
        return "fill-mask"
    raise UnsupportedModelError(
        f"{source}: cannot tell the task from architectures {architectures!r}; pass --task embed|fill-mask|classify")


def sentence_transformers_facts(source: Path) -> dict[str, Any] | None:
    """Pooling modes, normalisation and lower-casing from a sentence-transformers folder, if it is one."""
    if not (source / "modules.json").is_file():
        return None
    modules = _read_modules(source)
    types = [m.get("type", "") for m in modules]
    unknown = [t for t in types if t not in ST_MODULES]
    if unknown:
        raise UnsupportedModelError(f"{source}: sentence-transformers module(s) {', '.join(unknown)} are not supported")
    pooling_module = next((m for m in modules if m.get("type", "").endswith(".Pooling")), None)
    if pooling_module is None:  # token embeddings only: there is no sentence vector to match
        raise UnsupportedModelError(f"{source}: modules.json has no Pooling module")
    pooling = _pooling_modes(source, f"{pooling_module.get('path') or '.'}/config.json")
    st_name = "sentence_bert_config.json"
    st = read_source_json(source, st_name) if (source / st_name).is_file() else {}
    max_length = st.get("max_seq_length")
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1):
        raise UnsupportedModelError(f"{source}: sentence_bert_config.json max_seq_length must be a positive integer")
    return {
        "pooling": pooling,
        "normalize": any(t.endswith(".Normalize") for t in types),
        "max_length": max_length,
        "lowercase": bool(st.get("do_lower_case", False)),
    }


def _read_modules(source: Path) -> list[dict[str, Any]]:
    """modules.json: a list of {type, path} objects."""
    modules = read_source_json(source, "modules.json", expect=list)
    if not all(
        isinstance(m, dict) and isinstance(m.get("type", ""), str) and isinstance(m.get("path", ""), str)
        for m in modules
    ):
        raise UnsupportedModelError(f"{source / 'modules.json'}: expected a list of {{type, path}} objects")
    return modules


def _pooling_modes(source: Path, name: str) -> list[str]:
    path = source_file(source, name, "pooling config")
    config = read_source_json(source, name) if path.is_file() else {"pooling_mode_mean_tokens": True}
    unsupported = [k for k in ST_UNSUPPORTED_POOLING if config.get(k)]
    if unsupported:
        raise UnsupportedModelError(f"{path}: pooling {', '.join(unsupported)} is not supported")
    modes = [mode for key, mode in ST_POOLING if config.get(key)]
    if not modes:
        raise UnsupportedModelError(f"{path}: no pooling mode is switched on")
    return modes


def max_length_of(source: Path, config: dict, st: dict[str, Any] | None) -> int:
    """The longest input the model takes, as sentence-transformers or the tokenizer config says."""
    positions = config_int(config, "max_position_embeddings", source) if "max_position_embeddings" in config else 512
    table = next((shape for name, shape in tensor_shapes(source).items()
                  if name.endswith("embeddings.position_embeddings.weight")), None)
    if table is not None and table[:1] != [positions]:
        # the manifest's context_length is capped by this number; the weights must have that many positions
        raise UnsupportedModelError(f"{source}: config.json says max_position_embeddings {positions}, but the "
                                    f"position table in the weights has {table[:1]} rows")
    if st and st.get("max_length"):
        return min(int(st["max_length"]), positions)
    tok_config = source / "tokenizer_config.json"
    declared = read_source_json(source, tok_config.name).get("model_max_length") if tok_config.is_file() else None
    # transformers writes a huge sentinel (1e30) when a tokenizer declares no maximum
    if isinstance(declared, (int, float)) and 0 < declared < 1_000_000:
        return min(int(declared), positions)
    return positions


def _manifest(source: Path, config: dict, task: str, options: ExportOptions) -> Manifest:
    st = sentence_transformers_facts(source) if task == "embed" else None
    hidden = config_int(config, "hidden_size", source)
    model: dict[str, Any] = {"file": MODEL_FILE, "hidden_size": hidden,
                             "context_length": max_length_of(source, config, st),
                             "num_layers": config_int(config, "num_hidden_layers", source),
                             "vocab_size": config_int(config, "vocab_size", source)}
    if task == "embed":
        pooling = st["pooling"] if st else ["mean"]
        model.update(pooling=pooling, normalize=bool(st and st["normalize"]), dim=hidden * len(pooling),
                     sentence_transformers=st is not None)
    if task == "classify":
        labels = config.get("id2label") or {}
        if not isinstance(labels, dict):
            raise UnsupportedModelError(f"{source}: config.json id2label must be an object")
        count = len(labels) or (config_int(config, "num_labels", source) if "num_labels" in config else 2)
        model.update(id2label={str(i): str(labels.get(str(i), f"LABEL_{i}")) for i in range(count)},
                     problem_type=str(config.get("problem_type") or "single_label_classification"))
    weights = weight_files(source)  # safetensors only: a pickled pytorch_model.bin is refused here
    return Manifest(
        family="bert", task=task, format="onnx", quant=options.quant,
        tokenizer=TokenizerSection(file=TOKENIZER_FILE, lowercase=bool(st and st["lowercase"])),
        model=EncoderModel(**model),
        source=SourceSection(path=str(source.resolve()),
                             sha256={str(w.relative_to(source)): sha256_of(w) for w in weights},
                             architectures=tuple(str(a) for a in config.get("architectures") or ())),
    )


def _export_onnx(source: Path, task: str, scratch: Path) -> Path:
    from optimum.exporters.onnx import main_export

    # library_name="transformers": a sentence-transformers folder would otherwise be exported with
    # its pooling inside the graph; edgelm pools itself so that every pooling mode is explicit.
    # optimum's own validation is off because edgelm validates end to end (tokenizer included).
    try:
        with quiet_loggers("optimum"):
            main_export(str(source), str(scratch), task=OPTIMUM_TASKS[task], library_name="transformers",
                        do_validation=False, local_files_only=True)
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        first = first_line(err)
        raise ExportError(f"{source}: optimum could not export the model ({first})") from None
    path = scratch / MODEL_FILE
    if not path.is_file():
        raise ExportError(f"{source}: optimum wrote no {MODEL_FILE}")
    return path


def _write_tokenizer(source: Path, target: Path) -> dict[str, Any]:
    """tokenizer.json exactly as transformers would tokenise (built from vocab.txt if need be).

    Returns the special tokens the runtime needs: mask (fill-mask) and pad (batching).
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source), use_fast=True, local_files_only=True)
    except (OSError, ValueError) as err:
        first = first_line(err)
        raise UnsupportedModelError(f"{source}: cannot load its tokenizer ({first})") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UnsupportedModelError(f"{source}: no fast tokenizer could be built (tokenizer.json is needed)")
    backend = tokenizer.backend_tokenizer
    # the runtime sets truncation and per-batch padding itself; none are baked into the file
    backend.no_truncation()
    backend.no_padding()
    backend.save(str(target))
    return {"mask_token": tokenizer.mask_token, "mask_id": tokenizer.mask_token_id,
            "pad_id": tokenizer.pad_token_id, "vocab_size": backend.get_vocab_size()}


def graph_io(path: Path) -> dict[str, tuple[str, ...]]:
    """The written graph's input and output names, for the manifest (the runtime checks them)."""
    from edgelm.runtime.device import RuntimeOptions, onnx_session

    session = onnx_session(path, RuntimeOptions(threads=1))
    return {"inputs": tuple(i.name for i in session.get_inputs()),
            "outputs": tuple(o.name for o in session.get_outputs())}


# calibration: short inputs (their activations have the widest outlier channels) and corpus sentences;
# none of them is a validation probe
CALIBRATION_SHORT = ("Hi", "Yes.", "No", "Sure", "Fine", "Great!", "Why?", "ok then")
CALIBRATION_SENTENCES = 24


def calibration_feeds(tokenizer_path: Path, graph: Path, manifest: Manifest) -> list[dict[str, Any]]:
    """Graph feeds of the calibration texts, tokenised and padded as the runtime would."""
    from tokenizers import Tokenizer

    from edgelm.models.corpus import builtin_text
    from edgelm.runtime.device import RuntimeOptions, onnx_session

    sentences = [s.strip() for s in builtin_text()[:20_000].split(". ") if 3 <= len(s.split()) <= 60]
    texts = [*CALIBRATION_SHORT, *sentences[:CALIBRATION_SENTENCES]]
    if manifest.tokenizer.lowercase:
        texts = [t.lower() for t in texts]
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    tokenizer.enable_truncation(int(manifest.model.context_length))
    names = [i.name for i in onnx_session(graph, RuntimeOptions(threads=1)).get_inputs()]
    encodings = tokenizer.encode_batch(texts)
    # each text alone, and the short ones as one padded batch, as the runtime batches them: padded
    # positions reach peaks single texts do not (without this batch, MiniLM's "Thanks!" fell from
    # 0.996 alone to 0.990 in a batch; with it, 0.995)
    groups = [[e] for e in encodings] + [encodings[: len(CALIBRATION_SHORT)]]
    return [_padded_feed(group, names, manifest.tokenizer.pad_id or 0) for group in groups]


def _padded_feed(encodings: list[Any], names: list[str], pad_id: int) -> dict[str, Any]:
    import numpy as np

    width = max(len(e.ids) for e in encodings)
    ids = np.full((len(encodings), width), pad_id, np.int64)  # (B, T)
    mask, types = np.zeros_like(ids), np.zeros_like(ids)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding.ids)] = encoding.ids
        mask[row, : len(encoding.ids)] = 1
        types[row, : len(encoding.ids)] = encoding.type_ids
    inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
    return {n: inputs[n] for n in names}


def quantize_encoder_int8(src: Path, dst: Path, feeds: list[dict[str, Any]]) -> list[str]:
    """Dynamic int8, per-channel weights, activations smoothed per channel; returns the MatMuls kept fp32.

    The scheme must give the same numbers on every CPU (edgelm/export/int8_safety.py). Measured on
    MiniLM-L6 (onnxruntime 1.32, min cosine to torch over the probes, native on an AVX-512 VNNI CPU /
    under an emulated AVX2-only Zen 2; speed at batch 32 relative to fp32 on the VNNI CPU):
    - 8-bit signed weights everywhere but the feed-forward down projections (the previous rule):
      0.9959 / 0.9879, 1.34x: wrong without VNNI;
    - 7-bit signed weights (reduce_range) for every quantized MatMul: 0.9914 / 0.9914, 1.30x;
    - 8-bit unsigned weights (u8 x u8 kernels widen to 16 bits) everywhere: 0.9968 / 0.9968, 1.06x;
    - weight-only MatMulNBits, 8 bits in blocks of 32: 0.9978 / 0.9976, 0.92x;
    - 7-bit signed attention projections, 8-bit unsigned feed-forward up projections: 0.9960 / 0.9960,
      1.25x. The up projections are the ones 7 bits hurt (0.9914 with them signed, 0.9960 without).
    The last is what this does; the feed-forward down projections (reading GELU outputs, whose
    outliers smoothing does not tame enough) stay fp32, as before.
    """
    from edgelm.export.smooth_quant import smoothed_int8

    return smoothed_int8(src, dst, feeds, keep=_feed_forward_down, unsigned=_feed_forward_up)


def _feed_forward_down(name: str) -> bool:
    return "/output/dense/" in name and "/attention/" not in name


def _feed_forward_up(name: str) -> bool:
    return "/intermediate/dense/" in name
