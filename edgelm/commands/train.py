"""`edgelm train`: train a language model of any family edgelm trains, with a progress bar."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgelm.errors import UsageError
from edgelm.safe_text import read_text

RECURRENT = ("rnn", "lstm")
TRANSFORMERS = ("gpt2", "llama", "bert")
TRAINABLE = (*RECURRENT, *TRANSFORMERS)


def run_train(model: str, out: Path, text_file: Path | None, force: bool = False, **flags) -> None:
    """Train `model` into `out`; flags left as None take the family's defaults."""
    flags = {k: v for k, v in flags.items() if v is not None}
    if model in RECURRENT:
        _train_recurrent(model, Path(out), text_file, force, flags)
    elif model in TRANSFORMERS:
        _train_transformer(model, Path(out), text_file, force, flags)
    else:
        raise UsageError(f"model must be one of {', '.join(TRAINABLE)}, got {model!r}")


def _train_recurrent(cell: str, out: Path, text_file: Path | None, force: bool, flags: dict) -> None:
    from edgelm.models.train import TrainOptions, check_output_folder, split_training_text, train

    if "heads" in flags:
        raise UsageError(f"--heads is for gpt2, llama and bert; {cell} has no attention")
    opts = TrainOptions(cell=cell, **flags)
    opts.check()
    check_output_folder(out, force)  # before minutes of training, not after
    text = None
    if text_file is not None:
        text = read_text(text_file, "the training text")
        split_training_text(text, opts)  # refuse a text that is too short before any output
    _announce(cell, text_file, opts.steps, f"tokenizer {opts.tokenizer}")
    with _bar(opts.steps) as bar:
        result = train(out, opts, text, on_step=lambda step, loss: (bar.update(1, loss)), force=force)
    _report(out, result, f"per {opts.tokenizer} token")


def _train_transformer(family: str, out: Path, text_file: Path | None, force: bool, flags: dict) -> None:
    from edgelm.models.hf_train import HfTrainOptions, split_text, train_hf
    from edgelm.models.train import check_output_folder

    if "tokenizer" in flags:
        raise UsageError(f"--tokenizer is for rnn and lstm; {family} trains its own family's tokenizer")
    opts = HfTrainOptions(family=family, **flags)
    opts.check()
    check_output_folder(out, force)
    text = None
    if text_file is not None:
        text = read_text(text_file, "the training text")
        split_text(text, opts)
    _announce(family, text_file, opts.steps, f"{opts.layers} layers x {opts.hidden}, vocabulary {opts.vocab_size}")
    with _bar(opts.steps) as bar:
        result = train_hf(out, opts, text, on_step=lambda step, loss: (bar.update(1, loss)), force=force)
    _report(out, result, "masked tokens" if family == "bert" else f"llama-perplexity protocol, ctx {opts.seq_len}")


def _announce(model: str, text_file: Path | None, steps: int, detail: str) -> None:
    source = text_file or "built-in corpus (pydoc_data.topics)"
    click.echo(f"training {model} on {source}: {steps} steps, {detail}", err=True)


def _bar(steps: int):
    return click.progressbar(length=steps, label="train", file=sys.stderr,
                             item_show_func=lambda loss: f"loss {loss:.3f}" if loss else "")


def _report(out: Path, result, measure: str) -> None:
    click.echo(f"saved {out}: {result.params:,} parameters, {result.seconds:.0f}s, "
               f"final loss {result.final_loss:.3f}")
    click.echo(f"held-out perplexity: {result.held_out_perplexity:.3f} ({measure})")
