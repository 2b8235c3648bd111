"""Encoder tasks (embeddings, fill-mask, classification) over one ONNX session and tokenizer.

The base class owns the session, the tokenizer and the batching: texts are sorted by token
length and padded per batch, so short texts never pay for the longest one. Subclasses only turn
the graph's output into their answer. Inputs longer than the model's maximum are truncated and
the results say which ones were.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgelm.artifact import Manifest
from edgelm.errors import ArtifactError, InputError
from edgelm.runtime.core.aio import AsyncEncoding
from edgelm.runtime.device import RuntimeOptions
from edgelm.runtime.loading import check_dim, manifest_where, node_named, open_onnx, static_dim
from edgelm.safe_text import check_text

KNOWN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len")
Progress = Callable[[int, int], None]  # (texts done, texts in all)


class Embeddings(np.ndarray):
    """(n, dim) float32 sentence vectors; `truncated` holds the indices of texts cut to max length,
    `token_counts` how many tokens each text ran as (special tokens included, after truncation),
    so a caller reporting usage need not tokenise the texts again."""

    truncated: tuple[int, ...] = ()
    token_counts: tuple[int, ...] = ()

    def __array_finalize__(self, obj: Any) -> None:
        self.truncated = getattr(obj, "truncated", ())
        self.token_counts = getattr(obj, "token_counts", ())


class MaskPredictions(list):
    """[(token, probability)] best first; `truncated` is True when the text was cut to max length."""

    truncated: bool = False


@dataclass
class Batch:
    rows: np.ndarray  # (B,) where each row's text sits in the caller's list
    feed: dict[str, np.ndarray]  # graph inputs, each (B, T)
    mask: np.ndarray  # (B, T) attention mask, 1 on real tokens


class EncoderTask(AsyncEncoding):
    """One ONNX encoder session plus its tokenizer; `close()` frees the session."""

    task = ""
    default_batch_size = 32

    output_width = "hidden_size"  # the model field the graph output's last axis must equal

    def __init__(self, session: Any, tokenizer: Any, manifest: Manifest, where: str = "manifest"):
        self.session = session
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.max_length = manifest.model.context_length
        self.lowercase = manifest.tokenizer.lowercase
        self.pad_id = manifest.tokenizer.pad_id or 0  # padded positions are masked: any valid id serves
        tokenizer.no_padding()  # padding happens per batch, after sorting by length
        tokenizer.enable_truncation(self.max_length)
        self.input_names = [i.name for i in session.get_inputs()]
        unknown = [n for n in self.input_names if n not in KNOWN_INPUTS]
        if unknown or "input_ids" not in self.input_names:
            raise ArtifactError(f"encoder graph has inputs {self.input_names}; expected some of {list(KNOWN_INPUTS)}")
        # schema 1 artifacts name no outputs: the graph's first one is the encoder's output
        self.output_name = (manifest.model.outputs or [session.get_outputs()[0].name])[0]
        output = node_named(session.get_outputs(), self.output_name)
        check_dim(where, f"model.{self.output_width}", self._width(), static_dim(output, -1), "output width")

    def _width(self) -> int | None:
        return getattr(self.manifest.model, self.output_width)

    # -- shared machinery ---------------------------------------------------------------------
    def _as_texts(self, texts: str | Sequence[str]) -> list[str]:
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
            raise InputError("texts must be a string or a list of strings")
        return [check_text(t, f"text {i}") for i, t in enumerate(texts)]  # lone surrogates: not UTF-8

    def _encode(self, texts: list[str]) -> list[Any]:
        if self.lowercase:  # sentence-transformers lower-cases before tokenising when configured to
            texts = [t.lower() for t in texts]
        return self.tokenizer.encode_batch(texts)

    def _batches(self, encodings: list[Any], batch_size: int) -> Iterator[Batch]:
        if batch_size < 1:
            raise InputError(f"batch_size must be at least 1, got {batch_size}")
        lengths = np.array([len(e.ids) for e in encodings])
        order = np.argsort(-lengths, kind="stable")  # longest first: a memory problem shows at once
        for rows in _length_groups(order, lengths, batch_size):
            width = int(lengths[rows[0]])
            ids = np.full((len(rows), width), self.pad_id, np.int64)  # (B, T)
            mask = np.zeros((len(rows), width), np.int64)
            types = np.zeros((len(rows), width), np.int64)
            for r, row in enumerate(rows):
                enc = encodings[row]
                ids[r, : len(enc.ids)] = enc.ids
                mask[r, : len(enc.ids)] = 1
                types[r, : len(enc.ids)] = enc.type_ids
            inputs = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
            yield Batch(rows, {n: inputs[n] for n in self.input_names}, mask)

    def _run(self, texts: list[str], batch_size: int | None, reduce: Callable[[np.ndarray, Batch], np.ndarray],
             progress: Progress | None = None) -> tuple[list[np.ndarray], tuple[int, ...], tuple[int, ...]]:
        """Per-text outputs of `reduce(graph_output, batch)` in the caller's order, the truncated
        rows, and each text's token count."""
        if self.session is None:
            raise InputError("this model was closed; load it again to use it")
        encodings = self._encode(texts)
        results: list[np.ndarray] = [np.empty(0)] * len(texts)
        done = 0
        for batch in self._batches(encodings, batch_size or self.default_batch_size):
            output = self.session.run([self.output_name], batch.feed)[0]
            for row, value in zip(batch.rows, reduce(output, batch)):
                results[row] = value
            done += len(batch.rows)
            if progress is not None:
                progress(done, len(texts))
        truncated = tuple(i for i, e in enumerate(encodings) if e.overflowing)
        return results, truncated, tuple(len(e.ids) for e in encodings)

    def close(self) -> None:
        self.session = None

    def __enter__(self) -> EncoderTask:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _length_groups(order: np.ndarray, lengths: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    """Rows in longest-first order, cut into batches that never pad a text to over twice its length.

    Padding costs compute, and in int8 graphs it also costs accuracy: dynamic quantization picks
    one activation scale per tensor, padded positions included, so a short text batched with a
    long one was seen to lose about 0.005 cosine on MiniLM.
    """
    start = 0
    while start < len(order):
        longest = lengths[order[start]]
        end = start + 1
        while end < len(order) and end - start < batch_size and 2 * lengths[order[end]] >= longest:
            end += 1
        yield order[start:end]
        start = end


def pool(hidden: np.ndarray, mask: np.ndarray, modes: Sequence[str]) -> np.ndarray:
    """Sentence vectors from token vectors, modes concatenated in order; (B, T, H) -> (B, H * modes)."""
    weights = mask[..., None].astype(np.float32)  # (B, T, 1)
    counts = np.maximum(weights.sum(axis=1), 1e-9)  # (B, 1)
    parts = []
    for mode in modes:
        if mode == "cls":
            parts.append(hidden[:, 0])
        elif mode == "max":
            parts.append(np.where(weights > 0, hidden, np.float32(-1e9)).max(axis=1))
        elif mode == "mean":
            parts.append((hidden * weights).sum(axis=1) / counts)
        elif mode == "mean_sqrt_len":
            parts.append((hidden * weights).sum(axis=1) / np.sqrt(counts))
        else:
            raise ArtifactError(f"unknown pooling mode {mode!r} in the manifest")
    return np.concatenate(parts, axis=1)


class Embedder(EncoderTask):
    task = "embed"

    def __init__(self, session: Any, tokenizer: Any, manifest: Manifest, where: str = "manifest"):
        super().__init__(session, tokenizer, manifest, where)
        self.pooling = list(manifest.model.pooling)
        unknown = [mode for mode in self.pooling if mode not in POOLING_MODES]
        if unknown:
            raise ArtifactError(f"{where}: model.pooling {unknown[0]!r} is not one of {', '.join(POOLING_MODES)}")
        self.normalize = manifest.model.normalize
        self.dim = manifest.model.dim
        hidden = manifest.model.hidden_size
        if hidden is not None and self.dim != hidden * len(self.pooling):
            raise ArtifactError(f"{where}: model.dim {self.dim} is not model.hidden_size {hidden} "
                                f"x {len(self.pooling)} pooling modes")

    def embed(self, texts: str | Sequence[str], *, batch_size: int | None = None, normalize: bool | None = None,
              progress: Progress | None = None) -> Embeddings:
        """Vectors (n, dim), one per text; `normalize` None follows the artifact (its Normalize module)."""
        texts = self._as_texts(texts)
        unit = self.normalize if normalize is None else normalize

        def reduce(hidden: np.ndarray, batch: Batch) -> np.ndarray:
            vectors = pool(hidden, batch.mask, self.pooling)  # (B, dim)
            if unit:
                vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            return vectors

        rows, truncated, token_counts = self._run(texts, batch_size, reduce, progress)
        matrix = np.stack(rows).astype(np.float32) if rows else np.zeros((0, self.dim), np.float32)
        result = matrix.view(Embeddings)
        result.truncated = truncated
        result.token_counts = token_counts
        return result


class MaskFiller(EncoderTask):
    task = "fill-mask"
    default_batch_size = 8  # the output is (B, T, vocab): large batches cost a lot of memory

    output_width = "vocab_size"

    def __init__(self, session: Any, tokenizer: Any, manifest: Manifest, where: str = "manifest"):
        super().__init__(session, tokenizer, manifest, where)
        self.mask_token = manifest.tokenizer.mask_token
        self.mask_id = manifest.tokenizer.mask_id

    def mask_logits(self, texts: str | Sequence[str], *, batch_size: int | None = None) -> np.ndarray:
        """Logits (n, vocab) at each text's mask token; an error unless every text has exactly one."""
        texts = self._as_texts(texts)
        for text in texts:
            self._check_one_mask(text)

        def reduce(logits: np.ndarray, batch: Batch) -> np.ndarray:
            ids = batch.feed["input_ids"]  # (B, T)
            return np.stack([logits[r, int(np.argmax(ids[r] == self.mask_id))] for r in range(len(ids))])

        rows, _, _ = self._run(texts, batch_size, reduce)
        return np.stack(rows) if rows else np.zeros((0, 0), np.float32)

    def fill_mask(self, text: str, top_k: int = 5) -> MaskPredictions:
        """The top_k most likely tokens for the mask in `text`, with their probabilities."""
        if not isinstance(text, str):
            raise InputError("fill_mask takes one text (a string)")
        check_text(text, "the text")
        if not isinstance(top_k, int) or top_k < 1:
            raise InputError(f"top_k must be a positive integer, got {top_k!r}")
        truncated = self._check_one_mask(text)
        logits = self.mask_logits([text])[0].astype(np.float64)  # (vocab,)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        best = np.argsort(-probs, kind="stable")[:top_k]
        result = MaskPredictions((self.tokenizer.id_to_token(int(i)), float(probs[i])) for i in best)
        result.truncated = truncated
        return result

    def _check_one_mask(self, text: str) -> bool:
        """Raise unless the text holds exactly one mask token within the maximum length; say if cut."""
        encoding = self._encode([text])[0]
        kept = encoding.ids.count(self.mask_id)
        dropped = sum(o.ids.count(self.mask_id) for o in encoding.overflowing)
        if kept + dropped == 0:
            raise InputError(f"the text has no mask token; write {self.mask_token} where a word should be filled in")
        if kept + dropped > 1:
            raise InputError(f"the text has {kept + dropped} mask tokens; fill-mask takes exactly one")
        if kept == 0:
            raise InputError(f"the mask token lies beyond the model's maximum of {self.max_length} tokens")
        return bool(encoding.overflowing)


class Classifier(EncoderTask):
    task = "classify"
    output_width = "id2label"

    def __init__(self, session: Any, tokenizer: Any, manifest: Manifest, where: str = "manifest"):
        labels = manifest.model.id2label
        missing = next((i for i in range(len(labels)) if str(i) not in labels), None)
        if missing is not None:
            raise ArtifactError(f"{where}: model.id2label has no label for class {missing}")
        self.labels = [labels[str(i)] for i in range(len(labels))]
        super().__init__(session, tokenizer, manifest, where)
        self.multi_label = manifest.model.problem_type == "multi_label_classification"

    def _width(self) -> int | None:
        return len(self.labels)

    def logits(self, texts: str | Sequence[str], *, batch_size: int | None = None) -> np.ndarray:
        """Raw class logits (n, labels)."""
        rows, _, _ = self._run(self._as_texts(texts), batch_size, lambda out, batch: out)
        return np.stack(rows) if rows else np.zeros((0, len(self.labels)), np.float32)

    def classify(self, texts: str | Sequence[str], *, batch_size: int | None = None) -> list[dict[str, Any]]:
        """The most likely label per text: [{label, score, truncated}]; scores are probabilities."""
        texts = self._as_texts(texts)
        rows, truncated_rows, _ = self._run(texts, batch_size, lambda out, batch: out)
        truncated = set(truncated_rows)
        results = []
        for i, logits in enumerate(rows):
            z = logits.astype(np.float64)
            if self.multi_label:  # independent labels: one sigmoid each
                probs = 1.0 / (1.0 + np.exp(-z))
            else:
                probs = np.exp(z - z.max())
                probs /= probs.sum()
            best = int(np.argmax(probs))
            results.append({"label": self.labels[best], "score": float(probs[best]), "truncated": i in truncated})
        return results


TASK_CLASSES: dict[str, type[EncoderTask]] = {"embed": Embedder, "fill-mask": MaskFiller, "classify": Classifier}


def load_encoder(folder: Path, manifest: Manifest, options: RuntimeOptions) -> EncoderTask:
    task_class = TASK_CLASSES.get(manifest.task)
    if task_class is None:
        raise ArtifactError(f"{folder}: unknown encoder task {manifest.task!r}; known: {', '.join(TASK_CLASSES)}")
    session, tokenizer = open_onnx(folder, manifest, options)
    return task_class(session, tokenizer, manifest, manifest_where(folder))
