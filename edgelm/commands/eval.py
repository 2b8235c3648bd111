"""`edgelm eval`: perplexity of a generator artifact by llama-perplexity's protocol, and its
distance (KL, top-1, perplexity ratio) from a base artifact on the same chunks."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from edgelm.errors import InputError, UsageError
from edgelm.paths import confined
from edgelm.safe_text import printable, read_text

DEFAULT_CTX = 512  # llama-perplexity's usual context, or the model's own where it is shorter


@dataclass(frozen=True)
class EvalText:
    text: str
    where: str  # what the text is, for the report


def default_text(manifest) -> EvalText:
    """The held-out slice an edgelm-trained source kept beside its weights, else the built-in corpus's."""
    source = getattr(manifest, "source", None)
    folder = Path(source.path) if source is not None and source.path else None
    if folder is not None and (folder / "held_out.txt").is_file():
        # the folder comes from the manifest: the file must really lie in it (no link out of it)
        path = confined(folder, "held_out.txt", "held-out text", error=InputError)
        return EvalText(read_text(path, "the held-out text"), f"held-out text of {folder}")
    from edgelm.models.corpus import builtin_text, split_held_out

    return EvalText(split_held_out(builtin_text())[1], "the built-in corpus's held-out slice")


def open_generator(path: Path, threads: int | None, n_ctx: int | None):
    from edgelm.runtime import load
    from edgelm.runtime.capabilities import TextModel

    model = load(path, threads=threads, n_ctx=n_ctx)
    if not isinstance(model, TextModel):
        model.close()
        raise UsageError(f"{path}: eval scores text generators; this is a {model.task} artifact")
    return model


def resolve_ctx(model, ctx: int | None) -> int:
    limit = model.decoder.context_length
    if ctx is None:
        return min(DEFAULT_CTX, limit) if limit else DEFAULT_CTX
    if ctx < 4:
        raise UsageError(f"--ctx must be at least 4, got {ctx}")
    if limit and ctx > limit:
        raise UsageError(f"--ctx {ctx} exceeds the model's context length {limit}")
    return ctx


def token_ids(model, text: str) -> list[int]:
    return list(model.tokenizer.encode(text, add_special_tokens=False).ids)


def evaluate(path: Path, text: EvalText | None, ctx: int | None, base_path: Path | None,
             max_chunks: int | None = None, threads: int | None = None, progress=None) -> dict:
    """The numbers `edgelm eval` prints, as a dict (the --json object plus what was scored)."""
    from edgelm.metrics import perplexity_chunks, score_chunks

    model = open_generator(path, threads, None)
    base = None
    try:
        text = text or default_text(model.manifest)
        n_ctx = resolve_ctx(model, ctx)
        ids = token_ids(model, text.text)
        bos = model.bos_id if model.add_bos else None
        chunks = perplexity_chunks(ids, n_ctx, bos)[: max_chunks or None]
        if base_path is not None:
            base = open_generator(base_path, threads, None)
            _check_same_tokenizer(model, base, ids, text.text, n_ctx, path, base_path)
        result = score_chunks(model, chunks, base, progress).as_dict()
    finally:
        model.close()
        if base is not None:
            base.close()
    return {**result, "ctx": n_ctx, "chunks": len(chunks), "text": text.where}


def _check_same_tokenizer(model, base, ids: list[int], text: str, n_ctx: int, path: Path, base_path: Path) -> None:
    if token_ids(base, text) != ids or (model.bos_id if model.add_bos else None) != (
            base.bos_id if base.add_bos else None):
        raise InputError(f"{base_path} and {path} do not share a tokenizer (they split the text differently); "
                         "--base needs the same tokenizer")
    if base.decoder.context_length and n_ctx > base.decoder.context_length:
        raise UsageError(f"--ctx {n_ctx} exceeds the base model's context length {base.decoder.context_length}")


def run_eval(artifact: Path, text_file: Path | None, ctx: int | None, base: Path | None, chunks: int | None,
             threads: int | None, as_json: bool) -> None:
    if chunks is not None and chunks < 1:
        raise UsageError(f"--chunks must be at least 1, got {chunks}")
    text = EvalText(read_text(text_file, "the evaluation text"), str(text_file)) if text_file else None

    def progress(done: int, total: int) -> None:
        if not as_json and sys.stderr.isatty():
            click.echo(f"\rchunk {done}/{total}", nl=done == total, err=True)

    result = evaluate(artifact, text, ctx, base, chunks, threads, progress)
    if as_json:
        keys = ("perplexity", "perplexity_error", "tokens_scored", "kl_divergence", "kl_divergence_p99",
                "top1_agreement", "perplexity_ratio")
        click.echo(json.dumps({k: result[k] for k in keys if k in result}))
        return
    click.echo(f"text: {printable(result['text'])}; {result['chunks']} chunks of {result['ctx']} tokens, "
               f"{result['tokens_scored']} tokens scored (second half of each chunk)")
    click.echo(f"PPL = {result['perplexity']:.4f} +/- {result['perplexity_error']:.4f}")
    if "kl_divergence" in result:
        click.echo(f"against {printable(str(base))}: mean KL {result['kl_divergence']:.6f} "
                   f"(p99 {result['kl_divergence_p99']:.6f}), top-1 agreement {result['top1_agreement']:.2%}, "
                   f"PPL ratio {result['perplexity_ratio']:.4f}")
