"""Resource limits and clean-ups: one regression test per class, each with a concrete hostile input.

Chat templates that loop or grow without bound, thread counts a backend would crash or stall on,
a context that does not fit in memory, export options reused across families, pickled weights,
library code touching the root logger, and `edgelm train --out` over a folder it does not own.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time

import pytest

from edgelm.errors import ArtifactError, InputError, UnsupportedModelError, UsageError
from edgelm.runtime.chat.template import render_chat
from edgelm.runtime.device import RuntimeOptions, thread_count

MESSAGES = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def rendering_stops(template: str, fragment: str, seconds: float = 3.0) -> None:
    started = time.monotonic()
    with pytest.raises(ArtifactError, match=fragment) as caught:
        render_chat(template, MESSAGES)
    assert time.monotonic() - started < seconds
    assert "\n" not in str(caught.value)


# -- chat templates: time and size ------------------------------------------------------------
def test_a_template_that_loops_forever_stops_within_about_a_second():
    endless = ("{% for i in range(100000) %}{% for j in range(100000) %}{% for k in range(100000) %}"
               "{% endfor %}{% endfor %}{% endfor %}")
    rendering_stops(endless, "ran longer than 1 s")


@pytest.mark.parametrize("template", [
    "{% for i in range(100000) %}{{ 'x' * 999 }}{% endfor %}",  # output grows past the limit
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% set a = 'x' * 600000 %}{% set b = a + a %}",
    "{% set block %}{% for i in range(100000) %}{{ 'y' * 100 }}{% endfor %}{% endset %}",
    "{{ 'x' * 10**9 }}",
    "{{ 'x'|center(10**9) }}",
    "{{ 'x'.ljust(10**9) }}",
    "{{ '%0999999999d' % 1 }}",
    "{{ '{:>999999999}'.format(1) }}",
    "{{ range(100000)|join('y' * 9000) }}",
    "{{ ('x' * 100000).replace('x', 'y' * 1000) }}",
    "{{ (((10**64)**64)**64)**64 }}",
    "{% set l = ['x' * 999999] %}{{ (l * 1000)|string }}",
    "{% set l = ['x' * 500000, 'y'] %}{% set m = [l, l, l, l] %}{{ m|string }}",  # nesting counts too
    "{{ ('\n' * 1000)|indent(100000) }}",
    "{{ ('ab' * 1000)|wordwrap(1, wrapstring='z' * 1000) }}",
])
def test_a_template_that_grows_without_bound_is_stopped_before_it_allocates(template):
    rendering_stops(template, "stopped")


@pytest.mark.parametrize("template, fragment", [
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursed too deeply"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ messages.__class__.__mro__ }}", "unsafe"),
    ("{{ messages[0].content.__init__.__globals__ }}", "unsafe"),
])
def test_sandbox_errors_become_one_line(template, fragment):
    with pytest.raises(ArtifactError, match=fragment) as caught:
        render_chat(template, MESSAGES)
    assert "\n" not in str(caught.value)


def test_real_templates_still_render_under_the_guards():
    template = ("{% set ns = namespace(sys='') %}{% for m in messages %}{% if m.role == 'system' %}"
                "{% set ns.sys = m.content %}{% endif %}{% endfor %}{{ bos_token }}"
                "{% for m in messages %}{{ '<|' ~ m['role'] ~ '|>\n' + m['content'] | trim }}"
                "{% if not loop.last %}\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}{{ ns.sys | length }}")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(template)
    expected = plain.render(messages=MESSAGES, bos_token="<s>", add_generation_prompt=True)
    assert render_chat(template, MESSAGES, bos_token="<s>") == expected == "<s><|user|>\nhi<|assistant|>\nhello<|assistant|>0"


def test_the_output_limit_grows_with_the_conversation():
    long = [{"role": "user", "content": "word " * 300_000}]  # 1.5M characters, over the base limit
    assert len(render_chat("{{ messages[0].content }}", long)) == 1_500_000


def test_a_long_conversation_passed_around_in_a_loop_stays_fast():
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message {i}"} for i in range(3000)]
    template = "{% for m in messages %}{{ m['content'] }}{% if loop.index0 < messages|length - 1 %},{% endif %}{% endfor %}"
    started = time.monotonic()
    assert render_chat(template, long).count(",") == 2999
    assert time.monotonic() - started < 1  # each size check of `messages` walks it once per render


def test_budgets_are_per_render_and_per_thread():
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    results = {}

    def fast_render():
        time.sleep(0.2)  # starts while the slow render is spending its budget
        results["fast"] = render_chat("{{ messages[0].content }}", MESSAGES)

    helper = threading.Thread(target=fast_render)
    helper.start()
    with pytest.raises(ArtifactError, match="ran longer"):
        render_chat(slow, MESSAGES)
    helper.join()
    assert results["fast"] == "hi"


def test_messages_with_undecodable_bytes_are_refused():
    with pytest.raises(InputError, match="message 0 \\(user\\) is not valid UTF-8"):
        render_chat("{{ messages[0].content }}", [{"role": "user", "content": "bad \udcff byte"}])


# -- threads ----------------------------------------------------------------------------------
@pytest.mark.parametrize("threads", [-1, 0, 10_000, True, 2.5, "4"])
def test_thread_counts_are_bounded_by_the_machine(threads):
    with pytest.raises(UsageError, match="threads must be"):
        RuntimeOptions(threads=threads)
    with pytest.raises(UsageError, match="threads must be"):
        thread_count(threads)


def test_bad_thread_counts_are_refused_by_both_backends(lstm_artifact, tmp_path):
    from test_llama_runtime import write_tiny_gguf

    from edgelm.runtime import load

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    for path in (lstm_artifact, gguf):
        for threads in (-1, 10_000):
            with pytest.raises(UsageError, match="threads must be between 1 and"):
                load(path, threads=threads)


# -- memory preflight -------------------------------------------------------------------------
def test_a_context_that_does_not_fit_in_memory_is_refused_before_llama_cpp(tmp_path, monkeypatch):
    from test_llama_runtime import write_tiny_gguf

    from edgelm.runtime import load
    from edgelm.runtime.gguf.metadata import read_gguf_header
    from edgelm.runtime.llamacpp import memory

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf", context=4096)
    header = read_gguf_header(gguf)
    need = memory.estimate_need(header, gguf.stat().st_size, 4096)
    # 2 layers x 4096 positions x 2 KV heads x (16 + 16) per head x 2 bytes (F16)
    assert need.kv_cache == 2 * 4096 * 2 * 32 * 2 and need.weights == gguf.stat().st_size
    monkeypatch.setattr(memory, "available_memory", lambda: need.total - 1)
    with pytest.raises(ArtifactError, match=r"needs about .* GiB .*KV cache.* smaller --n-ctx"):
        load(gguf, threads=1)
    monkeypatch.setattr(memory, "available_memory", lambda: need.total + 1)
    with load(gguf, threads=1) as model:  # fits exactly: loads
        assert model.decoder.context_length == 4096
    monkeypatch.setattr(memory, "available_memory", lambda: None)  # unknown (not Linux, no psutil)
    with load(gguf, threads=1, n_ctx=64) as model:
        assert model.decoder.context_length == 64


def test_available_memory_is_read_on_this_machine():
    from edgelm.runtime.llamacpp.memory import available_memory

    available = available_memory()
    assert available is None or available > 0


# -- export options, pickled weights, logging -------------------------------------------------
def test_one_options_object_serves_two_families(lstm_model, tmp_path):
    import edgelm
    from edgelm.export.options import ExportOptions
    from llama_fixtures import build_tiny_llama

    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    options = ExportOptions(validate=False)
    onnx = edgelm.export(lstm_model, tmp_path / "lstm", options)
    assert (onnx.format, onnx.quant) == ("onnx", "none")
    assert options.format is None and options.quant is None  # the caller's object is untouched
    llama = build_tiny_llama(tmp_path / "llama", hidden=64, layers=1, heads=2, kv_heads=1, vocab=300)
    gguf = edgelm.export(llama, tmp_path / "llama-gguf", options)
    assert gguf.format == "gguf" and options.format is None
    edgelm.export(lstm_model, tmp_path / "lstm-int8", ExportOptions(quant="int8", validate=False))
    assert root.level == level and root.handlers == handlers  # no library sets the app's root logger


_WEIGHT_ONLY_IN_A_FRESH_PROCESS = """
import logging, sys
from pathlib import Path
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from edgelm.export.onnx_quantize import WeightOnly, quantize_weight_only

weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32), "w")
graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 64])], [weight])
onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), sys.argv[1])
quantize_weight_only(Path(sys.argv[1]), Path(sys.argv[2]), WeightOnly(bits=8))
root = logging.getLogger()
print(len(root.handlers), root.level)
"""


def test_weight_only_quantization_leaves_a_fresh_root_logger_alone(tmp_path):
    # onnxruntime's MatMulNBits quantizer calls logging.basicConfig(level=INFO) when imported
    result = subprocess.run([sys.executable, "-c", _WEIGHT_ONLY_IN_A_FRESH_PROCESS, str(tmp_path / "f.onnx"),
                             str(tmp_path / "q.onnx")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", str(logging.WARNING)]
    assert (tmp_path / "q.onnx").stat().st_size > 0


def test_pickled_bert_weights_are_refused_in_one_line(tmp_path):
    import edgelm

    folder = tmp_path / "bert"
    folder.mkdir()
    config = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 8, "hidden_size": 4,
              "num_hidden_layers": 1, "num_attention_heads": 1, "max_position_embeddings": 16}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\na\nb\nc\n")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02pickled, never unpickled")
    with pytest.raises(UnsupportedModelError, match="pytorch_model.bin") as caught:
        edgelm.export(folder, tmp_path / "out")
    assert "safetensors" in str(caught.value) and not (tmp_path / "out").exists()


# -- train --out ------------------------------------------------------------------------------
def test_train_refuses_a_folder_it_does_not_own(lstm_model, tmp_path):
    import shutil

    from edgelm.models.train import check_output_folder

    foreign = tmp_path / "someone-elses-model"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"model_type": "gpt2"}')
    (foreign / "model.safetensors").write_bytes(b"their weights")
    with pytest.raises(UsageError, match="not a model edgelm trained.*--force"):
        check_output_folder(foreign)
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="'notes.txt'.*--force"):
        check_output_folder(foreign)
    check_output_folder(foreign, force=True)
    assert (foreign / "model.safetensors").read_bytes() == b"their weights"
    previous = shutil.copytree(lstm_model, tmp_path / "previous")
    check_output_folder(previous)  # a previous training output may be trained over
    check_output_folder(tmp_path / "new")
    with pytest.raises(UsageError, match="is a file"):
        check_output_folder(foreign / "notes.txt")
