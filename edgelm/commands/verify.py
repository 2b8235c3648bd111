"""`edgelm verify`: run an artifact's reference set on this machine and print every check (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgelm.errors import EdgelmError, VerificationError, first_line
from edgelm.safe_text import printable, terminal_json


def verify_artifact(path: Path, as_json: bool, threads: int | None) -> None:
    from edgelm.reference.verify import verify

    result = verify(path, threads=threads)
    _record_in_library(path, result.passed, str(result.machine.get("cpu") or ""))
    if as_json:
        click.echo(terminal_json(result.to_dict(), indent=2))
    else:
        kind = result.artifact
        click.echo(printable(f"{path}: {kind['family']} {kind['task']}, {kind['format']} {kind['quant']}"))
        for check in result.checks:
            click.echo(f"  {printable(check.describe())}")
        click.echo(f"this machine: {describe_machine(result.machine)}")
        exported = describe_machine(result.export_machine) if result.export_machine else "not recorded"
        click.echo(f"exported on:  {exported}")
    if not result.passed:
        detail = "; ".join(c.describe().removeprefix("FAIL ") for c in result.failed)
        raise VerificationError(f"verify failed on this machine: {printable(detail)}")
    if not as_json:
        click.echo("verify: passed")


def _record_in_library(path: Path, passed: bool, cpu: str) -> None:
    """Keep the outcome in every library entry for these files, so `edgelm list` shows it."""
    from datetime import datetime, timezone

    from edgelm.library import record_verification

    at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        names = record_verification(path, passed, at, cpu)
    except EdgelmError as err:  # the verdict stands; only its record failed, and that is said
        click.echo(f"note: the result was not recorded in the library: {first_line(err)}", err=True)
        return
    if names:
        click.echo(printable(f"recorded in the library for {', '.join(names)}"), err=True)


def describe_machine(facts: dict[str, Any]) -> str:
    """One line: CPU, architecture and OS, the kernel-selecting features, backends and threads."""
    isa = " ".join(facts.get("isa") or ()) or "none listed"
    backends = ", ".join(f"{name} {facts.get(key) or 'absent'}"
                         for name, key in (("onnxruntime", "onnxruntime"), ("llama-cpp-python", "llama_cpp_python")))
    text = (f"{facts.get('cpu') or 'unknown CPU'} ({facts.get('arch')}, {facts.get('os')}); isa: {isa}; "
            f"vnni: {'yes' if facts.get('vnni') else 'no'}; {backends}; threads {facts.get('threads')}")
    return printable(text)
