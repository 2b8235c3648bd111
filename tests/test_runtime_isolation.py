"""The device side never pulls in torch, transformers or optimum, not even indirectly."""

from __future__ import annotations

import subprocess
import sys

HEAVY = ("torch", "transformers", "optimum")


def run_fresh(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_loading_and_generating_imports_no_training_stack(lstm_int8_artifact):
    code = f"""
import sys, edgelm
with edgelm.load({str(lstm_int8_artifact)!r}) as model:
    text = model.generate("The ", max_tokens=8, temperature=0)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r})
print(repr(text), heavy)
"""
    out = run_fresh(code)
    assert out.strip().endswith("[]"), out


def test_cli_help_imports_no_heavy_backend():
    code = """
import sys
from click.testing import CliRunner
from edgelm.cli import main
for args in (["--help"], *([name, "--help"] for name in main.commands)):  # every command's module stays lazy
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (args, result.output)
print(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "optimum", "onnxruntime", "llama_cpp", "numpy")))
"""
    assert run_fresh(code).strip() == "[]"
