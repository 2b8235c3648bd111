"""RNN and LSTM language models to ONNX, with the recurrent state as explicit inputs/outputs."""

from __future__ import annotations

import codecs
import tempfile
import warnings
from pathlib import Path

import numpy as np

from edgelm.artifact import Check, Manifest, sha256_of, write_artifact
from edgelm.contract import GenerationSection, RecurrentModel, SourceSection, TokenizerSection
from edgelm.errors import UnsupportedModelError, first_line
from edgelm.export.checks import validate_into
from edgelm.export.hf_source import check_source_links, source_file
from edgelm.export.onnx_quantize import quantize_int8
from edgelm.export.options import ExportOptions
from edgelm.models.recurrent import TOKENIZER_NAME, WEIGHTS_NAME, RecurrentLM, load_model

MODEL_FILE = "model.onnx"
PPL_TOKENS = 3000  # held-out tokens scored for the perplexity check


def state_names(cell: str) -> tuple[list[str], list[str]]:
    return (["h0", "c0"], ["hn", "cn"]) if cell == "lstm" else (["h0"], ["hn"])


def export_recurrent(source: Path, config: dict, out: Path, options: ExportOptions) -> Manifest:
    check_source_links(source)
    for name in (WEIGHTS_NAME, TOKENIZER_NAME):
        if not source_file(source, name, "model file").is_file():
            raise UnsupportedModelError(f"{source}: missing {name}")
    try:
        model = load_model(source, config)
    except (RuntimeError, ValueError, TypeError) as err:
        raise UnsupportedModelError(f"{source}: weights do not fit config.json ({first_line(err)})") from None
    manifest = _manifest(source, config, model, options)
    with write_artifact(out, manifest) as tmp, tempfile.TemporaryDirectory() as scratch:
        options.progress("export", 0, 3)
        fp32 = Path(scratch) / MODEL_FILE
        _write_onnx(model, fp32)
        options.progress("export", 1, 3)
        target = tmp / MODEL_FILE
        if options.quant == "int8":
            quantize_int8(fp32, target)
        else:
            target.write_bytes(fp32.read_bytes())
        (tmp / TOKENIZER_NAME).write_bytes((source / TOKENIZER_NAME).read_bytes())
        options.progress("export", 2, 3)
        validate_into(manifest, options.validate, lambda: validate(model, tmp, manifest, fp32, source))
        options.progress("export", 3, 3)
    return manifest


def _manifest(source: Path, config: dict, model: RecurrentLM, options: ExportOptions) -> Manifest:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(source / TOKENIZER_NAME))
    inputs, outputs = state_names(model.config.cell)
    return Manifest(
        family=model.config.cell,
        task="text-generation",
        format="onnx",
        quant=options.quant,
        tokenizer=TokenizerSection(
            file=TOKENIZER_NAME, kind=config.get("tokenizer_kind"),
            vocab_size=tokenizer.get_vocab_size(), unk_id=tokenizer.token_to_id("<unk>"),
        ),
        # trained on running text: no end-of-text token is ever predicted, so no eos stop
        generation=GenerationSection(),
        model=RecurrentModel(
            file=MODEL_FILE,
            inputs=("input_ids", *inputs),
            outputs=("logits", *outputs),
            num_layers=model.config.num_layers,
            hidden_size=model.config.hidden_size,
            vocab_size=model.config.vocab_size,
            context_length=None,  # the state carries any length
        ),
        source=SourceSection(path=str(source.resolve()), sha256={WEIGHTS_NAME: sha256_of(source / WEIGHTS_NAME)},
                             training=config.get("training")),
    )


