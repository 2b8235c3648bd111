"""One spec per llama.cpp architecture edgelm converts to: what it accepts, its keys, its tensors.

A spec says which Hugging Face checkpoints it takes (and refuses, in one line, what llama.cpp's
graph for it would compute differently), how config.json maps to its shape, which metadata keys
it writes, which tensors must be present, and how tensors are laid out (GPT-2's Conv1D weights
transposed, LLaMA's rotary rows interleaved). The generic converter in gguf.py does the rest.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edgelm.errors import UnsupportedModelError, first_line

# what reading a config.json value of the wrong type or form raises (int("x"), set([{}]), a list's .get)
CONFIG_VALUE_ERRORS = (TypeError, ValueError, KeyError, AttributeError, OverflowError)


@dataclass(frozen=True)
class Shape:
    """The facts of config.json the converter needs, with each architecture's defaults filled in."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    hidden: int
    head_dim: int
    vocab_size: int
    ffn: int  # feed-forward width
    context: int  # positions the model was trained for (llama.cpp's context_length)


@dataclass(frozen=True)
class ArchSpec:
    name: str  # llama.cpp's general.architecture
    family: str  # edgelm family (edgelm/families.py) whose GGUF export this is
    model_arch: str  # gguf.MODEL_ARCH member for the tensor name map
    architectures: tuple[str, ...]  # Hugging Face classes accepted
    shape: Callable[[dict], Shape]
    check: Callable[[Path, dict], None]  # raises UnsupportedModelError for what is not implemented
    write_keys: Callable[[object, dict, Shape], None]  # architecture keys into a GGUFWriter
    top_tensors: tuple[str, ...]  # required GGUF tensors outside the blocks
    layer_tensors: tuple[str, ...]  # required per block, "blk.N." + part
    skipped: tuple[str, ...] = ()  # Hugging Face name suffixes not written (recomputed buffers)
    skipped_prefixes: tuple[str, ...] = ()  # heads that stay out of the file (BERT's MLM, pooler)
    strip_prefix: str = ""  # the head class's prefix ("bert.") dropped before the name lookup
    conv1d: tuple[str, ...] = ()  # block parts stored [in, out] by HF Conv1D: transposed
    rotary_interleave: bool = False  # LLaMA's rotary layout: q/k rows reordered per head
    ggml_gelu: bool = False  # GELU MLP: llama.cpp's GELU rounds through an F16 table (gguf_validate.py)
    tokenizers: tuple[str, ...] = ("spm", "bpe")  # tokenizer kinds (gguf_tokenizer.py) its export takes
    norm_offset: float = 0.0  # added to every RMSNorm weight: Gemma's norms scale by (1 + w)


@contextmanager
def config_values(source: Path, arch: str) -> Iterator[None]:
    """Reading config.json's values for `arch`: a value of the wrong type or form is one line, not a traceback.

    config.json comes from a stranger; the shape, the checks and the keys all read it this way.
    """
    try:
        yield
    except CONFIG_VALUE_ERRORS as err:
        raise UnsupportedModelError(f"{source / 'config.json'}: a {arch} field has the wrong type or form "
                                    f"({first_line(err)})") from None


MAX_CONFIG_INT = (1 << 31) - 1  # llama.cpp keeps sizes and positions in int32
MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS
LAYER_KEYS = ("num_hidden_layers", "n_layer")


def _int(config: dict, *keys: str, default: int | None = None) -> int:
    """A count from config.json: a positive integer (not a string, float or bool) within what
    llama.cpp holds; a layer count at most MAX_LAYERS, so nothing loops or allocates per layer
    for a billion of them."""
    for key in keys:
        value = config.get(key)
        if value is None:
            continue
        most = MAX_LAYERS if key in LAYER_KEYS else MAX_CONFIG_INT
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
            raise UnsupportedModelError(f"config.json {key} must be an integer in [1, {most}], got {value!r:.40}")
        return value
    if default is None:
        raise UnsupportedModelError(f"config.json lacks {keys[0]}")
    return default


def _rope_kind(config: dict) -> str | None:
    scaling = config.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type")
    return None if kind == "default" else kind


def _refuse_archs(source: Path, config: dict, accepted: tuple[str, ...], what: str) -> None:
    archs = config.get("architectures") or [accepted[0]]
    if not set(archs) & set(accepted):
        raise UnsupportedModelError(f"{source}: architecture {archs[0]} is not {what}")


