"""Quantized ONNX graphs whose accuracy does not depend on the CPU's kernel path.

onnxruntime multiplies dynamically quantized activations (uint8, 0..255) by int8 weights. On x86
without VNNI (AVX2, and AVX-512 without VNNI) the kernels add each pair of neighbouring u8 x s8
products in 16 bits with saturation (`vpmaddubsw`): with full-range weights a pair can reach
2 * 255 * 127 = 64770 and is clipped to 32767. With VNNI the pair is summed in 32 bits, so one
file gives different numbers on different CPUs. Two schemes cannot saturate anywhere:

- int8 weights within [-64, 64] (onnxruntime's `reduce_range`): a pair is at most
  2 * 255 * 64 = 32640;
- uint8 weights: the u8 x u8 kernels widen both operands to 16 bits before multiplying.

This module proves the first structurally (every int8 weight that meets uint8 activations lies
within the limit) and emulates the non-VNNI path, so an export made on a VNNI machine is judged as
an AVX2 laptop would run it: `emulated_graph` rewrites each int8-weight `MatMulInteger` /
`DynamicQuantizeMatMul` into plain float operators computing the pairwise saturating sums, and the
exporter runs its reference checks on that graph too. The LSTM's int8 kernel cannot be rewritten
that way; its weights are held to the same limit by the structural check.

`MatMulNBits` (GPT-2's weight-only int8/int4) is not covered here: its kernels quantize each
activation block to symmetric int8 and were measured to give bit-identical results on an AVX-512
VNNI machine and under an emulated AVX2-only CPU (README, "int8 on every CPU").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

PAIR_LIMIT = 32767  # the int16 a non-VNNI kernel adds a pair of u8 x s8 products into
U8_MAX = 255
S8_WEIGHT_LIMIT = PAIR_LIMIT // (2 * U8_MAX)  # 64: no pair of products can pass PAIR_LIMIT
UNPROVABLE_PEAK = 128  # reported for an int8 weight computed at run time: its range cannot be read

# quantized operators whose first input is uint8 activations (quantized on the fly), with the
# positions of their weight inputs
U8_ACTIVATION_WEIGHTS = {
    "MatMulInteger": (1,),
    "DynamicQuantizeMatMul": (1,),
    "DynamicQuantizeLSTM": (1, 2),
    "QAttention": (1,),
}
EMULATED_OPS = ("MatMulInteger", "DynamicQuantizeMatMul")


@dataclass(frozen=True)
class WeightPeak:
    """The largest |int8 weight| that meets uint8 activations, and where it is."""

    peak: int
    node: str
    weights_checked: int


def saturating_pair_matmul(a_u8: np.ndarray, w_s8: np.ndarray) -> np.ndarray:
    """(M, K) uint8 @ (K, N) int8 as a non-VNNI x86 kernel sums it: each pair (2i, 2i+1) in int16.

    An odd K's last product stands alone (the kernels pad K with zeros). Returns int64 (M, N).
    """
    a = a_u8.astype(np.int64)
    w = w_s8.astype(np.int64)
    even, odd = slice(0, a.shape[1] // 2 * 2, 2), slice(1, a.shape[1] // 2 * 2, 2)
    pairs = a[:, even, None] * w[None, even] + a[:, odd, None] * w[None, odd]  # (M, K/2, N)
    total = np.clip(pairs, -PAIR_LIMIT - 1, PAIR_LIMIT).sum(axis=1)
    if a.shape[1] % 2:
        total += a[:, -1:] @ w[-1:]
    return total


def int8_weight_peak(model: Any) -> WeightPeak | None:
    """The structural guarantee, read off the graph; None when no weight meets uint8 activations."""
    from onnx import TensorProto, numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    peak, where, count = 0, "", 0
    for node in model.graph.node:
        for position in U8_ACTIVATION_WEIGHTS.get(node.op_type, ()):
            if position >= len(node.input) or not node.input[position]:
                continue
            tensor = initializers.get(node.input[position])
            if tensor is not None and tensor.data_type == TensorProto.UINT8:
                count += 1  # u8 x u8 kernels widen to 16 bits: any value is safe
                continue
            if tensor is None or tensor.data_type != TensorProto.INT8:
                value = UNPROVABLE_PEAK  # computed at run time, or a type these kernels do not take
            else:
                value = int(np.abs(numpy_helper.to_array(tensor).astype(np.int16)).max(initial=0))
            count += 1
            if value > peak or not where:
                peak, where = value, node.name
    return WeightPeak(peak, where, count) if count else None


MIN_OPSET = 13  # from here on Slice, Unsqueeze and ReduceSum take their axes as inputs, as written below


def has_emulated_ops(model: Any) -> bool:
    weights = _signed_weights(model)
    return any(_emulated_weight(node, weights) is not None for node in model.graph.node)


def emulated_graph(model: Any) -> Any:
    """A copy of `model` in which every int8-weight MatMul computes what a non-VNNI CPU computes."""
    from edgelm.errors import ExportError

    version = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if version < MIN_OPSET:
        raise ExportError(f"the graph's opset {version} is below {MIN_OPSET}: its int8 MatMuls cannot be "
                          "emulated as a CPU without VNNI runs them")
    copy = type(model)()
    copy.CopyFrom(model)
    weights = _signed_weights(copy)
    nodes, replaced = [], set()
    for index, node in enumerate(copy.graph.node):
        weight = _emulated_weight(node, weights)
        if weight is None:
            nodes.append(node)
            continue
        nodes.extend(_rewrite(_Builder(copy, f"non_vnni_{index}"), node, weight))
        replaced.add(node.input[1])
    del copy.graph.node[:]
    copy.graph.node.extend(nodes)
    _drop_initializers(copy.graph, replaced)
    return copy


def _drop_initializers(graph: Any, names: set[str]) -> None:
    """The rewritten nodes' int8 weights, where nothing reads them now (onnxruntime warns about each)."""
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name not in names or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _signed_weights(model: Any) -> dict[str, np.ndarray]:
    """Every int8 initializer by name, read once (a graph has hundreds of nodes to look them up)."""
    from onnx import TensorProto, numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if t.data_type == TensorProto.INT8}


