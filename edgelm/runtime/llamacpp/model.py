"""The llama.cpp backend: GGUF models run through llama-cpp-python under edgelm's own loop.

llama.cpp only computes logits here. Sampling, detokenising and stop strings are edgelm's
shared TextGenerator machinery, so temperature, seed, top-k/top-p/min-p, repetition penalty and
stop strings mean exactly what they mean for the ONNX decoders.
"""

from __future__ import annotations

import ctypes
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelm.artifact import Manifest, artifact_file
from edgelm.errors import ArtifactError, ContextOverflowError, ProviderError, UsageError, first_line
from edgelm.runtime.core.generator import Decoder
from edgelm.runtime.core.params import check_token_ids
from edgelm.runtime.device import RuntimeOptions, thread_count
from edgelm.runtime.gguf.metadata import read_gguf_header
from edgelm.runtime.llamacpp.log import GGML_LOG_ERROR, captured_llama_log, log_lines
from edgelm.runtime.llamacpp.memory import check_fits, saved_prefix_budget
from edgelm.runtime.llamacpp.native import context_pointer, vocab_pointer
from edgelm.runtime.loading import check_gguf, manifest_where

# The KV cache is allocated for the whole context up front; models trained for 128k tokens
# would need gigabytes for it. Contexts longer than this are capped (and the cap is the limit
# the context policy enforces, named in its error message).
MAX_CONTEXT = 4096
# What a Llama's own context holds when a batched decoder brings its own (llama.cpp pads a
# context to 256 cells; a small batch keeps its compute buffer small)
MINIMAL_CONTEXT = 256
MINIMAL_BATCH = 8


@dataclass
class Encoding:
    """What `tokenizers.Tokenizer.encode` returns, as far as edgelm uses it."""

    ids: list[int]


