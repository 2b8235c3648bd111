"""`edgelm demo --out DIR`: every family end to end, everything under DIR, one closing table."""

from __future__ import annotations

from click.testing import CliRunner

from edgelm.artifact import read_manifest
from edgelm.cli import main

ARTIFACTS = {"rnn-int8": ("rnn", "onnx", "int8"), "lstm-int8": ("lstm", "onnx", "int8"),
             "gpt2-int8": ("gpt2", "onnx", "int8"), "gpt2-q8_0": ("gpt2", "gguf", "q8_0"),
             "llama-q4_k_m": ("llama", "gguf", "q4_k_m"), "bert-fill-mask-none": ("bert", "onnx", "none")}


def test_quick_demo_writes_every_artifact_under_out_and_prints_the_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--quick"])
    assert result.exit_code == 0, result.output
    for name, (family, fmt, quant) in ARTIFACTS.items():
        manifest = read_manifest(out / name)
        assert (manifest.family, manifest.format, manifest.quant) == (family, fmt, quant)
        assert manifest.validation and not manifest.validation_skipped
    for family in ("rnn", "lstm", "gpt2", "llama", "bert"):
        assert (out / f"{family}-model" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]
    table = result.output[result.output.index("family  format"):].splitlines()
    assert len(table) == 2 + len(ARTIFACTS)  # header, rule, one row per artifact
    assert all("MB" in row for row in table[2:]) and "tok/s" in table[2]
