"""`edgelm run`: stream a continuation of a prompt to the terminal."""

from __future__ import annotations

from pathlib import Path

import click

from edgelm.errors import UsageError
from edgelm.safe_text import printable, terminal_json


def run_prompt(artifact: Path, prompt: str, as_json: bool, device: dict, sampling: dict) -> None:
    import dataclasses

    from edgelm.runtime import load

    sampling = {k: v for k, v in sampling.items() if v is not None and v != ()}
    with load(artifact, **device) as model:
        if not hasattr(model, "stream"):
            raise UsageError(f"{artifact} was exported for task {model.task}; `run` needs text-generation")
        stream = model.stream(prompt, **sampling)
        for piece in stream:
            if not as_json:
                click.echo(printable(piece, keep_lines=True), nl=False)  # a vocabulary can hold escapes
        completion = stream.completion
    if as_json:
        click.echo(terminal_json(dataclasses.asdict(completion), indent=2))
        return
    click.echo()
    if completion.truncated_prompt_tokens:
        click.echo(f"note: dropped the first {completion.truncated_prompt_tokens} prompt tokens to fit the context",
                   err=True)
