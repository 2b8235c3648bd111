"""A GPT-2 decoder graph built for decoding, written node by node from the checkpoint's weights.

Unlike optimum's decoder-with-past graph (which concatenates the cache every step), this graph
uses onnxruntime's fused kernels:

- `GroupQueryAttention` (com.microsoft) with the key/value cache preallocated to a fixed length:
  past and present are the same buffer, so the runtime binds one OrtValue per cache tensor to both
  and the kernel writes each new position in place. Each row's length is `seqlens_k[b] + 1`
  (its tokens so far, the new ones included), so rows of a batch advance independently;
  prompts are right-padded.
- `SkipLayerNormalization` for every residual add + LayerNorm pair, `FastGelu` (GPT-2's tanh
  GELU) with the MLP bias folded in.
- Logits only for the rows asked for: `logits_index` (B, K) indexes the flattened (B*S) hidden
  states, so a decoding step computes one row per sequence and teacher forcing can ask for all.

Graph I/O (the names the manifest records, `cache_length` is fixed by the runtime's buffers):
  input_ids, position_ids (B, S) int64; seqlens_k (B,) int32; total_sequence_length () int32;
  logits_index (B, K) int64; past_key_values.{i}.key/value (B, heads, cache_length, head_dim)
  -> logits (B, K, vocab); present.{i}.key/value (same buffers as the pasts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

GRAPH_KIND = "fused-gqa"  # recorded as model.graph; optimum's graph is "optimum"
OPSET = 18
EXTERNAL_DATA_BYTES = 1_800_000_000  # protobuf caps a file at 2 GB; larger graphs keep weights outside
ACTIVATIONS = {"gelu_new": "FastGelu", "gelu_pytorch_tanh": "FastGelu", "gelu_fast": "FastGelu"}
HEAD_DIM_MULTIPLE = 8  # onnxruntime's CPU GroupQueryAttention kernel refuses other head sizes
# a quantized graph's separate head is the embedding transposed when the checkpoint ties them (GPT-2
# does): the quantizer then lets the embedding gather read the head's packed blocks (onnx_quantize.py)
TIED_TABLES = (("wte", "lm_head.weight"),)


@dataclass(frozen=True)
class Gpt2Geometry:
    layers: int
    heads: int
    width: int
    inner: int
    vocab: int
    positions: int
    epsilon: float
    attention_scale: tuple[float, ...]  # per layer: 1/sqrt(head_dim), or what the config asks

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


def unsupported_reason(config: dict[str, Any]) -> str | None:
    """Why this checkpoint cannot use the fused graph (None: it can)."""
    heads, width = config["n_head"], config["n_embd"]
    if (width // heads) % HEAD_DIM_MULTIPLE:
        return f"head_dim {width // heads} is not a multiple of {HEAD_DIM_MULTIPLE} (GroupQueryAttention's CPU kernel)"
    activation = config.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        return f"activation_function {activation!r} has no fused kernel here"
    if config.get("reorder_and_upcast_attn"):
        return "reorder_and_upcast_attn changes the attention arithmetic"
    return None


def geometry(config: dict[str, Any]) -> Gpt2Geometry:
    layers, heads, width = config["n_layer"], config["n_head"], config["n_embd"]
    base = 1.0 / np.sqrt(width // heads) if config.get("scale_attn_weights", True) else 1.0
    scales = tuple(
        float(base / (i + 1) if config.get("scale_attn_by_inverse_layer_idx") else base) for i in range(layers)
    )
    return Gpt2Geometry(layers, heads, width, config.get("n_inner") or 4 * width, config["vocab_size"],
                        config["n_positions"], float(config.get("layer_norm_epsilon", 1e-5)), scales)


def io_names(layers: int) -> dict[str, tuple[str, ...]]:
    pasts = tuple(f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value"))
    presents = tuple(f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value"))
    inputs = ("input_ids", "position_ids", "seqlens_k", "total_sequence_length", "logits_index", *pasts)
    return {"inputs": inputs, "outputs": ("logits", *presents), "past_names": pasts, "present_names": presents}


def load_weights(files: list[Path]) -> dict[str, np.ndarray]:
    """Every tensor as fp32 numpy, names without the `transformer.` prefix (both layouts exist)."""
    from safetensors.torch import load_file

    weights: dict[str, np.ndarray] = {}
    for path in files:
        for name, tensor in load_file(str(path)).items():
            weights[name.removeprefix("transformer.")] = tensor.float().numpy()
    return weights


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[Any] = []
        self.initializers: list[Any] = []

    def weight(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array, np.float32), name))
        return name

    def const(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], ms: bool = False, **attrs: Any) -> list[str]:
        from onnx import helper

        domain = "com.microsoft" if ms else ""
        name = f"{op}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, outputs, name=name, domain=domain, **attrs))
        return outputs


def build_graph(config: dict[str, Any], weights: dict[str, np.ndarray], separate_head: bool) -> Any:
    """The decoding graph as an onnx ModelProto.

    separate_head: the lm_head gets its own (C, vocab) MatMul weight, which weight-only
    quantization can pack; otherwise it reads the embedding through Gemm(transB), sharing it.
    """
    from onnx import TensorProto, helper

    geo = geometry(config)
    b = _Builder()
    w = weights
    eps = geo.epsilon
    b.weight("wte", w["wte.weight"])
    b.weight("wpe", w["wpe.weight"])
    b.node("Gather", ["wte", "input_ids"], ["tok"])
    b.node("Gather", ["wpe", "position_ids"], ["pos"])
    residual, skip = "tok", "pos"  # the first SkipLayerNormalization adds token and position embeddings
    bias: list[str] = []
    for i in range(geo.layers):
        p = f"h.{i}."
        ln1 = [b.weight(p + "ln_1.weight", w[p + "ln_1.weight"]), b.weight(p + "ln_1.bias", w[p + "ln_1.bias"])]
        h, _, _, x = b.node("SkipLayerNormalization", [residual, skip, *ln1, *bias],
                            [f"{p}ln1", "", "", f"{p}x_attn"], ms=True, epsilon=eps)
        qkv = b.node("MatMul", [h, b.weight(p + "attn.c_attn.weight", w[p + "attn.c_attn.weight"])], [p + "qkv_mm"])
        qkv = b.node("Add", [*qkv, b.weight(p + "attn.c_attn.bias", w[p + "attn.c_attn.bias"])], [p + "qkv"])
        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        attn = b.node("GroupQueryAttention",
                      [*qkv, "", "", past_k, past_v, "seqlens_k", "total_sequence_length"],
                      [p + "attn", f"present.{i}.key", f"present.{i}.value"], ms=True,
                      num_heads=geo.heads, kv_num_heads=geo.heads, scale=geo.attention_scale[i])[:1]
        out = b.node("MatMul", [*attn, b.weight(p + "attn.c_proj.weight", w[p + "attn.c_proj.weight"])],
                     [p + "attn_out"])
        ln2 = [b.weight(p + "ln_2.weight", w[p + "ln_2.weight"]), b.weight(p + "ln_2.bias", w[p + "ln_2.bias"])]
        h2, _, _, x2 = b.node("SkipLayerNormalization",
                              [*out, x, *ln2, b.weight(p + "attn.c_proj.bias", w[p + "attn.c_proj.bias"])],
                              [f"{p}ln2", "", "", f"{p}x_mlp"], ms=True, epsilon=eps)
        fc = b.node("MatMul", [h2, b.weight(p + "mlp.c_fc.weight", w[p + "mlp.c_fc.weight"])], [p + "fc_mm"])
        act = ACTIVATIONS[config.get("activation_function", "gelu_new")]
        fc = b.node(act, [*fc, b.weight(p + "mlp.c_fc.bias", w[p + "mlp.c_fc.bias"])], [p + "fc"], ms=True)
        proj = b.node("MatMul", [*fc, b.weight(p + "mlp.c_proj.weight", w[p + "mlp.c_proj.weight"])],
                      [p + "mlp_out"])
        residual, skip, bias = proj[0], x2, [b.weight(p + "mlp.c_proj.bias", w[p + "mlp.c_proj.bias"])]
    lnf = [b.weight("ln_f.weight", w["ln_f.weight"]), b.weight("ln_f.bias", w["ln_f.bias"])]
    b.node("SkipLayerNormalization", [residual, skip, *lnf, *bias], ["final"], ms=True, epsilon=eps)
    _head(b, geo, w, separate_head)
    return _model(b, geo, helper, TensorProto)


def _head(b: _Builder, geo: Gpt2Geometry, w: dict[str, np.ndarray], separate_head: bool) -> None:
    """Only the hidden rows named by logits_index reach the (C x vocab) head."""
    b.node("Reshape", ["final", b.const("flat_shape", np.array([-1, geo.width], np.int64))], ["final_flat"])
    b.node("Gather", ["final_flat", "logits_index"], ["picked"])  # (B, K, C)
    if separate_head:
        head = w.get("lm_head.weight", w["wte.weight"])  # GPT-2 ties it to the embedding
        b.node("MatMul", ["picked", b.weight("lm_head.weight", head.T)], ["logits"])
        return
    if "lm_head.weight" in w and not np.array_equal(w["lm_head.weight"], w["wte.weight"]):
        b.weight("lm_head.weight", w["lm_head.weight"])
        table = "lm_head.weight"
    else:
        table = "wte"
    b.node("Reshape", ["picked", b.const("rows_shape", np.array([-1, geo.width], np.int64))], ["picked_flat"])
    b.node("Gemm", ["picked_flat", table], ["logits_flat"], transB=1)
    b.node("Shape", ["logits_index"], ["index_shape"])
    b.node("Concat", ["index_shape", b.const("vocab_dim", np.array([geo.vocab], np.int64))], ["logits_shape"], axis=0)
    b.node("Reshape", ["logits_flat", "logits_shape"], ["logits"])


def _model(b: _Builder, geo: Gpt2Geometry, helper: Any, tp: Any) -> Any:
    cache = ["batch", geo.heads, "cache_length", geo.head_dim]
    names = io_names(geo.layers)
    inputs = [
        helper.make_tensor_value_info("input_ids", tp.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("position_ids", tp.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("seqlens_k", tp.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", tp.INT32, []),
        helper.make_tensor_value_info("logits_index", tp.INT64, ["batch", "rows"]),
        *(helper.make_tensor_value_info(n, tp.FLOAT, cache) for n in names["past_names"]),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", tp.FLOAT, ["batch", "rows", geo.vocab]),
        *(helper.make_tensor_value_info(n, tp.FLOAT, cache) for n in names["present_names"]),
    ]
    graph = helper.make_graph(b.nodes, "gpt2_decoder", inputs, outputs, b.initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="edgelm")


def save_graph(model: Any, path: Path) -> None:
    """One file, or graph + `<name>_data` when the weights pass protobuf's 2 GB limit."""
    import onnx

    large = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(path), save_as_external_data=large, all_tensors_to_one_file=True,
                    location=path.name + "_data")
