"""`edgelm bench`: two artifacts of different formats side by side, each measured in its own process."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from conftest import export_to
from edgelm.cli import main
from edgelm.commands.bench import ROW_KEYS, verdicts

SMALL = ["--prompt-tokens", "8", "--new-tokens", "4", "--rounds", "1", "--threads", "1"]


@pytest.fixture(scope="module")
def two_formats(gpt2_source, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    onnx = export_to(gpt2_source, folder / "gpt2-onnx", validate=False)
    gguf = export_to(gpt2_source, folder / "gpt2-gguf", format="gguf", quant="q8_0", validate=False)
    return onnx, gguf


def test_bench_json_has_a_row_per_artifact_with_the_documented_keys(two_formats):
    result = CliRunner().invoke(main, ["bench", *map(str, two_formats), *SMALL, "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    assert [r["artifact"] for r in rows] == [str(p) for p in two_formats]
    assert [(r["format"], r["quant"]) for r in rows] == [("onnx", "none"), ("gguf", "q8_0")]
    for row in rows:
        assert set(ROW_KEYS) <= set(row)
        assert row["prefill_tok_s"] > 0 and row["decode_tok_s"] > 0 and 0 < row["ttft_s"] < 60
        assert row["peak_rss_bytes"] > 10 * 2**20  # a whole Python process with a backend loaded
    sizes = {r["format"]: r["size_bytes"] for r in rows}
    assert sizes["onnx"] > sizes["gguf"]  # fp32 graph against 8-bit weights


def test_bench_table_names_both_and_the_fastest(two_formats):
    result = CliRunner().invoke(main, ["bench", *map(str, two_formats), *SMALL])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["artifact", "family", "format", "quant"]
    assert any(str(two_formats[0]) in line for line in lines[1:3])
    assert any(str(two_formats[1]) in line for line in lines[1:3])
    assert any(line.startswith("fastest decode: ") for line in lines)


def test_verdict_says_by_how_much():
    rows = [{"artifact": "a", "decode_tok_s": 50.0}, {"artifact": "b", "decode_tok_s": 100.0}]
    assert verdicts(rows) == ["fastest decode: b (100.0/s), 2.00x a"]


def test_a_missing_artifact_is_one_line_before_measuring(tmp_path):
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "nope"), *SMALL])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "no such artifact" in result.output
