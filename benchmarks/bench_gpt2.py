"""GPT-2 124M decode speed near the hardware floor: edgelm's fused ONNX graph (fp32, int8, int4)
against Optimum's ORTModelForCausalLM on its own int8 export and llama-cpp-python on Q8_0.

No pretrained weights can be downloaded here, so the model has GPT-2 124M's configuration and
random weights (speed does not depend on the values). Every contender runs in its own process
(so peak RSS is its own), with the same thread count, after a warm-up; rounds are interleaved
(every contender once per round, so drifting load hits all alike) and medians are reported.
Every contender prefills exactly --prompt ids and decodes exactly --decode greedy tokens.

- edgelm rows: `edgelm bench`'s own measurement (edgelm.load, the decoder's prefill and steps).
- optimum-int8: optimum's ORTQuantizer with its dynamic AVX2 config on optimum's own fp32
  export, run by ORTModelForCausalLM.generate() with its default CPU session settings (threads
  set to --threads; torch, which only runs generate()'s glue, gets one thread).
- llama-q8_0: edgelm's GGUF Q8_0 export of the same weights, driven by llama-cpp-python's `eval`
  with argmax over `scores` (the public surface a user would write).

Effective bandwidth = weight bytes read per token x decode tokens/s, against the machine's read
bandwidth measured here (numpy sums over a buffer far larger than the caches, one per thread).
Weight bytes per token: every initializer a MatMul/MatMulNBits/Gemm/MatMulInteger reads (ONNX;
embedding rows are gathered, not read whole); the .gguf file size (llama.cpp's output matrix is
the tied token embedding, read whole).

Targets (issue 12): edgelm int8 >= 3x optimum-int8 and >= 0.8x llama-q8_0; int4 >= int8.

    .venv/bin/python benchmarks/bench_gpt2.py [--threads 2] [--prompt 64] [--decode 64] [--rounds 3]
    .venv/bin/python benchmarks/bench_gpt2.py --small     # a tiny model, to check the script runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_direct import prompt_ids, time_llama_direct  # noqa: E402 - shared with the other GGUF benchmark

CONTENDERS = {  # name: (backend, folder in the workdir)
    "optimum-int8": ("optimum ORTModelForCausalLM", "optimum-int8"),
    "llama-q8_0": ("llama-cpp-python", "edgelm-q8_0"),
    "edgelm-fp32": ("edgelm onnx (fused)", "edgelm-fp32"),
    "edgelm-int8": ("edgelm onnx (fused, MatMulNBits 8)", "edgelm-int8"),
    "edgelm-int4": ("edgelm onnx (fused, MatMulNBits 4)", "edgelm-int4"),
}
SHAPES = {"124m": {}, "small": {"n_layer": 2, "n_head": 4, "n_embd": 128, "n_positions": 256}}
WEIGHT_OPS = ("MatMul", "MatMulNBits", "Gemm", "MatMulInteger")


# -- building the models (once, cached) --------------------------------------------------------
def build(workdir: Path, shape: dict) -> None:
    from edgelm.export import export
    from edgelm.export.options import ExportOptions

    source = workdir / "source"
    if not (source / "model.safetensors").is_file():
        _build_source(source, shape)
    for folder, fmt, quant in (("edgelm-fp32", "onnx", "none"), ("edgelm-int8", "onnx", "int8"),
                               ("edgelm-int4", "onnx", "int4"), ("edgelm-q8_0", "gguf", "q8_0")):
        if not (workdir / folder / "edgelm.json").is_file():
            print(f"exporting {folder} ...", flush=True)  # validation is the tests' job; here only speed
            export(source, workdir / folder, ExportOptions(format=fmt, quant=quant, validate=False))
    if not (workdir / "optimum-int8" / "model_quantized.onnx").is_file():
        _build_optimum_int8(source, workdir / "optimum-int8")


def _build_source(source: Path, shape: dict) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from edgelm.models.corpus import builtin_text

    print("building a random GPT-2 ...", flush=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([builtin_text()], trainer)
    eos = tokenizer.token_to_id("<|endoftext|>")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(source)
    torch.manual_seed(0)
    # GPT-2's real vocabulary width (50257) for the head, whatever the tokenizer's size
    GPT2LMHeadModel(GPT2Config(bos_token_id=eos, eos_token_id=eos, **shape)).save_pretrained(source)


def _build_optimum_int8(source: Path, folder: Path) -> None:
    """Optimum's own path: main_export, then ORTQuantizer with its dynamic AVX2 configuration."""
    from optimum.exporters.onnx import main_export
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoQuantizationConfig

    print("exporting optimum-int8 ...", flush=True)
    main_export(str(source), str(folder), task="text-generation-with-past", do_validation=False)
    quantizer = ORTQuantizer.from_pretrained(folder, file_name="model.onnx")
    quantizer.quantize(save_dir=folder, quantization_config=AutoQuantizationConfig.avx2(is_static=False))
    for name in ("tokenizer.json",):
        shutil.copy(source / name, folder / name)


