"""GPT-2 checkpoints to ONNX with a key/value cache, optionally weight-only int8/int4, validated.

The graph is edgelm's own decoding graph (export/gpt2_graph.py: fused attention over a
preallocated cache, fused LayerNorm/GELU, logits only where asked). A checkpoint whose geometry
onnxruntime's fused attention cannot take gets optimum's `text-generation-with-past` graph instead,
and the manifest says which (`model.graph`). Validation runs the exported file through the
runtime's own decoder, so what is checked is what users will run.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgelm.artifact import Check, Manifest, write_artifact
from edgelm.contract import GenerationSection, KvDecoderModel, SourceSection, TokenizerSection
from edgelm.errors import ExportError, UnsupportedModelError, first_line
from edgelm.export import gpt2_graph
from edgelm.export.checks import max_abs_diff, validate_into
from edgelm.export.hf_source import (
    check_source_links,
    config_int,
    require_tokenizer,
    special_token_id,
    tensor_shapes,
    weight_files,
    weights_sha256,
    write_tokenizer_json,
)
from edgelm.export.onnx_quantize import WeightOnly, quantize_weight_only
from edgelm.export.options import ExportOptions
from edgelm.export.ort_format import write_ort
from edgelm.export.quiet import quiet_loggers
from edgelm.metrics import perplexity_of

MODEL_FILE = "model.onnx"
TOKENIZER_FILE = "tokenizer.json"
EOS_TEXT = "<|endoftext|>"
EMBEDDING_NAMES = ("transformer.wte.weight", "wte.weight")
POSITION_NAMES = ("transformer.wpe.weight", "wpe.weight")
GREEDY_TOKENS = 32
ORT_MAX_ABS = 1e-4  # the .ort copy runs the same kernels; only fusion order may differ
# Block sizes measured on GPT-2 124M decode (2 threads, interleaved, loaded machine): block 128 was
# 17% faster than 32 for int8 (fp32 scales cost 12.5% more bytes at 32); 8 bits hold accuracy at 128,
# 4 bits keep 32 (llama.cpp's Q4_0 block) for theirs. Thresholds: edgelm/families.py
WEIGHT_ONLY = {"int8": WeightOnly(bits=8, block_size=128), "int4": WeightOnly(bits=4, block_size=32)}
PPL_TOKENS = 512
PROMPTS = (
    "The quick brown fox",
    "def main():\n    return",
    "In the beginning",
    "A list is a sequence of items, and a tuple",
)


def graph_io_names(num_layers: int) -> dict[str, tuple[str, ...]]:
    """Inputs, outputs, pasts and presents of optimum's GPT-2 decoder-with-past graph, in its order."""
    pasts = tuple(f"past_key_values.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value"))
    presents = tuple(f"present.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value"))
    return {"inputs": ("input_ids", *pasts, "attention_mask", "position_ids"), "outputs": ("logits", *presents),
            "past_names": pasts, "present_names": presents}


def check_source(source: Path, config: dict) -> None:
    """Everything that can be told from the folder's files, before torch is loaded."""
    if "GPT2LMHeadModel" not in (config.get("architectures") or ["GPT2LMHeadModel"]):
        raise UnsupportedModelError(
            f"{source}: architectures {config.get('architectures')} has no GPT2LMHeadModel (needed for text generation)"
        )
    for key in ("n_layer", "n_head", "n_embd", "vocab_size", "n_positions"):
        config_int(config, key, source)
    if config["n_embd"] % config["n_head"]:
        raise UnsupportedModelError(
            f"{source}: n_embd {config['n_embd']} is not a multiple of n_head {config['n_head']}")
    check_source_links(source)
    require_tokenizer(source)
    shapes = tensor_shapes(source)
    embedding = next((shapes[n] for n in EMBEDDING_NAMES if n in shapes), None)
    if embedding is None:
        raise UnsupportedModelError(
            f"{source}: weights have no token embedding ({EMBEDDING_NAMES[0]})"
        )
    vocab, width = config.get("vocab_size"), config.get("n_embd")
    if embedding != [vocab, width]:
        raise UnsupportedModelError(
            f"{source}: config.json says vocab_size {vocab} x n_embd {width}, "
            f"but the embedding matrix in the weights is {embedding[0]} x {embedding[1]}"
        )
    positions = next((shapes[n] for n in POSITION_NAMES if n in shapes), None)
    if positions is not None and positions[:1] != [config["n_positions"]]:
        # the manifest's context_length comes from n_positions; the position table must hold that many rows
        raise UnsupportedModelError(f"{source}: config.json says n_positions {config['n_positions']}, but the "
                                    f"position table in the weights has {positions[:1]} rows")


