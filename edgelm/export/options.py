"""What an export was asked to do. Importing this module costs nothing (no torch)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class ExportOptions:
    format: str | None = None  # None: the family's default format
    # None: the first type in the (family, format) table (edgelm/families.py); export() resolves it
    # before calling an exporter, so exporters always see a name
    quant: str | None = None
    task: str = "auto"
    validate: bool = True
    target: str = "default"  # "mobile": also the ORT-format model and its operator list (ONNX: gpt2, bert)
    # progress(label, done, total): called as work advances, for bars in the CLI
    progress: Callable[[str, int, int], None] = field(default=lambda label, done, total: None)
