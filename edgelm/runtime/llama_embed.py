"""Sentence embeddings from a BERT GGUF through llama.cpp's embedding mode.

llama.cpp tokenises ([CLS] ... [SEP]), runs the encoder and pools as the file's pooling_type says;
edgelm truncates to the model's maximum length (keeping [SEP], as transformers does), normalises
when the artifact says so, and reports which texts were truncated, as the ONNX Embedder does.
BERT attends both ways, so a whole text must fit one llama.cpp batch: n_batch = n_ubatch =
the maximum length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from edgelm.artifact import Manifest, artifact_file
from edgelm.errors import ArtifactError, InputError
from edgelm.runtime.device import RuntimeOptions
from edgelm.runtime.encoders import Embeddings
from edgelm.runtime.llama import LlamaCppTokenizer, open_llama
from edgelm.safe_text import check_text


class GgufEmbedder:
    """`embed(texts)` over one llama.cpp context in embedding mode; `close()` frees it."""

    task = "embed"

    def __init__(self, llm, manifest: Manifest):
        import llama_cpp

        self.llm = llm
        self.manifest = manifest
        self.tokenizer = LlamaCppTokenizer(llm._model.vocab)
        self.max_length = int(manifest.model.context_length)
        self.normalize = bool(manifest.model.normalize)
        self.dim = int(llm.n_embd())
        self.sep_id = int(llama_cpp.llama_vocab_sep(llm._model.vocab))
        self.closed = False

    def ids(self, text: str) -> tuple[list[int], bool]:
        """[CLS] text [SEP] as llama.cpp tokenises it, cut to the maximum length (ending in [SEP])."""
        ids = list(self.llm.tokenize(text.encode("utf-8"), add_bos=True, special=False))
        if len(ids) <= self.max_length:
            return ids, False
        return [*ids[: self.max_length - 1], self.sep_id], True

    def embed(self, texts: str | Sequence[str], *, batch_size: int | None = None, normalize: bool | None = None,
              progress: Callable[[int, int], None] | None = None) -> Embeddings:
        """Vectors (n, dim), one per text; `normalize` None follows the artifact (its Normalize module).

        `batch_size` is accepted for the ONNX Embedder's signature; llama.cpp runs one text at a time.
        """
        if self.closed:
            raise InputError("this model was closed; load it again to use it")
        texts = [texts] if isinstance(texts, str) else list(texts)
        for i, text in enumerate(texts):
            check_text(text, f"text {i}")
        unit = self.normalize if normalize is None else normalize
        rows, truncated = [], []
        for i, text in enumerate(texts):
            ids, cut = self.ids(text)
            if cut:
                truncated.append(i)
            rows.append(self._vector(ids))
            if progress is not None:
                progress(i + 1, len(texts))
        matrix = np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.dim), np.float32)
        if unit and len(matrix):
            matrix = matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
        result = matrix.view(Embeddings)
        result.truncated = tuple(truncated)
        return result

    def _vector(self, ids: list[int]) -> np.ndarray:
        import llama_cpp

        llm = self.llm
        llm._ctx.kv_cache_clear()
        llm._batch.reset()
        llm._batch.add_sequence(ids, 0, True)  # every token an output: the pooling reads them all
        llm._ctx.decode(llm._batch)
        pointer = llama_cpp.llama_get_embeddings_seq(llm._ctx.ctx, 0)
        if not pointer:
            raise ArtifactError("llama.cpp returned no pooled embedding (is the file's pooling_type none?)")
        return np.ctypeslib.as_array(pointer, shape=(self.dim,)).copy()  # (dim,)

    def close(self) -> None:
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
    llm, _ = open_llama(path, options, length, extra={"embedding": True, "n_batch": length, "n_ubatch": length})
    return GgufEmbedder(llm, manifest)
