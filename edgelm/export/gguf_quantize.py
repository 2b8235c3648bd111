"""Quantize a float GGUF through llama.cpp's own quantizer (llama-cpp-python's binding).

llama_model_quantize reports failure only by a non-zero return code, with the reason in
llama.cpp's log, and it silently falls back to another type for tensors whose rows do not fit the
wanted block size (256 for K-quants, 32 otherwise). Both are captured here: a failure becomes an
ExportError with llama.cpp's own reason, and every fallback is returned to go in the manifest.
"""

from __future__ import annotations

import ctypes
import re
from dataclasses import dataclass, field
from pathlib import Path

from edgelm.errors import ExportError
from edgelm.families import FLOAT_GGUF, LLAMA_FTYPES
from edgelm.runtime.llamacpp.log import captured_llama_log, log_lines

# "warning: blk.0.attn_q.weight - ncols 64 not divisible by 256 (required for type q4_K)"
FALLBACK_LINE = re.compile(
    r"(?P<tensor>[\w.]+)\s+-\s+ncols\s+(?P<cols>\d+)\s+not divisible by\s+(?P<block>\d+)"
    r"\s+\(required for type\s+(?P<wanted>\w+)\s*\)")
FALLBACK_COUNT = re.compile(r"(\d+) of (\d+) tensor\(s\) required fallback quantization")


@dataclass
class QuantizeReport:
    fallbacks: list[dict] = field(default_factory=list)  # tensor, wanted, used, reason
    fallback_count: int = 0  # as llama.cpp counted them
    log: list[str] = field(default_factory=list)


def quantize_gguf(float_path: Path, out_path: Path, quant: str, threads: int = 0) -> QuantizeReport:
    """Write `out_path` as `quant` from the float GGUF `float_path`; raise ExportError on failure."""
    import llama_cpp

    if quant not in LLAMA_FTYPES or quant in FLOAT_GGUF:
        raise ExportError(f"{quant!r} is not a llama.cpp quantization type")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[quant]
    params.nthread = threads
    with captured_llama_log() as log:
        code = llama_cpp.llama_model_quantize(str(float_path).encode(), str(out_path).encode(),
                                              ctypes.byref(params))
    lines = log_lines(log)
    if code != 0 or not out_path.is_file():
        raise ExportError(f"llama.cpp could not quantize to {quant} ({_failure_reason(lines, code)})")
    report = QuantizeReport(log=lines)
    report.fallbacks = _fallbacks(lines, out_path)
    counted = [FALLBACK_COUNT.search(line) for line in lines]
    report.fallback_count = next((int(m.group(1)) for m in counted if m), len(report.fallbacks))
    return report


def _failure_reason(lines: list[str], code: int) -> str:
    errors = [line for line in lines if re.search(r"error|failed|exception|invalid", line, re.I)]
    reason = errors[0] if errors else (lines[-1] if lines else f"return code {code}, no log")
    return re.sub(r"^\w+: ", "", reason)


def _fallbacks(lines: list[str], out_path: Path) -> list[dict]:
    """Tensors llama.cpp stored in another type than wanted, with the type it used instead."""
    used = tensor_types_by_name(out_path)
    found = []
    for line in lines:
        match = FALLBACK_LINE.search(line)
        if match:
            name = match.group("tensor")
            found.append({
                "tensor": name,
                "wanted": match.group("wanted").upper(),
                "used": used.get(name, "unknown"),
                "reason": f"row length {match.group('cols')} is not a multiple of {match.group('block')}",
            })
    return found


def tensor_types_by_name(path: Path) -> dict[str, str]:
    from gguf import GGUFReader

    reader = GGUFReader(path)
    return {t.name: t.tensor_type.name for t in reader.tensors}


def tensor_type_counts(path: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind in tensor_types_by_name(path).values():
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))
