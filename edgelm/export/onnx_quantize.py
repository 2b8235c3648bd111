"""Quantizing ONNX graphs: dynamic int8, and weight-only MatMulNBits (8 or 4 bits per weight).

Weight-only quantization stores each MatMul's constant weight as `bits`-bit integers with one
fp32 scale per `block_size` weights along the input dimension (symmetric, round to nearest);
onnxruntime's `MatMulNBits` kernel reads the packed weights directly. Measured here (one
768x3072 MatMul, one row, onnxruntime 1.32 CPU): 8-bit weights at accuracy_level 0 (fp32
compute) fall back to a slow dequantizing path (about 40x slower than accuracy_level 4), so
edgelm uses accuracy_level 4, where the kernel quantizes each activation block to int8 on the
fly with its own scale (finer than dynamic quantization's one scale per tensor).

A table that is both gathered (an embedding) and multiplied (a tied output head) is stored once:
after quantization the Gather reads the head's packed blocks through `GatherBlockQuantized`
(com.microsoft), which dequantizes only the rows it picks. MatMulNBits keeps B as (N, K/block,
block bytes) with scales (N, K/block): column n of the (K, N) weight is row n of the (N, K)
table, so both kernels read the same initializers. Without this the fp32 table stayed beside
its 8-bit copy (GPT-2 124M: 154 MB of a 285 MB file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgelm.errors import ExportError
from edgelm.export.gemm_to_matmul import rewrite_gemms
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


def quantize_weight_only(src: Path, dst: Path, how: WeightOnly, exclude: tuple[str, ...] = (),
                         tied: tuple[tuple[str, str], ...] = ()) -> None:
    """Every MatMul with a constant weight (except the nodes named in `exclude`) to MatMulNBits.

    tied: (table, weight) initializer pairs that may hold one matrix, the weight being the table
    transposed (a tied embedding and head); where they do, Gathers on the table read the weight's
    quantized blocks instead and the fp32 table is dropped. Pairs that differ are left as they are.
    """
    import onnx

    # importing the quantizer calls logging.basicConfig(level=INFO), which would install a console
    # handler on the application's root logger for good; inside quiet_root_calls a stand-in handler
    # makes that call a no-op
    with quiet_root_calls("onnxruntime/quantization"):
        from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    config = DefaultWeightOnlyQuantConfig(block_size=how.block_size, is_symmetric=True,
                                          accuracy_level=how.accuracy_level, bits=how.bits)
    model = onnx.load(str(src))
    rewrite_gemms(model)
    shared = [(table, weight) for table, weight in tied if _is_transpose(model, table, weight)]
    # the quantizer logs every node at INFO through its own handler: progress notes, not for users
    with quiet_loggers("onnxruntime.quantization.matmul_nbits_quantizer"), quiet_root_calls("onnxruntime/quantization"):
        quantizer = MatMulNBitsQuantizer(model, nodes_to_exclude=list(exclude), algo_config=config)
        quantizer.process()
    if not any(n.op_type == "MatMulNBits" for n in quantizer.model.model.graph.node):
        # a weight-only export that packed nothing would ship fp32 weights under a 4/8-bit label
        raise ExportError(f"weight-only {how.bits}-bit quantization found no linear layer with a constant "
                          "weight to pack in this graph")
    for table, weight in shared:
        _gather_from_quantized(quantizer.model.model, table, weight, how)
    _save(quantizer.model.model, dst)


def _initializer(model: Any, name: str) -> Any | None:
    return next((t for t in model.graph.initializer if t.name == name), None)


def _is_transpose(model: Any, table: str, weight: str) -> bool:
    from onnx import numpy_helper

    found = _initializer(model, table), _initializer(model, weight)
    if None in found:
        return False
    table_array, weight_array = (numpy_helper.to_array(t) for t in found)
    return table_array.ndim == 2 and table_array.shape == weight_array.shape[::-1] and \
        bool((table_array == weight_array.T).all())


def _gather_from_quantized(model: Any, table: str, weight: str, how: WeightOnly) -> None:
    """Replace every Gather of `table` rows by GatherBlockQuantized over `weight`'s MatMulNBits blocks."""
    import numpy as np
    from onnx import numpy_helper

    head = next((n for n in model.graph.node if n.op_type == "MatMulNBits" and n.input[1] == f"{weight}_Q{how.bits}"),
                None)
    if head is None or len(head.input) != 3:  # symmetric blocks have no zero points
        raise ExportError(f"the quantizer did not pack {weight} as symmetric MatMulNBits; cannot share it with {table}")
    width = next(a.i for a in head.attribute if a.name == "K")
    # the kernel wants scales of the data's rank, (N, K/block, 1): onnxruntime folds this Reshape at
    # load into a copy of the scales only (K/block floats a row); the packed blocks stay one tensor
    scales = f"{table}_block_scales"
    model.graph.initializer.extend([numpy_helper.from_array(np.array([0, 0, 1], np.int64), f"{scales}_shape"),
                                    *_width_constants(table, width, how.block_size)])
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.append(_node("Reshape", [head.input[2], f"{scales}_shape"], [scales]))
    for node in nodes:
        if node.op_type == "Gather" and node.input[0] == table:
            model.graph.node.extend(_quantized_gather(node, table, head.input[1], scales, width, how))
        else:
            model.graph.node.append(node)
    if not any(table in node.input for node in model.graph.node):
        model.graph.initializer.remove(_initializer(model, table))


