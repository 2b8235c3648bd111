"""edgelm's fused GPT-2 graph: parity with torch at every cached step, the shared KV buffer,
the context limit it enforces, weight-only int4, and the ORT-format copy for devices."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_gpt2 import PROMPTS, torch_greedy_text

from conftest import export_to
from edgelm.artifact import MANIFEST_NAME
from edgelm.errors import ArtifactError, ContextOverflowError, InputError, UsageError


def manifest_of(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_NAME).read_text())


def graph_nodes(path: Path) -> list:
    import onnx

    return list(onnx.load(str(path), load_external_data=False).graph.node)


def graph_ops(path: Path) -> set[str]:
    return {node.op_type for node in graph_nodes(path)}


def torch_logits(source: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(source).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()  # (T, vocab)


@pytest.fixture(scope="session")
def gpt2_int4_mobile(gpt2_source, tmp_path_factory) -> Path:
    return export_to(gpt2_source, tmp_path_factory.mktemp("art") / "gpt2-int4-mobile", quant="int4",
                     target="mobile")


# -- the graph ----------------------------------------------------------------------------------
def test_fp32_graph_is_fused_and_has_no_cache_concatenation(gpt2_fp32):
    model = manifest_of(gpt2_fp32)["model"]
    assert model["graph"] == "fused-gqa" and model["weight_bits"] is None
    nodes = graph_nodes(gpt2_fp32 / "model.onnx")
    assert {"GroupQueryAttention", "SkipLayerNormalization", "FastGelu"} <= {n.op_type for n in nodes}
    cache_readers = {n.op_type for n in nodes for name in n.input if name.startswith("past_key_values.")}
    assert cache_readers == {"GroupQueryAttention"}  # written in place, never concatenated
    assert model["inputs"][:5] == ["input_ids", "position_ids", "seqlens_k", "total_sequence_length",
                                   "logits_index"]


def test_every_cached_step_matches_torch(gpt2_fp32, gpt2_source):
    import edgelm

    with edgelm.load(gpt2_fp32) as model:
        ids = model.encode("Every object has an identity, a type and a value.")
        reference = torch_logits(gpt2_source, ids)
        stepped = [model.decoder.prefill(ids[:3])] + [model.decoder.step(t) for t in ids[3:]]
        scored = model.decoder.score(ids)
    np.testing.assert_allclose(np.stack(stepped), reference[2:], atol=1e-4)
    np.testing.assert_allclose(scored, reference, atol=1e-4)


def test_batch_rows_of_different_lengths_match_torch_at_every_step(gpt2_fp32, gpt2_source):
    import edgelm

    with edgelm.load(gpt2_fp32) as model:
        rows = [model.encode(p) for p in PROMPTS]
        logits = [model.decoder.prefill_batch(rows)]
        extra = np.array([[5, 9, 11], [7, 3, 2], [1, 1, 4]])  # (steps, B): tokens fed to each row
        logits += [model.decoder.step_batch(tokens) for tokens in extra]
    for b, row in enumerate(rows):
        reference = torch_logits(gpt2_source, row + extra[:, b].tolist())  # (T + 3, vocab)
        ours = np.stack([step[b] for step in logits])  # (4, vocab)
        np.testing.assert_allclose(ours, reference[len(row) - 1 :], atol=1e-4)


# -- the shared buffer -------------------------------------------------------------------------
def test_buffers_are_reused_across_generations_and_rebuilt_for_a_new_batch_size(gpt2_fp32):
    import edgelm

    with edgelm.load(gpt2_fp32) as model:
        first = model.generate(PROMPTS[0], temperature=0, max_tokens=8)
        buffers = [id(b) for b in model.decoder.buffers]
        second = model.generate(PROMPTS[1], temperature=0, max_tokens=8)
        assert [id(b) for b in model.decoder.buffers] == buffers
        again = model.generate(PROMPTS[0], temperature=0, max_tokens=8)  # stale cache contents never leak
        batch = model.generate_batch(PROMPTS[:2], temperature=0, max_tokens=8)
        assert model.decoder.buffers[0].shape() == [2, 2, 128, 32]  # (B, heads, context, head_dim)
    assert again == first and batch == [first, second]


def test_the_buffer_ends_at_the_context_length(gpt2_fp32):
    import edgelm

    with edgelm.load(gpt2_fp32) as model:
        decoder = model.decoder
        decoder.prefill(list(range(5, 125)))  # 120 of 128 positions
        for _ in range(8):
            decoder.step(7)
        assert decoder.lengths.tolist() == [128]
        with pytest.raises(ContextOverflowError, match="context length 128"):
            decoder.step(7)
        with pytest.raises(ContextOverflowError, match="context length 128"):
            model.complete("a, b, c. " * 60, max_tokens=10)
        with pytest.raises(InputError, match="at most|exceeds the context length 128"):
            decoder.prefill(list(range(129)))
        decoder.close()
        with pytest.raises(InputError, match="prefill first"):
            decoder.step(7)


# -- weight-only quantization ------------------------------------------------------------------
def test_int8_and_int4_are_weight_only_and_record_their_blocks(gpt2_int8, gpt2_int4_mobile, gpt2_fp32):
    from edgelm.families import FAMILIES

    for folder, bits, block in ((gpt2_int8, 8, 128), (gpt2_int4_mobile, 4, 32)):
        manifest = manifest_of(folder)
        bound = FAMILIES["gpt2"].spec("onnx").quant(manifest["quant"]).bound(
            f"held_out_perplexity_ratio_{manifest['quant']}_vs_fp32")  # the calibrated table's
        model = manifest["model"]
        assert (model["weight_bits"], model["block_size"], model["accuracy_level"]) == (bits, block, 4)
        assert "MatMulNBits" in graph_ops(folder / "model.onnx")
        checks = {c["name"]: c for c in manifest["validation"]}
        ratio = checks[f"held_out_perplexity_ratio_{manifest['quant']}_vs_fp32"]
        assert ratio["threshold"] == bound and ratio["value"] <= bound and manifest["validation_passed"]
        assert_embedding_stored_once(folder / "model.onnx", bits)
        assert "model.onnx_data" in manifest["files"]  # weights onnxruntime maps instead of copying
        modes = {(folder / name).stat().st_mode & 0o777 for name in ("model.onnx", "model.onnx_data")}
        assert len(modes) == 1  # as readable as the graph (onnx writes the data file owner-only)
    sizes = [sum(p.stat().st_size for p in f.glob("model.onnx*")) for f in (gpt2_int4_mobile, gpt2_int8, gpt2_fp32)]
    assert sizes == sorted(sizes)


def assert_embedding_stored_once(path: Path, bits: int) -> None:
    """The tied embedding is the head's packed blocks: no fp32 (vocab, width) table beside them."""
    import onnx

    graph = onnx.load(str(path)).graph
    gathers = [n for n in graph.node if n.op_type == "GatherBlockQuantized"]
    heads = [n for n in graph.node if n.op_type == "MatMulNBits" and n.input[1] == f"lm_head.weight_Q{bits}"]
    assert len(gathers) == 1 and len(heads) == 1 and gathers[0].input[0] == heads[0].input[1]
    assert "wte" not in {t.name for t in graph.initializer}