def export_gpt2(source: Path, config: dict, out: Path, options: ExportOptions) -> Manifest:
    check_source(source, config)
    fused = gpt2_graph.unsupported_reason(config) is None
    manifest = _manifest(source, config, options, fused)
    with write_artifact(out, manifest) as tmp, tempfile.TemporaryDirectory() as scratch:
        options.progress("export", 0, 3)
        write_tokenizer_json(source, tmp / TOKENIZER_FILE)
        _check_tokenizer_fits(tmp / TOKENIZER_FILE, config, manifest)
        quantized = options.quant in WEIGHT_ONLY
        if fused:
            fp32 = _fused_export(source, config, Path(scratch) / "onnx", separate_head=quantized)
        else:
            fp32 = _optimum_export(source, Path(scratch) / "onnx")
        options.progress("export", 1, 3)
        if quantized:
            quantize_weight_only(fp32, tmp / MODEL_FILE, WEIGHT_ONLY[options.quant], tied=gpt2_graph.TIED_TABLES)
        else:
            _move_model(fp32, tmp)
        if options.target == "mobile":
            ort_file, operators = write_ort(tmp / MODEL_FILE)
            manifest.model = replace(manifest.model, ort_file=ort_file, ort_operators=operators)
        options.progress("export", 2, 3)
        validate_into(manifest, options.validate, lambda: validate(source, tmp, manifest, fp32))
        options.progress("export", 3, 3)
    return manifest


def _manifest(source: Path, config: dict, options: ExportOptions, fused: bool) -> Manifest:
    layers, heads, width = config["n_layer"], config["n_head"], config["n_embd"]
    how = WEIGHT_ONLY.get(options.quant)
    io = gpt2_graph.io_names(layers) if fused else graph_io_names(layers)
    return Manifest(
        family="gpt2",
        task="text-generation",
        format="onnx",
        quant=options.quant,
        tokenizer=TokenizerSection(kind="byte-level-bpe", file=TOKENIZER_FILE),
        generation=GenerationSection(add_bos=False),
        model=KvDecoderModel(
            file=MODEL_FILE,
            **io,
            graph=gpt2_graph.GRAPH_KIND if fused else "optimum",
            weight_bits=how.bits if how else None,
            block_size=how.block_size if how else None,
            accuracy_level=how.accuracy_level if how else None,
            num_layers=layers,
            num_heads=heads,
            head_dim=width // heads,
            hidden_size=width,
            vocab_size=config["vocab_size"],
            context_length=config.get("n_positions"),
        ),
        source=SourceSection(path=str(source.resolve()), sha256=weights_sha256(source),
                             architectures=("GPT2LMHeadModel",)),
        versions=_export_versions(),
    )


def _check_tokenizer_fits(path: Path, config: dict, manifest: Manifest) -> None:
    """Record the tokenizer's size and special ids; ids beyond the embedding would crash at run time."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    size = tokenizer.get_vocab_size()
    if size > config["vocab_size"]:
        raise UnsupportedModelError(
            f"tokenizer has {size} tokens but the model's vocab_size is only {config['vocab_size']}"
        )
    eos = special_token_id(tokenizer, config, "eos", EOS_TEXT)
    bos = special_token_id(tokenizer, config, "bos", EOS_TEXT)
    pad = special_token_id(tokenizer, config, "pad", None)
    # GPT-2 has no pad token; padded positions are masked out, so any valid id serves (eos here)
    manifest.tokenizer = replace(manifest.tokenizer, vocab_size=size, eos_id=eos, bos_id=bos,
                                 pad_id=pad if pad is not None else eos)


def _optimum_export(source: Path, folder: Path) -> Path:
    """optimum's decoder-with-past export; its own validation is skipped (ours is stricter)."""
    from optimum.exporters.onnx import main_export

    noise = io.StringIO()
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(noise),
            contextlib.redirect_stderr(noise),
            quiet_loggers("optimum", "transformers"),  # their notes are for model authors
        ):
            warnings.simplefilter(
                "ignore"
            )  # tracer warnings on every export: expected, not for users
            main_export(
                str(source),
                str(folder),
                task="text-generation-with-past",
                do_validation=False,
                local_files_only=True,
            )
    except Exception as err:  # noqa: BLE001 - optimum and torch raise many types; one line for users
        raise ExportError(f"{source}: the ONNX export failed ({first_line(err)})") from None
    path = folder / MODEL_FILE
    if not path.is_file():
        raise ExportError(f"{source}: the ONNX export produced no {MODEL_FILE}")
    return path


def _fused_export(source: Path, config: dict, folder: Path, separate_head: bool) -> Path:
    """edgelm's decoding graph, written straight from the safetensors weights (no tracing)."""
    folder.mkdir(parents=True)
    weights = gpt2_graph.load_weights(weight_files(source))
    try:
        graph = gpt2_graph.build_graph(config, weights, separate_head)
    except KeyError as err:
        raise UnsupportedModelError(f"{source}: the weights have no {err.args[0]} tensor") from None
    path = folder / MODEL_FILE
    gpt2_graph.save_graph(graph, path)
    return path