def weight_bytes_per_token(workdir: Path, name: str) -> int:
    folder = workdir / CONTENDERS[name][1]
    if name.startswith("llama"):
        return (folder / "model.gguf").stat().st_size
    import onnx

    path = folder / ("model_quantized.onnx" if name == "optimum-int8" else "model.onnx")
    graph = onnx.load(str(path)).graph
    sizes = {t.name: len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes for t in graph.initializer}
    used = {i for n in graph.node if n.op_type in WEIGHT_OPS for i in n.input if i in sizes}
    return sum(sizes[i] for i in used)


def read_bandwidth(threads: int, megabytes: int = 512) -> float:
    """Bytes/s the machine reads: each thread sums its own buffer (numpy releases the GIL)."""
    import numpy as np

    buffers = [np.ones(megabytes * 2**20 // 8) for _ in range(threads)]
    for b in buffers:
        b.sum()  # touch every page once
    best = 0.0
    for _ in range(5):
        workers = [threading.Thread(target=b.sum) for b in buffers]
        started = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        best = max(best, threads * megabytes * 2**20 / (time.perf_counter() - started))
    return best


# -- workers: one contender per process --------------------------------------------------------
def worker(name: str, workdir: Path, prompt: int, decode: int, threads: int) -> dict:
    from edgelm.commands.bench import measure_one, peak_rss_bytes

    folder = workdir / CONTENDERS[name][1]
    if name.startswith("edgelm-"):
        row = measure_one(folder, prompt, decode, threads)
    elif name == "llama-q8_0":
        ids = prompt_ids(workdir, prompt)
        row = time_llama_direct(folder / "model.gguf", ids, decode, threads, warm=ids[:8])
    else:
        row = _optimum(folder, prompt_ids(workdir, prompt), decode, threads)
    return {**row, "name": name, "peak_rss_bytes": peak_rss_bytes()}


def _optimum(folder: Path, ids: list[int], decode: int, threads: int) -> dict:
    import onnxruntime as ort
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    torch.set_num_threads(1)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    model = ORTModelForCausalLM.from_pretrained(folder, file_name="model_quantized.onnx", use_cache=True,
                                                session_options=options, provider="CPUExecutionProvider")
    model.generation_config.eos_token_id = None  # never stop early: exactly n new tokens
    x = torch.tensor([ids])

    def generate(n: int) -> float:
        started = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                 do_sample=False, use_cache=True, pad_token_id=0)
        assert out.shape[1] == len(ids) + n
        return time.perf_counter() - started

    generate(4)  # warm-up
    ttft = generate(1)
    total = generate(decode + 1)
    return {"prefill_tok_s": len(ids) / ttft, "decode_tok_s": decode / (total - ttft), "ttft_s": ttft}


# -- the driver ----------------------------------------------------------------------------
def run_worker(name: str, args) -> dict | None:
    cmd = [sys.executable, __file__, "--worker", name, "--workdir", str(args.workdir), "--threads",
           str(args.threads), "--prompt", str(args.prompt), "--decode", str(args.decode)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT "):])


def merge(results: list[dict]) -> dict:
    merged = dict(results[0])
    for key in ("ttft_s", "prefill_tok_s", "decode_tok_s"):
        merged[key] = statistics.median(r[key] for r in results)
    merged["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in results)
    return merged


def table(rows: list[dict], args, bandwidth: float) -> str:
    by = {r["name"]: r["decode_tok_s"] for r in rows}
    lines = [f"| contender | backend | threads | weights MB/token | pp{args.prompt} tok/s | tg{args.decode} tok/s "
             "| TTFT ms | peak RSS MB | GB/s effective | % of read bw | vs optimum-int8 | vs llama-q8_0 |",
             "|" + "---|" * 12]
    for r in rows:
        weights = weight_bytes_per_token(args.workdir, r["name"])
        effective = weights * r["decode_tok_s"]
        ratio = [f"{r['decode_tok_s'] / by[k]:.2f}x" if k in by else "-" for k in ("optimum-int8", "llama-q8_0")]
        lines.append(f"| {r['name']} | {CONTENDERS[r['name']][0]} | {args.threads} | {weights / 1e6:.0f} "
                     f"| {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.2f} | {r['ttft_s'] * 1000:.0f} "
                     f"| {r['peak_rss_bytes'] / 2**20:.0f} | {effective / 1e9:.1f} | {100 * effective / bandwidth:.0f}% "
                     f"| {ratio[0]} | {ratio[1]} |")
    return "\n".join(lines)


def verdict(rows: list[dict]) -> list[str]:
    by = {r["name"]: r["decode_tok_s"] for r in rows}
    goals = (("edgelm-int8", "optimum-int8", 3.0), ("edgelm-int8", "llama-q8_0", 0.8), ("edgelm-int4", "edgelm-int8", 1.0))
    return [f"{a} / {b} = {by[a] / by[b]:.2f} (target >= {goal}): {'met' if by[a] / by[b] >= goal else 'MISSED'}"
            for a, b, goal in goals if a in by and b in by]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="a tiny model and few tokens: checks the script")
    parser.add_argument("--only", nargs="*", choices=list(CONTENDERS), default=list(CONTENDERS))
    parser.add_argument("--worker", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = "small" if args.small else "124m"
    args.workdir = args.workdir or Path(f"/tmp/edgelm-bench-gpt2-{shape}")
    if args.worker:
        result = worker(args.worker, args.workdir, args.prompt, args.decode, args.threads)
        print("RESULT " + json.dumps(result), flush=True)
        return
    build(args.workdir, SHAPES[shape])
    runs: dict[str, list[dict]] = {name: [] for name in args.only}
    for round_ in range(args.rounds):
        for name in args.only:
            result = run_worker(name, args)
            if result is not None:
                runs[name].append(result)
                print(f"round {round_ + 1}: {name} {result['decode_tok_s']:.2f} tok/s decode", flush=True)
    rows = [merge(results) for results in runs.values() if results]
    bandwidth = read_bandwidth(args.threads)
    print(f"\nGPT-2 {shape} (random weights), {args.threads} threads, median of {args.rounds} interleaved rounds; "
          f"read bandwidth {bandwidth / 1e9:.1f} GB/s; load average {os.getloadavg()[0]:.1f}\n")
    from edgelm.machine import machine_facts

    facts = machine_facts(args.threads)  # int8 kernels differ by CPU: say which ones ran
    print(f"machine: {facts['cpu']}; isa: {' '.join(facts['isa'])}; vnni: {facts['vnni']}")
    print(table(rows, args, bandwidth))
    print("\n" + "\n".join(verdict(rows)))


if __name__ == "__main__":
    main()
