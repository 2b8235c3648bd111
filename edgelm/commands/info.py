"""`edgelm info`: what an artifact is, its files and its validation numbers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import click

from edgelm.safe_text import printable, terminal_json


def describe(path: Path, as_json: bool, verify: bool) -> None:
    from edgelm.runtime import info

    manifest = info(path, verify=verify)
    if as_json:
        from edgelm.machine import machine_facts

        click.echo(terminal_json({**manifest.to_dict(), "this_machine": machine_facts()}, indent=2))
        return
    # every string here comes from a file made elsewhere: escaped before it reaches the terminal
    head = f"{path}: {manifest.family} {manifest.task}, {manifest.format} {manifest.quant}"
    click.echo(printable(head))
    for name, meta in manifest.files.items():
        click.echo(f"  {printable(name):<24} {meta['size']:>12,} bytes")
    if manifest.validation_skipped:
        click.echo("validation: skipped")
    else:
        click.echo(f"validation: {'passed' if manifest.validation_passed else 'FAILED'}")
        for check in manifest.validation:
            click.echo(f"  {printable(check.describe())}")
    if manifest.validation_reference:
        click.echo(printable(f"reference set: {manifest.validation_reference} (run `edgelm verify` on the device)"))
    from edgelm.commands.verify import describe_machine
    from edgelm.machine import machine_facts

    # both machines: a quantized file's numbers depend on the CPU that runs it
    exported = describe_machine(dataclasses.asdict(manifest.machine)) if manifest.machine else "not recorded"
    click.echo(f"exported on:  {exported}")
    click.echo(f"this machine: {describe_machine(machine_facts())}")
    if manifest.created:
        click.echo(printable(f"created {manifest.created} by edgelm {manifest.versions.get('edgelm')}"))
    else:
        click.echo("not made by edgelm: the file's own metadata stands in for a manifest")
