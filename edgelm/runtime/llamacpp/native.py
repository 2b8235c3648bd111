"""The one module that reaches into llama-cpp-python's private parts.

llama-cpp-python's `Llama` keeps the native pointers edgelm needs (the model, its vocabulary,
the context) and the batch it decodes with in private attributes, and its log callback in a
private module. None of that is a promise: a release may rename any of it. Keeping every such
access here, as one small function each, makes an upgrade a one-file review;
`tests/test_llama_native.py` fails when another module touches them. Everything else in edgelm
uses llama-cpp-python's public C bindings (`llama_cpp.llama_*`) and `Llama`'s public methods.
"""

from __future__ import annotations

from collections.abc import Sequence


def model_pointer(llm):
    """The native `llama_model *` a `Llama` loaded (for contexts edgelm creates itself)."""
    return llm._model.model


def vocab_pointer(llm):
    """The native `llama_vocab *` of a `Llama`'s model (tokenising, special ids)."""
    return llm._model.vocab


def context_pointer(llm):
    """The native `llama_context *` of a `Llama` (logits and embeddings are read from it)."""
    return llm._ctx.ctx


def decode_whole_sequences(llm, sequences: Sequence[Sequence[int]]) -> None:
    """One decode of several token lists on a cleared cache, list i as sequence i, every token
    an output (an encoder's pooling reads them all). Uses the `Llama`'s own batch, which is sized
    for its n_batch, so the caller keeps the total within it."""
    llm._ctx.kv_cache_clear()
    llm._batch.reset()
    for seq, ids in enumerate(sequences):
        llm._batch.add_sequence(ids, seq, True)
    llm._ctx.decode(llm._batch)


def native_tokenize_address() -> int:
    """The address of llama.cpp's C `llama_tokenize`, for llguidance to call without Python.

    The public binding is a Python wrapper; only the loaded library holds the C symbol."""
    import ctypes

    import llama_cpp

    return ctypes.cast(llama_cpp.llama_cpp._lib.llama_tokenize, ctypes.c_void_p).value


def library_log_callback():
    """llama-cpp-python's own log callback, restored after edgelm captured llama.cpp's log."""
    from llama_cpp import _logger

    return _logger.llama_log_callback