def _refuse_activation(source: Path, config: dict, key: str, wanted: str, default: str) -> None:
    if config.get(key, default) != wanted:
        raise UnsupportedModelError(f"{source}: {key} {config.get(key)!r}; llama.cpp's graph for it uses {wanted}")


# ---- LLaMA / Mistral -------------------------------------------------------------------------

def _llama_like_shape(config: dict) -> Shape:
    heads, hidden = _int(config, "num_attention_heads"), _int(config, "hidden_size")
    context = _int(config, "max_position_embeddings", default=2048)
    window = config.get("sliding_window")
    # llama.cpp's LLaMA/Phi-3 graphs have no sliding window: beyond it the results would differ
    if config.get("model_type") in ("mistral", "phi3") and window:
        context = min(context, int(window))
    return Shape(
        n_layers=_int(config, "num_hidden_layers"), n_heads=heads,
        n_kv_heads=_int(config, "num_key_value_heads", default=heads), hidden=hidden,
        head_dim=_int(config, "head_dim", default=hidden // heads), vocab_size=_int(config, "vocab_size"),
        ffn=_int(config, "intermediate_size"), context=context,
    )


def _check_llama(source: Path, config: dict) -> None:
    _refuse_archs(source, config, ("LlamaForCausalLM", "MistralForCausalLM"), "a LLaMA causal LM")
    _refuse_activation(source, config, "hidden_act", "silu", "silu")
    if config.get("mlp_bias"):
        raise UnsupportedModelError(f"{source}: MLP biases are not part of llama.cpp's LLaMA graph")
    if _rope_kind(config) not in (None, "linear", "llama3"):
        raise UnsupportedModelError(
            f"{source}: rope scaling {_rope_kind(config)!r} is not converted (linear and llama3 are)")


def _decoder_keys(writer, config: dict, shape: Shape) -> None:
    """Keys every decoder here shares."""
    writer.add_context_length(shape.context)
    writer.add_embedding_length(shape.hidden)
    writer.add_block_count(shape.n_layers)
    writer.add_feed_forward_length(shape.ffn)
    writer.add_head_count(shape.n_heads)


def _rms_rope_keys(writer, config: dict, shape: Shape) -> None:
    """Keys of the RMSNorm + rotary decoders (LLaMA, Qwen2, Phi-3)."""
    _decoder_keys(writer, config, shape)
    writer.add_head_count_kv(shape.n_kv_heads)
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))


def _llama_keys(writer, config: dict, shape: Shape) -> None:
    import gguf

    _rms_rope_keys(writer, config, shape)
    _head_dim_keys(writer, shape)
    writer.add_vocab_size(shape.vocab_size)
    if _rope_kind(config) == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config["rope_scaling"]["factor"]))


LLAMA_BLOCK = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down")

LLAMA = ArchSpec(
    name="llama", family="llama", model_arch="LLAMA", architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    shape=_llama_like_shape, check=_check_llama, write_keys=_llama_keys,
    top_tensors=("token_embd.weight", "output_norm.weight"),
    layer_tensors=tuple(f"{p}.weight" for p in LLAMA_BLOCK),
    skipped=("rotary_emb.inv_freq",), rotary_interleave=True,
)


# ---- GPT-2 -----------------------------------------------------------------------------------

def _gpt2_shape(config: dict) -> Shape:
    hidden, heads = _int(config, "n_embd", "hidden_size"), _int(config, "n_head", "num_attention_heads")
    return Shape(
        n_layers=_int(config, "n_layer", "num_hidden_layers"), n_heads=heads, n_kv_heads=heads,
        hidden=hidden, head_dim=hidden // heads, vocab_size=_int(config, "vocab_size"),
        ffn=_int(config, "n_inner", default=4 * hidden),  # n_inner null means 4x the width
        context=_int(config, "n_positions", "n_ctx", default=1024),
    )


def _check_gpt2(source: Path, config: dict) -> None:
    _refuse_archs(source, config, ("GPT2LMHeadModel",), "a GPT-2 causal LM (GPT2LMHeadModel)")
    # llama.cpp's GELU is the tanh approximation, which is GPT-2's own "gelu_new"
    _refuse_activation(source, config, "activation_function", "gelu_new", "gelu_new")
    if config.get("scale_attn_by_inverse_layer_idx") or config.get("add_cross_attention"):
        raise UnsupportedModelError(f"{source}: per-layer attention scaling and cross-attention are not in "
                                    "llama.cpp's GPT-2 graph")
    if config.get("scale_attn_weights") is False:
        raise UnsupportedModelError(f"{source}: unscaled attention is not in llama.cpp's GPT-2 graph")


