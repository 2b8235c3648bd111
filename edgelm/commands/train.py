"""`edgelm train`: train a recurrent language model with a progress bar."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgelm.safe_text import read_text


def run_train(cell: str, out: Path, text_file: Path | None, force: bool = False, **flags) -> None:
    from edgelm.models.train import TrainOptions, check_output_folder, split_training_text, train

    flags = {k: v for k, v in flags.items() if v is not None}
    opts = TrainOptions(cell=cell, **flags)
    opts.check()
    check_output_folder(out, force)  # before minutes of training, not after
    text = None
    if text_file is not None:
        text = read_text(text_file, "the training text")
        split_training_text(text, opts)  # refuse a text that is too short before any output
    source = text_file or "built-in corpus (pydoc_data.topics)"
    click.echo(f"training {cell} on {source}: {opts.steps} steps, tokenizer {opts.tokenizer}", err=True)
    with click.progressbar(length=opts.steps, label="train", file=sys.stderr,
                           item_show_func=lambda loss: f"loss {loss:.3f}" if loss else "") as bar:
        result = train(out, opts, text, on_step=lambda step, loss: (bar.update(1, loss)), force=force)
    click.echo(f"saved {out}: {result.params:,} parameters, {result.seconds:.0f}s, "
               f"final loss {result.final_loss:.3f}")
    click.echo(f"held-out perplexity: {result.held_out_perplexity:.3f} (per {opts.tokenizer} token)")
