"""Threads and execution providers: chosen explicitly, never silently swapped."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from edgelm.errors import ArtifactError, ProviderError, UsageError, first_line

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}


@dataclass(frozen=True)
class RuntimeOptions:
    """How to run an artifact on this machine."""

    threads: int | None = None  # None: the number of physical cores
    provider: str = "cpu"  # cpu | cuda | dml | coreml (ONNX artifacts)
    n_gpu_layers: int = 0  # GGUF artifacts: layers offloaded to a GPU
    n_ctx: int | None = None  # GGUF artifacts: context to allocate (None: trained length, at most 4096)
    verify: bool = False  # check sha256 of every file before loading
    model_format: str = "onnx"  # ONNX artifacts: "ort" runs the ORT-format copy (--target mobile exports)
    # GGUF text generators: sequences decoded together by a scheduler (None: one call at a time,
    # on the single-sequence decoder); other models ignore it
    parallel: int | None = None

    def __post_init__(self) -> None:
        if self.threads is not None:
            thread_count(self.threads)  # refuse a bad count at load, before any backend sees it
        if not _integer_at_least(self.n_gpu_layers, -1):  # -1: every layer, as llama.cpp counts
            raise UsageError(f"n_gpu_layers must be an integer >= -1, got {self.n_gpu_layers!r:.40}")
        if self.model_format not in ("onnx", "ort"):
            raise UsageError(f"model_format must be 'onnx' or 'ort', got {self.model_format!r:.40}")
        if self.parallel is not None and not _integer_at_least(self.parallel, 1):
            raise UsageError(f"parallel must be a positive integer, got {self.parallel!r:.40}")
        if self.n_ctx is not None and not _integer_at_least(self.n_ctx, 1):
            raise UsageError(f"n_ctx must be a positive integer, got {self.n_ctx!r:.40}")


def _integer_at_least(value: object, low: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def physical_cores() -> int:
    """Physical cores (hyper-threads share execution units, so they rarely speed up inference)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return max(1, (os.cpu_count() or 2) // 2)
    cores = set()
    physical = core = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "physical id":
            physical = value.strip()
        elif key == "core id":
            core = value.strip()
            cores.add((physical, core))
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(len(cores) or usable, usable))


THREADS_PER_CPU = 4  # beyond this many threads per logical CPU only contention grows


def thread_count(threads: object) -> int:
    """The thread count to run with: physical cores for None; a UsageError for anything that is
    not a positive integer or is far beyond this machine (backends crash or stall on those)."""
    if threads is None:
        return physical_cores()
    if isinstance(threads, bool) or not isinstance(threads, int):
        raise UsageError(f"threads must be a positive integer, got {type(threads).__name__} {threads!r:.40}")
    limit = THREADS_PER_CPU * (os.cpu_count() or 1)
    if not 1 <= threads <= limit:
        raise UsageError(f"threads must be between 1 and {limit} ({THREADS_PER_CPU} per CPU here), got {threads}")
    return threads


def onnx_session(path: Path, options: RuntimeOptions):
    """An onnxruntime InferenceSession on the requested provider, or a ProviderError."""
    import onnxruntime as ort

    name = PROVIDERS.get(options.provider)
    if name is None:
        raise ProviderError(f"unknown provider {options.provider!r}; choose one of: {', '.join(PROVIDERS)}")
    available = ort.get_available_providers()
    if name not in available:
        offered = sorted(k for k, v in PROVIDERS.items() if v in available)
        raise ProviderError(
            f"provider {options.provider!r} is not available in this onnxruntime build "
            f"(available: {', '.join(offered)})"
        )
    so = ort.SessionOptions()
    so.intra_op_num_threads = thread_count(options.threads)
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = [name] if name == "CPUExecutionProvider" else [name, "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), sess_options=so, providers=providers)
    except Exception as err:  # onnxruntime raises its own untyped errors for bad files
        raise ArtifactError(f"{path}: onnxruntime could not load the model ({first_line(err)})") from None
    if session.get_providers()[0] != name:
        raise ProviderError(
            f"onnxruntime could not start {options.provider!r} (got {session.get_providers()[0]}); "
            "check the GPU driver and libraries"
        )
    return session
