"""Running the fused GPT-2 graph (edgelm/export/gpt2_graph.py) over preallocated cache buffers.

Each cache tensor is one OrtValue of (B, heads, cache_length, head_dim), bound as both the
past input and the present output: GroupQueryAttention writes the new positions in place, so
nothing is concatenated or copied between steps. The buffers are allocated once per batch size
and reused by every later generation; the IO binding is built once per generation, and a step
only rewrites five small arrays that the binding already points at.

Prompts are right-padded: row b holds `lengths[b]` tokens, its positions are 0..lengths[b]-1
and `seqlens_k[b] = lengths[b] - 1` tells the kernel where its valid keys end, so the rows of a
batch advance independently and padding is never attended to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from edgelm.artifact import Manifest
from edgelm.errors import ContextOverflowError, InputError
from edgelm.runtime.core.generator import Decoder
from edgelm.runtime.loading import check_cache_geometry, check_graph_io

STEP_INPUTS = ("input_ids", "position_ids", "seqlens_k", "total_sequence_length", "logits_index")


class KvBufferDecoder(Decoder):
    """Holds the per-row lengths and the shared key/value buffers of a batch between calls."""

    def __init__(self, session: Any, manifest: Manifest, where: str = "manifest"):
        model = manifest.model
        check_graph_io(session, model, where)
        check_cache_geometry(session, model, STEP_INPUTS, where)
        self.session = session
        self.context_length = model.context_length
        self.past_names = list(model.past_names)
        self.present_names = list(model.present_names)
        self.cache_shape = (model.num_heads, model.context_length, model.head_dim)
        self.vocab_size = model.vocab_size
        self.pad_id = manifest.tokenizer.pad_id or 0  # padded positions are never attended to: any id serves
        self.buffers: list[Any] = []
        self.lengths = np.zeros(0, np.int64)  # (B,): tokens each row holds
        self.binding: Any = None

    # -- one sequence (the Decoder interface) ----------------------------------------------
    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        return self.prefill_batch([ids])[0]

    def step(self, token_id: int) -> np.ndarray:
        return self.step_batch(np.asarray([token_id], np.int64))[0]

    # -- a batch, right-padded -------------------------------------------------------------
    def prefill_batch(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Run prompts of different lengths as one right-padded batch; return (B, vocab) logits."""
        lengths = np.asarray([len(r) for r in rows], np.int64)
        width = int(lengths.max())
        if width > self.context_length:
            raise InputError(f"prompt of {width} tokens exceeds the context length {self.context_length}")
        if lengths.min() < 1:
            raise InputError("every prompt needs at least one token")
        batch = len(rows)
        self._bind(batch)
        ids = np.full((batch, width), self.pad_id, np.int64)  # (B, W)
        for b, row in enumerate(rows):
            ids[b, : len(row)] = row
        feed = {
            "input_ids": ids,
            "position_ids": np.broadcast_to(np.arange(width, dtype=np.int64), (batch, width)).copy(),
            "seqlens_k": (lengths - 1).astype(np.int32),
            "total_sequence_length": np.asarray(width, np.int32),
            "logits_index": (np.arange(batch) * width + lengths - 1)[:, None],  # (B, 1): each row's last token
        }
        for name, array in feed.items():
            self.binding.bind_cpu_input(name, array)
        self.session.run_with_iobinding(self.binding)
        self.lengths = lengths
        self._bind_step_inputs()
        return self.logits[:, 0].copy()

    def step_batch(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row; return (B, vocab) logits."""
        tokens = np.asarray(tokens, np.int64).reshape(-1)
        if self.binding is None:
            raise InputError("step needs a prefill first")
        if tokens.shape[0] != self.lengths.shape[0]:
            raise InputError(f"step got {tokens.shape[0]} tokens for a batch of {self.lengths.shape[0]}")
        if int(self.lengths.max()) + 1 > self.context_length:
            raise ContextOverflowError(f"the sequence would pass the context length {self.context_length}")
        step = self.step_arrays
        step["input_ids"][:, 0] = tokens
        step["position_ids"][:, 0] = self.lengths
        step["seqlens_k"][:] = self.lengths  # new length - 1
        step["total_sequence_length"][...] = self.lengths.max() + 1
        self.session.run_with_iobinding(self.binding)
        self.lengths = self.lengths + 1
        return self.logits[:, 0].copy()

    def score(self, ids: Sequence[int]) -> np.ndarray:
        """Every position's logits (T, vocab) from one call on fresh buffers (teacher forcing)."""
        count = len(ids)
        if not 0 < count <= self.context_length:
            raise InputError(f"score needs 1 to {self.context_length} tokens, got {count}")
        empty = np.zeros((1, self.cache_shape[0], count, self.cache_shape[2]), np.float32)
        feed = {name: empty for name in self.past_names}
        feed.update(input_ids=np.asarray([ids], np.int64), position_ids=np.arange(count, dtype=np.int64)[None],
                    seqlens_k=np.asarray([count - 1], np.int32), total_sequence_length=np.asarray(count, np.int32),
                    logits_index=np.arange(count, dtype=np.int64)[None])
        return self.session.run(["logits"], feed)[0][0]

    # -- buffers and binding ---------------------------------------------------------------
    def _bind(self, batch: int) -> None:
        """The cache buffers for this batch size (kept from the last generation when it matches)."""
        import onnxruntime as ort

        if not self.buffers or self.buffers[0].shape()[0] != batch:
            shape = (batch, *self.cache_shape)  # (B, heads, context, head_dim)
            self.buffers = [ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for _ in self.past_names]
        self.binding = self.session.io_binding()
        for past, present, buffer in zip(self.past_names, self.present_names, self.buffers):
            self.binding.bind_ortvalue_input(past, buffer)
            self.binding.bind_ortvalue_output(present, buffer)
        self.logits = np.zeros((batch, 1, self.vocab_size), np.float32)  # written in place by every run
        self._logits_value = ort.OrtValue.ortvalue_from_numpy(self.logits)
        self.binding.bind_ortvalue_output("logits", self._logits_value)

    def _bind_step_inputs(self) -> None:
        """Step inputs live in arrays the binding points at; a step only writes into them."""
        import onnxruntime as ort

        batch = self.lengths.shape[0]
        self.step_arrays = {
            "input_ids": np.zeros((batch, 1), np.int64),
            "position_ids": np.zeros((batch, 1), np.int64),
            "seqlens_k": np.zeros(batch, np.int32),
            "total_sequence_length": np.zeros((), np.int32),
            "logits_index": np.arange(batch, dtype=np.int64)[:, None],
        }
        self._step_values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.step_arrays.items()}
        for name, value in self._step_values.items():
            self.binding.bind_ortvalue_input(name, value)

    def close(self) -> None:
        self.session = None
        self.buffers = []
        self.binding = None

