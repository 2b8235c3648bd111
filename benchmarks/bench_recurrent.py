"""Decode speed of exported RNN/LSTM models (fp32, int8) against torch eager on the same weights.

    python benchmarks/bench_recurrent.py [--cell lstm] [--hidden 256] [--layers 2] [--vocab 2000]

Weights are random (speed does not depend on their values). All contenders run in this one
process, one after another, with the same thread count, after a warm-up; each number is the
median of several repetitions. Report the ratios: absolute numbers drift on shared machines.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path


def build_source(folder: Path, cell: str, hidden: int, layers: int, vocab: int) -> None:
    import torch

    from edgelm.models.recurrent import RecurrentConfig, RecurrentLM, save_model
    from edgelm.models.tokenizer import train_bpe_tokenizer

    torch.manual_seed(0)
    from edgelm.models.corpus import builtin_text

    tokenizer = train_bpe_tokenizer(builtin_text()[:200_000], vocab)
    config = RecurrentConfig(cell=cell, vocab_size=tokenizer.get_vocab_size(), embed_size=hidden,
                             hidden_size=hidden, num_layers=layers)
    save_model(RecurrentLM(config).eval(), tokenizer, folder, {"tokenizer_kind": "bpe"})


def time_steps(step, steps: int, reps: int) -> float:
    """Median seconds per decode step over `reps` runs of `steps` steps, after one warm-up run."""
    runs = []
    for rep in range(reps + 1):
        started = time.perf_counter()
        for i in range(steps):
            step(i)
        if rep:  # the first run warms caches and allocators
            runs.append((time.perf_counter() - started) / steps)
    return statistics.median(runs)


def torch_eager(source: Path, threads: int, steps: int, reps: int) -> float:
    import torch

    from edgelm.models.recurrent import load_model

    torch.set_num_threads(threads)
    model = load_model(source)
    state = list(model.initial_state(1))
    ids = torch.zeros((1, 1), dtype=torch.int64)

    @torch.no_grad()
    def step(i: int) -> None:
        nonlocal state
        ids[0, 0] = i % 50
        _, *state = model(ids, *state)

    return time_steps(step, steps, reps)


def edgelm_decoder(artifact: Path, threads: int, steps: int, reps: int) -> tuple[float, float]:
    """(seconds per raw decoder step, seconds per token of the whole generate loop)."""
    from edgelm.runtime import load

    with load(artifact, threads=threads) as generator:
        generator.decoder.prefill([1, 2, 3])
        per_step = time_steps(lambda i: generator.decoder.step(i % 50), steps, reps)
        loop = []
        for _ in range(reps):
            result = generator.complete("The ", max_tokens=steps, temperature=0.8, seed=0)
            loop.append(result.timings["total_s"] / result.completion_tokens)
    return per_step, statistics.median(loop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cell", default="lstm", choices=["rnn", "lstm"])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    from edgelm.export import export
    from edgelm.export.options import ExportOptions
    from edgelm.runtime.device import physical_cores

    threads = args.threads or physical_cores()
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "source"
        build_source(source, args.cell, args.hidden, args.layers, args.vocab)
        rows = [("torch eager fp32", torch_eager(source, threads, args.steps, args.reps), None)]
        for quant in ("none", "int8"):
            artifact = Path(scratch) / quant
            export(source, artifact, ExportOptions(quant=quant))
            step, loop = edgelm_decoder(artifact, threads, args.steps, args.reps)
            rows.append((f"edgelm onnx {'fp32' if quant == 'none' else quant}", step, loop))
    base = rows[0][1]
    print(f"{args.cell} {args.layers}x{args.hidden}, vocab {args.vocab}, threads {threads}, "
          f"{args.steps} steps x {args.reps} reps (median)")
    print(f"{'contender':<20} {'ms/step':>9} {'tok/s':>9} {'vs torch':>9} {'loop ms/tok':>12}")
    for name, step, loop in rows:
        loop_text = f"{loop * 1e3:12.3f}" if loop else f"{'-':>12}"
        print(f"{name:<20} {step * 1e3:9.3f} {1 / step:9.0f} {base / step:8.2f}x {loop_text}")
    print(json.dumps({name: {"ms_per_step": step * 1e3, "speedup_vs_torch": base / step}
                      for name, step, _ in rows}))


if __name__ == "__main__":
    main()
