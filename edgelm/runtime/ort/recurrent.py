"""Running exported RNN/LSTM graphs: prefill the prompt in one call, then one token per step."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from edgelm.artifact import Manifest
from edgelm.errors import ArtifactError
from edgelm.runtime.core.generator import Decoder, TextGenerator
from edgelm.runtime.device import RuntimeOptions
from edgelm.runtime.loading import check_dim, manifest_where, node_named, open_onnx, static_dim


class RecurrentDecoder(Decoder):
    """Holds the hidden state (h, and c for LSTM) between calls; nothing else grows with length."""

    context_length = None

    def __init__(self, session, manifest: Manifest, where: str = "manifest"):
        self.session = session
        model = manifest.model
        self.input_names = list(model.inputs)  # input_ids, then the state; outputs: logits, then the state
        self.output_names = list(model.outputs)
        if len(self.input_names) < 2 or len(self.input_names) != len(self.output_names):
            raise ArtifactError(f"{where}: model.inputs and model.outputs must be ids/logits plus one entry per state")
        for name in self.input_names[1:]:  # each state input is (L, B, H) with L and H fixed in the graph
            node = node_named(session.get_inputs(), name)
            check_dim(where, "model.num_layers", model.num_layers, static_dim(node, 0), f"{name} shape")
            check_dim(where, "model.hidden_size", model.hidden_size, static_dim(node, 2), f"{name} shape")
        logits = node_named(session.get_outputs(), self.output_names[0])
        check_dim(where, "model.vocab_size", model.vocab_size, static_dim(logits, -1), "logits width")
        shape = (model.num_layers, 1, model.hidden_size)  # (L, B, H)
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
    session, tokenizer = open_onnx(folder, manifest, options)
    return TextGenerator(RecurrentDecoder(session, manifest, manifest_where(folder)), tokenizer, manifest)
