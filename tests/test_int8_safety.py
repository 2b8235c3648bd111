"""int8 that is right on every CPU: the saturation emulation, its graph form, and the structural bound.

Without VNNI, onnxruntime's x86 kernels add each pair of uint8 x int8 products in 16 bits with
saturation; edgelm's exports keep every int8 weight that meets uint8 activations within [-64, 64]
(or use uint8 weights), and validation reruns the reference checks on a graph that emulates that
path. These tests hold on any CPU: they read the graph and compare numpy with onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edgelm.export.int8_safety import (
    S8_WEIGHT_LIMIT,
    emulated_graph,
    has_emulated_ops,
    int8_weight_peak,
    saturating_pair_matmul,
)


def test_hand_computed_saturating_pairs():
    a = np.array([[255, 255, 255]], np.uint8)
    # 255*127 + 255*127 = 64770 is clipped to 32767; the odd K's last product stands alone
    assert saturating_pair_matmul(a, np.array([[127], [127], [127]], np.int8)).tolist() == [[32767 + 32385]]
    assert saturating_pair_matmul(a[:, :2], np.array([[-128], [-128]], np.int8)).tolist() == [[-32768]]
    # within the limit nothing is clipped: 255*64*2 = 32640
    assert saturating_pair_matmul(a[:, :2], np.array([[64], [64]], np.int8)).tolist() == [[32640]]
    assert S8_WEIGHT_LIMIT == 64


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 9), st.integers(1, 17), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_weights_within_the_limit_never_saturate(rows, k, n, seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (rows, k), dtype=np.uint8)
    w = rng.integers(-S8_WEIGHT_LIMIT, S8_WEIGHT_LIMIT + 1, (k, n), dtype=np.int8)
    a[0] = 255  # the worst case row
    np.testing.assert_array_equal(saturating_pair_matmul(a, w), a.astype(np.int64) @ w.astype(np.int64))


def matmul_integer_model(w: np.ndarray, a_zero: int, w_zero: np.ndarray | None) -> onnx.ModelProto:
    inputs = ["a", "w", "a_zero"] + (["w_zero"] if w_zero is not None else [])
    initializers = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.uint8(a_zero), "a_zero")]
    if w_zero is not None:
        initializers.append(numpy_helper.from_array(w_zero, "w_zero"))
    graph = helper.make_graph([helper.make_node("MatMulInteger", inputs, ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("a", TensorProto.UINT8, ["b", "t", w.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.INT32, None)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def run(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feed)[0]


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 21), st.integers(1, 6), st.integers(0, 255),
       st.booleans(), st.integers(0, 2**31 - 1))
def test_emulated_graph_computes_the_saturating_sums(batch, steps, k, n, a_zero, with_w_zero, seed):
    rng = np.random.default_rng(seed)
    w = rng.integers(-128, 128, (k, n), dtype=np.int8)  # full range: pairs saturate
    w_zero = rng.integers(-3, 4, (n,), dtype=np.int8) if with_w_zero else None
    a = rng.integers(0, 256, (batch, steps, k), dtype=np.uint8)
    model = matmul_integer_model(w, a_zero, w_zero)
    assert has_emulated_ops(model)
    emulated = run(emulated_graph(model), {"a": a})
    flat = a.reshape(-1, k)
    expected = saturating_pair_matmul(flat, w) - a_zero * w.astype(np.int64).sum(axis=0)
    if w_zero is not None:
        expected += -flat.astype(np.int64).sum(axis=1, keepdims=True) * w_zero + k * a_zero * w_zero.astype(np.int64)
    np.testing.assert_array_equal(emulated.reshape(-1, n), expected)


def test_emulation_changes_what_saturates_and_matches_this_cpus_kernel():
    """The kernel here sums in 32 bits with VNNI and saturates like the emulation without it.

    Seen: 129540 on an AVX-512 VNNI CPU; 65534, the emulation's number, under an emulated Zen 2.
    """
    from edgelm.machine import machine_facts

    w = np.full((4, 2), 127, np.int8)
    w[:, 1] = 64  # the second column is within the limit
    a = np.full((1, 1, 4), 255, np.uint8)
    model = matmul_integer_model(w, 0, None)
    native, emulated = run(model, {"a": a}), run(emulated_graph(model), {"a": a})
    assert emulated[0, 0, 0] == 2 * 32767
    facts = machine_facts()
    if facts["arch"] in ("x86_64", "AMD64") and "avx2" in facts["isa"]:
        assert native[0, 0, 0] == (4 * 255 * 127 if facts["vnni"] else emulated[0, 0, 0])
    assert native[0, 0, 1] == emulated[0, 0, 1] == 4 * 255 * 64  # within the limit: the same everywhere


def dynamic_quantize_matmul_model(w: np.ndarray, scale: np.ndarray) -> onnx.ModelProto:
    initializers = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(scale, "s")]
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "w", "s"], ["y"], name="dq", domain="com.microsoft")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, w.shape[0]])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def test_dynamic_quantize_matmul_is_emulated_too():
    rng = np.random.default_rng(0)
    w = rng.integers(-128, 128, (16, 3), dtype=np.int8)
    scale = np.float32(0.01)
    x = rng.uniform(-1, 1, (2, 16)).astype(np.float32)
    model = dynamic_quantize_matmul_model(w, np.asarray(scale))
    # what onnxruntime's DynamicQuantizeLinear gives, then the saturating sums
    x_scale = (max(x.max(), 0) - min(x.min(), 0)) / 255
    zero = np.clip(np.round(-min(x.min(), 0) / x_scale), 0, 255)
    x_u8 = np.clip(np.round(x / x_scale) + zero, 0, 255).astype(np.uint8)
    integer = saturating_pair_matmul(x_u8, w) - zero * w.astype(np.int64).sum(axis=0)
    np.testing.assert_allclose(run(emulated_graph(model), {"x": x}), integer * x_scale * scale, rtol=1e-5, atol=1e-5)


def test_weight_peak_reads_the_graph():
    assert int8_weight_peak(matmul_integer_model(np.full((4, 2), 64, np.int8), 0, None)).peak == 64
    assert int8_weight_peak(matmul_integer_model(np.full((4, 2), -128, np.int8), 0, None)).peak == 128
    unsigned = matmul_integer_model(np.full((4, 2), 255, np.uint8), 0, None)
    assert int8_weight_peak(unsigned).peak == 0 and not has_emulated_ops(unsigned)  # u8 x u8 widens


def quantized_weights(path) -> list[tuple[str, np.ndarray]]:
    """Every weight of an operator that meets uint8 activations, with its operator type."""
    from edgelm.export.int8_safety import U8_ACTIVATION_WEIGHTS

    model = onnx.load(str(path))
    tensors = {t.name: t for t in model.graph.initializer}
    return [(node.op_type, numpy_helper.to_array(tensors[node.input[i]]))
            for node in model.graph.node for i in U8_ACTIVATION_WEIGHTS.get(node.op_type, ())
            if i < len(node.input) and node.input[i]]


def assert_no_kernel_can_saturate(artifact) -> None:
    weights = quantized_weights(artifact / "model.onnx")
    assert weights, "an int8 export with no quantized operator"
    for op_type, w in weights:
        assert w.dtype in (np.int8, np.uint8), op_type
        if w.dtype == np.int8:
            assert np.abs(w.astype(np.int16)).max() <= S8_WEIGHT_LIMIT, op_type


def test_recurrent_int8_is_safe_on_every_cpu(lstm_int8_artifact):
    import json

    assert_no_kernel_can_saturate(lstm_int8_artifact)
    assert "DynamicQuantizeLSTM" in {op for op, _ in quantized_weights(lstm_int8_artifact / "model.onnx")}
    checks = {c["name"]: c for c in json.loads((lstm_int8_artifact / "edgelm.json").read_text())["validation"]}
    assert checks["int8_weight_peak_u8s8"]["passed"] and checks["int8_weight_peak_u8s8"]["threshold"] == 64
    emulated = [n for n in checks if n.endswith("_non_vnni_emulated")]
    assert emulated and all(checks[n]["passed"] for n in emulated)


@pytest.mark.parametrize("fixture", ["gpt2_int8"])
def test_gpt2_quantized_graphs_have_no_uint8_activation_operators(fixture, request):
    """Weight-only MatMulNBits quantizes activations symmetrically inside the kernel (README)."""
    artifact = request.getfixturevalue(fixture)
    model = onnx.load(str(artifact / "model.onnx"))
    assert int8_weight_peak(model) is None
    assert any(n.op_type == "MatMulNBits" for n in model.graph.node)


def test_an_unsafe_file_fails_its_checks(lstm_model, lstm_int8_artifact, tmp_path):
    """The same LSTM quantized with full-range int8 weights fails the structural check, on any CPU."""
    import json
    import shutil

    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgelm.artifact import read_manifest
    from edgelm.export.kernel_paths import kernel_path_checks
    from edgelm.export.recurrent import _write_onnx
    from edgelm.models.recurrent import load_model
    from edgelm.runtime.device import RuntimeOptions

    folder = tmp_path / "a"
    shutil.copytree(lstm_int8_artifact, folder)
    fp32 = tmp_path / "fp32.onnx"
    _write_onnx(load_model(lstm_model, json.loads((lstm_model / "config.json").read_text())), fp32)
    quantize_dynamic(str(fp32), str(folder / "model.onnx"), weight_type=QuantType.QInt8)  # the old scheme
    checks = {c.name: c for c in kernel_path_checks(folder, read_manifest(folder), RuntimeOptions())}
    peak = checks["int8_weight_peak_u8s8"]
    assert not peak.passed and peak.value > S8_WEIGHT_LIMIT


def test_a_graph_below_opset_13_is_refused_in_one_line():
    from edgelm.errors import ExportError

    model = matmul_integer_model(np.full((4, 2), 127, np.int8), 0, None)
    model.opset_import[0].version = 11
    with pytest.raises(ExportError, match="opset 11 is below 13"):
        emulated_graph(model)
