"""Many sequences over edgelm's fused GPT-2 graph (issue 17's ONNX building block).

The rows of one preallocated key/value buffer per cache tensor, (slots, heads, context + 1,
head_dim), are sequence slots with their own lengths. GroupQueryAttention reads and writes a row
only up to `seqlens_k[b]`, so rows are independent, and a run may cover any contiguous range of
rows: the buffer is bound through IO binding as a raw pointer at the range's first row, with the
range's shape, as both the past input and the present output.

- `admit(prompt_ids) -> slot` picks the free slot whose cached tokens share the longest prefix
  with the prompt (at least half of that cache; otherwise the least recently used slot) and
  keeps that prefix: a chat's next turn evaluates only its new tokens.
- `step(tokens, prefill)` runs every decoding slot at one token in ONE session run over the
  smallest range of rows holding them; a row of that range that is not stepped (free, or still
  prefilling) is fed a filler token written at its own cached length, past everything it holds,
  where the next real token overwrites it. That is why each row has one column beyond the
  context: a full row's filler lands there. Each prefilling slot then runs a chunk of its prompt
  on its row alone (positions continuing its cache, so chunks go in between decode steps).
- `release(slot)` frees the slot and keeps its cache for prefix reuse; `cached_tokens(slot)`.

Sampling, stop strings and constraints are the scheduler's (runtime/core/scheduler.py), one
`Continuation` per sequence.

Exactness (tests/test_gpt2_batch_slots.py). Every kernel computes a row from that row alone,
but some choose their code path by the number of rows M: onnxruntime's MatMulNBits rounds
differently for one row than for several (about 1e-6), and with int8-quantized activations
(accuracy_level 4) such a difference now and then flips one activation's rounding, which moves
logits by about 1e-2. Measured against solo runs, sequences admitted at different times with
prompts in chunks and one released mid-batch:
- fp32: bit-identical, prompt chunks included; where a slot's earlier run supplied the prefix,
  within 1.5e-6 (a 4-layer 768-wide random GPT-2);
- the tiny test GPT-2 (64 wide) in int8: max |logit difference| 2.4e-7, no top-1 change;
- the 768-wide random GPT-2 (6 sequences, 176 rows, chunks of 64): int4 bit-identical (with
  reused prefixes mean KL 9.3e-6, max 0.023); int8 mean KL 2.3e-5, max 0.035, top-1 98.3%: the
  flipped rows are near ties (the solo run's top two within 0.011; random weights give flat
  logits). Greedy text of 8 threaded streams equals the solo runs' in all three.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgelm.artifact import Manifest
from edgelm.errors import ArtifactError, ContextOverflowError, InputError, UsageError
from edgelm.runtime.core.params import check_token_ids
from edgelm.runtime.core.scheduler import shared_prefix
from edgelm.runtime.core.slots import SlotBook, check_slot_count
from edgelm.runtime.ort.kv_buffer_decoder import KvBufferDecoder

MAX_SLOTS = 64  # each slot holds a whole context's cache; more is a typo, not a plan
FLOAT_BYTES = 4
GIB = 1 << 30
KEPT_BINDINGS = 16  # decode bindings kept, by row range (the ranges in use change slowly)


def check_slots(slots: object) -> int:
    return check_slot_count(slots, MAX_SLOTS)


class FusedBatchDecoder(SlotBook):
    """`slots` sequences over one onnxruntime session of the fused GPT-2 graph.

    Not thread-safe: one scheduler loop owns it and makes every call (`cached_tokens` may be read
    beside it). `evaluated` counts the tokens run (prefix reuse shows there), `runs` the session
    runs."""

    def __init__(self, session: Any, manifest: Manifest, slots: int, where: str = "manifest"):
        import onnxruntime as ort

        self.graph = KvBufferDecoder(session, manifest, where)  # checks the graph's inputs and cache geometry
        self._open_slots(check_slots(slots))
        self.context_length = self.graph.context_length
        self.vocab_size = self.graph.vocab_size
        heads, _, head_dim = self.graph.cache_shape
        self.row_shape = (heads, self.context_length + 1, head_dim)  # one spare column for fillers
        self.row_bytes = int(np.prod(self.row_shape)) * FLOAT_BYTES
        self.buffers = [ort.OrtValue.ortvalue_from_numpy(self._zeros((self.slots, *self.row_shape)))
                        for _ in self.graph.past_names]
        self.logits = np.zeros((self.slots, 1, self.vocab_size), np.float32)  # every decode run writes here
        self._decode_runs: dict[tuple[int, int], _DecodeRun] = {}  # by (first row, row count)
        self.evaluated = 0
        self.runs = 0

    def _zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        try:
            return np.zeros(shape, np.float32)
        except MemoryError:
            total = self.row_bytes * self.slots * len(self.graph.past_names)
            raise ArtifactError(
                f"the key/value cache of {self.slots} sequences of {self.context_length} tokens needs "
                f"{total / GIB:.1f} GiB, more than this machine can allocate; load with fewer parallel sequences"
            ) from None

    @property
    def session(self) -> Any:
        return self.graph.session

    # -- sequences ---------------------------------------------------------------------------
    def admit(self, prompt_ids: Sequence[int]) -> int:
        """A free slot for this prompt, its cache kept up to the longest prefix it shares with
        the prompt; the rest of the prompt waits for `step`'s prefill."""
        self._check_open()
        ids = self._checked_prompt(prompt_ids, "prompt")
        slot = self._free_slot_for(ids)
        # evaluate at least the last prompt token: its logits are what the first sample needs.
        # Keys and values past `keep` stay in the row, unread, until new tokens overwrite them.
        self._start(slot, ids, min(shared_prefix(self.states[slot].cached, ids), len(ids) - 1))
        return slot

    def release(self, slot: int) -> None:
        """Ends a sequence; its cached tokens stay for a later prompt that shares them."""
        self._end(slot)

    # -- evaluation --------------------------------------------------------------------------
    def step(self, tokens: Mapping[int, int] | None = None,
             prefill: Mapping[int, int] | None = None) -> dict[int, np.ndarray]:
        """Token `tokens[slot]` for each decoding slot (one run over all of them), and up to
        `prefill[slot]` prompt tokens for each slot still prefilling (one run per slot). Logits
        (vocab,) for every stepped slot and every slot whose prompt is now complete; a decode
        row is a view valid until the next step (the scheduler samples every row before it steps
        again)."""
        self._check_open()
        tokens, chunks = self._check_steps(tokens or {}), self._check_prefill(prefill or {})
        out = self._decode(tokens) if tokens else {}
        for slot, chunk in chunks.items():
            logits = self._prefill(slot, chunk)
            if logits is not None:
                out[slot] = logits
        return out

    def _check_steps(self, tokens: Mapping[int, int]) -> dict[int, int]:
        """Every decode step checked before anything runs, so a refused one changes no row."""
        checked = {}
        for slot, token in tokens.items():
            state = self._active(slot)
            if state.pending:
                raise UsageError(f"slot {slot} still has {len(state.pending)} prompt tokens to prefill")
            if len(state.cached) + 1 > self.context_length:
                raise ContextOverflowError(
                    f"slot {slot}: {len(state.cached) + 1} tokens exceed the context length {self.context_length}")
            checked[slot] = check_token_ids([token], self.vocab_size, f"slot {slot} token")[0]
        return checked

    def _check_prefill(self, prefill: Mapping[int, int]) -> dict[int, list[int]]:
        chunks = {}
        for slot, most in prefill.items():
            state = self._active(slot)
            if isinstance(most, bool) or not isinstance(most, int) or most < 1:
                raise UsageError(f"prefill of slot {slot}: max tokens must be a positive integer, got {most!r:.40}")
            if state.pending:
                chunks[slot] = state.pending[:most]
        return chunks

    def _decode(self, tokens: dict[int, int]) -> dict[int, np.ndarray]:
        first, last = min(tokens), max(tokens)
        key = (first, last - first + 1)
        run = self._decode_runs.pop(key, None) or _DecodeRun(self, *key)
        self._decode_runs[key] = run  # most recent last; a few ranges recur, so few bindings are kept
        if len(self._decode_runs) > KEPT_BINDINGS:
            del self._decode_runs[next(iter(self._decode_runs))]
        lengths = np.asarray([len(self.states[s].cached) for s in range(first, last + 1)], np.int64)
        ids = np.full(len(lengths), self.graph.pad_id, np.int64)
        positions = np.zeros(len(lengths), np.int64)  # a filler's position only shapes its own garbage
        for slot, token in tokens.items():
            ids[slot - first], positions[slot - first] = token, lengths[slot - first]
        logits = run(ids, positions, lengths)  # (rows, vocab)
        self._count(len(tokens))  # fillers are not evaluated tokens
        for slot, token in tokens.items():
            self._advance(slot, [token])
        return {slot: logits[slot - first] for slot in tokens}

    def _prefill(self, slot: int, chunk: list[int]) -> np.ndarray | None:
        """A chunk of one slot's prompt on its row alone; the last prompt token's logits once the
        whole prompt is in."""
        state = self.states[slot]
        start, count = len(state.cached), len(chunk)
        binding = self._bind_rows(slot, 1)
        feed = {
            "input_ids": np.asarray([chunk], np.int64),
            "position_ids": np.arange(start, start + count, dtype=np.int64)[None],
            "seqlens_k": np.asarray([start + count - 1], np.int32),
            "total_sequence_length": np.asarray(start + count, np.int32),
            "logits_index": np.asarray([[count - 1]], np.int64),
        }
        for name, array in feed.items():
            binding.bind_cpu_input(name, array)
        logits = np.empty((1, 1, self.vocab_size), np.float32)
        binding.bind_output("logits", "cpu", 0, np.float32, list(logits.shape), logits.ctypes.data)
        self.session.run_with_iobinding(binding)
        self._count(count)
        del state.pending[:count]
        self._advance(slot, chunk)
        return None if state.pending else logits[0, 0]

    def _advance(self, slot: int, ids: list[int]) -> None:
        state = self.states[slot]
        state.cached.extend(ids)
        state.used = self._tick()

    # -- binding -----------------------------------------------------------------------------
    def _bind_rows(self, first: int, count: int) -> Any:
        """An IO binding whose cache inputs and outputs are rows first..first+count-1 of the buffers."""
        binding = self.session.io_binding()
        shape = [count, *self.row_shape]
        for past, present, buffer in zip(self.graph.past_names, self.graph.present_names, self.buffers):
            address = buffer.data_ptr() + first * self.row_bytes
            binding.bind_input(past, "cpu", 0, np.float32, shape, address)
            binding.bind_output(present, "cpu", 0, np.float32, shape, address)
        return binding

    def _count(self, tokens: int) -> None:
        self.evaluated += tokens
        self.runs += 1

    # -- scoring, bookkeeping ----------------------------------------------------------------
    def score(self, ids: Sequence[int]) -> np.ndarray:
        """Every position's logits (T, vocab) from one call on fresh buffers (teacher forcing);
        no slot is touched."""
        self._check_open()
        return self.graph.score(ids)

    def _check_open(self) -> None:
        if self.graph.session is None:
            raise InputError("this decoder was closed; load the model again to use it")

    def close(self) -> None:
        self._decode_runs = {}  # bindings first: they point into the buffers
        self.buffers = []
        self.graph.close()


