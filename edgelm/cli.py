"""The `edgelm` command: a thin click layer that parses, calls the API and renders."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import click

from edgelm._version import __version__
from edgelm.errors import EdgelmError, first_line
from edgelm.families import quant_help
from edgelm.safe_text import printable


class EdgelmGroup(click.Group):
    """Turns every error a user can cause into one line and an exit code; --debug shows more.

    Anything else is a bug in edgelm or a library: it still prints one line (the exception's type
    and first line, escaped), never a traceback, unless --debug asks for it."""

    def invoke(self, ctx: click.Context):
        debug = ctx.params.get("debug", False)  # parsed before invoke, so set even for embedded use
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise  # click's own usage errors, --help and exits print themselves
        except EdgelmError as err:
            if debug:
                raise
            click.echo(f"error: {first_line(err, limit=1000)}", err=True)
            ctx.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # `edgelm run ... | head`: the reader has gone, which is not an error
            _silence_stdout()
            ctx.exit(1)
        except ImportError as err:
            if debug:
                raise
            missing = printable(err.name or first_line(err))
            click.echo(f"error: {missing} is not installed; exporting needs `pip install edgelm[export]`", err=True)
            ctx.exit(1)
        except BaseException as err:  # noqa: B036 - the last resort: a bug must not show a traceback
            # a BaseException that is no exit or interrupt is a bug too: pyo3's PanicException (a Rust panic)
            if debug or isinstance(err, (SystemExit, GeneratorExit)):
                raise
            click.echo(f"error: internal error ({type(err).__name__}): {first_line(err)}; rerun with --debug",
                       err=True)
            ctx.exit(1)


class ModelRef(click.ParamType):
    """An artifact folder, a .gguf file, or the name of a model in the library (`edgelm list`).
    Every command that opens a model resolves it here, through the same function as load()."""

    name = "artifact"

    def convert(self, value, param, ctx):
        from edgelm.library import resolve_model

        return value if isinstance(value, Path) else resolve_model(value)


MODEL = ModelRef()


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so flushing it at exit does not raise BrokenPipeError again."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # no real file descriptor (embedded, tests)
        pass


def _terminate(signum, frame):  # SIGTERM unwinds like Ctrl-C, so partial exports get cleaned up
    raise KeyboardInterrupt


@click.group(cls=EdgelmGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgelm")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
def main(debug: bool) -> None:
    """Export language models to ONNX/GGUF and run them offline."""
    signal.signal(signal.SIGTERM, _terminate)
    if not debug:
        _quiet_tracing_noise()


def _quiet_tracing_noise() -> None:
    """Tracing torch models prints warnings meant for model authors, not for people exporting;
    edgelm's validation checks the traced graph instead. --debug shows them again."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for text in ("torch.tensor results are registered as constants", "Converting a tensor to a Python",
                 "Iterating over a tensor might cause the trace"):
        warnings.filterwarnings("ignore", message=f".*{text}")


def progress_printer(label_width: int = 10):
    """A progress(label, done, total) callback drawing one click bar per label."""
    bars: dict[str, object] = {}

    def progress(label: str, done: int, total: int) -> None:
        bar = bars.get(label)
        if bar is None:
            bar = click.progressbar(length=total, label=label.ljust(label_width), file=sys.stderr)
            bar.__enter__()
            bars[label] = bar
        bar.update(done - bar.pos)
        if done >= total:
            bar.__exit__(None, None, None)

    return progress