def _emulated_weight(node: Any, weights: dict[str, np.ndarray]) -> np.ndarray | None:
    """The int8 weight of an operator the emulation rewrites; None for any other node."""
    if node.op_type not in EMULATED_OPS or len(node.input) < 2:
        return None
    return weights.get(node.input[1])


class _Builder:
    """Appends constants and nodes with names unique to one rewritten operator."""

    def __init__(self, model: Any, prefix: str) -> None:
        self.model, self.prefix, self.nodes, self.count = model, prefix, [], 0

    def name(self) -> str:
        self.count += 1
        return f"{self.prefix}_{self.count}"

    def const(self, value: np.ndarray) -> str:
        from onnx import numpy_helper

        name = self.name()
        self.model.graph.initializer.append(numpy_helper.from_array(value, name))
        return name

    def op(self, op_type: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        from onnx import helper

        out = output or self.name()
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out + "_node", **attrs))
        return out

    def ints(self, *values: int) -> str:
        return self.const(np.asarray(values, np.int64))


def _rewrite(b: _Builder, node: Any, weight: np.ndarray) -> list[Any]:
    """The node's output from float operators: saturated pair sums, then the zero-point terms."""
    from onnx import TensorProto, helper

    if node.op_type == "DynamicQuantizeMatMul":
        quantized, a_scale, a_zero = b.name(), b.name(), b.name()
        b.nodes.append(helper.make_node("DynamicQuantizeLinear", [node.input[0]], [quantized, a_scale, a_zero],
                                        name=quantized + "_node"))
        w_zero = node.input[3] if len(node.input) > 3 and node.input[3] else ""
        integer = _integer_product(b, quantized, a_zero, w_zero, weight)
        scale = b.op("Mul", [b.op("Cast", [a_scale], to=TensorProto.FLOAT), node.input[2]])
        result = b.op("Mul", [integer, scale])
        bias = node.input[4] if len(node.input) > 4 and node.input[4] else ""
        b.op("Add", [result, bias], node.output[0]) if bias else b.op("Identity", [result], node.output[0])
        return b.nodes
    a_zero = node.input[2] if len(node.input) > 2 else ""
    w_zero = node.input[3] if len(node.input) > 3 else ""
    integer = _integer_product(b, node.input[0], a_zero, w_zero, weight)
    b.op("Cast", [b.op("Round", [integer])], node.output[0], to=TensorProto.INT32)
    return b.nodes


def _integer_product(b: _Builder, a_u8: str, a_zero: str, w_zero: str, weight: np.ndarray) -> str:
    """sum_k (a_k - a_zero)(w_k - w_zero) in float, the raw a*w pairs saturated as without VNNI."""
    from onnx import TensorProto

    k = weight.shape[0]
    half = k // 2
    w = weight.astype(np.float32)
    a = b.op("Cast", [a_u8], to=TensorProto.FLOAT)
    last = b.ints(-1)
    even = b.op("Slice", [a, b.ints(0), b.ints(2 * half), last, b.ints(2)])
    odd = b.op("Slice", [a, b.ints(1), b.ints(2 * half), last, b.ints(2)])
    pairs = b.op("Add", [b.op("Mul", [b.op("Unsqueeze", [even, last]), b.const(w[0 : 2 * half : 2])]),
                         b.op("Mul", [b.op("Unsqueeze", [odd, last]), b.const(w[1 : 2 * half : 2])])])
    clipped = b.op("Clip", [pairs, b.const(np.float32(-PAIR_LIMIT - 1)), b.const(np.float32(PAIR_LIMIT))])
    total = b.op("ReduceSum", [clipped, b.ints(-2)], keepdims=0)
    if k % 2:  # a lone last product cannot saturate: |255 * 128| < 32768
        tail = b.op("Slice", [a, b.ints(2 * half), b.ints(k), last])
        total = b.op("Add", [total, b.op("MatMul", [tail, b.const(w[-1:])])])
    if a_zero:  # - a_zero * sum_k w_k
        a_zero_f = b.op("Cast", [a_zero], to=TensorProto.FLOAT)
        total = b.op("Sub", [total, b.op("Mul", [a_zero_f, b.const(w.sum(axis=0))])])
        if w_zero:  # + K * a_zero * w_zero
            w_zero_f = b.op("Cast", [w_zero], to=TensorProto.FLOAT)
            total = b.op("Add", [total, b.op("Mul", [b.op("Mul", [a_zero_f, w_zero_f]), b.const(np.float32(k))])])
    if w_zero:  # - w_zero * sum_k a_k
        w_zero_f = b.op("Cast", [w_zero], to=TensorProto.FLOAT)
        row_sums = b.op("ReduceSum", [a, last], keepdims=1)
        total = b.op("Sub", [total, b.op("Mul", [row_sums, w_zero_f])])
    return total
