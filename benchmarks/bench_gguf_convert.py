"""Peak memory and time of edgelm's HF LLaMA -> GGUF conversion, against the checkpoint's size.

Builds a random-weight LLaMA (default about 0.3B parameters, F32 safetensors) in a scratch folder,
then converts it in a fresh process per quant, measuring peak RSS above the process's footprint
after imports. Streaming tensors one at a time should keep the growth far below the checkpoint.

    .venv/bin/python benchmarks/bench_gguf_convert.py [--hidden 1024 --layers 16 --vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def build(folder: Path, hidden: int, layers: int, vocab: int) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from llama_fixtures import build_tiny_llama

    build_tiny_llama(folder, tokenizer="bpe", hidden=hidden, layers=2, heads=hidden // 64,
                     kv_heads=max(1, hidden // 256))
    config = json.loads((folder / "config.json").read_text())
    config.update(num_hidden_layers=layers, intermediate_size=hidden * 8 // 3 // 256 * 256 or 256)
    config["vocab_size"] = max(vocab, config["vocab_size"])  # extra rows: unused [PAD] tokens
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=torch.float32)
    model.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def convert_child(source: str, out: str, quant: str) -> None:
    """Runs in its own process so that ru_maxrss belongs to this conversion alone."""
    import gguf  # noqa: F401  (imports first: they are the baseline)
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from edgelm.export import export
    from edgelm.export.options import ExportOptions

    base = _status_bytes("VmRSS")
    start = time.perf_counter()
    export(source, out, ExportOptions(format="gguf", quant=quant, validate=False))
    seconds = time.perf_counter() - start
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork and exec
    print(json.dumps({"base": base, "peak": _status_bytes("VmHWM"), "seconds": seconds}))


def _status_bytes(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key} (Linux only)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--quants", default="f16,q8_0,q4_k_m")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        source = Path(scratch) / "src"
        params = build(source, args.hidden, args.layers, args.vocab)
        size = sum(f.stat().st_size for f in source.glob("*.safetensors"))
        print(f"checkpoint: {params / 1e6:.0f}M parameters, {size / 2**20:.0f} MiB F32 safetensors")
        print(f"{'quant':8} {'seconds':>8} {'peak RSS MiB':>13} {'growth MiB':>11} {'growth/ckpt':>12} {'gguf MiB':>9}")
        for quant in args.quants.split(","):
            out = Path(scratch) / f"out-{quant}"
            result = subprocess.run([sys.executable, __file__, "--child", str(source), str(out), quant],
                                    capture_output=True, text=True, check=True)
            stats = json.loads(result.stdout.strip().splitlines()[-1])
            growth = stats["peak"] - stats["base"]
            gguf_size = (out / "model.gguf").stat().st_size
            print(f"{quant:8} {stats['seconds']:8.1f} {stats['peak'] / 2**20:13.0f} {growth / 2**20:11.0f} "
                  f"{growth / size:12.2f} {gguf_size / 2**20:9.0f}")


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        convert_child(*sys.argv[2:])
    else:
        main()