@main.command()
@click.argument("model", type=click.Choice(["rnn", "lstm", "gpt2", "llama", "bert"]))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the trained model.")
@click.option("--text", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Training text (UTF-8); default: the built-in corpus (Python's documentation).")
@click.option("--tokenizer", type=click.Choice(["char", "bpe"]), default=None,
              help="rnn/lstm tokenizer [default: char]; the others train their family's own.")
@click.option("--vocab-size", type=int, default=None, help="Vocabulary size (BPE/WordPiece) [default: per model].")
@click.option("--hidden", type=int, default=None, help="Hidden size [default: 256].")
@click.option("--layers", type=int, default=None, help="Layers [default: 2 for rnn/lstm, 3 otherwise].")
@click.option("--heads", type=int, default=None, help="Attention heads (gpt2, llama, bert) [default: 4].")
@click.option("--steps", type=int, default=None, help="Training steps [default: per model, about two minutes].")
@click.option("--seq-len", type=int, default=None, help="Training window; the context of gpt2/llama/bert.")
@click.option("--batch-size", type=int, default=None, help="Windows per step [default: per model].")
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: per model].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--force", is_flag=True, help="Write into --out even if it holds files edgelm train did not write.")
@click.option("--add", "add_to_library", is_flag=True,
              help="Then export it (its family's default format and quantization, validated) into the library.")
@click.option("--add-as", metavar="NAME", default=None, help="The library name [default: --out's folder name].")
def train(model, out, text, force, add_to_library, add_as, **flags):
    """Train a language model (RNN, LSTM, GPT-2, LLaMA, or BERT as a masked LM)."""
    from edgelm.commands.train import run_train

    if not add_to_library and add_as is None:
        run_train(model, out, text, force=force, **flags)
        return
    from edgelm.commands.library import export_into_library, library_name_for

    name = library_name_for(out, add_as)  # a bad or taken name fails before minutes of training
    run_train(model, out, text, force=force, **flags)
    export_into_library(out, name, progress_printer())


@main.command()
@click.argument("source")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Artifact folder to write.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "gguf"]), default=None,
              help="Output format [default: the family's own].")
@click.option("--quant", default=None, metavar="TYPE",  # checked against the (family, format) table
              help=f"{quant_help()} [default: the first listed for the format].")
@click.option("--task", default="auto", show_default=True, help="auto|embed|fill-mask|classify (BERT).")
@click.option("--no-validate", is_flag=True, help="Skip validation (the manifest says so).")
@click.option("--target", type=click.Choice(["default", "mobile"]), default="default", show_default=True,
              help="mobile: also write the model in onnxruntime's ORT format with its operator list (ONNX).")
@click.option("--add", "add_to_library", is_flag=True, help="Register the artifact in the library (`edgelm list`).")
@click.option("--add-as", metavar="NAME", default=None, help="Register it under NAME [default: --out's folder name].")
def export(source, out, fmt, quant, task, no_validate, target, add_to_library, add_as):
    """Export a model folder (or hub id) to a validated artifact."""
    from edgelm.export import export as run_export
    from edgelm.export.options import ExportOptions

    name = None
    if add_to_library or add_as is not None:
        from edgelm.commands.library import library_name_for

        name = library_name_for(out, add_as)  # a bad or taken name fails before minutes of exporting

    options = ExportOptions(format=fmt, quant=quant, task=task, validate=not no_validate, target=target,
                            progress=progress_printer())
    manifest = run_export(source, out, options)
    click.echo(f"wrote {out} ({manifest.family}, {manifest.format}, {manifest.quant})")
    for check in manifest.validation:
        click.echo(f"  {check.describe()}")
    if manifest.validation_skipped:
        click.echo("  validation skipped (--no-validate)")
    if name is not None:
        from edgelm.commands.library import add_model

        add_model(out, name, copy=False)


@main.command()
@click.argument("artifact", type=MODEL)
@click.option("--json", "as_json", is_flag=True, help="Print the whole manifest as JSON.")
@click.option("--verify", is_flag=True, help="Also check every file's sha256.")
def info(artifact, as_json, verify):
    """Show what an artifact is and how it validated."""
    from edgelm.commands.info import describe

    describe(artifact, as_json, verify)


