"""`edgelm verify`: run an artifact's reference set on this machine and print every check (no torch)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from edgelm.errors import VerificationError
from edgelm.safe_text import printable, terminal_json


def verify_artifact(path: Path, as_json: bool, threads: int | None) -> None:
    from edgelm.reference.verify import verify

    result = verify(path, threads=threads)
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


def describe_machine(facts: dict[str, Any]) -> str:
    """One line: CPU, architecture and OS, the kernel-selecting features, backends and threads."""
    isa = " ".join(facts.get("isa") or ()) or "none listed"
    backends = ", ".join(f"{name} {facts.get(key) or 'absent'}"
                         for name, key in (("onnxruntime", "onnxruntime"), ("llama-cpp-python", "llama_cpp_python")))
    text = (f"{facts.get('cpu') or 'unknown CPU'} ({facts.get('arch')}, {facts.get('os')}); isa: {isa}; "
            f"vnni: {'yes' if facts.get('vnni') else 'no'}; {backends}; threads {facts.get('threads')}")
    return printable(text)