class _DecodeRun:
    """The IO binding of one decode run over a fixed range of rows, kept between steps: its
    small inputs and its logits live in arrays the binding points at, so a step only writes
    into them."""

    def __init__(self, decoder: FusedBatchDecoder, first: int, count: int):
        import onnxruntime as ort

        self.session = decoder.session
        self.binding = decoder._bind_rows(first, count)
        self.arrays = {
            "input_ids": np.zeros((count, 1), np.int64),
            "position_ids": np.zeros((count, 1), np.int64),
            "seqlens_k": np.zeros(count, np.int32),
            "total_sequence_length": np.zeros((), np.int32),
            "logits_index": np.arange(count, dtype=np.int64)[:, None],  # (rows, 1): S is 1
        }
        self.values = {n: ort.OrtValue.ortvalue_from_numpy(a) for n, a in self.arrays.items()}
        for name, value in self.values.items():
            self.binding.bind_ortvalue_input(name, value)
        self.logits = decoder.logits[:count]  # (rows, 1, vocab): the first rows of the shared array
        self.binding.bind_output("logits", "cpu", 0, np.float32, list(self.logits.shape), self.logits.ctypes.data)

    def __call__(self, ids: np.ndarray, positions: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Each row's token written at its own length (the new key's column); (rows, vocab)."""
        arrays = self.arrays
        arrays["input_ids"][:, 0] = ids
        arrays["position_ids"][:, 0] = positions
        arrays["seqlens_k"][:] = lengths  # the new length - 1
        arrays["total_sequence_length"][...] = lengths.max() + 1
        self.session.run_with_iobinding(self.binding)
        return self.logits[:, 0]
