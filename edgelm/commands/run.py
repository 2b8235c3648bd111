"""`edgelm run`: stream a continuation of a prompt to the terminal."""

from __future__ import annotations

from pathlib import Path

import click

from edgelm.errors import UsageError
from edgelm.safe_text import printable, terminal_json


def run_prompt(artifact: Path, prompt: str, as_json: bool, device: dict, sampling: dict) -> None:
    import dataclasses

    from edgelm.runtime import load
    from edgelm.runtime.capabilities import TextModel

    sampling = {k: v for k, v in sampling.items() if v is not None and v != ()}
    with load(artifact, **device) as model:
        if not isinstance(model, TextModel):
            raise UsageError(f"{artifact} was exported for task {model.task}; `run` needs text-generation")
        constraint = constraint_flags(sampling)  # taken out of `sampling`
        stream = model.stream(prompt, **constraint, **sampling)
        for piece in stream:
            if not as_json:
                click.echo(printable(piece, keep_lines=True), nl=False)  # a vocabulary can hold escapes
        completion = stream.completion
    if as_json:
        click.echo(terminal_json(dataclasses.asdict(completion), indent=2))
        return
    click.echo()
    if completion.constraint_incomplete:
        click.echo("note: the output is incomplete for the constraint (--max-tokens or a stop string ended it)",
                   err=True)
    if completion.truncated_prompt_tokens:
        click.echo(f"note: dropped the first {completion.truncated_prompt_tokens} prompt tokens to fit the context",
                   err=True)


def constraint_flags(flags: dict) -> dict:
    """Take the constraint flags out of `flags`; return them as the API's keyword arguments,
    with the schema and grammar files read (UTF-8, `-` for stdin)."""
    from edgelm.safe_text import read_text

    given = {name: flags.pop(name) for name in ("json_schema", "regex", "grammar", "json_object") if name in flags}
    for name, what in (("json_schema", "--json-schema file"), ("grammar", "--grammar file")):
        if given.get(name) is not None:
            given[name] = read_text(given[name], what)
    return {name: value for name, value in given.items() if value is not None}
