"""What a GGUF file's metadata must mean before llama.cpp may load it.

`gguf_file.parse_gguf_header` checks the file's structure; this checks its values, and
`read_gguf_header` (the one entry the loaders call) does both. llama.cpp
refuses most wrong values with an exception, but some end in an abort (`GGML_ASSERT`) that takes
the embedding process down: a repeated token, a layer count of 0 or above 512, an expert count
that contradicts itself, an unknown rope scaling type, a head count that leaves a head of size
0. edgelm also reads some of these values itself (context length, special token ids, the chat
template), so each key has the type llama.cpp reads it as, and the sizes the header claims are
checked against the tensors' shapes, before anything is allocated.
"""

from __future__ import annotations

import math
import mmap
from pathlib import Path

from edgelm.errors import ArtifactError
from edgelm.runtime.gguf.parser import ArrayValue, GgufHeader, MalformedGguf, parse_gguf_header

# llama.cpp's LLM_ARCH_NAMES in the llama-cpp-python build edgelm pins (a test checks each name
# is in the installed library); any other name is refused before llama.cpp is asked.
KNOWN_ARCHITECTURES = frozenset("""
clip llama llama4 deci falcon grok gpt2 gptj gptneox mpt baichuan starcoder refact bert modern-bert
nomic-bert nomic-bert-moe neo-bert jina-bert-v2 jina-bert-v3 eurobert bloom stablelm qwen qwen2 qwen2moe
qwen2vl qwen3 qwen3moe qwen3next qwen3vl qwen3vlmoe qwen35 qwen35moe qwen4exp phi2 phi3 phimoe plamo
plamo2 plamo3 codeshell orion internlm2 minicpm minicpm3 gemma gemma2 gemma3 gemma3n gemma4
gemma4-assistant gemma-embedding starcoder2 mamba mamba2 maple jamba falcon-h1 xverse command-r cohere2
cohere2moe dbrx olmo olmo2 olmoe muse-glimmer openelm arctic deepseek deepseek2 deepseek2-ocr deepseek32
deepseek4 chatglm glm4 glm4moe glm-dsa bitnet t5 t5encoder jais jais2 nemotron nemotron_h nemotron_h_moe
exaone exaone4 exaone-moe rwkv6 rwkv6qwen2 rwkv7 arwkv7 granite granitemoe granitehybrid graniteswitch
granite_swa chameleon wavtokenizer-dec plm bailingmoe bailingmoe2 bailingmoe3 dots1 dots3note arcee
afmoe laguna ernie4_5 ernie4_5-moe hunyuan-moe hunyuan-dense hunyuan_vl hy_v3 hy_v4 smollm3 gpt-oss lfm2
lfm2moe dream smallthinker llada llada-moe seed_oss grovemoe apertus minimax-01 hrm_text minimax-m2
minimax-m3 cogvlm rnd1 pangu-embedded mistral3 eagle3 dflash mistral4 paddleocr mimo2 step35 spark2_5
llama-embed maincoder kimi-linear kimi-k3 glm5-next talkie mellum nanbeige qwen3tts pockettts
""".split())

MAX_LAYERS = 512  # LLAMA_MAX_LAYERS
MAX_EXPERTS = 1024  # LLAMA_MAX_EXPERTS
MAX_CONTEXT = (1 << 31) - 1  # positions are int32 in llama.cpp
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")
TOKENIZER_MODELS = ("llama", "gpt2")  # SentencePiece and byte-level BPE: what edgelm's text generators use
ENCODER_TOKENIZERS = {"bert": "bert"}  # architecture -> the tokenizer its embedder runs (WordPiece)

