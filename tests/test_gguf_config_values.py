"""A config.json value of the wrong type or form, in any field a GGUF architecture reads, is refused in
one line (UnsupportedModelError), never a TypeError/ValueError/KeyError traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgelm.errors import UnsupportedModelError
from edgelm.export.gguf import _shape, write_arch_keys
from edgelm.export.gguf_arch import MODEL_TYPES, arch_for_config

gguf = pytest.importorskip("gguf")

SOURCE = Path("/nonexistent/source")
COMMON = {"num_hidden_layers": 7, "num_attention_heads": 2, "num_key_value_heads": 1, "hidden_size": 64,
          "head_dim": 32, "vocab_size": 100, "intermediate_size": 128, "max_position_embeddings": 128}
VALID = {
    "llama": {**COMMON, "architectures": ["LlamaForCausalLM"]},
    "qwen2": {**COMMON, "architectures": ["Qwen2ForCausalLM"]},
    "qwen3": {**COMMON, "architectures": ["Qwen3ForCausalLM"]},
    "phi3": {**COMMON, "architectures": ["Phi3ForCausalLM"], "partial_rotary_factor": 0.5},
    "gemma3_text": {**COMMON, "architectures": ["Gemma3ForCausalLM"], "hidden_activation": "gelu_pytorch_tanh",
                    "sliding_window": 8, "query_pre_attn_scalar": 32, "rope_local_base_freq": 10000.0,
                    "final_logit_softcapping": 30.0, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
    "gpt2": {"architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_head": 2, "n_layer": 2, "vocab_size": 100},
}
# every field some architecture reads, and values of each wrong kind JSON can hold
FIELDS = sorted({*COMMON, "architectures", "hidden_act", "hidden_activation", "sliding_window", "layer_types",
                 "sliding_window_pattern", "query_pre_attn_scalar", "rope_local_base_freq",
                 "final_logit_softcapping", "rope_scaling", "rope_theta", "rms_norm_eps", "partial_rotary_factor",
                 "attention_bias", "use_sliding_window", "n_embd", "n_head", "n_layer", "layer_norm_epsilon"})
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=3), max_leaves=6)


def convert_keys(config: dict) -> None:
    """What export_gguf reads from config.json before any tensor: the spec, its checks, shape and keys."""
    spec = arch_for_config(SOURCE, config)
    shape = _shape(SOURCE, spec, config)
    write_arch_keys(gguf.GGUFWriter(None, spec.name), SOURCE, spec, config, shape)


@pytest.mark.parametrize("model_type", sorted(VALID))
def test_valid_configs_convert(model_type):
    convert_keys({"model_type": model_type, **VALID[model_type]})


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(VALID)), st.lists(st.tuples(st.sampled_from(FIELDS), JSON_VALUES), min_size=1,
                                                max_size=3))
def test_any_wrong_value_is_one_line(model_type, changes):
    config = {"model_type": model_type, **VALID[model_type], **dict(changes)}
    try:
        convert_keys(config)
    except UnsupportedModelError as err:
        assert "\n" not in str(err) and len(str(err)) < 600


def test_a_hashable_model_type_is_required():
    with pytest.raises(UnsupportedModelError, match="has no GGUF converter"):
        arch_for_config(SOURCE, {"model_type": ["gemma3_text"]})
    assert "bert" in MODEL_TYPES  # BERT reads the same guard (gguf_bert.py)


@pytest.mark.parametrize("model_type", ["llama", "gemma3_text", "gpt2"])
@pytest.mark.parametrize("layers", [0, -1, 513, 10**9, 2.5, "7", True])
def test_a_layer_count_outside_what_llama_cpp_holds_is_one_line(model_type, layers):
    config = dict(VALID[model_type], model_type=model_type)
    config["n_layer" if model_type == "gpt2" else "num_hidden_layers"] = layers
    with pytest.raises(UnsupportedModelError, match="must be an integer in"):
        convert_keys(config)


@pytest.mark.parametrize("window", [0, -8])
def test_a_sliding_window_of_no_tokens_is_refused(window):
    with pytest.raises(UnsupportedModelError, match="sliding_window must be an integer"):
        convert_keys(dict(VALID["gemma3_text"], model_type="gemma3_text", sliding_window=window))
