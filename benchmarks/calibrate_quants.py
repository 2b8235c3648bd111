"""Calibrate edgelm's quantization thresholds on trained models: every type against full precision.

For a GPT-2 and a LLaMA trained by `edgelm train` (trained here with the defaults unless given),
export every quantization type edgelm offers (ONNX int8 against ONNX fp32; GGUF Q8_0, Q6_K,
Q5_K_M, Q4_K_M, Q4_0 against GGUF F32) and score each with `edgelm eval --base` (llama-perplexity's
protocol on the held-out text): mean KL divergence and its 99th percentile, top-1 agreement and the
perplexity ratio (ONNX int4 too). Prints the table the README publishes, and the thresholds the
margins give (edgelm/families.py holds them).

    python benchmarks/calibrate_quants.py --out .calibration                 # trains both (minutes)
    python benchmarks/calibrate_quants.py --gpt2 m/gpt2 --llama m/llama --out .calibration
    python benchmarks/calibrate_quants.py --small --out /tmp/cal             # a smoke run, tiny models
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from edgelm.families import GGUF_DECODER_QUANTS

ONNX_TYPES = ("int8", "int4")
# every quantized (not float) GGUF decoder type the registry offers
GGUF_TYPES = tuple(q.name for q in GGUF_DECODER_QUANTS if q.method == "llama.cpp")
# threshold = the worst measured mean KL times KL_MARGIN, rounded up to one significant digit: sharper
# models move further under the same quantization (on these models mean KL grew about 3x between
# 450 and 850 training steps), and larger ones are sharper still. The perplexity ratio's bound follows
# from it: to first order the excess log-perplexity is the mean KL, so 1 + 2 x the KL bound, rounded
# up to 0.01 and at least 1.01 (the noise of the 256 tokens export validation scores).
KL_MARGIN = 10.0
SMALL = dict(hidden=256, layers=1, heads=4, vocab_size=1024, seq_len=64, batch_size=4, steps=20)


def trained(family: str, folder: Path | None, out: Path, small: bool) -> Path:
    if folder is not None:
        return folder
    from edgelm.models.hf_train import HfTrainOptions, train_hf

    target = out / f"{family}-model"
    if not (target / "model.safetensors").is_file():
        started = time.perf_counter()
        train_hf(target, HfTrainOptions(family=family, **(SMALL if small else {})), force=True)
        print(f"trained {family} in {time.perf_counter() - started:.0f}s -> {target}", flush=True)
    return target


def export(source: Path, out: Path, fmt: str, quant: str) -> Path:
    import edgelm
    from edgelm.export.options import ExportOptions

    if not (out / "edgelm.json").is_file():  # measuring, not gating: the thresholds are what is calibrated
        edgelm.export(source, out, ExportOptions(format=fmt, quant=quant, validate=False))
    return out


def model_bytes(artifact: Path) -> int:
    return sum(p.stat().st_size for p in artifact.iterdir() if p.suffix in (".onnx", ".gguf") or "_data" in p.name)


def calibrate(family: str, source: Path, out: Path, chunks: int | None) -> list[dict]:
    from edgelm.commands.eval import evaluate

    rows = []
    pairs = [("onnx", "none", ONNX_TYPES)] if family == "gpt2" else []
    pairs.append(("gguf", "f32", GGUF_TYPES))
    for fmt, base_quant, quants in pairs:
        base = export(source, out / f"{family}-{fmt}-{base_quant}", fmt, base_quant)
        for quant in quants:
            artifact = export(source, out / f"{family}-{fmt}-{quant}", fmt, quant)
            numbers = evaluate(artifact, None, None, base, chunks)
            rows.append({"family": family, "format": fmt, "quant": quant, "bytes": model_bytes(artifact),
                         "base_bytes": model_bytes(base), **numbers})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | type | size (vs float) | mean KL | KL p99 | PPL ratio | top-1 |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['family']} | {r['format'].upper()} {r['quant']} | {r['bytes'] / 1e6:.2f} MB "
                     f"({r['bytes'] / r['base_bytes']:.0%}) | {r['kl_divergence']:.5f} | {r['kl_divergence_p99']:.4f} "
                     f"| {r['perplexity_ratio']:.4f} | {r['top1_agreement']:.1%} |")
    return "\n".join(lines)


def round_up(value: float, digits: int = 1) -> float:
    """Up to `digits` significant digits, rounding away from zero so a bound never shrinks."""
    if value <= 0:
        return 0.0
    scale = 10 ** (math.floor(math.log10(value)) - digits + 1)
    return math.ceil(value / scale - 1e-9) * scale


def bounds_for(worst_kl: float) -> tuple[float, float]:
    """(mean KL bound, perplexity-ratio bound) for a type whose worst measured mean KL is `worst_kl`."""
    kl = round_up(worst_kl * KL_MARGIN)
    return kl, max(1.01, math.ceil((1 + 2 * kl) * 100 - 1e-9) / 100)


def thresholds(rows: list[dict]) -> str:
    lines = [f"thresholds (mean KL x {KL_MARGIN:g} of the worst model; PPL ratio 1 + 2 x that, at least 1.01):"]
    for key in dict.fromkeys((r["format"], r["quant"]) for r in rows):
        worst = max(r["kl_divergence"] for r in rows if (r["format"], r["quant"]) == key)
        kl, ratio = bounds_for(worst)
        lines.append(f"  {key[0]} {key[1]}: mean_kl <= {kl:g}, ppl_ratio <= {ratio:g}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpt2", type=Path, help="A GPT-2 folder from `edgelm train gpt2` (default: train one).")
    parser.add_argument("--llama", type=Path, help="A LLaMA folder from `edgelm train llama` (default: train one).")
    parser.add_argument("--out", type=Path, default=Path(".calibration"), help="Working folder for the artifacts.")
    parser.add_argument("--chunks", type=int, default=None, help="Score only the first N chunks (default: all).")
    parser.add_argument("--small", action="store_true", help="Tiny models and few steps: checks the script.")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for family, folder in (("gpt2", args.gpt2), ("llama", args.llama)):
        rows += calibrate(family, trained(family, folder, args.out, args.small), args.out, args.chunks)
    print(table(rows))
    print(thresholds(rows))


if __name__ == "__main__":
    main()
