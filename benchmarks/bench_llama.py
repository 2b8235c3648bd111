"""LLaMA speed: edgelm vs llama-cpp-python's Llama used directly vs transformers torch fp32.

Builds a ~300M-parameter LLaMA with random weights (speed does not depend on the values),
converts it with `edgelm export --format gguf` to Q8_0 and Q4_K_M, and measures, with the same threads, after a warm-up, median of repetitions:
prefill (pp) and decode (tg) tokens/s, time to first token, and peak RSS. edgelm and Llama
run alternately in one process on the same file, so machine noise hits both alike; peak RSS
is measured in a fresh process per backend. Decode speed is also turned into an effective
memory bandwidth (tokens/s x bytes read per token) next to numpy's measured read bandwidth.

    .venv/bin/python benchmarks/bench_llama.py [--threads N] [--reps 3] [--workdir DIR]

The machines this runs on are shared and noisy: read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

VOCAB = 32000
CONFIG = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 20, "num_attention_heads": 16,
          "num_key_value_heads": 4, "max_position_embeddings": 2048, "vocab_size": VOCAB, "rms_norm_eps": 1e-5,
          "rope_theta": 10000.0, "tie_word_embeddings": False}
QUANTS = ("Q8_0", "Q4_K_M")
PROMPT_TOKENS, DECODE_TOKENS = 128, 64


# -- building the model -----------------------------------------------------------------------
def synthetic_vocab() -> list[str]:
    """SentencePiece-style pieces where "▁w<n>" is one token for every n: prompts of exact length."""
    pieces = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], "\u2581", "w", *"0123456789", "\u2581w"]
    return pieces + [f"\u2581w{n}" for n in range(VOCAB - len(pieces))]


def write_tokenizer_model(folder: Path) -> None:
    """A SentencePiece BPE tokenizer.model of the synthetic vocabulary (no training needed)."""
    from sentencepiece import sentencepiece_model_pb2 as sp

    proto = sp.ModelProto()
    proto.trainer_spec.model_type = sp.TrainerSpec.BPE
    proto.trainer_spec.byte_fallback = True
    proto.normalizer_spec.name = "identity"
    proto.normalizer_spec.add_dummy_prefix = True
    for i, piece in enumerate(synthetic_vocab()):
        kind = {0: 2, 1: 3, 2: 3}.get(i, 6 if piece.startswith("<0x") else 1)  # unknown, control, byte, normal
        proto.pieces.add(piece=piece, score=float(len(piece)) if kind == 1 else 0.0, type=kind)
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())


def build_hf_model(folder: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(folder, safe_serialization=True)
    write_tokenizer_model(folder)


def prepare(workdir: Path) -> dict[str, Path]:
    """The HF folder and, through edgelm's own converter, one GGUF artifact per quantization;
    built once and reused by later runs. Validation is skipped: this measures speed only."""
    from edgelm.export import export
    from edgelm.export.options import ExportOptions

    hf = workdir / "hf"
    if not (hf / "tokenizer.model").exists():
        print(f"building a random LLaMA in {hf} ...", flush=True)
        build_hf_model(hf)
    files = {"hf": hf}
    for quant in QUANTS:
        artifact = workdir / quant.lower()
        if not (artifact / "edgelm.json").exists():
            print(f"converting to {quant} with edgelm export ...", flush=True)
            export(hf, artifact, ExportOptions(format="gguf", quant=quant.lower(), validate=False))
        files[quant] = artifact / "model.gguf"
    return files


# -- measuring --------------------------------------------------------------------------------
def prompt_text(seed: int, n: int) -> str:
    """n random one-token words; a new draw per repetition so no KV-cache prefix is reused."""
    words = np.random.default_rng(seed).choice(VOCAB - 300, n, replace=False)
    return " ".join(f"w{i}" for i in words)


def prefill_edgelm(model, seed: int) -> dict[str, float]:
    started = time.perf_counter()
    first = model.complete(prompt_text(seed, PROMPT_TOKENS - 1), max_tokens=1, temperature=0)
    ttft = time.perf_counter() - started
    assert first.prompt_tokens == PROMPT_TOKENS, first.prompt_tokens
    return {"pp": PROMPT_TOKENS / first.timings["prefill_s"], "ttft": ttft}


class EvalTimer:
    """Sums the time spent inside Llama.eval (llama.cpp's decode plus its thin Python wrapper);
    the rest of a decode step is the generation loop's own overhead."""

    def __init__(self, llm):
        self.llm, self.inner, self.calls = llm, llm.eval, []

    @property
    def seconds(self) -> float:
        return sum(self.calls)

    def __enter__(self):
        def timed(tokens):
            started = time.perf_counter()
            self.inner(tokens)
            self.calls.append(time.perf_counter() - started)

        self.llm.eval = timed  # an instance attribute: Llama.generate calls self.eval
        return self

    def __exit__(self, *exc) -> None:
        del self.llm.eval


def decode_edgelm(model, seed: int) -> dict[str, float]:
    model.eos_id, model.end_ids = None, set()  # random weights: always decode the full length
    with EvalTimer(model.decoder.llm) as timer:
        done = model.complete(prompt_text(seed, 8), max_tokens=DECODE_TOKENS, temperature=0)
    assert done.completion_tokens == DECODE_TOKENS and len(timer.calls) == DECODE_TOKENS
    decode_s = done.timings["total_s"] - done.timings["prefill_s"]
    # the first eval is the prompt; the others are the DECODE_TOKENS - 1 steps
    overhead = (decode_s - sum(timer.calls[1:])) / (DECODE_TOKENS - 1)
    return {"tg": (DECODE_TOKENS - 1) / decode_s, "loop_ms": overhead * 1000}


def prefill_direct(llm, seed: int) -> dict[str, float]:
    llm.reset()
    started = time.perf_counter()
    tokens = llm.tokenize(prompt_text(seed, PROMPT_TOKENS - 1).encode(), add_bos=True)
    evaluated = time.perf_counter()
    llm.eval(tokens)
    prefill_s = time.perf_counter() - evaluated
    llm.sample(temp=0.0)
    ttft = time.perf_counter() - started
    assert len(tokens) == PROMPT_TOKENS, len(tokens)
    return {"pp": PROMPT_TOKENS / prefill_s, "ttft": ttft}


def decode_direct(llm, seed: int) -> dict[str, float]:
    llm.reset()
    short = llm.tokenize(prompt_text(seed, 8).encode(), add_bos=True)
    first_at, eval_before = 0.0, 0.0
    with EvalTimer(llm) as timer:
        for count, _ in enumerate(llm.generate(short, temp=0.0, top_k=1, repeat_penalty=1.0), start=1):
            if count == 1:
                first_at, eval_before = time.perf_counter(), timer.seconds
            if count == DECODE_TOKENS:
                break
        decode_s = time.perf_counter() - first_at
        overhead = (decode_s - (timer.seconds - eval_before)) / (DECODE_TOKENS - 1)
    return {"tg": (DECODE_TOKENS - 1) / decode_s, "loop_ms": overhead * 1000}


def time_torch(folder: Path, threads: int, reps: int) -> dict[str, float]:
    import torch
    from transformers import LlamaForCausalLM

    torch.set_num_threads(threads)
    model = LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    runs = []
    with torch.inference_mode():
        for rep in range(reps + 1):  # the first is the warm-up
            ids = torch.randint(300, VOCAB, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(rep))
            started = time.perf_counter()
            out = model(ids, use_cache=True)
            prefill_s = time.perf_counter() - started
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            started = time.perf_counter()
            for _ in range(DECODE_TOKENS - 1):
                out = model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            runs.append({"pp": PROMPT_TOKENS / prefill_s, "tg": (DECODE_TOKENS - 1) / (time.perf_counter() - started),
                         "ttft": prefill_s})
    return median_of(runs[1:])


def median_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def speed_worker(path: str, threads: int, reps: int) -> dict:
    """edgelm and Llama direct on the same file, each measurement back to back and the order
    swapped every repetition, so the drifting load of a shared machine hits both alike."""
    import llama_cpp

    import edgelm

    model = edgelm.load(path, threads=threads)
    llm = llama_cpp.Llama(path, n_ctx=model.decoder.context_length, n_threads=threads,
                          n_threads_batch=threads, verbose=False)
    ours = {"prefill": (prefill_edgelm, model), "decode": (decode_edgelm, model)}
    theirs = {"prefill": (prefill_direct, llm), "decode": (decode_direct, llm)}
    runs: dict[str, list[dict]] = {"edgelm": [], "llama-cpp-python": []}
    for rep in range(reps + 1):  # the first round is the warm-up
        pair = [("edgelm", ours), ("llama-cpp-python", theirs)]
        results = {name: {} for name, _ in pair}
        for phase in ("prefill", "decode"):
            for name, fns in pair if rep % 2 else pair[::-1]:
                fn, target = fns[phase]
                results[name].update(fn(target, 1000 * rep + (phase == "decode")))
        if rep:
            for name, result in results.items():
                runs[name].append(result)
    return {name: {**median_of(r), "best_tg": max(x["tg"] for x in r), "best_pp": max(x["pp"] for x in r)}
            for name, r in runs.items()}


def memory_worker(backend: str, path: str, threads: int) -> dict:
    """Peak RSS of one backend alone: load, one prefill, one decode."""
    if backend == "torch":
        result = time_torch(Path(path), threads, reps=2)
    elif backend == "edgelm":
        import edgelm

        model = edgelm.load(path, threads=threads)
        result = {**prefill_edgelm(model, 0), **decode_edgelm(model, 1)}
    else:
        import llama_cpp

        llm = llama_cpp.Llama(path, n_ctx=CONFIG["max_position_embeddings"], n_threads=threads,
                              n_threads_batch=threads, verbose=False)
        result = {**prefill_direct(llm, 0), **decode_direct(llm, 1)}
    return {**result, "peak_rss_mb": peak_rss_mb()}


def peak_rss_mb() -> float:
    """This process's peak RSS. Not getrusage: Linux carries ru_maxrss across exec, so a child
    would report the benchmark parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def in_child(*args: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"worker {args} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def read_bandwidth_gbs(threads: int, size_mb: int = 1024) -> float:
    """numpy's read bandwidth: the max of a buffer far larger than the caches, one slice per
    thread (a SIMD integer max is the cheapest full read numpy offers)."""
    data = np.ones(size_mb * (1 << 20) // 8, dtype=np.int64)
    parts = np.array_split(data, threads)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(5):
            started = time.perf_counter()
            list(pool.map(np.max, parts))
            best = max(best, data.nbytes / (time.perf_counter() - started) / 1e9)
    return best


def bytes_per_token(path: Path) -> int:
    """Weights read to decode one token: every tensor except the embedding table (one row)."""
    from edgelm.runtime.gguf.metadata import read_gguf_header

    header = read_gguf_header(path)
    embedding = next(t for t in header.tensors if t.name == "token_embd.weight")
    return sum(t.nbytes for t in header.tensors) - embedding.nbytes + embedding.nbytes // VOCAB


def params_of(path: Path) -> int:
    from edgelm.runtime.gguf.metadata import read_gguf_header

    return sum(int(np.prod(t.shape)) for t in read_gguf_header(path).tensors)


def row(name, size_mb, params, backend, threads, r, base=None) -> str:
    ratio = f"{r['pp'] / base['pp']:5.2f} {r['tg'] / base['tg']:5.2f}" if base else "    -     -"
    return (f"| {name:<8} | {size_mb:7.0f} | {params / 1e6:5.0f}M | {backend:<16} | {threads:>2} | {r['pp']:8.1f} |"
            f" {r['tg']:7.2f} | {r['ttft'] * 1000:7.0f} | {r.get('peak_rss_mb', float('nan')):7.0f} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/edgelm-bench-llama"))
    parser.add_argument("--no-torch", action="store_true", help="Skip the transformers torch fp32 row.")
    args = parser.parse_args()
    started = time.perf_counter()
    files = prepare(args.workdir)
    bandwidth = read_bandwidth_gbs(args.threads)
    t = str(args.threads)
    lines = ["| model    | size MB | params | backend          |  t |  pp128/s |  tg64/s | TTFT ms |  RSS MB | x pp  x tg |",
             "|----------|---------|--------|------------------|----|----------|---------|---------|---------|-------------|"]
    notes = []
    for quant in QUANTS:
        path = str(files[quant])
        print(f"measuring {quant} ...", flush=True)
        speed = in_child("speed", path, t, str(args.reps))
        for backend, label in (("edgelm", "edgelm"), ("llama", "llama-cpp-python")):
            speed[label]["peak_rss_mb"] = in_child("memory", backend, path, t)["peak_rss_mb"]
        size, params = files[quant].stat().st_size / 2**20, params_of(files[quant])
        direct = speed["llama-cpp-python"]
        lines.append(row(quant, size, params, "llama-cpp-python", args.threads, direct, direct))
        lines.append(row(quant, size, params, "edgelm", args.threads, speed["edgelm"], direct))
        ours = speed["edgelm"]
        notes.append(f"{quant} best of {args.reps}, edgelm / llama-cpp-python: pp x{ours['best_pp'] / direct['best_pp']:.3f}"
                     f", tg x{ours['best_tg'] / direct['best_tg']:.3f}; per decoded token outside llama.cpp's eval:"
                     f" edgelm {ours['loop_ms']:.2f} ms, llama-cpp-python {direct['loop_ms']:.2f} ms"
                     f" (of {1000 / direct['tg']:.1f} ms)")
        per_token = bytes_per_token(files[quant])
        for label in ("llama-cpp-python", "edgelm"):
            effective = speed[label]["tg"] * per_token / 1e9
            notes.append(f"{quant} {label:<16}: {per_token / 1e6:6.0f} MB/token x {speed[label]['tg']:6.2f} tok/s = "
                         f"{effective:5.1f} GB/s effective, {effective / bandwidth:4.0%} of the measured read bandwidth")
    if not args.no_torch:
        print("measuring transformers torch fp32 ...", flush=True)
        torch_row = in_child("memory", "torch", str(files["hf"]), t)
        lines.append(row("fp32", sum(f.stat().st_size for f in files["hf"].glob("*.safetensors")) / 2**20,
                         params_of(files["Q8_0"]), "torch (HF) fp32", args.threads, torch_row))
    print()
    print("\n".join(lines))
    print("x pp / x tg: tokens/s relative to llama-cpp-python direct on the same file (1.00 = equal)")
    print(f"numpy read bandwidth with {args.threads} threads: {bandwidth:.1f} GB/s")
    print("\n".join(notes))
    print(f"(shared, noisy machine: compare ratios; whole run {time.perf_counter() - started:.0f}s)")


def worker(kind: str, *rest: str) -> None:
    if kind == "speed":
        result = speed_worker(rest[0], int(rest[1]), int(rest[2]))
    else:
        result = memory_worker(rest[0], rest[1], int(rest[2]))
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(*sys.argv[2:])
    else:
        main()