class LlamaCppTokenizer:
    """llama.cpp's own tokenizer behind the small `tokenizers`-like surface edgelm uses.

    Special-token text (e.g. "<|eot_id|>") in the input becomes the special token, as with
    Hugging Face tokenizers; that is what chat templates rely on.
    """

    def __init__(self, vocab):
        self.vocab = vocab  # llama_vocab_p, owned by the model

    def llg_vocabulary(self, end_ids: set[int]):
        """llguidance's view of this vocabulary (constrained output), from llama.cpp itself."""
        from edgelm.runtime.llamacpp.llg_vocab import llama_vocabulary

        return llama_vocabulary(self.vocab, end_ids)

    def encode(self, text: str, add_special_tokens: bool = False) -> Encoding:
        import llama_cpp

        data = text.encode("utf-8")
        room = len(data) + 8  # a token covers at least one byte; plus BOS/EOS
        for _ in range(2):
            buffer = (llama_cpp.llama_token * room)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buffer, room, add_special_tokens, True)
            if n >= 0:
                return Encoding(list(buffer[:n]))
            room = -n
        raise ArtifactError(f"llama.cpp could not tokenise a text of {len(data)} bytes")

    def decode_bytes(self, ids: Sequence[int], skip_special_tokens: bool = True) -> bytes:
        import llama_cpp

        if not ids:
            return b""
        # llama.cpp indexes its vocabulary unchecked (an id past the end aborts the process)
        ids = check_token_ids(ids, self.vocab_size, "llama.cpp detokenise")
        tokens = (llama_cpp.llama_token * len(ids))(*ids)
        room = 8 * len(ids) + 16
        for _ in range(2):
            buffer = ctypes.create_string_buffer(room)
            n = llama_cpp.llama_detokenize(self.vocab, tokens, len(ids), buffer, room, False,
                                           not skip_special_tokens)
            if n >= 0:
                return buffer.raw[:n]
            room = -n
        raise ArtifactError(f"llama.cpp could not detokenise {len(ids)} tokens")

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        # broken multi-byte characters show as U+FFFD, which the incremental detokeniser waits on
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        """The text of one token as written in a prompt (special tokens included)."""
        return self.decode([token_id], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        import llama_cpp

        return llama_cpp.llama_vocab_n_tokens(self.vocab)

    def end_of_generation_ids(self) -> set[int]:
        """Every id llama.cpp treats as ending a generation (EOS, end-of-turn, ...)."""
        import llama_cpp

        return {i for i in range(self.vocab_size) if llama_cpp.llama_vocab_is_eog(self.vocab, i)}


class LlamaCppDecoder(Decoder):
    """Logits from a llama.cpp context, reusing the KV cache for a prompt's shared prefix.

    A chat re-sends the whole conversation each turn; only the tokens after the longest prefix
    shared with what the cache already holds are evaluated again.
    """

    def __init__(self, llm, context_length: int | None = None):
        self.llm = llm
        # llama.cpp rounds its context up (to 256); the limit kept is what was asked for
        self.context_length = min(llm.n_ctx(), context_length or llm.n_ctx())
        self.n_vocab = llm.n_vocab()
        self.cached: list[int] = []  # the tokens whose keys and values the cache holds
        self.views: dict[int, np.ndarray] = {}

    def _logits(self) -> np.ndarray:
        import llama_cpp

        # the last evaluated position's row, read in place: no copy of llama.cpp's buffer. The row
        # sits at the same address step after step, so its numpy view is made once and reused.
        row = llama_cpp.llama_get_logits_ith(context_pointer(self.llm), -1)
        address = ctypes.cast(row, ctypes.c_void_p).value
        view = self.views.get(address)
        if view is None:
            if not address:
                raise ArtifactError("llama.cpp returned no logits for the last token")
            view = np.ctypeslib.as_array((ctypes.c_float * self.n_vocab).from_address(address))  # (vocab,)
            self.views = {address: view}  # an old address is not valid once llama.cpp reallocates
        return view

    def _eval(self, ids: Sequence[int]) -> None:
        ids = check_token_ids(ids, self.n_vocab, "llama.cpp input")  # an id past the vocabulary aborts
        if len(self.cached) + len(ids) > self.context_length:
            raise ContextOverflowError(
                f"{len(self.cached) + len(ids)} tokens exceed the context length {self.context_length}"
            )
        self.llm.eval(ids)
        self.cached.extend(ids)

    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        ids = list(ids)
        shared = 0
        for old, new in zip(self.cached, ids):
            if old != new:
                break
            shared += 1
        shared = min(shared, len(ids) - 1)  # evaluate at least one token to get its logits
        self.llm.n_tokens = shared  # eval() drops everything the cache holds past this point
        self.cached = self.cached[:shared]
        self._eval(ids[shared:])
        return self._logits()

    def step(self, token_id: int) -> np.ndarray:
        self._eval([token_id])
        return self._logits()

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None


def context_for(header, requested: int | None, user_n_ctx: int | None = None) -> int:
    """The context to allocate: the trained (or manifest) length, capped at MAX_CONTEXT unless
    the user asked for a size (the KV cache grows with it, so large contexts are opt-in)."""
    arch = header.get("general.architecture", "llama")
    trained = int(requested or header.get(f"{arch}.context_length") or MAX_CONTEXT)
    if user_n_ctx is not None:
        if user_n_ctx < 1:
            raise UsageError(f"n_ctx must be a positive integer, got {user_n_ctx}")
        return min(trained, user_n_ctx)
    return min(trained, MAX_CONTEXT)


def open_llama(path: Path, options: RuntimeOptions, n_ctx: int | None = None, extra: dict | None = None,
               sequences: int | None = None):
    """A llama_cpp.Llama for a GGUF file whose header has been checked first, and its context.

    `extra`: further Llama arguments (the embedder's embedding=True and batch sizes).
    `sequences`: the caller makes its own context for that many sequences of `n_ctx` tokens each
    (LlamaBatchDecoder): the preflight counts the KV cache of all of them, and the Llama's own
    context, which then serves nothing, is kept minimal."""
    header = read_gguf_header(path)
    n_ctx = context_for(header, n_ctx, options.n_ctx)
    if options.provider != "cpu":
        raise ProviderError(
            f"GGUF models run on llama.cpp; use --n-gpu-layers instead of --provider {options.provider}")
    import llama_cpp

    if options.n_gpu_layers and not llama_cpp.llama_supports_gpu_offload():
        raise ProviderError(
            f"n_gpu_layers={options.n_gpu_layers} asked for, but this llama-cpp-python build has no GPU "
            "support; reinstall it with a GPU backend (CUDA, Metal, Vulkan) or use n_gpu_layers=0"
        )
    threads = thread_count(options.threads)
    if not options.n_gpu_layers:  # layers on a GPU live in its memory, which is not measured here
        check_fits(path, header, header.file_size or path.stat().st_size, n_ctx, sequences=sequences or 1)
    if sequences is not None:
        extra = {**(extra or {}), "n_batch": MINIMAL_BATCH, "n_ubatch": MINIMAL_BATCH}
    with captured_llama_log(GGML_LOG_ERROR) as log:
        try:
            llm = llama_cpp.Llama(
                model_path=str(path), n_ctx=n_ctx if sequences is None else MINIMAL_CONTEXT, n_threads=threads,
                n_threads_batch=threads, n_gpu_layers=options.n_gpu_layers, use_mmap=True,
                logits_all=False, verbose=False, **(extra or {}),
            )
        except Exception as err:  # noqa: BLE001
            # llama.cpp fails with ValueError/RuntimeError; llama-cpp-python's own Python also compiles
            # every chat template in the metadata (a jinja2 TemplateSyntaxError on a broken one)
            # the first error is the cause ("key not found in model: llama.block_count"); later
            # ones only say that loading failed. Drop the C function names in front of it.
            reason = re.sub(r"^\w+: ", "", next(iter(log_lines(log)), "") or first_line(err))
            raise ArtifactError(f"{path}: llama.cpp could not load the model ({first_line(reason)})") from None
    return llm, n_ctx


def load_llama(folder: Path, manifest: Manifest, options: RuntimeOptions):
    """The runtime entry the llama family registers for format "gguf"."""
    from edgelm.runtime.chat.generator import ChatGenerator

    path = artifact_file(folder, manifest, manifest.model.file, "model.file")
    where = str(path) if manifest.source.bare_gguf else manifest_where(folder)
    check_gguf(read_gguf_header(path), manifest, where)
    if options.parallel is not None:
        return _scheduled_llama(path, manifest, options)
    llm, n_ctx = open_llama(path, options, manifest.model.context_length)
    tokenizer = LlamaCppTokenizer(vocab_pointer(llm))
    return ChatGenerator(LlamaCppDecoder(llm, n_ctx), tokenizer, manifest)


def _scheduled_llama(path: Path, manifest: Manifest, options: RuntimeOptions):
    """A chat generator whose calls are sequences of one scheduler over `options.parallel` slots."""
    from edgelm.runtime.chat.generator import ChatGenerator
    from edgelm.runtime.core.scheduler import Scheduler

    decoder = open_batch_decoder(path, options, options.parallel, manifest.model.context_length)
    tokenizer = LlamaCppTokenizer(vocab_pointer(decoder.llm))
    return ChatGenerator(decoder, tokenizer, manifest, scheduler=Scheduler(decoder, name=path.stem))


def open_batch_decoder(path: Path, options: RuntimeOptions, slots: int, n_ctx: int | None = None,
                       batch_tokens: int | None = None):
    """A LlamaBatchDecoder over a GGUF file: `slots` sequences of up to `n_ctx` tokens each (the
    model's context, capped as `context_for` says), in one unified KV cache."""
    from edgelm.runtime.llamacpp.batch import DEFAULT_BATCH_TOKENS, LlamaBatchDecoder, check_slots
    from edgelm.runtime.llamacpp.saved_prefixes import DEFAULT_BUDGET

    check_slots(slots)
    llm, n_ctx = open_llama(path, options, n_ctx, sequences=slots)
    try:
        header = read_gguf_header(path)
        saved = saved_prefix_budget(header, header.file_size or path.stat().st_size, n_ctx, slots, DEFAULT_BUDGET)
        return LlamaBatchDecoder(llm, slots, n_ctx, batch_tokens or DEFAULT_BATCH_TOKENS, saved_bytes=saved)
    except BaseException:
        llm.close()
        raise
