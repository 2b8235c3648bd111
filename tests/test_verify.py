"""`edgelm verify`: every family's reference set passes on fresh exports, and fails on a swapped model
file or an altered reference (both with the manifest re-hashed, so only the numbers can tell)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import edgelm
from conftest import export_to
from edgelm.artifact import MANIFEST_NAME, sha256_of
from edgelm.cli import main
from edgelm.errors import ArtifactError
from edgelm.reference.store import REFERENCE_NAME


def rehash(folder: Path) -> None:
    """Make the manifest list every file's current size and sha256, as a careful forger would."""
    path = folder / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"size": (folder / name).stat().st_size, "sha256": sha256_of(folder / name)}
    path.write_text(json.dumps(manifest))


def copy_artifact(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def alter_reference(folder: Path, name: str, change) -> None:
    with np.load(folder / REFERENCE_NAME, allow_pickle=False) as data:
        arrays = {key: data[key] for key in data.files}
    arrays[name] = change(arrays[name])
    np.savez(folder / REFERENCE_NAME, **arrays)
    rehash(folder)


def verify_cli(*args: str):
    return CliRunner().invoke(main, ["verify", *map(str, args)])


# -- tiny artifacts of every family and format not already built by conftest.py -------------------
@pytest.fixture(scope="module")
def tiny_bert_artifacts(tmp_path_factory) -> dict[str, Path]:
    from test_bert import write_tiny_bert

    root = tmp_path_factory.mktemp("verify-bert")
    return {
        "bert-embed": export_to(write_tiny_bert(root / "base", "base"), root / "art-embed"),
        "bert-mlm-int8": export_to(write_tiny_bert(root / "mlm", "mlm"), root / "art-mlm-int8", quant="int8"),
        "bert-cls": export_to(write_tiny_bert(root / "cls", "classify"), root / "art-cls"),
        "bert-gguf": export_to(root / "base", root / "art-embed-gguf", format="gguf", quant="f32"),
    }


@pytest.fixture(scope="module")
def qwen2_sources(tmp_path_factory) -> tuple[Path, Path]:
    from gguf_fixtures import build_tiny_qwen2

    root = tmp_path_factory.mktemp("verify-qwen2")
    return build_tiny_qwen2(root / "seed0", seed=0), build_tiny_qwen2(root / "seed1", seed=1)


@pytest.fixture(scope="module")
def gguf_artifacts(qwen2_sources, gpt2_source, tmp_path_factory) -> dict[str, Path]:
    from gguf_fixtures import build_tiny_phi3

    from llama_fixtures import build_tiny_llama

    root = tmp_path_factory.mktemp("verify-gguf")
    return {
        "qwen2-f32": export_to(qwen2_sources[0], root / "qwen2-f32", quant="f32"),
        "qwen2-q8_0": export_to(qwen2_sources[0], root / "qwen2-q8", quant="q8_0"),
        "phi3-f16": export_to(build_tiny_phi3(root / "phi3" / "source"), root / "phi3-f16", quant="f16"),
        "llama-f32": export_to(build_tiny_llama(root / "llama" / "source"), root / "llama-f32", quant="f32"),
        "gpt2-gguf-f32": export_to(gpt2_source, root / "gpt2-f32", format="gguf", quant="f32"),
    }


ONNX = ["lstm_artifact", "lstm_int8_artifact", "gpt2_fp32", "gpt2_int8"]


@pytest.mark.parametrize("fixture", ONNX)
def test_verify_passes_on_fresh_onnx_exports(request, fixture):
    folder = request.getfixturevalue(fixture)
    result = edgelm.verify(folder, threads=1)
    assert result.passed, [c.describe() for c in result.checks]
    assert any(c.threshold is not None for c in result.checks)  # something is bounded, not only reported
    assert result.machine["threads"] == 1 and "isa" in result.machine
    assert result.export_machine is not None and result.export_machine["cpu"] == result.machine["cpu"]
    # the numbers are validation's own: same names, same bounds
    recorded = {c["name"]: c["threshold"] for c in json.loads((folder / MANIFEST_NAME).read_text())["validation"]}
    assert all(recorded.get(c.name, c.threshold) == c.threshold for c in result.checks)


def test_verify_passes_on_every_bert_task_and_gguf(tiny_bert_artifacts):
    for name, folder in tiny_bert_artifacts.items():
        result = edgelm.verify(folder)
        assert result.passed, (name, [c.describe() for c in result.checks])
        names = {c.name for c in result.checks}
        assert "min_cosine_vs_torch" in names
        assert ("top1_agreement_vs_torch" in names) == (name in ("bert-mlm-int8", "bert-cls"))


def test_verify_passes_on_every_gguf_decoder(gguf_artifacts):
    for name, folder in gguf_artifacts.items():
        result = edgelm.verify(folder)
        assert result.passed, (name, [c.describe() for c in result.checks])
        assert any(c.threshold is not None for c in result.checks), name


def test_cli_prints_every_check_and_both_machines(lstm_int8_artifact):
    result = verify_cli(lstm_int8_artifact)
    assert result.exit_code == 0, result.output
    assert "held_out_perplexity_ratio_int8_vs_fp32" in result.output and "(threshold 1.02)" in result.output
    assert "this machine:" in result.output and "exported on:" in result.output
    as_json = json.loads(verify_cli(lstm_int8_artifact, "--json", "--threads", "1").stdout)
    assert as_json["passed"] is True and as_json["machine"]["threads"] == 1
    assert set(as_json) >= {"passed", "checks", "machine", "export_machine"}
    assert {"name", "value", "threshold", "passed"} <= set(as_json["checks"][0])


def test_a_swapped_onnx_model_fails(gpt2_source, gpt2_fp32, tmp_path):
    """Another valid GPT-2 of the same shape (other weights), re-hashed: only the numbers can tell."""
    import torch
    from transformers import GPT2LMHeadModel

    other = copy_artifact(gpt2_source, tmp_path / "other-source")
    model = GPT2LMHeadModel.from_pretrained(str(other))
    torch.manual_seed(1)
    model.apply(model._init_weights)
    model.save_pretrained(other)
    swapped = copy_artifact(gpt2_fp32, tmp_path / "swapped")
    export_to(other, tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.onnx", swapped / "model.onnx")
    rehash(swapped)
    result = verify_cli(swapped)
    assert result.exit_code == 1
    error = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "max_abs_logit_diff_vs_torch" in error[0], result.stderr


def test_a_swapped_gguf_model_fails(qwen2_sources, gguf_artifacts, tmp_path):
    swapped = copy_artifact(gguf_artifacts["qwen2-f32"], tmp_path / "swapped")
    export_to(qwen2_sources[1], tmp_path / "seed1", quant="f32", validate=False)
    shutil.copy(tmp_path / "seed1" / "model.gguf", swapped / "model.gguf")
    rehash(swapped)
    result = verify_cli(swapped)
    assert result.exit_code == 1 and "max_abs_logit_diff_vs_torch" in result.stderr, result.output


def test_an_altered_reference_fails(lstm_artifact, tiny_bert_artifacts, tmp_path):
    lstm = copy_artifact(lstm_artifact, tmp_path / "lstm")
    alter_reference(lstm, "logits", lambda rows: rows + np.float32(0.01))
    result = verify_cli(lstm)
    assert result.exit_code == 1
    assert "max_abs_logit_diff_vs_torch" in result.stderr and "FAIL" not in result.stderr
    assert result.stderr.count("\n") == 1
    bert = copy_artifact(tiny_bert_artifacts["bert-embed"], tmp_path / "bert")
    alter_reference(bert, "outputs", lambda rows: rows[::-1].copy())  # vectors of other probes
    result = verify_cli(bert, "--json")
    assert result.exit_code == 1 and "min_cosine_vs_torch" in result.stderr
    assert json.loads(result.stdout)["passed"] is False


def test_a_reference_without_probe_texts_is_one_line(tiny_bert_artifacts, tmp_path):
    bert = copy_artifact(tiny_bert_artifacts["bert-embed"], tmp_path / "bert")
    alter_reference(bert, "texts", lambda texts: texts[:0])  # no probe: nothing to take a minimum over
    result = verify_cli(bert)
    assert result.exit_code == 1 and "'texts' must hold 1..256 texts" in result.stderr
    assert result.stderr.count("\n") == 1


def test_an_unhashed_change_is_refused_before_any_check(lstm_artifact, tmp_path):
    lstm = copy_artifact(lstm_artifact, tmp_path / "lstm")
    with open(lstm / REFERENCE_NAME, "r+b") as handle:  # same size, different bytes
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    result = verify_cli(lstm)
    assert result.exit_code == 1 and "sha256 does not match" in result.stderr


def test_artifacts_without_a_reference_are_one_line(lstm_model, tmp_path):
    unvalidated = export_to(lstm_model, tmp_path / "unvalidated", validate=False)
    result = verify_cli(unvalidated)
    assert result.exit_code == 1 and "no reference set" in result.stderr and result.stderr.count("\n") == 1
    bare = tmp_path / "bare.gguf"
    bare.write_bytes(b"GGUF")
    result = verify_cli(bare)
    assert result.exit_code == 1 and "bare .gguf" in result.stderr
    with pytest.raises(ArtifactError, match="no reference set"):
        edgelm.verify(unvalidated)


def test_info_shows_the_export_machine(lstm_artifact):
    result = CliRunner().invoke(main, ["info", str(lstm_artifact)])
    assert "exported on:" in result.output and "reference set: reference.npz" in result.output
    manifest = json.loads(CliRunner().invoke(main, ["info", str(lstm_artifact), "--json"]).stdout)
    assert isinstance(manifest["machine"]["isa"], list) and manifest["validation_reference"] == REFERENCE_NAME


def test_verify_imports_no_training_stack(lstm_int8_artifact, gpt2_int8):
    code = f"""
import sys
import edgelm
from click.testing import CliRunner
from edgelm.cli import main
assert edgelm.verify({str(lstm_int8_artifact)!r}).passed
assert CliRunner().invoke(main, ["verify", {str(gpt2_int8)!r}]).exit_code == 0
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "optimum")))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def manifest_with(folder: Path, tmp_path: Path, change) -> Path:
    copy = copy_artifact(folder, tmp_path / "changed")
    path = copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize("change, field", [
    (lambda d: d.__setitem__("machine", "x86"), "machine must be an object"),
    (lambda d: d["machine"].__setitem__("isa", "avx2"), "machine.isa must be a list"),
    (lambda d: d["machine"].__setitem__("vnni", 1), "machine.vnni must be true or false"),
    (lambda d: d["machine"].__setitem__("threads", 0), "machine.threads must be an integer >= 1"),
    (lambda d: d["machine"].__setitem__("cpu", "x" * 10_000), "machine.cpu must be at most 200 characters"),
    (lambda d: d["machine"].__setitem__("isa", ["avx2"] * 1000), "machine.isa must list at most 64"),
    (lambda d: d.__setitem__("validation_reference", 3), "validation_reference must be a string"),
    (lambda d: d.__setitem__("validation_reference", "other.npz"), "validation_reference 'other.npz' is not among"),
])
def test_wrong_machine_or_reference_fields_name_the_field(lstm_artifact, tmp_path, change, field):
    from edgelm.artifact import read_manifest

    with pytest.raises(ArtifactError, match=field):
        read_manifest(manifest_with(lstm_artifact, tmp_path, change))


def test_manifests_from_before_the_reference_still_load(lstm_artifact, tmp_path):
    from edgelm.artifact import read_manifest

    def older(data):
        del data["machine"], data["validation_reference"], data["files"][REFERENCE_NAME]

    folder = manifest_with(lstm_artifact, tmp_path, older)
    (folder / REFERENCE_NAME).unlink()
    manifest = read_manifest(folder, verify=True)
    assert manifest.machine is None and manifest.validation_reference is None
    with edgelm.load(folder) as model:
        assert model.generate("The ", max_tokens=2, temperature=0) is not None
    with pytest.raises(ArtifactError, match="no reference set"):
        edgelm.verify(folder)


def test_machine_facts_are_plain_and_sorted():
    from edgelm.machine import machine_facts

    facts = machine_facts()
    assert facts["isa"] == sorted(facts["isa"]) and isinstance(facts["vnni"], bool)
    assert facts["threads"] >= 1 and isinstance(facts["arch"], str)
    json.dumps(facts)
