"""Dynamic int8 for encoders with outlier channels: per-channel smoothing before quantization.

Dynamic quantization gives each activation tensor one scale. BERT's activations carry a few huge
channels, worst on short inputs (mostly [CLS]/[SEP]), so one scale leaves the other channels
with a handful of levels. Smoothing (as in SmoothQuant) moves that range into the weights, exactly
in fp32: a MatMul X @ W becomes (X * 1/s) @ (s * W), with s_k = max|X_k|^alpha / max|W_k|^(1-alpha)
per input channel k, max|X_k| measured on calibration texts. The weights are quantized per output
channel, so the extra range they take is held by their own scales.

One Mul per activation tensor, shared by every MatMul that reads it (query, key and value share
theirs): a Mul per MatMul made onnxruntime quantize the same tensor three times and was slower
than fp32 (measured). MatMuls named by `keep` stay fp32 and read the unsmoothed tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.export.quiet import quiet_root_calls

ALPHA = 0.75  # measured on MiniLM: 0.5 and 0.9 left short inputs lower (see quantize_encoder_int8)


def smoothed_int8(src: Path, dst: Path, feeds: Sequence[dict[str, np.ndarray]], keep: Callable[[str], bool],
                  unsigned: Callable[[str], bool], alpha: float = ALPHA) -> list[str]:
    """Write the smoothed, dynamically quantized graph to `dst`; return the MatMuls kept in fp32.

    MatMuls named by `unsigned` get 8-bit unsigned weights, the others 7-bit signed ones: the two
    schemes no CPU kernel can saturate (edgelm/export/int8_safety.py).
    """
    import onnx

    model = onnx.load(str(src))
    weights = {t.name: t for t in model.graph.initializer}
    matmuls = [n for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in weights]
    kept = [n.name for n in matmuls if keep(n.name)]
    groups: dict[str, list[Any]] = {}
    for node in matmuls:
        if node.name not in kept:
            groups.setdefault(node.input[0], []).append(node)
    peaks = _activation_peaks(src, list(groups), feeds)
    _insert_smoothing(model, groups, weights, peaks, alpha)
    smoothed = dst.with_name(dst.name + ".smoothed")
    signed = dst.with_name(dst.name + ".signed")
    onnx.save(model, str(smoothed))
    quantized = [n.name for n in matmuls if n.name not in kept]
    try:
        _quantize(smoothed, signed, [n for n in quantized if not unsigned(n)], unsigned_weights=False)
        _quantize(signed, dst, [n for n in quantized if unsigned(n)], unsigned_weights=True)
    finally:
        smoothed.unlink(missing_ok=True)
        signed.unlink(missing_ok=True)
    return kept


def _quantize(src: Path, dst: Path, nodes: list[str], unsigned_weights: bool) -> None:
    """Dynamic int8 with per-channel weights for `nodes` only (an empty list quantizes nothing)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if not nodes:
        dst.write_bytes(src.read_bytes())
        return
    # signed weights within [-64, 64] (reduce_range): a pair of u8 x s8 products stays below 2**15
    kind = {"weight_type": QuantType.QUInt8} if unsigned_weights else {"weight_type": QuantType.QInt8,
                                                                      "reduce_range": True}
    with quiet_root_calls("onnxruntime/quantization"):  # one warning per skipped node, expected
        quantize_dynamic(str(src), str(dst), per_channel=True, nodes_to_quantize=nodes, **kind)


def _activation_peaks(src: Path, names: list[str], feeds: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """max |x| per channel of each named tensor over the calibration feeds (one text per feed)."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(src))
    outputs = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names if n not in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every tensor named
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    peaks: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(names, session.run(names, feed)):
            channel_max = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            peaks[name] = np.maximum(peaks.get(name, channel_max), channel_max)
    return peaks


def _insert_smoothing(model: Any, groups: dict[str, list[Any]], weights: dict[str, Any],
                      peaks: dict[str, np.ndarray], alpha: float) -> None:
    from onnx import helper, numpy_helper

    muls = {}
    for tensor, nodes in groups.items():
        arrays = [numpy_helper.to_array(weights[n.input[1]]) for n in nodes]  # (K, N) each
        weight_peak = np.max([np.abs(w).max(axis=1) for w in arrays], axis=0)  # (K,)
        scale = (np.maximum(peaks[tensor], 1e-5) ** alpha / np.maximum(weight_peak, 1e-5) ** (1 - alpha))
        scale = scale.astype(np.float32)
        for node, array in zip(nodes, arrays):
            weights[node.input[1]].CopyFrom(numpy_helper.from_array(array * scale[:, None], node.input[1]))
            node.input[0] = tensor + "_smoothed"
        inverse = tensor + "_smooth_inverse"
        model.graph.initializer.append(numpy_helper.from_array(1.0 / scale, inverse))
        muls[tensor] = helper.make_node("Mul", [tensor, inverse], [tensor + "_smoothed"], name=tensor + "_smooth")
    ordered = [muls[i.name] for i in model.graph.input if i.name in muls]
    for node in model.graph.node:  # each Mul right after the node that makes its input
        ordered.append(node)
        ordered.extend(muls[o] for o in node.output if o in muls)
    del model.graph.node[:]
    model.graph.node.extend(ordered)