# "<arch>." keys llama.cpp reads, and the one type it reads each as
ARCH_KEY_TYPES = {
    "context_length": "uint32", "embedding_length": "uint32", "block_count": "uint32",
    "vocab_size": "uint32", "expert_count": "uint32", "expert_group_count": "uint32",
    "expert_group_used_count": "uint32", "nextn_predict_layers": "uint32",
    "rope.dimension_count": "uint32", "attention.key_length": "uint32", "attention.value_length": "uint32",
    "attention.layer_norm_rms_epsilon": "float32", "attention.layer_norm_epsilon": "float32",
    "rope.freq_base": "float32", "rope.scaling.factor": "float32", "rope.scale_linear": "float32",
    "rope.scaling.type": "string",
}
# keys that hold one value for every layer, or an array with one per layer
PER_LAYER_KEYS = ("feed_forward_length", "attention.head_count", "attention.head_count_kv", "expert_used_count")
TOKENIZER_KEY_TYPES = {
    "tokenizer.ggml.model": ("string",), "tokenizer.ggml.pre": ("string",),
    "tokenizer.ggml.tokens": ("array[string]",), "tokenizer.ggml.merges": ("array[string]",),
    "tokenizer.ggml.scores": ("array[float32]", "array[int32]"), "tokenizer.ggml.token_type": ("array[int32]",),
    "tokenizer.ggml.add_bos_token": ("bool",), "tokenizer.ggml.add_eos_token": ("bool",),
    "tokenizer.chat_template": ("string",), "general.architecture": ("string",), "general.file_type": ("uint32",),
}
TOKEN_ID_KEYS = ("bos", "eos", "eot", "eom", "unknown", "seperator", "padding", "cls", "mask",
                 "fim_pre", "fim_suf", "fim_mid", "fim_pad", "fim_rep", "fim_sep", "prefix", "suffix", "middle")


def check_model_metadata(header: GgufHeader) -> None:
    """Refuse (MalformedGguf) metadata llama.cpp would abort on, or that edgelm cannot use."""
    arch = header.get("general.architecture")
    _check_types(header, arch if isinstance(arch, str) else None)
    if arch is not None and arch not in KNOWN_ARCHITECTURES:
        raise MalformedGguf(f"general.architecture {arch[:40]!r} is not an architecture llama.cpp knows")
    n_vocab = _check_vocabulary(header)
    _check_tensor_types(header)
    if arch is not None:
        _check_hyperparameters(header, arch)
        _check_against_tensors(header, arch, n_vocab)


def _check_types(header: GgufHeader, arch: str | None) -> None:
    expected = {key: types for key, types in TOKENIZER_KEY_TYPES.items()}
    expected.update({f"tokenizer.ggml.{name}_token_id": ("uint32",) for name in TOKEN_ID_KEYS})
    if arch is not None:
        expected.update({f"{arch}.{key}": (kind,) for key, kind in ARCH_KEY_TYPES.items()})
        expected.update({f"{arch}.{key}": ("uint32", "array[uint32]", "array[int32]") for key in PER_LAYER_KEYS})
    for key, types in expected.items():
        found = header.types.get(key)
        if found is not None and found not in types:
            raise MalformedGguf(f"{key} is a {found}, llama.cpp reads it as a {' or '.join(types)}")


def _check_vocabulary(header: GgufHeader) -> int | None:
    """The number of tokens, and every special id inside it."""
    model = header.get("tokenizer.ggml.model")
    if model is not None and model not in TOKENIZER_MODELS and model != ENCODER_TOKENIZERS.get(
            header.get("general.architecture")):
        # llama.cpp's other tokenizers (bert, t5, rwkv, ...) abort on a vocabulary they do not expect
        raise MalformedGguf(f"tokenizer.ggml.model {model[:40]!r} is not a text-generation tokenizer edgelm runs "
                            f"({', '.join(TOKENIZER_MODELS)})")
    tokens = header.get("tokenizer.ggml.tokens")
    if tokens is None:
        return None
    n_vocab = tokens.length
    if n_vocab < 1 or n_vocab > MAX_CONTEXT:
        raise MalformedGguf(f"tokenizer.ggml.tokens holds {n_vocab} tokens")
    if model == "llama":
        _check_byte_tokens(set(tokens.values))
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        values = header.get(key)
        if values is not None and values.length != n_vocab:
            raise MalformedGguf(f"{key} has {values.length} entries for {n_vocab} tokens")
    for name in TOKEN_ID_KEYS:
        key = f"tokenizer.ggml.{name}_token_id"
        value = header.get(key)
        if value is not None and value >= n_vocab:
            raise MalformedGguf(f"{key} is {value}, outside the vocabulary of {n_vocab} tokens")
    return n_vocab


# the bytes valid UTF-8 text can hold: 0xC0, 0xC1 and 0xF5-0xFF never appear in it
UTF8_BYTES = [b for b in range(256) if b not in (0xC0, 0xC1) and b < 0xF5]


