"""int8 for ONNX graphs, through onnxruntime's dynamic quantization."""

from __future__ import annotations

from pathlib import Path

from edgelm.export.quiet import quiet_root_calls


def quantize_int8(src: Path, dst: Path) -> None:
    """Weights to int8 ahead of time, activations quantized on the fly per batch."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the quantizer logs a warning per skipped node on the root logger; expected, not for the user
    with quiet_root_calls("onnxruntime/quantization"):
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