def _gpt2_keys(writer, config: dict, shape: Shape) -> None:
    _decoder_keys(writer, config, shape)
    writer.add_layer_norm_eps(float(config.get("layer_norm_epsilon", 1e-5)))


GPT2_BLOCK = ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")

GPT2 = ArchSpec(
    name="gpt2", family="gpt2", model_arch="GPT2", architectures=("GPT2LMHeadModel",),
    shape=_gpt2_shape, check=_check_gpt2, write_keys=_gpt2_keys,
    top_tensors=("token_embd.weight", "position_embd.weight", "output_norm.weight", "output_norm.bias"),
    layer_tensors=tuple(f"{p}.{w}" for p in GPT2_BLOCK for w in ("weight", "bias")),
    skipped=(".attn.bias", ".attn.masked_bias"),  # causal-mask buffers of older checkpoints
    conv1d=("attn_qkv", "attn_output", "ffn_up", "ffn_down"), ggml_gelu=True,
)


# ---- Qwen2 / Qwen2.5 and Phi-3 (NEOX rotary: no row reordering) ------------------------------

def _refuse_rope_scaling(source: Path, config: dict, example: str) -> None:
    """A file that loads but rotates positions differently from torch would answer wrong: refuse."""
    if _rope_kind(config) is not None:
        raise UnsupportedModelError(f"{source}: rope scaling {_rope_kind(config)!r} is not converted for "
                                    f"{config.get('model_type')} ({example}); only unscaled rope is")


def _check_qwen2(source: Path, config: dict) -> None:
    _refuse_archs(source, config, ("Qwen2ForCausalLM",), "a Qwen2 causal LM (Qwen2ForCausalLM)")
    _refuse_activation(source, config, "hidden_act", "silu", "silu")
    _refuse_rope_scaling(source, config, "e.g. YaRN for long contexts")
    if config.get("use_sliding_window"):
        raise UnsupportedModelError(f"{source}: use_sliding_window is on; llama.cpp has no sliding window for Qwen2")


def _check_phi3(source: Path, config: dict) -> None:
    _refuse_archs(source, config, ("Phi3ForCausalLM",), "a Phi-3 causal LM (Phi3ForCausalLM)")
    _refuse_activation(source, config, "hidden_act", "silu", "silu")
    _refuse_rope_scaling(source, config, "e.g. longrope of the 128k models")


def _phi3_keys(writer, config: dict, shape: Shape) -> None:
    _rms_rope_keys(writer, config, shape)
    # Phi-3 may rotate only part of each head (partial_rotary_factor)
    writer.add_rope_dimension_count(int(shape.head_dim * float(config.get("partial_rotary_factor") or 1.0)))


QWEN2 = ArchSpec(
    name="qwen2", family="qwen2", model_arch="QWEN2", architectures=("Qwen2ForCausalLM",),
    shape=_llama_like_shape, check=_check_qwen2, write_keys=_rms_rope_keys,
    top_tensors=("token_embd.weight", "output_norm.weight"),
    layer_tensors=(*(f"{p}.weight" for p in LLAMA_BLOCK), "attn_q.bias", "attn_k.bias", "attn_v.bias"),
    skipped=("rotary_emb.inv_freq",),
)

PHI3_BLOCK = ("attn_norm", "attn_qkv", "attn_output", "ffn_norm", "ffn_up", "ffn_down")

PHI3 = ArchSpec(
    # fused qkv_proj stays attn_qkv (q|k|v rows), fused gate_up_proj is llama.cpp's ffn_up of
    # 2 x intermediate rows (gate first, as Phi-3 splits it); llama.cpp splits both itself
    name="phi3", family="phi3", model_arch="PHI3", architectures=("Phi3ForCausalLM",),
    shape=_llama_like_shape, check=_check_phi3, write_keys=_phi3_keys,
    top_tensors=("token_embd.weight", "output_norm.weight"),
    layer_tensors=tuple(f"{p}.weight" for p in PHI3_BLOCK),
    skipped=("rotary_emb.inv_freq",),
)


# ---- Qwen3 (per-head q/k RMSNorm, NEOX rotary) and Gemma 3 text -----------------------------

