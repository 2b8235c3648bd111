"""Quantizing ONNX graphs: dynamic int8, and weight-only MatMulNBits (8 or 4 bits per weight).

Weight-only quantization stores each MatMul's constant weight as `bits`-bit integers with one
fp32 scale per `block_size` weights along the input dimension (symmetric, round to nearest);
onnxruntime's `MatMulNBits` kernel reads the packed weights directly. Measured here (one
768x3072 MatMul, one row, onnxruntime 1.32 CPU): 8-bit weights at accuracy_level 0 (fp32
compute) fall back to a slow dequantizing path (about 40x slower than accuracy_level 4), so
edgelm uses accuracy_level 4, where the kernel quantizes each activation block to int8 on the
fly with its own scale (finer than dynamic quantization's one scale per tensor).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.export.quiet import quiet_loggers, quiet_root_calls


@dataclass(frozen=True)
class WeightOnly:
    """How MatMulNBits weights are made; the manifest records all three."""

    bits: int
    block_size: int = 32
    accuracy_level: int = 4


def quantize_int8(src: Path, dst: Path) -> None:
    """Weights to int8 ahead of time, activations quantized on the fly per batch.

    Signed weights within [-64, 64] (reduce_range): onnxruntime's LSTM kernel takes only signed
    weights, and without VNNI a pair of u8 x s8 products must stay below 2**15
    (edgelm/export/int8_safety.py).
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the quantizer logs a warning per skipped node on the root logger; expected, not for the user
    with quiet_root_calls("onnxruntime/quantization"):
        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, reduce_range=True)


def quantize_weight_only(src: Path, dst: Path, how: WeightOnly, exclude: tuple[str, ...] = ()) -> None:
    """Every MatMul with a constant weight (except the nodes named in `exclude`) to MatMulNBits."""
    import onnx

    # importing the quantizer calls logging.basicConfig(level=INFO), which would install a console
    # handler on the application's root logger for good; inside quiet_root_calls a stand-in handler
    # makes that call a no-op
    with quiet_root_calls("onnxruntime/quantization"):
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=how.block_size, is_symmetric=True,
                                          accuracy_level=how.accuracy_level, bits=how.bits)
    model = onnx.load(str(src))
    # the quantizer logs every node at INFO through its own handler: progress notes, not for users
    with quiet_loggers("onnxruntime.quantization.matmul_nbits_quantizer"), quiet_root_calls("onnxruntime/quantization"):
        quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=list(exclude), algo_config=config)
        quantizer.process()
    _save(quantizer.model.model, dst)


def _save(model: Any, dst: Path) -> None:
    import onnx

    large = sum(t.ByteSize() for t in model.graph.initializer) > 1_800_000_000
    onnx.save_model(model, str(dst), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=dst.name + "_data")
