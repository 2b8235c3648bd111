"""`edgelm info`: what an artifact is, its files and its validation numbers."""

from __future__ import annotations

import json
from pathlib import Path

import click


def describe(path: Path, as_json: bool, verify: bool) -> None:
    from edgelm.runtime import info

    manifest = info(path, verify=verify)
    if as_json:
        click.echo(json.dumps(manifest.to_dict(), indent=2, ensure_ascii=False))
        return
    click.echo(f"{path}: {manifest.family} {manifest.task}, {manifest.format} {manifest.quant}")
    for name, meta in manifest.files.items():
        click.echo(f"  {name:<24} {meta['size']:>12,} bytes")
    if manifest.validation_skipped:
        click.echo("validation: skipped")
    else:
        click.echo(f"validation: {'passed' if manifest.validation_passed else 'FAILED'}")
        for check in manifest.validation:
            click.echo(f"  {check.describe()}")
    if manifest.created:
        click.echo(f"created {manifest.created} by edgelm {manifest.versions.get('edgelm')}")
    else:
        click.echo("not made by edgelm: the file's own metadata stands in for a manifest")
