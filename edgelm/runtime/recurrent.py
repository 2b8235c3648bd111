"""Running exported RNN/LSTM graphs: prefill the prompt in one call, then one token per step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgelm.artifact import Manifest
from edgelm.errors import ArtifactError
from edgelm.runtime.device import RuntimeOptions, onnx_session
from edgelm.runtime.generator import Decoder, TextGenerator
from edgelm.runtime.tokenizer import load_tokenizer


class RecurrentDecoder(Decoder):
    """Holds the hidden state (h, and c for LSTM) between calls; nothing else grows with length."""

    context_length = None

    def __init__(self, session, manifest: Manifest):
        self.session = session
        self.input_names = list(manifest.model["inputs"])
        self.output_names = list(manifest.model["outputs"])
        actual = [i.name for i in session.get_inputs()]
        if actual != self.input_names:
            raise ArtifactError(f"model inputs {actual} do not match the manifest {self.input_names}")
        shape = (manifest.model["num_layers"], 1, manifest.model["hidden_size"])  # (L, B, H)
        self.zero_state = [np.zeros(shape, np.float32) for _ in self.input_names[1:]]
        self.state = self.zero_state
        self.step_ids = np.zeros((1, 1), np.int64)  # reused for every single-token step

    def _run(self, ids: np.ndarray) -> np.ndarray:
        logits, *self.state = self.session.run(self.output_names, dict(zip(self.input_names, [ids, *self.state])))
        return logits[0, -1]

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        self.state = self.zero_state
        return self._run(np.asarray([ids], dtype=np.int64))

    def step(self, token_id: int) -> np.ndarray:
        self.step_ids[0, 0] = token_id
        return self._run(self.step_ids)

    def close(self) -> None:
        self.session = None


def load_recurrent(folder: Path, manifest: Manifest, options: RuntimeOptions) -> TextGenerator:
    session = onnx_session(folder / manifest.model["file"], options)
    tokenizer = load_tokenizer(folder / manifest.tokenizer["file"])
    return TextGenerator(RecurrentDecoder(session, manifest), tokenizer, manifest)
