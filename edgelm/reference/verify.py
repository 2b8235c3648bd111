"""`edgelm.verify(path)`: prove an artifact on this machine against the reference it carries (no torch)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm.artifact import Check, read_manifest
from edgelm.errors import ArtifactError


@dataclass
class VerifyResult:
    """Every check with its bound, this machine's facts and the exporting machine's."""

    path: str
    passed: bool
    checks: list[Check]
    machine: dict[str, Any]
    export_machine: dict[str, Any] | None = None
    artifact: dict[str, str] = field(default_factory=dict)  # family, task, format, quant

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "passed": self.passed, "artifact": self.artifact,
                "checks": [dataclasses.asdict(c) for c in self.checks],
                "machine": self.machine, "export_machine": self.export_machine}


def verify(path: str | Path, threads: int | None = None) -> VerifyResult:
    """Hash every file, run the reference set through the runtime here, and compare against the bounds."""
    from edgelm.machine import machine_facts
    from edgelm.reference import reference_checks
    from edgelm.runtime.device import RuntimeOptions

    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        raise ArtifactError(f"{path}: a bare .gguf carries no reference set; verify works on artifact folders "
                            "exported by edgelm")
    options = RuntimeOptions(threads=threads)  # a bad count is refused before any file is read
    manifest = read_manifest(path, verify=True)
    checks = reference_checks(path, manifest, options)
    exported_on = dataclasses.asdict(manifest.machine) if manifest.machine is not None else None
    return VerifyResult(
        path=str(path), passed=all(c.passed for c in checks), checks=checks, machine=machine_facts(threads),
        export_machine=exported_on,
        artifact={"family": manifest.family, "task": manifest.task, "format": manifest.format,
                  "quant": manifest.quant},
    )