def _check_qwen3(source: Path, config: dict) -> None:
    _refuse_archs(source, config, ("Qwen3ForCausalLM",), "a Qwen3 causal LM (Qwen3ForCausalLM)")
    _refuse_activation(source, config, "hidden_act", "silu", "silu")
    _refuse_rope_scaling(source, config, "e.g. YaRN for long contexts")
    if config.get("use_sliding_window"):
        raise UnsupportedModelError(f"{source}: use_sliding_window is on; llama.cpp has no sliding window for Qwen3")
    if config.get("attention_bias"):
        raise UnsupportedModelError(f"{source}: attention biases are not part of llama.cpp's Qwen3 graph")


def _head_dim_keys(writer, shape: Shape) -> None:
    """Key and value lengths where a head is not hidden / heads wide (Qwen3, Gemma 3)."""
    writer.add_rope_dimension_count(shape.head_dim)
    if shape.head_dim != shape.hidden // shape.n_heads:
        writer.add_key_length(shape.head_dim)
        writer.add_value_length(shape.head_dim)


def _qwen3_keys(writer, config: dict, shape: Shape) -> None:
    _rms_rope_keys(writer, config, shape)
    _head_dim_keys(writer, shape)


QK_NORMS = ("attn_q_norm", "attn_k_norm")

QWEN3 = ArchSpec(
    name="qwen3", family="qwen3", model_arch="QWEN3", architectures=("Qwen3ForCausalLM",),
    shape=_llama_like_shape, check=_check_qwen3, write_keys=_qwen3_keys,
    top_tensors=("token_embd.weight", "output_norm.weight"),
    layer_tensors=tuple(f"{p}.weight" for p in (*LLAMA_BLOCK, *QK_NORMS)),
    skipped=("rotary_emb.inv_freq",),
)


def gemma3_sliding_layers(config: dict) -> list[bool]:
    """Which layers attend within the sliding window: config.json's layer_types, else Gemma 3's 5-in-6."""
    layers = _int(config, "num_hidden_layers")
    if not config.get("sliding_window"):
        return [False] * layers
    types = config.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        return [t == "sliding_attention" for t in types]
    pattern = _int(config, "sliding_window_pattern", "_sliding_window_pattern", default=6)
    return [(i + 1) % pattern != 0 for i in range(layers)]


def _check_gemma3(source: Path, config: dict) -> None:
    _refuse_archs(source, config, ("Gemma3ForCausalLM",), "a Gemma 3 text model (Gemma3ForCausalLM)")
    _refuse_activation(source, config, "hidden_activation", "gelu_pytorch_tanh", "gelu_pytorch_tanh")
    shape = _llama_like_shape(config)
    # llama.cpp scales queries by 1/sqrt(head_dim) (1/sqrt(hidden/heads) for the 27B): the scalar must agree
    if int(config.get("query_pre_attn_scalar") or shape.head_dim) != shape.head_dim:
        raise UnsupportedModelError(f"{source}: query_pre_attn_scalar {config.get('query_pre_attn_scalar')} is not "
                                    f"head_dim {shape.head_dim}; llama.cpp's Gemma 3 graph scales by head_dim")
    for key in ("attn_logit_softcapping", "use_bidirectional_attention", "attention_bias"):
        if config.get(key):
            raise UnsupportedModelError(f"{source}: {key} is set; llama.cpp's Gemma 3 text graph has none")
    if _rope_kind(config) not in (None, "linear"):
        raise UnsupportedModelError(f"{source}: rope scaling {_rope_kind(config)!r} is not converted for Gemma 3 "
                                    "(linear is)")
    if config.get("sliding_window") is not None:
        _int(config, "sliding_window")  # a window of zero or fewer tokens is no window llama.cpp can run
    types = config.get("layer_types")
    if isinstance(types, list) and set(types) - {"sliding_attention", "full_attention"}:
        raise UnsupportedModelError(f"{source}: layer_types other than sliding_attention/full_attention")


def _gemma3_keys(writer, config: dict, shape: Shape) -> None:
    import gguf

    _rms_rope_keys(writer, config, shape)
    _head_dim_keys(writer, shape)
    sliding = gemma3_sliding_layers(config)
    if any(sliding):  # llama.cpp: a window on the layers marked true, local rope base there
        writer.add_sliding_window(_int(config, "sliding_window"))
        writer.add_sliding_window_pattern(sliding)
        writer.add_rope_freq_base_swa(float(config.get("rope_local_base_freq", 10000.0)))
    if config.get("final_logit_softcapping"):
        writer.add_final_logit_softcapping(float(config["final_logit_softcapping"]))
    if _rope_kind(config) == "linear":  # the global layers only, as in transformers
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config["rope_scaling"]["factor"]))


