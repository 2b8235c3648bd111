"""`edgelm demo --out DIR`: every family end to end, everything under DIR, one closing table."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from edgelm.artifact import read_manifest
from edgelm.cli import main

ARTIFACTS = {"rnn-int8": ("rnn", "onnx", "int8"), "lstm-int8": ("lstm", "onnx", "int8"),
             "gpt2-int8": ("gpt2", "onnx", "int8"), "gpt2-q8_0": ("gpt2", "gguf", "q8_0"),
             "llama-q4_k_m": ("llama", "gguf", "q4_k_m"), "bert-fill-mask-none": ("bert", "onnx", "none")}
# what the demo's timed generation runs in: the child generate() starts, and whether it loaded torch
CHILD = ("import runpy, sys; sys.argv = ['demo', *sys.argv[1:]]; "
         "runpy.run_module('edgelm.commands.demo', run_name='__main__'); "
         "print(sorted(m for m in ('torch', 'transformers', 'optimum') if m in sys.modules))")


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    home = tmp_path_factory.mktemp("demo-cwd")
    out = home / "demo"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(home)  # nothing may land in the working directory
        result = CliRunner().invoke(main, ["demo", "--out", str(out), "--quick"])
    return home, out, result


def test_quick_demo_writes_every_artifact_under_out_and_prints_the_table(quick_demo):
    home, out, result = quick_demo
    assert result.exit_code == 0, result.output
    for name, (family, fmt, quant) in ARTIFACTS.items():
        manifest = read_manifest(out / name)
        assert (manifest.family, manifest.format, manifest.quant) == (family, fmt, quant)
        assert manifest.validation and not manifest.validation_skipped
    for family in ("rnn", "lstm", "gpt2", "llama", "bert"):
        assert (out / f"{family}-model" / "config.json").is_file()
    assert sorted(p.name for p in home.iterdir()) == ["demo"]
    table_text, verified = result.output[result.output.index("family  format"):].split("\nedgelm verify")
    table = [line for line in table_text.strip().splitlines() if not line.startswith("* ")]  # busy note
    assert len(table) == 2 + len(ARTIFACTS)  # header, rule, one row per artifact
    # the demo ends by verifying every artifact it made, each in a fresh process
    assert sorted(line.split()[1].rstrip(":") for line in verified.splitlines() if line.startswith("  ok ")) \
        == sorted(ARTIFACTS)
    assert all("MB" in row for row in table[2:]) and "tok/s" in table[2]
    assert result.output.count("tokens/s, a fresh process") == 5  # every printed speed: rnn, lstm, gpt2 x2, llama


@pytest.mark.parametrize("name, kind", [("gpt2-int8", "text"), ("llama-q4_k_m", "chat")])
def test_timed_generation_runs_in_a_process_without_torch(quick_demo, name, kind):
    """The speeds the demo prints come from a process that has only the runtime, as a user's has."""
    _, out, _ = quick_demo
    done = subprocess.run([sys.executable, "-c", CHILD, str(out / name), kind], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    row, loaded = done.stdout.strip().splitlines()[-2:]
    assert loaded == "[]"
    row = json.loads(row)
    assert row["completion_tokens"] >= 1 and row["seconds"] > 0 and isinstance(row["text"], str)


@pytest.mark.parametrize("seconds, waited, cell", [(1.0, 0.01, "10 tok/s"), (1.0, 0.5, "10 tok/s*"),
                                                     (1.0, None, "10 tok/s"), (0.01, 0.005, "1000 tok/s")])
def test_a_speed_measured_while_the_cpus_were_busy_is_marked(monkeypatch, tmp_path, seconds, waited, cell):
    """A wait is marked when it is a large share of the run and more than scheduler jitter."""
    from edgelm.commands import demo

    child = {"text": "the return", "completion_tokens": 10, "seconds": seconds, "cpu_wait_seconds": waited}
    monkeypatch.setattr(demo, "_run_child", lambda artifact, chat: child)
    assert demo.generate(tmp_path, chat=True)[0] == cell


def test_cpu_wait_is_read_from_the_scheduler():
    from edgelm.commands.demo import cpu_wait_seconds

    waited = cpu_wait_seconds()
    assert waited is None or waited >= 0


def test_the_closing_verify_fails_the_demo_on_a_broken_artifact(quick_demo, tmp_path, capsys):
    import shutil

    from edgelm.commands.demo import verify_all
    from edgelm.errors import VerificationError

    _, out, _ = quick_demo
    broken = shutil.copytree(out / "rnn-int8", tmp_path / "rnn-int8")
    (broken / "model.onnx").write_bytes(b"not a graph")  # the manifest's size and hash no longer match
    with pytest.raises(VerificationError, match="rnn-int8"):
        verify_all([out / "lstm-int8", broken])
    printed = capsys.readouterr().out
    assert "ok   lstm-int8" in printed and "FAIL rnn-int8" in printed