def tied_graph(vocab: int, width: int, untie: bool = False):
    """Gather rows of a (vocab, width) table and multiply by its transpose, as a tied GPT-2 does."""
    from onnx import TensorProto, helper, numpy_helper

    table = np.random.default_rng(0).standard_normal((vocab, width)).astype(np.float32)
    head = table.T.copy() + (1e-3 if untie else 0)
    nodes = [helper.make_node("Gather", ["wte", "ids"], ["rows"]), helper.make_node("MatMul", ["x", "head"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"]),
                        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", width])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(table, "wte"), numpy_helper.from_array(head, "head")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), table


@pytest.mark.parametrize("width, bits, block", [(256, 8, 128), (64, 8, 128), (80, 4, 32), (256, 4, 32)])
def test_tied_table_is_gathered_from_the_heads_blocks(tmp_path, width, bits, block):
    """Each gathered row is exactly the head's dequantized column, whole blocks or a zero-padded last one."""
    import onnx
    import onnxruntime as ort

    from edgelm.export.onnx_quantize import WeightOnly, quantize_weight_only

    model, table = tied_graph(300, width)
    onnx.save(model, str(tmp_path / "fp32.onnx"))
    quantize_weight_only(tmp_path / "fp32.onnx", tmp_path / "q.onnx", WeightOnly(bits, block), tied=(("wte", "head"),))
    assert "wte" not in {t.name for t in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    rows, columns = session.run(None, {"ids": np.arange(300)[None], "x": np.eye(width, dtype=np.float32)})
    assert rows.shape == (1, 300, width)
    np.testing.assert_allclose(rows[0], columns.T, atol=1e-6)  # one table, read by both kernels
    step = np.abs(table).max() / (2 ** (bits - 1) - 1)  # at most one quantization step per entry
    assert np.abs(rows[0] - table).max() <= step


def test_untied_table_keeps_its_own_gather(tmp_path):
    import onnx

    from edgelm.export.onnx_quantize import WeightOnly, quantize_weight_only

    model, _ = tied_graph(300, 256, untie=True)
    onnx.save(model, str(tmp_path / "fp32.onnx"))
    quantize_weight_only(tmp_path / "fp32.onnx", tmp_path / "q.onnx", WeightOnly(8, 128), tied=(("wte", "head"),))
    graph = onnx.load(str(tmp_path / "q.onnx")).graph
    assert "Gather" in {n.op_type for n in graph.node} and "wte" in {t.name for t in graph.initializer}


def test_int4_greedy_stays_close_to_transformers(gpt2_int4_mobile, gpt2_source):
    import edgelm

    with edgelm.load(gpt2_int4_mobile) as model:
        ours = model.generate(PROMPTS[0], temperature=0, max_tokens=6)
    assert ours[:3] == torch_greedy_text(gpt2_source, PROMPTS[0], 6)[:3]


# -- ORT format ---------------------------------------------------------------------------------
def test_ort_copy_loads_and_generates_as_the_onnx_file(gpt2_int4_mobile):
    import edgelm

    manifest = manifest_of(gpt2_int4_mobile)
    assert (manifest["model"]["ort_file"], manifest["model"]["ort_operators"]) == (
        "model.ort", "model.required_operators.config")
    assert {"model.ort", "model.required_operators.config"} <= set(manifest["files"])
    config = (gpt2_int4_mobile / "model.required_operators.config").read_text()
    assert "com.microsoft;1;" in config and "GroupQueryAttention" in config and "MatMulNBits" in config
    assert "GatherBlockQuantized" in config  # a reduced build must keep the quantized embedding's kernel
    assert "partial" not in config and "# - model.ort" in config  # no temporary paths from the export
    checks = {c["name"]: c for c in manifest["validation"]}
    assert checks["greedy_32_identical_prompts_ort_vs_onnx"]["passed"]
    with edgelm.load(gpt2_int4_mobile) as onnx_model, edgelm.load(gpt2_int4_mobile, model_format="ort") as ort_model:
        for prompt in PROMPTS:
            assert ort_model.generate(prompt, max_tokens=12, temperature=0) == onnx_model.generate(
                prompt, max_tokens=12, temperature=0)
        assert ort_model.generate_batch(PROMPTS, max_tokens=6, temperature=0.8, seed=1) == (
            onnx_model.generate_batch(PROMPTS, max_tokens=6, temperature=0.8, seed=1))


def test_ort_format_is_refused_where_it_was_not_exported(gpt2_int8, gpt2_source, tmp_path):
    import edgelm

    with pytest.raises(ArtifactError, match="no ORT-format model .*--target mobile"):
        edgelm.load(gpt2_int8, model_format="ort")
    with pytest.raises(UsageError, match="model_format must be"):
        edgelm.load(gpt2_int8, model_format="tflite")
    with pytest.raises(UsageError, match="--target mobile writes ONNX"):
        export_to(gpt2_source, tmp_path / "out", format="gguf", target="mobile")
    assert not (tmp_path / "out").exists()


def test_cli_target_mobile_writes_the_ort_copy(gpt2_source, tmp_path):
    from click.testing import CliRunner

    from edgelm.cli import main

    out = tmp_path / "mobile"
    result = CliRunner().invoke(main, ["export", str(gpt2_source), "--out", str(out), "--target", "mobile",
                                       "--no-validate"])
    assert result.exit_code == 0, result.output
    assert (out / "model.ort").is_file() and (out / "model.required_operators.config").is_file()
    refused = CliRunner().invoke(main, ["export", str(gpt2_source), "--out", str(tmp_path / "g"), "--format",
                                        "gguf", "--target", "mobile"])
    assert refused.exit_code == 2 and refused.output.startswith("error: --target mobile writes ONNX")


def test_weight_only_int4_on_optimums_graph(tmp_path):
    """A head size the fused graph cannot take keeps optimum's graph; weight-only int4 works on it too."""
    from gpt2_fixtures import make_gpt2_source

    import edgelm

    source = make_gpt2_source(tmp_path / "source", n_head=4, n_embd=48)
    art = export_to(source, tmp_path / "int4", quant="int4")
    manifest = manifest_of(art)
    assert manifest["model"]["graph"] == "optimum" and manifest["model"]["weight_bits"] == 4
    assert manifest["validation_passed"] and "MatMulNBits" in graph_ops(art / "model.onnx")
    with edgelm.load(art) as model:
        batch = model.generate_batch(PROMPTS, max_tokens=6, temperature=0)
        assert batch == [model.generate(p, max_tokens=6, temperature=0) for p in PROMPTS]
