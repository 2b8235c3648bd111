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
    taken = _names(graph)
    nodes, replaced, made = [], 0, {}  # made: original weight -> its transposed copy's name
    for node in graph.node:
        if not _rewritable(node, initializers):
            nodes.append(node)
            continue
        weight = node.input[1]
        if _attributes(node).get("transB", 0):
            if weight not in made:  # one copy for every Gemm that reads this weight (a tied head)
                made[weight] = _fresh(f"{weight}_transposed", taken)
                graph.initializer.append(_transposed_copy(initializers[weight], made[weight]))
            weight = made[weight]
        has_bias = len(node.input) > 2 and node.input[2] != ""
        product = _fresh(f"{node.output[0]}_product", taken) if has_bias else node.output[0]
        # the MatMul keeps the Gemm's name, so nodes named for exclusion from quantization still match
        nodes.append(helper.make_node("MatMul", [node.input[0], weight], [product], name=node.name))
        if has_bias:
            nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                          name=_fresh(f"{node.name}_bias", taken)))
        replaced += 1
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused_initializers(graph, set(made))
    return replaced


def _names(graph: Any) -> set[str]:
    """Every tensor and node name the graph already uses: a new one must not meet any of them."""
    names = {t.name for t in graph.initializer} | {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    for node in graph.node:
        names.update((node.name, *node.input, *node.output))
    return names


def _fresh(name: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        candidate, n = f"{name}_{n}", n + 1
    taken.add(candidate)
    return candidate


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