def _check_byte_tokens(tokens: set[bytes]) -> None:
    """llama.cpp's SentencePiece tokenizer spells a character it has no piece for byte by byte,
    and looks each byte's token up unchecked: a missing one is an uncaught C++ exception (abort)."""
    for byte in UTF8_BYTES:
        if b"<0x%02X>" % byte not in tokens and (byte == 0 or bytes([byte]) not in tokens):
            raise MalformedGguf(f"the SentencePiece vocabulary has no token for byte 0x{byte:02X} (<0x{byte:02X}>)")


def _per_layer(header: GgufHeader, key: str) -> tuple[int, ...] | None:
    """The values of a per-layer key: one for all layers, or one per layer."""
    value = header.get(key)
    if value is None:
        return None
    return value.values if isinstance(value, ArrayValue) else (value,)


def _check_hyperparameters(header: GgufHeader, arch: str) -> None:
    def get(key: str):
        return header.get(f"{arch}.{key}")

    context = get("context_length")
    if context is not None and not 1 <= context <= MAX_CONTEXT:
        raise MalformedGguf(f"{arch}.context_length is {context} (1 to {MAX_CONTEXT} tokens)")
    layers = get("block_count")
    if layers is not None and not 1 <= layers <= MAX_LAYERS:
        raise MalformedGguf(f"{arch}.block_count is {layers} (1 to {MAX_LAYERS} layers)")
    for key in PER_LAYER_KEYS:
        value = header.get(f"{arch}.{key}")
        if isinstance(value, ArrayValue) and layers is not None and value.length != layers:
            raise MalformedGguf(f"{arch}.{key} has {value.length} entries for {layers} layers")
        if isinstance(value, ArrayValue) and min(value.values, default=0) < 0:  # llama.cpp reads them unsigned
            raise MalformedGguf(f"{arch}.{key} holds a negative count ({min(value.values)})")
    if layers is not None and (get("nextn_predict_layers") or 0) > layers:
        raise MalformedGguf(f"{arch}.nextn_predict_layers is more than the {layers} layers")
    for key, kind in ARCH_KEY_TYPES.items():
        value = get(key)
        # a NaN, infinite or negative epsilon or rope base turns every logit into NaN
        if kind == "float32" and value is not None and not (math.isfinite(value) and value >= 0):
            raise MalformedGguf(f"{arch}.{key} is {value}")
    scaling = get("rope.scaling.type")
    if scaling is not None and scaling not in ROPE_SCALING_TYPES:
        raise MalformedGguf(f"{arch}.rope.scaling.type {scaling[:40]!r} is not one of {', '.join(ROPE_SCALING_TYPES)}")
    _check_experts(header, arch)
    _check_heads(header, arch)


def _check_experts(header: GgufHeader, arch: str) -> None:
    experts = header.get(f"{arch}.expert_count") or 0
    used = _per_layer(header, f"{arch}.expert_used_count") or (0,)
    groups = header.get(f"{arch}.expert_group_count") or 0
    group_used = header.get(f"{arch}.expert_group_used_count") or 0
    if experts > MAX_EXPERTS:
        raise MalformedGguf(f"{arch}.expert_count is {experts} (at most {MAX_EXPERTS})")
    if max(used) > experts:
        raise MalformedGguf(f"{arch}.expert_used_count {max(used)} is more than expert_count {experts}")
    if experts and not max(used):
        raise MalformedGguf(f"{arch}.expert_count is {experts} but no expert is used")
    if not experts and groups:
        raise MalformedGguf(f"{arch}.expert_group_count is {groups} for a model without experts")
    if experts and groups >= experts:
        raise MalformedGguf(f"{arch}.expert_group_count {groups} is not below expert_count {experts}")
    if groups > 1 and (experts % groups or not 0 < group_used < groups):
        raise MalformedGguf(f"{arch}: {experts} experts cannot form {groups} groups with {group_used} used")