@main.command()
@click.argument("artifact", type=MODEL)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: passed, checks, both machines.")
@click.option("--threads", type=int, default=None, help="Threads to run with [default: physical cores].")
def verify(artifact, as_json, threads):
    """Prove an artifact on this machine: hash its files, rerun its reference set, check every bound."""
    from edgelm.commands.verify import verify_artifact

    verify_artifact(artifact, as_json, threads)


def sampling_options(fn, max_tokens_help: str = "Tokens to generate [default: 128]."):
    """The generation flags shared by `run` and `chat`."""
    options = [
        click.option("--max-tokens", type=int, default=None, help=max_tokens_help),
        click.option("--temperature", type=float, default=None, help="0 is greedy [default: 0.8]."),
        click.option("--top-k", type=int, default=None),
        click.option("--top-p", type=float, default=None),
        click.option("--min-p", type=float, default=None),
        click.option("--repetition-penalty", type=float, default=None),
        click.option("--seed", type=int, default=None),
        click.option("--stop", multiple=True, help="Stop string (repeatable); never printed."),
        click.option("--truncate", is_flag=True, default=None,
                     help="Drop the start of a prompt that does not fit the context (and say so)."),
        click.option("--threads", type=int, default=None, help="CPU threads [default: physical cores]."),
        click.option("--provider", default="cpu", show_default=True, help="cpu|cuda|dml|coreml (ONNX)."),
        click.option("--n-gpu-layers", type=int, default=0, show_default=True, help="GGUF layers on the GPU."),
        click.option("--n-ctx", type=int, default=None,
                     help="GGUF context to allocate [default: trained length, at most 4096]."),
        click.option("--verify", is_flag=True, help="Check every file's sha256 against the manifest first."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def constraint_options(fn):
    """The output constraints shared by `run` and `chat` (at most one per call)."""
    options = [
        click.option("--json-schema", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
                     help="Constrain the output to JSON valid against the JSON Schema in FILE."),
        click.option("--regex", default=None, help="Constrain the output to a full match of RE."),
        click.option("--grammar", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
                     help="Constrain the output to the Lark grammar in FILE."),
        click.option("--json-object", is_flag=True, default=None, help="Constrain the output to a JSON object."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command()
@click.argument("artifact", type=MODEL)
@click.argument("prompt", required=False)
@click.option("--prompt-file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path),
              help="Read the prompt from a UTF-8 file (- for stdin) instead of PROMPT.")
@sampling_options
@constraint_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of streaming.")
def run(artifact, prompt, prompt_file, as_json, threads, provider, n_gpu_layers, n_ctx, verify, **sampling):
    """Generate a continuation of PROMPT, streamed to the terminal."""
    from edgelm.commands.run import run_prompt

    device = dict(threads=threads, provider=provider, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, verify=verify)
    run_prompt(artifact, prompt_text(prompt, prompt_file), as_json, device, sampling)


def prompt_text(prompt: str | None, prompt_file: Path | None) -> str:
    """The prompt from the argument or the file, checked to be valid UTF-8 either way."""
    from edgelm.errors import UsageError
    from edgelm.safe_text import check_text, read_text

    if (prompt is None) == (prompt_file is None):
        raise UsageError("give either a PROMPT argument or --prompt-file, not both or neither")
    if prompt_file is None:
        return check_text(prompt, "the PROMPT argument")  # Linux passes undecodable bytes as surrogates
    return read_text(prompt_file, "the prompt file")


@main.command()
@click.option("--out", "--workdir", "out", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".edgelm-demo"), show_default=True, help="Folder for every model and artifact.")
@click.option("--quick", is_flag=True, hidden=True, help="Tiny models, a few steps (for tests).")
def demo(out, quick):
    """All five families: train, export, validate and generate (RNN, LSTM, GPT-2, LLaMA, BERT)."""
    from edgelm.commands.demo import run_demo

    run_demo(out, quick)


def chat_sampling_options(fn):
    return sampling_options(fn, "Cap each reply at this many tokens [default: none; a reply runs until the "
                                "model ends its turn or the context is full].")


@main.command()
@click.argument("artifact", type=MODEL)
@click.option("--system", default=None, help="A system message that opens the conversation.")
@click.option("--resume", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Continue the conversation saved in FILE (by /save; JSON, OpenAI's message shape).")
@chat_sampling_options
@constraint_options
def chat(artifact, system, resume, threads, provider, n_gpu_layers, n_ctx, verify, **sampling):
    """Chat with a model in the terminal: Ctrl-C stops a reply, /save FILE keeps the conversation,
    /stats shows each reply's speed, /reset starts over, /exit or Ctrl-D quits."""
    from edgelm.commands.chat import run_chat

    device = dict(threads=threads, provider=provider, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, verify=verify)
    run_chat(artifact, system, device, sampling, resume)


@main.command()
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="The name to use [default: the folder's or file's name].")
@click.option("--copy", is_flag=True, help="Copy the files into the library (removed with `edgelm rm`) "
              "instead of keeping a reference to where they are.")
def add(path, name, copy):
    """Register an artifact folder or a .gguf file in the library under a name."""
    from edgelm.commands.library import add_model

    add_model(path, name, copy)


@main.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def list_(as_json):
    """The library's models: name, family, format, quantization, size, validation and verification."""
    from edgelm.commands.library import list_models

    list_models(as_json)


@main.command()
@click.argument("name")
def rm(name):
    """Remove a model from the library (its files too, only where `add --copy` copied them)."""
    from edgelm.commands.library import remove_model

    remove_model(name)


def encoder_options(fn):
    """Flags shared by the encoder commands (embed, fill-mask, classify)."""
    fn = click.option("--provider", default="cpu", show_default=True, help="cpu|cuda|dml|coreml.")(fn)
    fn = click.option("--threads", type=int, default=None, help="CPU threads [default: physical cores].")(fn)
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(fn)


LINES_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@main.command()
@click.argument("artifact", type=MODEL)
@click.argument("texts", nargs=-1)
@click.option("--file", type=LINES_FILE, help="More texts, one per line (UTF-8).")
@click.option("--batch-size", type=int, default=None, help="Texts per batch [default: 32].")
@click.option("--normalize/--no-normalize", default=None, help="Unit-length vectors [default: as exported].")
@encoder_options
def embed(artifact, texts, file, batch_size, normalize, as_json, threads, provider):
    """Print one embedding vector per TEXT (an embed artifact)."""
    from edgelm.commands.encode import run_embed

    run_embed(artifact, texts, file, as_json, batch_size, normalize, threads, provider)


@main.command("fill-mask")
@click.argument("artifact", type=MODEL)
@click.argument("text")
@click.option("--top-k", type=int, default=5, show_default=True)
@encoder_options
def fill_mask(artifact, text, top_k, as_json, threads, provider):
    """Most likely tokens for the one mask token in TEXT (a fill-mask artifact)."""
    from edgelm.commands.encode import run_fill_mask

    run_fill_mask(artifact, text, top_k, as_json, threads, provider)


@main.command()
@click.argument("artifact", type=MODEL)
@click.argument("texts", nargs=-1)
@click.option("--file", type=LINES_FILE, help="More texts, one per line (UTF-8).")
@encoder_options
def classify(artifact, texts, file, as_json, threads, provider):
    """The most likely label for each TEXT (a classify artifact)."""
    from edgelm.commands.encode import run_classify

    run_classify(artifact, texts, file, as_json, threads, provider)


@main.command("eval")
@click.argument("artifact", type=MODEL)
@click.option("--text", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Text to score (UTF-8) [default: the held-out text an edgelm-trained source kept, "
                   "else the built-in corpus's held-out slice].")
@click.option("--ctx", type=int, default=None, help="Chunk length in tokens [default: 512, or the model's context].")
@click.option("--base", type=MODEL, default=None,
              help="A base artifact with the same tokenizer: adds KL divergence, top-1 agreement, PPL ratio.")
@click.option("--chunks", type=int, default=None, help="Score only the first N chunks [default: all].")
@click.option("--threads", type=int, default=None, help="CPU threads [default: physical cores].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def eval_(artifact, text, ctx, base, chunks, threads, as_json):
    """Perplexity of a generator artifact (llama-perplexity's protocol), optionally against a base."""
    from edgelm.commands.eval import run_eval

    run_eval(artifact, text, ctx, base, chunks, threads, as_json)


@main.command()
@click.argument("artifacts", nargs=-1, required=True, type=MODEL)
@click.option("--prompt-tokens", type=int, default=64, show_default=True, help="Prompt length for prefill.")
@click.option("--new-tokens", type=int, default=64, show_default=True, help="Greedy tokens decoded.")
@click.option("--threads", type=int, default=None, help="CPU threads [default: physical cores].")
@click.option("--rounds", type=int, default=3, show_default=True, help="Interleaved rounds; medians are shown.")
@click.option("--json", "as_json", is_flag=True, help='Print {"rows": [...]} as JSON.')
def bench(artifacts, prompt_tokens, new_tokens, threads, rounds, as_json):
    """Measure artifacts side by side (each in its own process): speed, memory, size."""
    from edgelm.commands.bench import run_bench

    run_bench(artifacts, prompt_tokens, new_tokens, threads, rounds, as_json)


@main.command()
@click.argument("artifacts", nargs=-1)  # paths or library names; none: the whole library
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; others need --api-key.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0 picks a free port.")
@click.option("--api-key", envvar="EDGELM_API_KEY", default=None, help="Require 'Authorization: Bearer KEY' "
              "(also read from EDGELM_API_KEY).")
@click.option("--cors-origin", "cors_origins", multiple=True, metavar="ORIGIN",
              help="A web origin allowed to call the server from a browser (repeatable; none by default).")
@click.option("--name", "names", multiple=True, metavar="NAME=ARTIFACT", help="Serve ARTIFACT under the id NAME.")
@click.option("--max-queue", type=click.IntRange(0), default=64, show_default=True,
              help="Requests waiting per model; beyond it the answer is 503.")
@click.option("--allow-unauthenticated-remote", "allow_remote", is_flag=True,
              help="Bind a non-loopback address without an API key.")
@click.option("--threads", type=int, default=None, help="CPU threads per model [default: physical cores].")
@click.option("--provider", default="cpu", show_default=True, help="cpu|cuda|dml|coreml (ONNX).")
@click.option("--n-gpu-layers", type=int, default=0, show_default=True, help="GGUF layers on the GPU.")
@click.option("--n-ctx", type=int, default=None, help="GGUF context [default: trained length, at most 4096].")
@click.option("--verify", is_flag=True, help="Check every file's sha256 against the manifest first.")
@click.option("--parallel", type=click.IntRange(1), default=4, show_default=True,
              help="Sequences each GGUF text model or fused-graph ONNX GPT-2 decodes together (slots of "
              "one KV cache, each holding a whole context); other models take one request at a time.")
@click.pass_context
def serve(ctx, artifacts, host, port, api_key, cors_origins, names, max_queue, allow_remote, threads, provider,
          n_gpu_layers, n_ctx, verify, parallel):
    """Serve artifacts over HTTP in OpenAI's protocol (needs `pip install edgelm[serve]`)."""
    from edgelm.commands.serve import run_serve

    device = dict(threads=threads, provider=provider, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx, verify=verify,
                  parallel=parallel)
    debug = bool(ctx.find_root().params.get("debug"))
    run_serve(artifacts, names, host, port, api_key, cors_origins, max_queue, allow_remote, device, debug)


if __name__ == "__main__":
    main()
