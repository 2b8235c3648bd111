"""Running optimum's decoder-with-past graphs (GPT-2, `model.graph: "optimum"`): prefill in one
call, then one token per step. edgelm's fused graph runs in kv_buffer_decoder.py; `make_decoder`
picks by the manifest, and `KvTextGenerator` batches either.

The graph takes `input_ids`, `attention_mask` (past + new length), `position_ids` and
`past_key_values.{i}.key/value` (B, heads, past, head_dim), and returns `logits` and
`present.{i}.key/value` (B, heads, past + new, head_dim). The presents are fed back as the
next pasts. With IO binding they stay onnxruntime-owned values between steps, so the cache is
never copied into numpy and back; only the last position's logits leave the session.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.artifact import Manifest
from edgelm.errors import ArtifactError, InputError
from edgelm.runtime.core.constraints import pop_constraint
from edgelm.runtime.core.generator import Completion, Continuation, Decoder, TextGenerator, TextStream
from edgelm.runtime.core.params import GenerationParams
from edgelm.runtime.device import RuntimeOptions
from edgelm.runtime.loading import check_cache_geometry, check_graph_io, manifest_where, open_onnx

ROLE_INPUTS = ("input_ids", "attention_mask", "position_ids")  # the decoder-with-past interface


class KvCacheDecoder(Decoder):
    """Holds the attention mask, positions and key/value cache of a batch between calls."""

    def __init__(self, session, manifest: Manifest, io_binding: bool = True, where: str = "manifest"):
        model = manifest.model
        check_graph_io(session, model, where)
        check_cache_geometry(session, model, ROLE_INPUTS, where)
        self.session = session
        self.context_length = model.context_length
        self.past_names = list(model.past_names)  # key, value per layer; fed from the presents
        self.present_names = list(model.present_names)
        self.cache_shape = (model.num_heads, model.head_dim)
        self.pad_id = manifest.tokenizer.pad_id or 0  # padded positions are masked: any valid id serves
        self.io_binding = io_binding
        self.reset(1)

    def reset(self, batch: int) -> None:
        import onnxruntime as ort

        empty = np.zeros(
            (batch, self.cache_shape[0], 0, self.cache_shape[1]), np.float32
        )  # (B, H, 0, D)
        self.past: list[Any] = [
            ort.OrtValue.ortvalue_from_numpy(empty) if self.io_binding else empty
            for _ in self.past_names
        ]
        self.mask = np.zeros((batch, 0), np.int64)  # (B, past)
        self.next_position = np.zeros((batch, 1), np.int64)  # (B, 1)

    # -- one sequence (the Decoder interface) ----------------------------------------------
    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        return self.prefill_batch([ids])[0]

    def step(self, token_id: int) -> np.ndarray:
        return self.step_batch(np.asarray([token_id], np.int64))[0]

    # -- a batch, left-padded --------------------------------------------------------------
    def prefill_batch(self, rows: Sequence[Sequence[int]]) -> np.ndarray:
        """Run prompts of different lengths as one left-padded batch; return (B, vocab) logits."""
        width = max(len(r) for r in rows)
        if width > self.context_length:
            raise InputError(
                f"prompt of {width} tokens exceeds the context length {self.context_length}"
            )
        self.reset(len(rows))
        ids = np.full((len(rows), width), self.pad_id, np.int64)  # (B, T)
        mask = np.zeros((len(rows), width), np.int64)  # (B, T): 0 marks left padding
        for b, row in enumerate(rows):
            ids[b, width - len(row) :] = row
            mask[b, width - len(row) :] = 1
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)  # (B, T): padding sits at 0
        self.next_position = positions[:, -1:] + 1
        return self._run(ids, mask, positions)

    def step_batch(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row; return (B, vocab) logits."""
        ids = np.asarray(tokens, np.int64).reshape(-1, 1)  # (B, 1)
        mask = np.ones((ids.shape[0], 1), np.int64)
        positions = self.next_position
        self.next_position = positions + 1
        return self._run(ids, mask, positions)

    def _run(self, ids: np.ndarray, new_mask: np.ndarray, positions: np.ndarray) -> np.ndarray:
        self.mask = np.concatenate([self.mask, new_mask], axis=1)  # (B, past + T)
        feed = {"input_ids": ids, "attention_mask": self.mask, "position_ids": positions}
        if self.io_binding:
            return self._run_bound(feed)
        feed.update(zip(self.past_names, self.past))
        logits, *self.past = self.session.run(["logits", *self.present_names], feed)
        return logits[:, -1]  # (B, vocab)

    def _run_bound(self, feed: dict[str, np.ndarray]) -> np.ndarray:
        binding = self.session.io_binding()
        for name, array in feed.items():
            binding.bind_cpu_input(name, array)
        for name, value in zip(self.past_names, self.past):
            binding.bind_ortvalue_input(name, value)
        for name in ("logits", *self.present_names):
            binding.bind_output(name, "cpu")
        self.session.run_with_iobinding(binding)
        logits, *self.past = binding.get_outputs()
        return logits.numpy()[:, -1]  # (B, vocab)

    def score(self, ids: Sequence[int]) -> np.ndarray:
        """Every position's logits (T, vocab) from one call with an empty cache (teacher forcing)."""
        if not 0 < len(ids) <= self.context_length:
            raise InputError(f"score needs 1 to {self.context_length} tokens, got {len(ids)}")
        empty = np.zeros((1, *self.cache_shape[:1], 0, self.cache_shape[1]), np.float32)  # (B, H, 0, D)
        feed: dict[str, np.ndarray] = {name: empty for name in self.past_names}
        feed.update(input_ids=np.asarray([ids], np.int64), attention_mask=np.ones((1, len(ids)), np.int64),
                    position_ids=np.arange(len(ids), dtype=np.int64)[None])
        return self.session.run(["logits"], feed)[0][0]

    def close(self) -> None:
        self.session = None
        self.past = []


