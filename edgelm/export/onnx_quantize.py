"""int8 for ONNX graphs, through onnxruntime's dynamic quantization."""

from __future__ import annotations

import logging
from pathlib import Path


def quantize_int8(src: Path, dst: Path) -> None:
    """Weights to int8 ahead of time, activations quantized on the fly per batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the quantizer logs a warning per skipped node; those are expected, not for the user
    logging.getLogger().setLevel(logging.ERROR)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