def _write_onnx(model: RecurrentLM, path: Path) -> None:
    import torch

    inputs, outputs = state_names(model.config.cell)
    ids = torch.zeros((2, 5), dtype=torch.int64)
    state = model.initial_state(2)
    batch_axis = {1: "batch"}
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    axes.update({name: batch_axis for name in inputs + outputs})
    # The TorchScript exporter keeps batch and sequence dynamic for nn.RNN/nn.LSTM;
    # the dynamo exporter was seen to freeze nn.RNN's sequence length at the traced value.
    with warnings.catch_warnings():
        # torch warns about LSTM batch sizes unless h0/c0 are graph inputs; here they are
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(model, (ids, *state), str(path), dynamo=False, opset_version=17,
                          input_names=["input_ids", *inputs], output_names=["logits", *outputs],
                          dynamic_axes=axes)


ROLLOUT_CHUNKS = (7, 1, 1, 12, 1, 3)  # lengths the trace never saw, the state carried between them
ROLLOUT_BATCH = 3


def validate(model: RecurrentLM, folder: Path, manifest: Manifest, fp32_path: Path, source: Path) -> list[Check]:
    """torch's rollout and perplexity become the reference file; the checks are `edgelm verify`'s.

    int8 is bounded by its perplexity ratio to the fp32 graph, whose perplexity is measured here and
    stored with the reference (the fp32 graph itself is not part of the artifact).
    """
    from edgelm.export.checks import checks_from_reference
    from edgelm.reference.recurrent import onnx_perplexity, reference_arrays
    from edgelm.runtime.device import RuntimeOptions, onnx_session

    ids = _probe_ids(model.config.vocab_size)
    torch_logits, torch_states = _torch_rollout(model, ids)
    held_out = _held_out_ids(source)
    ppl_fp32 = None
    if manifest.quant != "none":
        ppl_fp32 = onnx_perplexity(onnx_session(fp32_path, RuntimeOptions()), held_out)
    arrays = reference_arrays(list(ROLLOUT_CHUNKS), ids, torch_logits, torch_states, held_out,
                              _torch_perplexity(model, held_out), ppl_fp32)
    return checks_from_reference(folder, manifest, arrays)


def _probe_ids(vocab_size: int) -> np.ndarray:
    rng = np.random.default_rng(1234)
    chunks = [rng.integers(0, vocab_size, size=(ROLLOUT_BATCH, n), dtype=np.int64) for n in ROLLOUT_CHUNKS]
    return np.concatenate(chunks, axis=1)  # (batch, positions)


def _torch_rollout(model: RecurrentLM, ids: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """torch fed the same chunks as the runtime will be: every position's logits, the final state."""
    import torch

    state = model.initial_state(ids.shape[0])
    start, rows = 0, []
    for length in ROLLOUT_CHUNKS:
        with torch.no_grad():
            logits, *state = model(torch.from_numpy(ids[:, start : start + length]), *state)
        rows.append(logits.numpy())
        start += length
    return np.concatenate(rows, 1), [s.numpy() for s in state]


def _held_out_ids(source: Path) -> np.ndarray:
    from tokenizers import Tokenizer

    from edgelm.models.corpus import builtin_text, split_held_out

    held_out_file = source_file(source, "held_out.txt", "held-out text")
    text = _read_text(held_out_file) if held_out_file.is_file() else split_held_out(builtin_text())[1]
    tokenizer = Tokenizer.from_file(str(source / TOKENIZER_NAME))
    ids = tokenizer.encode(text[: PPL_TOKENS * 8], add_special_tokens=False).ids[:PPL_TOKENS]
    return np.asarray(ids, dtype=np.int64)


def _read_text(path: Path, limit: int = PPL_TOKENS * 64) -> str:
    """The start of a UTF-8 text file (only the first tokens are scored), or one line naming it."""
    with open(path, "rb") as handle:
        data = handle.read(limit)
    try:  # incremental: a character cut by the limit is dropped, any other bad byte is an error
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError as err:
        raise UnsupportedModelError(f"{path}: not UTF-8 text (byte {err.start})") from None


def _torch_perplexity(model: RecurrentLM, ids: np.ndarray) -> float:
    import torch

    from edgelm.models.train import perplexity

    return perplexity(model, torch.from_numpy(ids))
