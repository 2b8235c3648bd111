"""What an export was asked to do. Importing this module costs nothing (no torch)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

ONNX_QUANTS = ("none", "int8")
GGUF_QUANTS = ("f32", "f16", "bf16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0")


@dataclass
class ExportOptions:
    format: str | None = None  # None: the family's default format
    quant: str | None = None  # None: "none" for ONNX, "f16" for GGUF
    task: str = "auto"
    validate: bool = True
    # progress(label, done, total): called as work advances, for bars in the CLI
    progress: Callable[[str, int, int], None] = field(default=lambda label, done, total: None)
