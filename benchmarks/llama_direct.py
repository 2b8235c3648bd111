"""Prompt ids and timing through llama-cpp-python's own Python surface, shared by the GGUF benchmarks."""
from __future__ import annotations

import time
from pathlib import Path


def prompt_ids(workdir: Path, length: int) -> list[int]:
    """The first `length` ids of the built-in text under the workdir's source tokenizer."""
    from tokenizers import Tokenizer

    from edgelm.models.corpus import builtin_text

    tokenizer = Tokenizer.from_file(str(workdir / "source" / "tokenizer.json"))
    return tokenizer.encode(builtin_text()[: 8 * length + 1000]).ids[:length]


def time_llama_direct(gguf: Path, ids: list[int], decode: int, threads: int, warm: list[int]) -> dict:
    """Eval `warm`, reset, then eval `ids` and `decode` greedy steps (argmax over the last row of scores)."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(str(gguf), n_ctx=len(ids) + decode + 16, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    try:
        llm.eval(warm)
        llm.reset()
        started = time.perf_counter()
        llm.eval(ids)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        ttft = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(decode):
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        decode_s = time.perf_counter() - started
    finally:
        llm.close()
    return {"prefill_tok_s": len(ids) / ttft, "decode_tok_s": decode / decode_s, "ttft_s": ttft}
