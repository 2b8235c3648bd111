"""`edgelm chat`: an interactive conversation in the terminal, replies streamed as they come.

Each turn re-sends the conversation (the KV cache keeps what is shared, so only the new turn
is evaluated). A reply runs until the model ends its turn or the context is full; --max-tokens
caps it. When the conversation outgrows the context, the oldest turns are dropped and a note
says so; the system message always stays. Ctrl-C during a reply stops that reply and keeps the
conversation; Ctrl-C (or Ctrl-D) at the prompt quits.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass
from pathlib import Path

import click

from edgelm.errors import ContextOverflowError, InputError, UsageError, first_line
from edgelm.safe_text import check_text, decode_utf8, printable

HELP = ("type a message; Ctrl-C stops a reply; /save FILE keeps the conversation, /stats shows each reply's "
        "speed, /reset starts over, /exit (or Ctrl-D) quits")
REPLY_ROOM = 512  # without --max-tokens: old turns go once the reply would have less room than this
UNBOUNDED_REPLY = 4096  # a reply's cap for a model without a context limit (none with a chat template today)


@dataclass
class Chat:
    """The conversation and the settings every turn uses."""

    model: object
    start: list[dict]  # the system message, kept by /reset
    messages: list[dict]
    cap: int | None  # --max-tokens, if given
    sampling: dict
    show_stats: bool = False


def run_chat(artifact: Path, system: str | None, device: dict, sampling: dict, resume: Path | None = None) -> None:
    from edgelm.commands.conversation import load_conversation
    from edgelm.commands.run import constraint_flags
    from edgelm.runtime import load
    from edgelm.runtime.core.constraints import pop_constraint
    from edgelm.runtime.core.params import GenerationParams

    sampling = {k: v for k, v in sampling.items() if v is not None and v != ()}
    sampling.pop("truncate", None)  # a chat always drops old turns to fit, and says so
    cap = sampling.pop("max_tokens", None)
    resumed = load_conversation(resume) if resume is not None else []  # a bad file fails before loading
    with load(artifact, **device) as model:
        if not getattr(model, "chat_template", ""):
            raise UsageError(f"{artifact} has no chat template; use `edgelm run` with a plain prompt")
        constraint = constraint_flags(sampling)
        pop_constraint(dict(constraint))  # a schema or grammar that does not compile fails before the prompt
        GenerationParams.from_kwargs(model.defaults, max_tokens=1 if cap is None else cap, **sampling)  # fail now
        chat = Chat(model, *_opening(system, resumed), cap=cap, sampling={**sampling, **constraint})
        click.echo(f"chat with {artifact} (context {model.decoder.context_length} tokens); {HELP}", err=True)
        if resumed:
            click.echo(f"(resumed {len(chat.messages)} messages from {printable(resume)})", err=True)
        _converse(chat)


def _opening(system: str | None, resumed: list[dict]) -> tuple[list[dict], list[dict]]:
    """(the start /reset returns to, the conversation now): --system replaces a resumed one."""
    has_system = bool(resumed) and resumed[0]["role"] == "system"
    if system is not None:
        start = [{"role": "system", "content": system}]
        return start, start + (resumed[1:] if has_system else resumed)
    start = resumed[:1] if has_system else []
    return start, list(resumed)


def _converse(chat: Chat) -> None:
    from edgelm.commands.conversation import save_conversation

    while (line := _read_line()) is not None:
        text = line.strip()
        command, _, argument = text.partition(" ")
        if text == "/exit":
            break
        if text == "/reset":
            chat.messages = list(chat.start)
            click.echo("(conversation cleared)", err=True)
        elif text == "/stats":
            chat.show_stats = not chat.show_stats
            click.echo(f"(speed of each reply {'shown' if chat.show_stats else 'hidden'})", err=True)
        elif command == "/save" and argument.strip() and not chat.messages:  # --resume refuses an empty file
            click.echo("(nothing to save yet)", err=True)
        elif command == "/save" and argument.strip():
            try:
                save_conversation(Path(argument.strip()), chat.messages)
                click.echo(f"(saved {len(chat.messages)} messages to {printable(argument.strip())})", err=True)
            except (OSError, ValueError) as err:  # ValueError: a NUL byte in the name (a piped line may hold one)
                why = getattr(err, "strerror", None) or err
                click.echo(f"error: cannot save to {printable(argument.strip())} ({printable(why)})", err=True)
        elif text.startswith("/"):
            click.echo(f"unknown command {printable(text)}; {HELP}", err=True)
        elif text:
            chat.messages = _one_turn(chat, text)


def _read_line() -> str | None:
    """The next line typed or piped; "" after saying so when it is not valid UTF-8; None to quit."""
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
    except (click.Abort, KeyboardInterrupt):  # end of input (Ctrl-D) or Ctrl-C at the prompt
        click.echo(err=True)
        return None
    except UnicodeDecodeError as err:  # the terminal's stream decodes strictly
        click.echo(f"error: that line is not valid UTF-8 (byte 0x{err.object[err.start]:02x}); type it again",
                   err=True)
        return ""
    except InputError as err:
        click.echo(f"error: {first_line(err)}; type it again", err=True)
        return ""


def _one_turn(chat: Chat, text: str) -> list[dict]:
    """Add the user's message, fit the context, stream the reply; return the new conversation."""
    model = chat.model
    limit = model.decoder.context_length
    asked = [*chat.messages, {"role": "user", "content": text}]
    if chat.cap is not None:
        room = chat.cap
    else:
        room = min(REPLY_ROOM, limit // 4) if limit else 1
    try:
        kept, dropped, ids = model.fit_messages(asked, room)
    except (ContextOverflowError, InputError) as err:
        click.echo(f"error: {first_line(err, limit=1000)}", err=True)
        return chat.messages
    if dropped:
        click.echo(f"(dropped the {dropped} oldest messages to stay within the context of {limit} tokens)", err=True)
    budget = chat.cap if chat.cap is not None else (limit - len(ids) if limit else UNBOUNDED_REPLY)
    started = time.perf_counter()
    try:
        with StopOnInterrupt() as interrupt:
            stream = interrupt.watch(model.chat_stream(kept, max_tokens=budget, **chat.sampling))
            reply, first_at = _stream_reply(stream)
    except InputError as err:  # the template refused the conversation (e.g. roles out of order)
        click.echo(f"error: {first_line(err, limit=1000)}", err=True)
        return chat.messages
    click.echo()
    if interrupt.pressed:
        if not reply.strip():
            click.echo("(reply stopped before it began; the message was not kept)", err=True)
            return chat.messages
        click.echo("(reply stopped; what was written is kept)", err=True)
    else:
        _say_why_it_ended(stream.completion, chat.cap, limit)
    if chat.show_stats:
        click.echo(_speed(stream.completion, started, first_at), err=True)
    return [*kept, {"role": "assistant", "content": reply.strip()}]


def _stream_reply(stream) -> tuple[str, float | None]:
    """The reply's text as printed, and when its first piece came (perf_counter)."""
    parts: list[str] = []
    first_at = None
    for piece in _without_leading_space(stream):
        if first_at is None:
            first_at = time.perf_counter()
        click.echo(printable(piece, keep_lines=True), nl=False)  # a vocabulary can hold terminal escapes
        parts.append(piece)
    return "".join(parts), first_at


def _say_why_it_ended(completion, cap: int | None, limit: int | None) -> None:
    if completion is None or completion.finish_reason != "length":
        return
    if cap is not None:
        click.echo(f"(reply cut at --max-tokens {cap})", err=True)
    else:
        click.echo(f"(reply cut: the context of {limit} tokens is full; /reset starts over)", err=True)


def _speed(completion, started: float, first_at: float | None) -> str:
    if completion is None or first_at is None:
        return f"(stopped after {time.perf_counter() - started:.2f} s)"
    total = completion.timings.get("total_s", time.perf_counter() - started)
    prefill = completion.timings.get("prefill_s", first_at - started)
    decode = max(total - prefill, 1e-9)
    rate = max(completion.completion_tokens - 1, 0) / decode  # the first token came from the prefill
    return (f"({completion.completion_tokens} tokens, {rate:.1f} tok/s; prompt of {completion.prompt_tokens} "
            f"tokens read in {prefill:.2f} s)")


class StopOnInterrupt:
    """While a reply streams, Ctrl-C cancels it before the model's next step and the chat goes on;
    a second Ctrl-C before the reply has stopped quits. The handler is the CLI's own and is put
    back when the reply ends; off the main thread (embedded use) Ctrl-C keeps its usual meaning."""

    def __init__(self):
        self.stream = None
        self.pressed = False
        self.previous = None

    def watch(self, stream):
        """The stream to cancel; cancelled at once if Ctrl-C came while it was being set up."""
        self.stream = stream
        if self.pressed:
            stream.cancel()
        return stream

    def __enter__(self) -> StopOnInterrupt:
        try:
            self.previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread
            self.previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        if self.stream is not None:
            self.stream.cancel()

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)


def _without_leading_space(pieces):
    """SentencePiece replies start with the word-boundary space; a terminal reply should not."""
    started = False
    for piece in pieces:
        if not started:
            piece = piece.lstrip()
            started = bool(piece)
        if piece:
            yield piece