def _move_model(onnx_path: Path, dest: Path) -> None:
    """model.onnx plus any external-data file next to it (models over 2 GB keep weights outside)."""
    for item in onnx_path.parent.iterdir():
        if item.name == MODEL_FILE or item.name.startswith(MODEL_FILE + "_data"):
            os.replace(item, dest / item.name)


def _export_versions() -> dict[str, str | None]:
    from importlib import metadata

    found: dict[str, str | None] = {}
    for dist in ("torch", "transformers", "optimum-onnx", "onnx"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            found[dist] = None
    return found


# -- validation --------------------------------------------------------------------------------
def validate(source: Path, folder: Path, manifest: Manifest, fp32_path: Path) -> list[Check]:
    """torch's logits and greedy continuations become the reference file; the checks are `edgelm verify`'s.

    Quantized graphs are bounded by their perplexity ratio to the fp32 graph, measured here and
    stored with the reference. The .ort copy's agreement with the .onnx file is checked here too.
    """
    import torch
    from transformers import GPT2LMHeadModel

    from edgelm.export.checks import checks_from_reference
    from edgelm.reference.gpt2 import reference_arrays
    from edgelm.reference.store import rows_within_budget
    from edgelm.runtime.ort.tokenizer import load_tokenizer

    torch.manual_seed(0)
    model = GPT2LMHeadModel.from_pretrained(str(source), use_safetensors=True).eval()
    tokenizer = load_tokenizer(folder / TOKENIZER_FILE)
    prompts = [tokenizer.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    held_out = _held_out_ids(tokenizer, manifest.model.context_length)
    torch_logits = _torch_logits(model, held_out)
    rows = rows_within_budget(len(held_out), torch_logits.shape[-1])
    if manifest.quant == "none":
        prompt_logits = [_torch_logits(model, ids) for ids in prompts]
        greedy = [_torch_greedy(model, ids, manifest.tokenizer.eos_id) for ids in prompts]
        arrays = reference_arrays(prompts, held_out, torch_logits, rows, prompt_logits, greedy, None)
    else:
        arrays = reference_arrays(prompts, held_out, torch_logits, rows, None, None,
                                  _fp32_perplexity(fp32_path, manifest, held_out))
    checks = checks_from_reference(folder, manifest, arrays)
    return [*checks, *_ort_checks(folder, manifest, prompts)] if manifest.model.ort_file else checks


def _fp32_perplexity(fp32_path: Path, manifest: Manifest, held_out: list[int]) -> float:
    from edgelm.runtime.device import RuntimeOptions, onnx_session
    from edgelm.runtime.ort.kv_decoder import make_decoder

    fp32 = make_decoder(onnx_session(fp32_path, RuntimeOptions()), manifest)
    return _perplexity(fp32.score(held_out), held_out)


def _ort_checks(folder: Path, manifest: Manifest, prompts: list[list[int]]) -> list[Check]:
    """The .ort copy must decode as the .onnx file does: same logits at every step, same greedy tokens."""
    from edgelm.runtime.device import RuntimeOptions, onnx_session
    from edgelm.runtime.ort.kv_decoder import make_decoder

    decoder = make_decoder(onnx_session(folder / MODEL_FILE, RuntimeOptions()), manifest)
    mobile = make_decoder(onnx_session(folder / manifest.model.ort_file, RuntimeOptions()), manifest)
    diff, same = 0.0, 0
    for ids in prompts:
        ours, theirs = [decoder.prefill(ids)], [mobile.prefill(ids)]
        tokens = [int(np.argmax(ours[0]))]
        for _ in range(GREEDY_TOKENS - 1):
            ours.append(decoder.step(tokens[-1]))
            theirs.append(mobile.step(tokens[-1]))
            tokens.append(int(np.argmax(ours[-1])))
        diff = max(diff, max_abs_diff(np.stack(ours), np.stack(theirs)))
        same += [int(np.argmax(t)) for t in theirs] == tokens
    return [Check.at_most("max_abs_logit_diff_ort_vs_onnx", diff, ORT_MAX_ABS),
            Check.at_least("greedy_32_identical_prompts_ort_vs_onnx", same, len(prompts))]


def _held_out_ids(tokenizer, context_length: int) -> list[int]:
    from edgelm.models.corpus import builtin_text, split_held_out

    text = split_held_out(builtin_text())[1]
    return tokenizer.encode(text[: PPL_TOKENS * 8], add_special_tokens=False).ids[
        : min(PPL_TOKENS, context_length)
    ]


def _torch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()  # (T, vocab)


def _torch_greedy(model, ids: list[int], eos_id: int | None) -> list[int]:
    """torch's greedy continuation by generate(), which may end early at eos."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=GREEDY_TOKENS,
            do_sample=False,
            pad_token_id=eos_id,
        )
    return out[0, len(ids) :].tolist()


def _perplexity(logits: np.ndarray, ids: list[int]) -> float:
    return perplexity_of(logits, ids)  # position t predicts token t+1
