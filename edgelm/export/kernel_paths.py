"""Export-time checks that a quantized ONNX file is right on every CPU, not only on this one.

Run after the reference checks, on the same reference file: the structural bound on int8 weights
(edgelm/export/int8_safety.py) and, where the graph has int8-weight MatMuls, the reference checks
again on a copy of the graph that computes what a CPU without VNNI computes. Each emulated check
keeps its bound and gets the suffix `_non_vnni_emulated`.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from edgelm.artifact import Check, Manifest, staged

EMULATED_SUFFIX = "_non_vnni_emulated"
PEAK_CHECK = "int8_weight_peak_u8s8"


def kernel_path_checks(folder: Path, manifest: Manifest, options: Any) -> list[Check]:
    if manifest.format != "onnx" or manifest.quant == "none":
        return []
    import onnx

    from edgelm.export.int8_safety import S8_WEIGHT_LIMIT, has_emulated_ops, int8_weight_peak

    model = onnx.load(str(Path(folder) / manifest.model.file))
    peak = int8_weight_peak(model)
    if peak is None:  # no operator here meets uint8 activations (weight-only MatMulNBits)
        return []
    check = Check.at_most(PEAK_CHECK, peak.peak, S8_WEIGHT_LIMIT)
    checks = [replace(check, note=f"largest |int8 weight| meeting uint8 activations, at {peak.node} "
                                  f"({peak.weights_checked} weights checked)")]
    if has_emulated_ops(model):
        checks.extend(_emulated_checks(Path(folder), manifest, model, options))
    return checks


def _emulated_checks(folder: Path, manifest: Manifest, model: Any, options: Any) -> list[Check]:
    """The reference checks on a copy of the artifact whose graph emulates the non-VNNI kernels."""
    import onnx

    from edgelm.export.int8_safety import emulated_graph
    from edgelm.reference import reference_checks

    with tempfile.TemporaryDirectory(prefix="edgelm-non-vnni-") as tmp:
        copy = Path(tmp)
        for path in folder.iterdir():
            if path.is_file() and path.name != manifest.model.file:
                shutil.copyfile(path, copy / path.name)
        onnx.save(emulated_graph(model), str(copy / manifest.model.file))
        checks = reference_checks(copy, staged(manifest, copy), options)
    return [replace(c, name=c.name + EMULATED_SUFFIX) for c in checks if c.threshold is not None]
