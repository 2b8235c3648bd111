"""`edgelm chat`: an interactive conversation in the terminal, replies streamed as they come.

Each turn re-sends the conversation (the KV cache keeps what is shared, so only the new turn
is evaluated). When the conversation outgrows the context, the oldest turns are dropped and a
note says so; the system message always stays.
"""

from __future__ import annotations

from pathlib import Path

import click

from edgelm.errors import ContextOverflowError, InputError, UsageError, first_line
from edgelm.safe_text import check_text, decode_utf8, printable

HELP = "type a message; /reset starts over, /exit (or Ctrl-D) quits"


def run_chat(artifact: Path, system: str | None, device: dict, sampling: dict) -> None:
    from edgelm.commands.run import constraint_flags
    from edgelm.runtime import load
    from edgelm.runtime.constraints import pop_constraint
    from edgelm.runtime.params import GenerationParams

    sampling = {k: v for k, v in sampling.items() if v is not None and v != ()}
    sampling.pop("truncate", None)  # a chat always drops old turns to fit, and says so
    with load(artifact, **device) as model:
        if not getattr(model, "chat_template", ""):
            raise UsageError(f"{artifact} has no chat template; use `edgelm run` with a plain prompt")
        constraint = constraint_flags(sampling)
        pop_constraint(dict(constraint))  # a schema or grammar that does not compile fails before the prompt
        params = GenerationParams.from_kwargs(model.defaults, **sampling)  # bad flags fail before the prompt
        sampling = {**sampling, **constraint}  # every reply is constrained
        click.echo(f"chat with {artifact} (context {model.decoder.context_length} tokens); {HELP}", err=True)
        start = [{"role": "system", "content": system}] if system else []
        messages = list(start)
        while (line := _read_line()) is not None:
            text = line.strip()
            if text == "/exit":
                break
            if text == "/reset":
                messages = list(start)
                click.echo("(conversation cleared)", err=True)
            elif text.startswith("/"):
                click.echo(f"unknown command {text}; {HELP}", err=True)
            elif text:
                messages = _one_turn(model, messages, text, params, sampling)


def _read_line() -> str | None:
    """The next line typed or piped; "" after saying so when it is not valid UTF-8."""
    stdin = click.get_binary_stream("stdin")
    try:
        if stdin.isatty():  # a terminal: click's prompt, with line editing
            line = click.prompt(">", prompt_suffix=" ", default="", show_default=False)
        else:  # a pipe: read bytes, so one bad line cannot take the buffered lines after it along
            click.echo("> ", nl=False)
            raw = stdin.readline()
            if not raw:
                raise click.Abort
            line = decode_utf8(raw.rstrip(b"\r\n"), "that line")
        return check_text(line, "that line")
    except click.Abort:  # end of input (Ctrl-D) or Ctrl-C at the prompt
        click.echo(err=True)
        return None
    except UnicodeDecodeError as err:  # the terminal's stream decodes strictly
        click.echo(f"error: that line is not valid UTF-8 (byte 0x{err.object[err.start]:02x}); type it again",
                   err=True)
        return ""
    except InputError as err:
        click.echo(f"error: {first_line(err)}; type it again", err=True)
        return ""


def _one_turn(model, messages: list[dict], text: str, params, sampling: dict) -> list[dict]:
    """Add the user's message, fit the context, stream the reply; return the new conversation."""
    asked = [*messages, {"role": "user", "content": text}]
    try:
        kept, dropped, _ = model.fit_messages(asked, params.max_tokens)
    except (ContextOverflowError, InputError) as err:
        click.echo(f"error: {first_line(err, limit=1000)}", err=True)
        return messages
    if dropped:
        click.echo(f"(dropped the {dropped} oldest messages to stay within the context of "
                   f"{model.decoder.context_length} tokens)", err=True)
    try:
        stream = model.chat_stream(kept, **sampling)
        reply = "".join(_echo(piece) for piece in _without_leading_space(stream))
    except InputError as err:  # the template refused the conversation (e.g. roles out of order)
        click.echo(f"error: {first_line(err, limit=1000)}", err=True)
        return messages
    click.echo()
    if stream.completion is not None and stream.completion.finish_reason == "length":
        click.echo(f"(reply cut at --max-tokens {params.max_tokens})", err=True)
    return [*kept, {"role": "assistant", "content": reply.strip()}]


def _echo(piece: str) -> str:
    click.echo(printable(piece, keep_lines=True), nl=False)  # a vocabulary can hold terminal escapes
    return piece


def _without_leading_space(pieces):
    """SentencePiece replies start with the word-boundary space; a terminal reply should not."""
    started = False
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        if piece:
            yield piece