def _check_heads(header: GgufHeader, arch: str) -> None:
    """A head count that leaves heads of size 0 aborts llama.cpp when it lays out the weights."""
    embedding = header.get(f"{arch}.embedding_length")
    heads = _per_layer(header, f"{arch}.attention.head_count")
    kv_heads = _per_layer(header, f"{arch}.attention.head_count_kv")
    if embedding is None or not heads:
        return
    if header.get(f"{arch}.attention.key_length") is None and max(heads) > embedding:
        raise MalformedGguf(f"{arch}.attention.head_count {max(heads)} leaves heads of size 0 "
                            f"in an embedding of {embedding}")
    if arch != "llama":
        return
    # llama's graph needs one head count and one head width for keys, values and rope; the width is
    # embedding / heads unless key_length and value_length say otherwise (Mistral-Nemo: 5120 / 32 heads of 128)
    if min(heads) < 1 or len(set(heads)) != 1:
        raise MalformedGguf(f"llama.attention.head_count {min(heads)}: llama needs one count of at least 1 per layer")
    for kv in kv_heads or ():
        if kv < 1 or heads[0] % kv:
            raise MalformedGguf(f"llama.attention.head_count_kv {kv} does not divide the {heads[0]} attention heads")
    default = embedding // heads[0]
    key = header.get("llama.attention.key_length", default)
    value = header.get("llama.attention.value_length", default)
    rope = header.get("llama.rope.dimension_count", key)
    if min(key, value, rope) < 1 or not key == value == rope:
        raise MalformedGguf(f"llama heads are {key} wide for keys, {value} for values and {rope} for rope; "
                            "llama.cpp needs one width")


# ggml's integer types, F64, and the types it only uses inside a matrix product: no weight kernel takes them
NO_WEIGHT_KERNEL = ("Q8_1", "Q8_K", "I8", "I16", "I32", "I64", "F64")


def _check_tensor_types(header: GgufHeader) -> None:
    """Weights of a type llama.cpp has no kernel for abort it on the first token; norms and biases
    (1-D) are multiplied element by element, which only F32 supports (converters write them so)."""
    for tensor in header.tensors:
        if tensor.ggml_type in NO_WEIGHT_KERNEL:
            raise MalformedGguf(f"tensor {tensor.name!r} is of type {tensor.ggml_type}, "
                                "which llama.cpp cannot compute with")
        if len(tensor.shape) == 1 and tensor.ggml_type != "F32":
            raise MalformedGguf(f"tensor {tensor.name!r} is 1-D of type {tensor.ggml_type}; llama.cpp needs F32 there")
        # BERT adds a token-type row to the F32 activations directly: the CPU add has no F32 + F16 kernel
        if tensor.name == "token_types.weight" and tensor.ggml_type != "F32":
            raise MalformedGguf(f"tensor 'token_types.weight' is of type {tensor.ggml_type}; llama.cpp needs F32 there")


def _check_against_tensors(header: GgufHeader, arch: str, n_vocab: int | None) -> None:
    """The sizes the metadata claims, against the token embedding's shape (ggml: row length first)."""
    embd = header.tensor("token_embd.weight")
    if embd is None or len(embd.shape) != 2:
        return
    width, rows = embd.shape
    if n_vocab is not None and rows != n_vocab:
        raise MalformedGguf(f"token_embd.weight has {rows} rows for a vocabulary of {n_vocab} tokens")
    vocab_size = header.get(f"{arch}.vocab_size")
    if vocab_size is not None and vocab_size != rows:
        raise MalformedGguf(f"{arch}.vocab_size is {vocab_size}, but token_embd.weight has {rows} rows")
    embedding = header.get(f"{arch}.embedding_length")
    if embedding is not None and embedding != width:
        raise MalformedGguf(f"{arch}.embedding_length is {embedding}, but token_embd.weight rows are {width} wide")


def read_gguf_header(path: str | Path) -> GgufHeader:
    """Check a GGUF file from its header to the end of its last tensor, and what its metadata
    means to llama.cpp; ArtifactError if bad."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = path.stat().st_size
            if size == 0:
                raise ArtifactError(f"{path}: not a valid GGUF file (the file is empty)")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
                header = parse_gguf_header(view, size)
        check_model_metadata(header)
        return header
    except MalformedGguf as err:
        raise ArtifactError(f"{path}: not a valid GGUF file ({err})") from None
    except OSError as err:
        raise ArtifactError(f"{path}: cannot read the file ({err.strerror or err})") from None
