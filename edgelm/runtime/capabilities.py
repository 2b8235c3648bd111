"""What an object `edgelm.load()` returns can do, as typed protocols.

`load()` returns a different class per task and backend (TextGenerator, ChatGenerator,
KvTextGenerator, the ONNX encoder tasks, GgufEmbedder). The CLI and the server ask these
protocols, not `hasattr` on a method name, so a capability has one definition that type
checkers read too. Nothing here imports a backend: checking a capability loads nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from edgelm.runtime.core.generator import Completion, Decoder, TextStream
    from edgelm.runtime.core.params import GenerationParams
    from edgelm.runtime.ort.encoders import Embeddings, MaskPredictions


@runtime_checkable
class Tokenized(Protocol):
    """Any task with a tokenizer (`/tokenize`, `/detokenize`)."""

    tokenizer: Any


@runtime_checkable
class TextModel(Protocol):
    """A text generator: `generate`, `complete` and `stream` over one decoder."""

    tokenizer: Any
    decoder: Decoder
    defaults: GenerationParams

    def generate(self, prompt: str, **params: Any) -> str: ...

    def complete(self, prompt: str, **params: Any) -> Completion: ...

    def stream(self, prompt: str, **params: Any) -> TextStream: ...

    def encode(self, text: str) -> list[int]: ...

    def close(self) -> None: ...


@runtime_checkable
class ChatModel(TextModel, Protocol):
    """A text generator that also takes message lists (its template may still be empty)."""

    chat_template: str

    def chat(self, messages: list[dict], **params: Any) -> str: ...

    def chat_complete(self, messages: list[dict], **params: Any) -> Completion: ...

    def chat_stream(self, messages: list[dict], **params: Any) -> TextStream: ...


@runtime_checkable
class EmbeddingModel(Protocol):
    """Sentence vectors. The result's `token_counts` holds how many tokens each text became
    (special tokens and truncation included), where the embedder reports them."""

    tokenizer: Any

    def embed(self, texts: str | Sequence[str], *, batch_size: int | None = None,
              normalize: bool | None = None, progress: Any = None) -> Embeddings: ...

    def close(self) -> None: ...


@runtime_checkable
class TokenIdsModel(Protocol):
    """A task that tells the ids it runs a text as, and whether it cut it (GgufEmbedder)."""

    def ids(self, text: str) -> tuple[list[int], bool]: ...


@runtime_checkable
class MaskFillingModel(Protocol):
    """Masked-token prediction (BERT's fill-mask head)."""

    def fill_mask(self, text: str, top_k: int = 5) -> MaskPredictions: ...

    def close(self) -> None: ...


@runtime_checkable
class ClassifierModel(Protocol):
    """Sequence classification: labels with scores, or raw logits."""

    def classify(self, texts: str | Sequence[str], *, batch_size: int | None = None) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


def can_chat(task: object) -> bool:
    """A chat model whose artifact has a chat template to render messages with."""
    return isinstance(task, ChatModel) and bool(task.chat_template)
