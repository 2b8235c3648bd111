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
from edgelm.families import family_named
from edgelm.metrics import max_abs_diff, token_nll, top1_agreement
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
        validate_into(manifest, options.validate, lambda: validate(model, target, fp32, source, options.quant))
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


def validate(model: RecurrentLM, onnx_path: Path, fp32_path: Path, source: Path, quant: str) -> list[Check]:
    """Roll out chunks on fresh random inputs carrying the state, against torch; then perplexity."""
    from edgelm.runtime.device import RuntimeOptions, onnx_session

    session = onnx_session(onnx_path, RuntimeOptions())
    torch_logits, onnx_logits, torch_states, onnx_states = _rollout(model, session)
    logit_diff = max_abs_diff(torch_logits, onnx_logits)
    state_diff = max(max_abs_diff(a, b) for a, b in zip(torch_states, onnx_states))
    held_out = _held_out_ids(source)
    ppl_torch = _torch_perplexity(model, held_out)
    ppl_onnx = onnx_perplexity(session, held_out)
    bound = family_named(model.config.cell).spec("onnx").quant(quant).bound  # thresholds: edgelm/families.py
    if quant == "none":
        return [
            Check.at_most("max_abs_logit_diff_vs_torch", logit_diff, bound("max_abs_logit_diff_vs_torch")),
            Check.at_most("max_abs_state_diff_vs_torch", state_diff, bound("max_abs_state_diff_vs_torch")),
            Check.measured("held_out_perplexity", ppl_onnx),
            Check.measured("held_out_perplexity_torch", ppl_torch),
        ]
    fp32_ppl = onnx_perplexity(onnx_session(fp32_path, RuntimeOptions()), held_out)
    return [
        Check.measured("top1_agreement_vs_torch", top1_agreement(torch_logits, onnx_logits)),
        Check.measured("max_abs_logit_diff_vs_torch", logit_diff),
        Check.measured("held_out_perplexity_fp32", fp32_ppl),
        Check.measured("held_out_perplexity_torch", ppl_torch),
        Check.at_most("held_out_perplexity_ratio_int8_vs_fp32", ppl_onnx / fp32_ppl,
                      bound("held_out_perplexity_ratio_int8_vs_fp32")),
    ]


def _rollout(model: RecurrentLM, session, batch: int = 3, chunks=(7, 1, 1, 12, 1, 3)):
    import torch

    rng = np.random.default_rng(1234)
    names = [o.name for o in session.get_outputs()]
    t_state = model.initial_state(batch)
    o_state = [s.numpy() for s in t_state]
    t_all, o_all = [], []
    for length in chunks:
        ids = rng.integers(0, model.config.vocab_size, size=(batch, length), dtype=np.int64)
        with torch.no_grad():
            t_logits, *t_state = model(torch.from_numpy(ids), *t_state)
        feed = dict(zip([i.name for i in session.get_inputs()], [ids, *o_state]))
        o_logits, *o_state = session.run(names, feed)
        t_all.append(t_logits.numpy())
        o_all.append(o_logits)
    return (np.concatenate(t_all, 1), np.concatenate(o_all, 1),
            [s.numpy() for s in t_state], o_state)


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


def onnx_perplexity(session, ids: np.ndarray, chunk: int = 256) -> float:
    """Per-token perplexity of an exported recurrent graph, carrying the state across chunks."""
    inputs = [i.name for i in session.get_inputs()]
    layers, _, size = session.get_inputs()[1].shape  # (L, batch, H); L and H are fixed
    state = [np.zeros((layers, 1, size), np.float32) for _ in inputs[1:]]
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        y = ids[start + 1 : start + chunk + 1]
        x = ids[start : start + len(y)][None, :]
        logits, *state = session.run(None, dict(zip(inputs, [x, *state])))
        total += token_nll(logits[0], y).sum()
        count += len(y)
    return float(np.exp(total / max(count, 1)))

