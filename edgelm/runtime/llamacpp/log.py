"""llama.cpp's log, captured instead of printed: the one place that swaps its log callback.

llama.cpp explains failures (a missing key, a quantization fallback) only in its log. Loading and
quantizing both collect it here, then restore llama-cpp-python's own callback.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Iterator

GGML_LOG_ERROR = 4  # ggml's log levels: 1 debug, 2 info, 3 warn, 4 error, 5 continuation
GGML_LOG_CONT = 5

_swap = threading.RLock()  # the callback is process-wide; one capture at a time


@contextlib.contextmanager
def captured_llama_log(min_level: int = 0) -> Iterator[list[str]]:
    """Every llama.cpp log line of the block at `min_level` or above (continuations joined to
    their line), collected instead of printed."""
    import llama_cpp

    from edgelm.runtime.llamacpp.native import library_log_callback

    lines: list[str] = []
    last_kept = [False]

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        piece = text.decode("utf-8", errors="replace")
        if level == GGML_LOG_CONT:
            if last_kept[0] and lines:
                lines[-1] += piece
            return
        last_kept[0] = level >= min_level
        if last_kept[0]:
            lines.append(piece)

    with _swap:
        llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
        try:
            yield lines
        finally:
            llama_cpp.llama_log_set(library_log_callback(), ctypes.c_void_p(0))


def log_lines(log: list[str]) -> list[str]:
    """Captured pieces as stripped, non-empty lines (one piece may hold several lines)."""
    return [line.strip() for piece in log for line in piece.splitlines() if line.strip()]
