"""Gemm rewritten as MatMul + Add computes the same thing, and only plain Gemms are rewritten."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from edgelm.export.gemm_to_matmul import rewrite_gemms  # noqa: E402


def gemm_model(rows: int, k: int, n: int, trans_b: int, bias: bool, alpha: float, seed: int):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "w")]
    inputs = ["x", "w"]
    if bias:
        inits.append(numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b"))
        inputs.append("b")
    node = helper.make_node("Gemm", inputs, ["y"], name="g", transB=trans_b, alpha=alpha)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model, x):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 4), k=st.integers(1, 9), n=st.integers(1, 9), trans_b=st.sampled_from([0, 1]),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_rewritten_gemm_computes_the_same(rows, k, n, trans_b, bias, seed):
    model = gemm_model(rows, k, n, trans_b, bias, 1.0, seed)
    x = np.random.default_rng(seed + 1).standard_normal((rows, k)).astype(np.float32)
    expected = run(model, x)
    assert rewrite_gemms(model) == 1
    assert {node.op_type for node in model.graph.node} == ({"MatMul", "Add"} if bias else {"MatMul"})
    assert len(model.graph.initializer) == (2 if bias else 1)  # a transposed weight is held once
    np.testing.assert_allclose(run(model, x), expected, rtol=1e-5, atol=1e-5)


def test_a_scaled_gemm_is_left_alone():
    model = gemm_model(2, 3, 4, 0, True, 0.5, 0)
    assert rewrite_gemms(model) == 0
    assert [node.op_type for node in model.graph.node] == ["Gemm"]


def test_new_names_never_meet_the_graphs_own_and_the_matmul_keeps_the_gemms_name():
    model = gemm_model(2, 3, 4, 1, True, 1.0, 0)
    taken = helper.make_tensor_value_info("w_transposed", TensorProto.FLOAT, [2])  # a name the rewrite would pick
    model.graph.value_info.append(taken)
    x = np.ones((2, 3), np.float32)
    expected = run(model, x)
    assert rewrite_gemms(model) == 1
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    assert matmul.name == "g" and matmul.input[1] != "w_transposed"
    np.testing.assert_allclose(run(model, x), expected, rtol=1e-5, atol=1e-5)
