"""Sentence embeddings from a BERT GGUF through llama.cpp's embedding mode.

llama.cpp tokenises ([CLS] ... [SEP]), runs the encoder and pools as the file's pooling_type says;
edgelm truncates to the model's maximum length (keeping [SEP], as transformers does), normalises
when the artifact says so, and reports which texts were truncated, as the ONNX Embedder does.
BERT attends both ways, so a whole text must fit one llama.cpp micro-batch (n_batch = n_ubatch =
the maximum length); `batch_size` texts, each its own sequence, may share one decode.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edgelm.artifact import Manifest, artifact_file
from edgelm.errors import ArtifactError, InputError
from edgelm.runtime.core.aio import AsyncEncoding
from edgelm.runtime.device import RuntimeOptions
from edgelm.runtime.llamacpp.model import LlamaCppTokenizer, open_llama
from edgelm.runtime.llamacpp.native import context_pointer, decode_whole_sequences, vocab_pointer
from edgelm.runtime.ort.encoders import Embeddings
from edgelm.safe_text import check_text

# texts per decode by default: llama.cpp attends over every token of a decode (other texts masked
# out), so packing gains nothing (MiniLM F16, 64 sentences, 1 thread, one process, interleaved:
# 32.9 texts/s one at a time, 33.3 eight per decode, 24.8 up to 32 per decode within 256 tokens)
DEFAULT_BATCH = 1


class GgufEmbedder(AsyncEncoding):
    """`embed(texts)` over one llama.cpp context in embedding mode; `close()` frees it."""

    task = "embed"

    def __init__(self, llm, manifest: Manifest, batch_tokens: int):
        import llama_cpp

        self.llm = llm
        self.batch_tokens = batch_tokens
        self.max_sequences = max(1, int(llm.context_params.n_seq_max))
        self.manifest = manifest
        self.tokenizer = LlamaCppTokenizer(vocab_pointer(llm))
        self.max_length = int(manifest.model.context_length)
        self.normalize = bool(manifest.model.normalize)
        self.dim = int(llm.n_embd())
        self.sep_id = int(llama_cpp.llama_vocab_sep(vocab_pointer(llm)))
        self.closed = False
        self._context = threading.Lock()  # one llama.cpp context: calls from several threads take turns

    def ids(self, text: str) -> tuple[list[int], bool]:
        """[CLS] text [SEP] as llama.cpp tokenises it, cut to the maximum length (ending in [SEP])."""
        ids = list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
        if len(ids) <= self.max_length:
            return ids, False
        return [*ids[: self.max_length - 1], self.sep_id], True

    def embed(self, texts: str | Sequence[str], *, batch_size: int | None = None, normalize: bool | None = None,
              progress: Callable[[int, int], None] | None = None) -> Embeddings:
        """Vectors (n, dim), one per text; `normalize` None follows the artifact (its Normalize module).

        `batch_size`: texts per llama.cpp decode at most (default 1, see DEFAULT_BATCH), within its token budget.
        """
        if self.closed:
            raise InputError("this model was closed; load it again to use it")
        texts = [texts] if isinstance(texts, str) else list(texts)
        for i, text in enumerate(texts):
            check_text(text, f"text {i}")
        unit = self.normalize if normalize is None else normalize
        most = max(1, min(batch_size or DEFAULT_BATCH, self.max_sequences))
        with self._context:
            encoded = [self.ids(text) for text in texts]
            rows = self._rows(encoded, most, progress)
        matrix = np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.dim), np.float32)
        if unit and len(matrix):
            matrix = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
        result = matrix.view(Embeddings)
        result.truncated = tuple(i for i, (_, cut) in enumerate(encoded) if cut)
        result.token_counts = tuple(len(ids) for ids, _ in encoded)  # what each text ran as: usage needs it
        return result

    def _rows(self, encoded: list[tuple[list[int], bool]], most: int,
              progress: Callable[[int, int], None] | None) -> list[np.ndarray]:
        """Each text's pooled vector, `most` texts per decode within the token budget."""
        rows: list[np.ndarray] = []
        group: list[list[int]] = []
        for ids, _ in encoded:
            if group and (len(group) == most or sum(map(len, group)) + len(ids) > self.batch_tokens):
                rows += self._vectors(group)
                group = []
                if progress is not None:
                    progress(len(rows), len(encoded))
            group.append(ids)
        if group:
            rows += self._vectors(group)
            if progress is not None:
                progress(len(rows), len(encoded))
        return rows

    def _vectors(self, group: list[list[int]]) -> list[np.ndarray]:
        """One decode for several texts, each its own sequence; llama.cpp pools each (dim,)."""
        import llama_cpp

        decode_whole_sequences(self.llm, group)  # every token an output: the pooling reads them all
        vectors = []
        for seq in range(len(group)):
            pointer = llama_cpp.llama_get_embeddings_seq(context_pointer(self.llm), seq)
            if not pointer:
                raise ArtifactError("llama.cpp returned no pooled embedding (is the file's pooling_type none?)")
            vectors.append(np.ctypeslib.as_array(pointer, shape=(self.dim,)).copy())  # (dim,)
        return vectors

    def close(self) -> None:
        with self._context:  # not while another thread's texts are in the context
            if not self.closed:
                self.llm.close()
                self.closed = True

    def __enter__(self) -> GgufEmbedder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_gguf_embedder(folder: Path, manifest: Manifest, options: RuntimeOptions) -> GgufEmbedder:
    """The runtime entry the bert family registers for format "gguf"."""
    path = artifact_file(folder, manifest, manifest.model.file, "model.file")
    length = int(manifest.model.context_length)
    tokens = length  # an encoder keeps no cache between calls: the context holds one decode's tokens
    llm, _ = open_llama(path, options, tokens, extra={"embedding": True, "n_batch": tokens, "n_ubatch": tokens})
    return GgufEmbedder(llm, manifest, tokens)
