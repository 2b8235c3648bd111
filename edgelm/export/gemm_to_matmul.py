"""Linear layers written as Gemm, rewritten as MatMul + Add so weight-only quantization sees them.

onnxruntime's MatMulNBits quantizer packs the constant B of MatMul nodes only. Exporters write
a linear layer either as MatMul (+ Add) or as one Gemm (GPT-2's Conv1D through torch.addmm
comes out as Gemm from current torch/optimum), and a Gemm is left in fp32 without a word. A Gemm
with a constant B, alpha = beta = 1 and no transposed A is the same as MatMul(A, B') + C, where
B' is B, or B transposed once when transB is set.
"""

from __future__ import annotations

from typing import Any


def _attributes(node: Any) -> dict[str, Any]:
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _rewritable(node: Any, initializers: dict[str, Any]) -> bool:
    if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or node.input[1] not in initializers:
        return False
    attrs = _attributes(node)
    plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0 and attrs.get("transA", 0) == 0
    return plain and len(initializers[node.input[1]].dims) == 2


def _transposed_copy(tensor: Any, name: str) -> Any:
    from onnx import numpy_helper

    return numpy_helper.from_array(numpy_helper.to_array(tensor).T.copy(), name)


def rewrite_gemms(model: Any) -> int:
    """Replace every rewritable Gemm in the main graph in place; returns how many were replaced."""
    from onnx import helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    nodes, replaced, transposed = [], 0, set()
    for node in graph.node:
        if not _rewritable(node, initializers):
            nodes.append(node)
            continue
        weight = node.input[1]
        if _attributes(node).get("transB", 0):
            transposed.add(node.input[1])
            weight = f"{node.input[1]}_transposed"
            if weight not in initializers:
                initializers[weight] = _transposed_copy(initializers[node.input[1]], weight)
                graph.initializer.append(initializers[weight])
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = f"{node.output[0]}_product" if has_bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=f"{node.name}_MatMul"))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]], name=f"{node.name}_Add"))
        replaced += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(graph, transposed)
    return replaced


def _drop_unused_initializers(graph: Any, candidates: set[str]) -> None:
    """Originals of the weights transposed above, where nothing reads them any more (a subgraph's
    nodes included), so the file holds one copy."""
    used = {o.name for o in graph.output} | set(_inputs_anywhere(graph))
    kept = [t for t in graph.initializer if t.name not in candidates or t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _inputs_anywhere(graph: Any):
    from onnx import AttributeProto

    for node in graph.node:
        yield from node.input
        for attr in node.attribute:
            if attr.type == AttributeProto.GRAPH:
                yield from _inputs_anywhere(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _inputs_anywhere(sub)
