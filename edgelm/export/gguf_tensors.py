"""Hugging Face tensors -> GGUF tensors: names, layouts (rotary rows, Conv1D), storage types, rope_freqs.

Tensors are planned from the safetensors headers alone (names, shapes), then read and converted
one at a time while the GGUF file is written, so memory holds at most one tensor in F32.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelm.errors import UnsupportedModelError
from edgelm.export.gguf_arch import ArchSpec, Shape

ROPE_FREQS_NAME = "rope_freqs.weight"


@dataclass(frozen=True)
class TensorPlan:
    gguf_name: str
    shape: tuple[int, ...]  # torch order: (out, in) for matrices; ggml reverses it on write
    storage: str  # "f32", "f16" or "bf16"
    hf_name: str | None = None  # None for tensors edgelm computes (rope_freqs)
    file: Path | None = None
    rotary_heads: int = 0  # > 0: reorder rows for llama.cpp's rotary layout with this many heads
    transpose: bool = False  # stored [in, out] (HF Conv1D): transposed to (out, in) on the way
    offset: float = 0.0  # added to every value (Gemma's (1 + w) norms become llama.cpp's plain w)


def weight_files(source: Path) -> list[Path]:
    """The safetensors shards of a checkpoint (pickled .bin weights are refused: no pickle)."""
    from edgelm.export.hf_source import SAFETENSORS_INDEX, source_file
    from edgelm.export.hf_source import weight_files as indexed_weight_files

    if (source / SAFETENSORS_INDEX).is_file():
        return indexed_weight_files(source)  # shards confined to the folder, the index read guardedly
    files = sorted(source.glob("*.safetensors"))
    if files:
        return [source_file(source, f.name, "weight file") for f in files]
    if any(source.glob("*.bin")) or any(source.glob("*.pth")):
        raise UnsupportedModelError(
            f"{source}: only safetensors weights are read (pickled .bin/.pth files can run code)")
    raise UnsupportedModelError(f"{source}: no *.safetensors weights found")


def plan_tensors(source: Path, spec: ArchSpec, shape: Shape, float_type: str) -> list[TensorPlan]:
    """Every GGUF tensor to write, in order, from the safetensors headers (no data read)."""
    import gguf
    from safetensors import safe_open

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[spec.model_arch], shape.n_layers)
    plans = []
    for file in weight_files(source):
        with safe_open(file, framework="pt") as handle:
            for hf_name in handle.keys():
                name = hf_name.removeprefix(spec.strip_prefix) if spec.strip_prefix else hf_name
                if name.endswith(spec.skipped) or (spec.skipped_prefixes and name.startswith(spec.skipped_prefixes)):
                    continue
                gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
                if gguf_name is None:
                    raise UnsupportedModelError(f"{file.name}: tensor {hf_name!r} has no GGUF name for {spec.name}")
                dims = tuple(handle.get_slice(hf_name).get_shape())
                transpose = len(dims) == 2 and gguf_name.split(".")[-2] in spec.conv1d
                dims = dims[::-1] if transpose else dims
                rotary = _rotary_heads(gguf_name, shape) if spec.rotary_interleave else 0
                offset = spec.norm_offset if gguf_name.endswith("_norm.weight") else 0.0
                plans.append(TensorPlan(gguf_name, dims, _storage(gguf_name, dims, float_type),
                                        hf_name, file, rotary, transpose, offset))
    _check_complete(plans, spec, shape)
    return plans


# matrices llama.cpp adds to F32 activations directly (BERT's token-type row): its CPU add has no
# F32 + F16 kernel and aborts the process, so these stay F32 in every file
ALWAYS_F32 = ("token_types.weight",)


def _storage(gguf_name: str, dims: tuple[int, ...], float_type: str) -> str:
    # llama.cpp reads norms and other 1-D tensors as F32; only matrices take the chosen type
    matrix = len(dims) == 2 and not gguf_name.endswith("_norm.weight") and gguf_name not in ALWAYS_F32
    return float_type if matrix else "f32"


def _rotary_heads(gguf_name: str, shape: Shape) -> int:
    if ".attn_q." in gguf_name:
        return shape.n_heads
    if ".attn_k." in gguf_name:
        return shape.n_kv_heads  # grouped-query attention: k has only the KV heads
    return 0


def _check_complete(plans: list[TensorPlan], spec: ArchSpec, shape: Shape) -> None:
    have = {p.gguf_name for p in plans}
    needed = list(spec.top_tensors)
    for layer in range(shape.n_layers):
        needed += [f"blk.{layer}.{part}" for part in spec.layer_tensors]
    missing = [n for n in needed if n not in have]
    if missing:
        raise UnsupportedModelError(f"checkpoint lacks {len(missing)} {spec.name} tensor(s), e.g. {missing[0]}")
    embd = next(p for p in plans if p.gguf_name == "token_embd.weight")
    if embd.shape != (shape.vocab_size, shape.hidden):
        raise UnsupportedModelError(
            f"embedding shape {embd.shape} does not match config.json ({shape.vocab_size}, {shape.hidden})")


def interleave_rotary_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF keeps each head's rotary pairs as two halves; llama.cpp wants each pair adjacent.

    Per head, new row 2i = old row i and new row 2i+1 = old row i + head_dim/2.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    # (H, 2, half, ...) -> (H, half, 2, ...): the two halves interleave row by row
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def rope_freqs_plan(config: dict, shape: Shape) -> TensorPlan | None:
    """llama3 rope scaling has no metadata keys in llama.cpp: it reads per-frequency factors."""
    scaling = config.get("rope_scaling") or {}
    if (scaling.get("rope_type") or scaling.get("type")) != "llama3":
        return None
    return TensorPlan(ROPE_FREQS_NAME, (shape.head_dim // 2,), "f32")


def rope_freqs(config: dict, shape: Shape) -> np.ndarray:
    """(head_dim/2,) F32: how much each rotary frequency is divided by under llama3 scaling."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_config = LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})
    plain, _ = ROPE_INIT_FUNCTIONS["default"](hf_config, "cpu")  # (head_dim/2,)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_config, "cpu")
    return (plain.double() / scaled.double()).float().numpy()


def converted(plan: TensorPlan, config: dict, shape: Shape) -> np.ndarray:
    """The data of one tensor as the GGUF file stores it (F32, F16, or BF16 bits as bytes)."""
    import gguf
    import torch
    from safetensors import safe_open

    if plan.hf_name is None:
        data = rope_freqs(config, shape)
    else:
        with safe_open(plan.file, framework="pt") as handle:
            data = handle.get_tensor(plan.hf_name).to(torch.float32).numpy()
    if plan.transpose:
        data = data.T
    if plan.rotary_heads:
        data = interleave_rotary_rows(data, plan.rotary_heads)
    if plan.offset:
        data = data + np.float32(plan.offset)
    if plan.storage == "f16":
        return data.astype(np.float16)
    if plan.storage == "bf16":
        return gguf.quants.quantize(np.ascontiguousarray(data), gguf.GGMLQuantizationType.BF16)
    return np.ascontiguousarray(data, dtype=np.float32)


def stream_converted(plans: list[TensorPlan], config: dict, shape: Shape) -> Iterator[np.ndarray]:
    for plan in plans:
        yield converted(plan, config, shape)


def nbytes(plan: TensorPlan) -> int:
    return int(np.prod(plan.shape)) * (4 if plan.storage == "f32" else 2)
