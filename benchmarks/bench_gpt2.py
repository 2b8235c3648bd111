"""GPT-2 124M generation speed: transformers torch, Optimum ORT, and edgelm, side by side.

No pretrained weights can be downloaded here, so the model has the real 124M configuration and
random weights (speed does not depend on the values). Each contender runs in its own
subprocess (so peak RSS is its own), with the same thread count, after a warm-up. Repetitions
run in interleaved rounds (every contender once per round), so drifting load on a shared
machine hits all of them alike; the median over rounds is reported. Every contender generates
exactly --decode tokens: end-of-text is disabled in the generation config for generate() (not
min_new_tokens, whose logits processor costs more than a decode step here) and in edgelm.
In the Optimum process torch only runs generate()'s glue, so it gets one thread: ORT's own
pool holds the --threads cores (measured: this helps Optimum).

    .venv/bin/python benchmarks/bench_gpt2.py [--threads 2] [--prompt 64] [--decode 64] [--reps 3]

Built models are cached in --workdir (default /tmp/edgelm-bench-gpt2); the first run exports
them (a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONTENDERS = {
    # name: (backend, quant, model file relative to the workdir)
    "torch-fp32": ("transformers torch", "fp32", "source/model.safetensors"),
    "optimum-int8": ("optimum ORTModelForCausalLM", "int8", "optimum-int8/model.onnx"),
    "edgelm-fp32": ("edgelm onnx", "fp32", "edgelm-fp32/model.onnx"),
    "edgelm-int8": ("edgelm onnx", "int8", "edgelm-int8/model.onnx"),
    "edgelm-int8-nobind": ("edgelm onnx, no IO binding", "int8", "edgelm-int8/model.onnx"),
}


# -- building the models (once, cached) --------------------------------------------------------
def build(workdir: Path) -> None:
    source = workdir / "source"
    if not (source / "model.safetensors").is_file():
        _build_source(source)
    for quant in ("fp32", "int8"):
        art = workdir / f"edgelm-{quant}"
        if not (art / "edgelm.json").is_file():
            from edgelm.export import export
            from edgelm.export.options import ExportOptions

            print(f"exporting {art.name} ...", flush=True)
            # validation is what tests/test_gpt2.py covers; here only speed is measured
            export(
                source,
                art,
                ExportOptions(quant="none" if quant == "fp32" else "int8", validate=False),
            )
    optimum = workdir / "optimum-int8"
    if not (optimum / "model.onnx").is_file():
        # Optimum needs config.json beside the graph: the very same int8 file, linked
        optimum.mkdir(exist_ok=True)
        for name in ("config.json", "generation_config.json"):
            shutil.copy(source / name, optimum / name)
        os.link(workdir / "edgelm-int8" / "model.onnx", optimum / "model.onnx")


def _build_source(source: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from edgelm.models.corpus import builtin_text

    print("building a random GPT-2 124M ...", flush=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=4000,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([builtin_text()], trainer)
    eos = tokenizer.token_to_id("<|endoftext|>")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(
        source
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(bos_token_id=eos, eos_token_id=eos)).save_pretrained(source)


def prompt_ids(workdir: Path, length: int) -> list[int]:
    from tokenizers import Tokenizer

    from edgelm.models.corpus import builtin_text

    tokenizer = Tokenizer.from_file(str(workdir / "source" / "tokenizer.json"))
    return tokenizer.encode(builtin_text()[:20_000]).ids[:length]


# -- workers: one contender per process --------------------------------------------------------
def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_hf_generate(
    model, ids: list[int], decode: int, reps: int
) -> tuple[list[float], list[float]]:
    """(time to first token, total time) per repetition, through generate() with a KV cache."""
    import torch

    x = torch.tensor([ids])
    mask = torch.ones_like(x)
    model.generation_config.eos_token_id = None  # never stop early: exactly n new tokens

    def gen(n: int) -> None:
        with torch.no_grad():
            out = model.generate(
                input_ids=x,
                attention_mask=mask,
                max_new_tokens=n,
                do_sample=False,
                use_cache=True,
                pad_token_id=0,
            )
        assert out.shape[1] == len(ids) + n

    gen(4)  # warm-up
    firsts = [timed(lambda: gen(1)) for _ in range(reps)]
    totals = [timed(lambda: gen(decode)) for _ in range(reps)]
    return firsts, totals


def run_edgelm(folder: Path, ids: list[int], decode: int, reps: int, threads: int, bind: bool):
    import edgelm
    from edgelm.runtime.kv_decoder import KvCacheDecoder

    model = edgelm.load(folder, threads=threads)
    model.decoder = KvCacheDecoder(model.decoder.session, model.manifest, io_binding=bind)
    model.eos_id = None  # generate exactly `decode` tokens, as min_new_tokens does for generate()
    text = model.tokenizer.decode(ids)
    assert model.encode(text) == ids, "the prompt must re-encode to the same ids"
    model.complete(text, max_tokens=4, temperature=0)  # warm-up
    firsts, totals = [], []
    for _ in range(reps):
        done = model.complete(text, max_tokens=decode, temperature=0)
        assert done.completion_tokens == decode
        firsts.append(done.timings["prefill_s"])
        totals.append(done.timings["total_s"])
    return firsts, totals


def worker(name: str, workdir: Path, threads: int, prompt: int, decode: int, reps: int) -> dict:
    ids = prompt_ids(workdir, prompt)
    if name == "torch-fp32":
        import torch
        from transformers import GPT2LMHeadModel

        torch.set_num_threads(threads)
        model = GPT2LMHeadModel.from_pretrained(workdir / "source").eval()
        firsts, totals = run_hf_generate(model, ids, decode, reps)
    elif name == "optimum-int8":
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM

        torch.set_num_threads(1)

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        model = ORTModelForCausalLM.from_pretrained(
            workdir / "optimum-int8",
            use_cache=True,
            session_options=options,
            provider="CPUExecutionProvider",
        )
        firsts, totals = run_hf_generate(model, ids, decode, reps)
    else:
        folder = workdir / ("edgelm-fp32" if name == "edgelm-fp32" else "edgelm-int8")
        firsts, totals = run_edgelm(
            folder, ids, decode, reps, threads, bind=not name.endswith("nobind")
        )
    first, total = statistics.median(firsts), statistics.median(totals)
    return {
        "name": name,
        "prompt_tokens": len(ids),
        "ttft_s": first,
        "prefill_tps": len(ids) / first,
        # decode: the tokens after the first, over the time after the first
        "decode_tps": (decode - 1) / (total - first),
        "peak_rss_mb": peak_rss_mb(),
    }


def peak_rss_mb() -> float:
    """This process's peak resident memory. Linux's ru_maxrss survives exec (it would include the
    parent's memory at fork), so prefer VmHWM, which belongs to the process's own address space."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the driver ----------------------------------------------------------------------------
def table(rows: list[dict], workdir: Path, threads: int, prompt: int, decode: int) -> str:
    by = {r["name"]: r for r in rows}
    torch_tg = by.get("torch-fp32", {}).get("decode_tps")
    optimum_tg = by.get("optimum-int8", {}).get("decode_tps")
    head = (
        f"| contender | backend | quant | size MB | threads | pp{prompt} tok/s | tg{decode} tok/s "
        "| TTFT ms | peak RSS MB | tg vs torch | tg vs optimum |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        backend, quant, file = CONTENDERS[r["name"]]
        size = (workdir / file).stat().st_size / 1e6
        vs_torch = f"{r['decode_tps'] / torch_tg:.2f}x" if torch_tg else "-"
        vs_opt = f"{r['decode_tps'] / optimum_tg:.2f}x" if optimum_tg else "-"
        lines.append(
            f"| {r['name']} | {backend} | {quant} | {size:.0f} | {threads} | {r['prefill_tps']:.1f} "
            f"| {r['decode_tps']:.2f} | {r['ttft_s'] * 1000:.0f} | {r['peak_rss_mb']:.0f} | {vs_torch} | {vs_opt} |"
        )
    return "\n".join(lines)


def run_worker(name: str, args) -> dict | None:
    """One repetition of one contender in a fresh process (so its peak memory is its own)."""
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        name,
        "--workdir",
        str(args.workdir),
        "--threads",
        str(args.threads),
        "--prompt",
        str(args.prompt),
        "--decode",
        str(args.decode),
        "--reps",
        "1",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not lines:
        print(f"{name}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(lines[-1][len("RESULT ") :])


def merge_rounds(results: list[dict]) -> dict:
    """Median speed over the rounds; the largest peak memory seen."""
    merged = dict(results[0])
    for key in ("ttft_s", "prefill_tps", "decode_tps"):
        merged[key] = statistics.median(r[key] for r in results)
    merged["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)
    merged["rounds"] = len(results)
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/edgelm-bench-gpt2"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--only", nargs="*", choices=list(CONTENDERS), default=list(CONTENDERS))
    parser.add_argument("--worker", choices=list(CONTENDERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker(
            args.worker, args.workdir, args.threads, args.prompt, args.decode, args.reps
        )
        print("RESULT " + json.dumps(result), flush=True)
        return
    build(args.workdir)
    runs: dict[str, list[dict]] = {name: [] for name in args.only}
    for round_ in range(args.reps):
        for name in args.only:
            started = time.perf_counter()
            result = run_worker(name, args)
            if result is not None:
                runs[name].append(result)
                print(
                    f"round {round_ + 1}: {name} {result['decode_tps']:.2f} tok/s decode "
                    f"({time.perf_counter() - started:.0f}s)",
                    flush=True,
                )
    rows = [merge_rounds(results) for results in runs.values() if results]
    print(
        f"\nGPT-2 124M (random weights), {args.threads} threads, median of {args.reps}; "
        f"load average {os.getloadavg()[0]:.1f} (shared machine: read the ratios)\n"
    )
    print(table(rows, args.workdir, args.threads, args.prompt, args.decode))


if __name__ == "__main__":
    main()