def _width_constants(table: str, width: int, block_size: int) -> list[Any]:
    """Constants the gathers' reshape (and, for a zero-padded last block, slice) read."""
    import numpy as np
    from onnx import numpy_helper

    padded = -(-width // block_size) * block_size
    values = {"padded_width": [padded]}
    if padded != width:  # unused initializers draw a warning from onnxruntime at every load
        values.update(start=[0], width=[width], last_axis=[-1])
    return [numpy_helper.from_array(np.array(v, np.int64), f"{table}_{name}") for name, v in values.items()]


def _quantized_gather(gather: Any, table: str, blocks: str, scales: str, width: int, how: WeightOnly) -> list[Any]:
    """GatherBlockQuantized gives (..., K/block, block): back to (..., K), what the Gather gave."""
    if any(a.name == "axis" and a.i != 0 for a in gather.attribute):
        raise ExportError(f"{gather.name} gathers along an axis other than rows; its table cannot be shared")
    rows, out = gather.input[1], gather.output[0]
    padded = width % how.block_size != 0
    nodes = [
        _node("GatherBlockQuantized", [blocks, rows, scales], [f"{out}_blocks"], domain="com.microsoft",
              gather_axis=0, quantize_axis=2, block_size=how.block_size, bits=how.bits),
        _node("Shape", [rows], [f"{out}_rows_shape"]),
        _node("Concat", [f"{out}_rows_shape", f"{table}_padded_width"], [f"{out}_shape"], axis=0),
        _node("Reshape", [f"{out}_blocks", f"{out}_shape"], [f"{out}_padded" if padded else out]),
    ]
    if padded:
        bounds = [f"{table}_{name}" for name in ("start", "width", "last_axis")]
        nodes.append(_node("Slice", [f"{out}_padded", *bounds], [out]))
    return nodes


def _node(op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs: Any) -> Any:
    from onnx import helper

    return helper.make_node(op, inputs, outputs, name=f"{outputs[0]}_{op}", domain=domain, **attrs)


def _save(model: Any, dst: Path) -> None:
    """The graph in `dst`, its weights in `<dst>_data` beside it.

    onnxruntime maps page-aligned external data from the file instead of copying it out of the
    parsed protobuf, so the weights are not held twice while MatMulNBits packs them. Measured on
    GPT-2 124M int8 (one session, 2 threads): peak RSS 266 MiB with external data, 316 MiB inline.
    """
    import onnx

    data = dst.with_name(dst.name + "_data")
    onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    data.chmod(dst.stat().st_mode & 0o777)  # onnx creates it owner-only; it is as shareable as the graph