class KvTextGenerator(TextGenerator):
    """TextGenerator plus batch generation: several prompts decoded together, left-padded."""

    decoder: Any  # KvCacheDecoder or KvBufferDecoder: both prefill and step in batches

    def complete_batch(self, prompts: Sequence[str], **params: Any) -> list[Completion]:
        """One Completion per prompt, each equal to what `complete` gives for it alone."""
        self._check_open()
        if isinstance(prompts, str) or not prompts:
            raise InputError("complete_batch needs a non-empty list of prompts")
        from edgelm.runtime.ort.batch import FusedBatchDecoder

        if isinstance(self.decoder, FusedBatchDecoder):  # sequence slots: the scheduler batches the prompts
            return self._complete_scheduled(prompts, params)
        constraint = pop_constraint(params)  # each row gets its own grammar state
        resolved = GenerationParams.from_kwargs(self.defaults, **params)
        rows = [Continuation(self, *self._prompt_ids(p, resolved), resolved, constraint) for p in prompts]
        with self.exclusive():  # the batch resets the decoder's state: never in a scheduled sequence's middle
            return self._decode_rows(rows)

    def _decode_rows(self, rows: list[Continuation]) -> list[Completion]:
        started = time.perf_counter()
        logits = self.decoder.prefill_batch([r.ids for r in rows])  # (B, vocab)
        prefill_s = time.perf_counter() - started
        while True:
            # finished rows keep a slot in the batch; what they are fed no longer matters
            tokens = [
                r.accept(logits[b])[0] if not r.done else self.decoder.pad_id
                for b, r in enumerate(rows)
            ]
            tokens = [self.decoder.pad_id if t is None else t for t in tokens]  # a row its grammar ended
            if all(r.done for r in rows):
                break
            logits = self.decoder.step_batch(np.asarray(tokens, np.int64))
        timings = {"prefill_s": prefill_s, "total_s": time.perf_counter() - started}
        for row in rows:
            row.finish()
        return [r.completion(timings) for r in rows]

    def _complete_scheduled(self, prompts: Sequence[str], params: dict[str, Any]) -> list[Completion]:
        """Every prompt submitted as a sequence of the scheduler before any is read, so they decode
        together; one that fails to start cancels those already submitted."""
        streams: list[TextStream] = []
        try:
            for prompt in prompts:
                streams.append(self.stream(prompt, **params))
            for stream in streams:
                for _ in stream:
                    pass
        except BaseException:
            for stream in streams:
                stream.cancel()
            raise
        return [stream.completion for stream in streams]

    def generate_batch(self, prompts: Sequence[str], **params: Any) -> list[str]:
        return [c.text for c in self.complete_batch(prompts, **params)]


def make_decoder(session: Any, manifest: Manifest, where: str = "manifest") -> Decoder:
    """The decoder for the manifest's graph kind: optimum's concatenating graph or edgelm's fused one."""
    from edgelm.runtime.ort.kv_buffer_decoder import KvBufferDecoder

    kinds = {"optimum": KvCacheDecoder, "fused-gqa": KvBufferDecoder}
    kind = manifest.model.graph
    if kind not in kinds:
        raise ArtifactError(f"{where}: model.graph {kind!r} is not one this edgelm runs ({', '.join(kinds)})")
    return kinds[kind](session, manifest, where=where)


def load_gpt2(folder: Path, manifest: Manifest, options: RuntimeOptions) -> KvTextGenerator:
    """`options.parallel` on the fused graph: that many sequence slots, one scheduler stepping them
    together. Optimum's graph runs one sequence at a time whatever `parallel` says."""
    session, tokenizer = open_onnx(folder, manifest, options)
    where = manifest_where(folder)
    if options.parallel is not None and manifest.model.graph == "fused-gqa":
        from edgelm.runtime.core.scheduler import Scheduler
        from edgelm.runtime.ort.batch import FusedBatchDecoder

        decoder = FusedBatchDecoder(session, manifest, options.parallel, where)
        return KvTextGenerator(decoder, tokenizer, manifest, scheduler=Scheduler(decoder, name=folder.name))
    return KvTextGenerator(make_decoder(session, manifest, where), tokenizer, manifest)
