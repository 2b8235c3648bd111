"""A memory preflight for GGUF models: will the weights and the KV cache fit in RAM?

llama.cpp allocates the whole KV cache when it opens a context. A context request (or a header
claiming a huge model) that does not fit makes the machine swap or the process die, taking the
app that embeds edgelm with it; so the need is estimated from the header and the file size and
compared with the memory available before llama.cpp is called. Where the available memory
cannot be read (not Linux, no psutil), the check is skipped rather than guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgelm.errors import ArtifactError

KV_BYTES = 2  # llama-cpp-python allocates the KV cache in F16 by default
BATCH = 512  # llama.cpp's default batch: the logits buffer and compute scratch scale with it
GIB = 1 << 30


@dataclass(frozen=True)
class MemoryNeed:
    weights: int
    kv_cache: int
    scratch: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.scratch


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation without swapping, or None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    return int(psutil.virtual_memory().available)


def _count(header, key: str) -> int | None:
    value = header.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def estimate_need(header, file_size: int, n_ctx: int, sequences: int = 1, swa_full: bool = True) -> MemoryNeed:
    """Weights (the file, mapped), the F16 KV cache for `sequences` x `n_ctx` tokens, and a
    logits/compute scratch. A batched decoder gives every sequence (slot) its whole context in one
    unified cache, so all of them are counted, not the one being decoded.

    Sliding-window layers (Gemma 3's five in six) keep a cache of their own. llama.cpp sizes it at
    the full context when the context is opened with swa_full (its default, and llama-cpp-python's
    unless told otherwise); without, at the window per sequence plus one batch, padded to 256 cells."""
    arch = header.get("general.architecture", "llama")
    layers = _count(header, f"{arch}.block_count") or 0
    embd = _count(header, f"{arch}.embedding_length") or 0
    heads = _count(header, f"{arch}.attention.head_count") or 1
    kv_heads = _count(header, f"{arch}.attention.head_count_kv") or heads
    key_len = _count(header, f"{arch}.attention.key_length") or embd // heads
    value_len = _count(header, f"{arch}.attention.value_length") or embd // heads
    per_cell = kv_heads * (key_len + value_len) * KV_BYTES  # one token of one layer
    window = _count(header, f"{arch}.attention.sliding_window")
    sliding = _sliding_layers(header.get(f"{arch}.attention.sliding_window_pattern"), layers) if window else 0
    full_cells = sequences * n_ctx
    swa_cells = full_cells if swa_full else -(-min(full_cells, window * sequences + BATCH) // 256) * 256
    kv_cache = ((layers - sliding) * full_cells + sliding * swa_cells) * per_cell
    vocab = _count(header, f"{arch}.vocab_size") or 0
    scratch = BATCH * (vocab + 4 * embd) * 4
    return MemoryNeed(file_size, kv_cache, scratch)


def _sliding_layers(pattern, layers: int) -> int:
    """How many layers slide, from a per-layer list; 0 (all counted at full size) when the file does not list them."""
    values = getattr(pattern, "values", ())
    return sum(1 for v in values[:layers] if v is True) if len(values) == layers else 0


def saved_prefix_budget(header, file_size: int, n_ctx: int, sequences: int, ceiling: int) -> int:
    """Bytes of released sequences' caches worth keeping in host memory (saved_prefixes.py): at
    most `ceiling`, and at most a quarter of what stays free once the model and its contexts are
    in, so a machine the model only just fits does not page for a cache of old conversations."""
    available = available_memory()
    if available is None:
        return ceiling
    need = estimate_need(header, file_size, n_ctx, sequences).total
    return max(0, min(ceiling, (available - need) // 4))


def check_fits(path: Path, header, file_size: int, n_ctx: int, available: int | None = None,
               sequences: int = 1) -> None:
    """An ArtifactError with the numbers when the model and the contexts of its `sequences`
    need more than is free."""
    available = available_memory() if available is None else available
    if available is None:
        return
    need = estimate_need(header, file_size, n_ctx, sequences)
    if need.total <= available:
        return
    context = f"a context of {n_ctx} tokens" if sequences == 1 else f"{sequences} sequences of {n_ctx} tokens"
    fewer = "" if sequences == 1 else " or fewer parallel sequences"
    raise ArtifactError(
        f"{path.name}: needs about {need.total / GIB:.2f} GiB (weights {need.weights / GIB:.2f} GiB + "
        f"KV cache {need.kv_cache / GIB:.2f} GiB for {context}) but only "
        f"{available / GIB:.2f} GiB of memory is available; use a smaller --n-ctx (n_ctx=){fewer} or a "
        "smaller quantization"
    )
