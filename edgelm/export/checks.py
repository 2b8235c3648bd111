"""Shared helpers for export validation: comparing arrays and failing loudly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.artifact import Check, Manifest, staged
from edgelm.errors import ValidationError
from edgelm.metrics import max_abs_diff, top1_agreement  # noqa: F401  (the exporters' comparisons, one place)


def raise_if_failed(checks: list[Check]) -> None:
    failed = [c for c in checks if not c.passed]
    if failed:
        detail = "; ".join(f"{c.name} = {c.value:.4g} (threshold {c.threshold:g})" for c in failed)
        raise ValidationError(f"validation failed: {detail}", checks)


def validate_into(manifest: Manifest, enabled: bool, run_checks: Callable[[], list[Check]]) -> None:
    """Run an exporter's checks into the manifest and fail on a miss, or record that they were skipped.

    Called inside `write_artifact`, so a failure removes the partial folder.
    """
    if not enabled:
        manifest.validation_skipped = True
        return
    manifest.validation = run_checks()
    raise_if_failed(manifest.validation)


def checks_from_reference(folder: Path, manifest: Manifest, arrays: dict[str, np.ndarray],
                          options: Any = None) -> list[Check]:
    """Store torch's outputs as the artifact's reference file, then run the checks `edgelm verify` runs.

    One code path for both: validation is the reference checks on the exporting machine. A
    quantized ONNX file is then also checked as a CPU without VNNI would run it (kernel_paths.py).
    """
    from edgelm.export.kernel_paths import kernel_path_checks
    from edgelm.reference import reference_checks
    from edgelm.reference.store import REFERENCE_NAME, write_reference
    from edgelm.runtime.device import RuntimeOptions

    write_reference(folder, arrays)
    manifest.validation_reference = REFERENCE_NAME
    options = options or RuntimeOptions()
    checks = reference_checks(folder, staged(manifest, folder), options)
    return checks + kernel_path_checks(folder, manifest, options)