GEMMA3_BLOCK = (*LLAMA_BLOCK, *QK_NORMS, "post_attention_norm", "post_ffw_norm")

GEMMA3 = ArchSpec(
    # the embedding scale sqrt(hidden) is llama.cpp's own (its graph multiplies), as is GELU-tanh;
    # the norms are (1 + w) in transformers and plain w in llama.cpp: 1 is added on the way
    name="gemma3", family="gemma3", model_arch="GEMMA3", architectures=("Gemma3ForCausalLM",),
    shape=_llama_like_shape, check=_check_gemma3, write_keys=_gemma3_keys,
    top_tensors=("token_embd.weight", "output_norm.weight"),
    layer_tensors=tuple(f"{p}.weight" for p in GEMMA3_BLOCK),
    skipped=("rotary_emb.inv_freq", "rotary_emb_local.inv_freq"), ggml_gelu=True, norm_offset=1.0,
)


# ---- BERT (embeddings) ------------------------------------------------------------------------

def _bert_shape(config: dict) -> Shape:
    heads, hidden = _int(config, "num_attention_heads"), _int(config, "hidden_size")
    return Shape(
        n_layers=_int(config, "num_hidden_layers"), n_heads=heads, n_kv_heads=heads, hidden=hidden,
        head_dim=hidden // heads, vocab_size=_int(config, "vocab_size"), ffn=_int(config, "intermediate_size"),
        context=_int(config, "max_position_embeddings", default=512),
    )


def _check_bert(source: Path, config: dict) -> None:
    archs = config.get("architectures") or ["BertModel"]
    if not all(str(a).startswith("Bert") for a in archs):
        raise UnsupportedModelError(f"{source}: architecture {archs[0]} is not a BERT encoder")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise UnsupportedModelError(f"{source}: position_embedding_type {config['position_embedding_type']!r}; "
                                    "llama.cpp's BERT graph has absolute positions")
    if config.get("hidden_act", "gelu") not in ("gelu", "gelu_new"):
        raise UnsupportedModelError(f"{source}: hidden_act {config.get('hidden_act')!r}; llama.cpp's BERT uses GELU")


def _bert_keys(writer, config: dict, shape: Shape) -> None:
    _decoder_keys(writer, config, shape)
    writer.add_layer_norm_eps(float(config.get("layer_norm_eps", 1e-12)))
    writer.add_causal_attention(False)
    writer.add_token_type_count(_int(config, "type_vocab_size", default=2))


BERT_BLOCK = ("attn_q", "attn_k", "attn_v", "attn_output", "attn_output_norm", "ffn_up", "ffn_down",
              "layer_output_norm")

BERT = ArchSpec(
    name="bert", family="bert", model_arch="BERT", architectures=("BertModel",),
    shape=_bert_shape, check=_check_bert, write_keys=_bert_keys,
    top_tensors=("token_embd.weight", "token_types.weight", "position_embd.weight",
                 "token_embd_norm.weight", "token_embd_norm.bias"),
    layer_tensors=tuple(f"{p}.{w}" for p in BERT_BLOCK for w in ("weight", "bias")),
    skipped=("position_ids",), skipped_prefixes=("pooler.", "cls.", "classifier."), strip_prefix="bert.",
    ggml_gelu=True, tokenizers=("wordpiece",),
)


ARCHS = {spec.name: spec for spec in (LLAMA, GPT2, QWEN2, PHI3, QWEN3, GEMMA3, BERT)}
MODEL_TYPES = {"llama": LLAMA, "mistral": LLAMA, "gpt2": GPT2, "qwen2": QWEN2, "phi3": PHI3, "qwen3": QWEN3,
               "gemma3_text": GEMMA3, "bert": BERT}


def arch_for_config(source: Path, config: dict) -> ArchSpec:
    """The spec for a source's config.json, checked: unsupported options are refused here."""
    model_type = config.get("model_type")
    spec = MODEL_TYPES.get(model_type) if isinstance(model_type, str) else None
    if spec is None:
        raise UnsupportedModelError(f"{source}: model_type {config.get('model_type')!r} has no GGUF converter")
    with config_values(source, spec.name):
        spec.check(source, config)
    return spec
