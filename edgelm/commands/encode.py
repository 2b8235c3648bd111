"""`edgelm embed`, `edgelm fill-mask`, `edgelm classify`: encoder artifacts from the terminal."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgelm.errors import InputError, UsageError
from edgelm.safe_text import check_text, printable, read_text, terminal_json

PROGRESS_FROM = 256  # texts; fewer finish before a bar would be worth drawing


def _load_task(artifact: Path, task: str, threads: int | None, provider: str):
    from edgelm.runtime import load

    model = load(artifact, threads=threads, provider=provider)
    if getattr(model, "task", None) != task:
        model.close()
        raise UsageError(f"{artifact} was exported for task {getattr(model, 'task', '?')}; this command needs {task}")
    return model


def read_lines(path: Path) -> list[str]:
    """One text per non-empty line of a UTF-8 file."""
    return [line for line in read_text(path, "the --file").splitlines() if line.strip()]


def _texts(texts: tuple[str, ...], file: Path | None) -> list[str]:
    """TEXT arguments (checked to be valid UTF-8, which Linux does not promise) plus --file lines."""
    all_texts = [check_text(t, f"TEXT argument {i + 1}") for i, t in enumerate(texts)]
    all_texts += read_lines(file) if file else []
    if not all_texts:
        raise InputError("give at least one TEXT or a --file with one text per line")
    return all_texts


def run_embed(artifact: Path, texts: tuple[str, ...], file: Path | None, as_json: bool, batch_size: int | None,
              normalize: bool | None, threads: int | None, provider: str) -> None:
    all_texts = _texts(texts, file)
    with _load_task(artifact, "embed", threads, provider) as model:
        if len(all_texts) >= PROGRESS_FROM:
            with click.progressbar(length=len(all_texts), label="embed", file=sys.stderr) as bar:
                vectors = model.embed(all_texts, batch_size=batch_size, normalize=normalize,
                                      progress=lambda done, total: bar.update(done - bar.pos))
        else:
            vectors = model.embed(all_texts, batch_size=batch_size, normalize=normalize)
    if as_json:
        click.echo(json.dumps({"dim": int(vectors.shape[1]), "embeddings": vectors.tolist(),
                               "truncated": list(vectors.truncated)}))
    else:
        for row in vectors:
            click.echo(" ".join(f"{v:.7g}" for v in row))
    _note_truncated(len(vectors.truncated), model.max_length)


def run_fill_mask(artifact: Path, text: str, top_k: int, as_json: bool, threads: int | None, provider: str) -> None:
    check_text(text, "the TEXT argument")
    with _load_task(artifact, "fill-mask", threads, provider) as model:
        predictions = model.fill_mask(text, top_k=top_k)
    if as_json:
        click.echo(terminal_json({"predictions": [{"token": t, "score": s} for t, s in predictions],
                                  "truncated": predictions.truncated}))
    else:
        for token, score in predictions:
            click.echo(f"{score:.4f}  {printable(token)}")  # vocabulary strings come from the model file
    _note_truncated(int(predictions.truncated), model.max_length)


def run_classify(artifact: Path, texts: tuple[str, ...], file: Path | None, as_json: bool, threads: int | None,
                 provider: str) -> None:
    all_texts = _texts(texts, file)
    with _load_task(artifact, "classify", threads, provider) as model:
        results = model.classify(all_texts)
    if as_json:
        click.echo(terminal_json(results))
    else:
        for text, result in zip(all_texts, results):
            click.echo(f"{printable(result['label'])}\t{result['score']:.4f}\t{printable(text[:80])}")
    _note_truncated(sum(r["truncated"] for r in results), model.max_length)


def _note_truncated(count: int, max_length: int) -> None:
    if count:
        click.echo(f"note: {count} text(s) were longer than {max_length} tokens and were truncated", err=True)
