"""What a JSON-schema constraint costs: decode tokens/s with and without it, and the first mask.

Two models, in one run, same threads: a GPT-2 124M-shaped int8 ONNX with a 50257-token byte-level
BPE vocabulary, and a LLaMA GGUF (Q8_0) with a 32000-token vocabulary (bench_llama.py's model and
cache). Weights are random: speed does not depend on their values, and the constraint decides
what is valid. Each model decodes --decode tokens greedily, end tokens disabled, three ways in
interleaved rounds (median reported): unconstrained; under a schema whose next token is almost
anything (a long JSON string: the mask walks the whole vocabulary); under a structured schema
(an array of small objects: keys, enums, integers, booleans). Neither schema can close within
--decode tokens, so every run decodes the same count. Decode time includes the first mask.

"First mask" is what a constrained call adds before its first token: compiling the schema,
creating the matcher and computing the first mask (the model's vocabulary adapter is cached).
"Adapter" is the one-time cost per loaded model of building llguidance's view of the vocabulary.

    .venv/bin/python benchmarks/bench_constraints.py [--threads 2] [--decode 64] [--reps 3]
    .venv/bin/python benchmarks/bench_constraints.py --small     # tiny models, seconds: a smoke run

Targets (issue 9): the constraint costs at most 10% of decode throughput; the first mask <= 50 ms.
Built models are cached in --workdir (the full-size ones take minutes to build the first time).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_llama  # noqa: E402 - the LLaMA model and its cache are bench_llama's

STRING_SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "minLength": 5000}},
                 "required": ["text"], "additionalProperties": False}
STRUCTURED_SCHEMA = {
    "type": "array", "minItems": 1000,
    "items": {"type": "object", "additionalProperties": False, "required": ["id", "color", "ok"],
              "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 100000},
                             "color": {"enum": ["red", "green", "blue", "cyan"]}, "ok": {"type": "boolean"}}},
}
MODES = {"none": None, "json string": STRING_SCHEMA, "json structured": STRUCTURED_SCHEMA}
GPT2_FULL = dict(vocab=50257, n_layer=12, n_head=12, n_embd=768)
GPT2_SMALL = dict(vocab=2000, n_layer=2, n_head=2, n_embd=64)


# -- building -----------------------------------------------------------------------------------
def synthetic_text(words: int, seed: int = 0) -> str:
    """Pseudo-words from random syllables: enough distinct pairs for BPE to reach 50257 tokens."""
    rng = np.random.default_rng(seed)
    syllables = [a + b for a in "bcdfghjklmnprstvwz" for b in "aeiouy"] + list("0123456789.,;:{}[]\"'")
    picks = rng.integers(0, len(syllables), size=(words, 3))
    lengths = rng.integers(1, 4, size=words)
    return " ".join("".join(syllables[i] for i in row[:n]) for row, n in zip(picks, lengths))


def build_gpt2(workdir: Path, shape: dict) -> Path:
    """A GPT-2 with random weights and a byte-level BPE of shape["vocab"] tokens, exported to int8."""
    artifact = workdir / "gpt2-int8"
    if (artifact / "edgelm.json").is_file():
        return artifact
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    from edgelm.export import export
    from edgelm.export.options import ExportOptions
    from edgelm.models.corpus import builtin_text

    print(f"building a random GPT-2 ({shape}) in {workdir} ...", flush=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=shape["vocab"], special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = builtin_text() + synthetic_text(400_000 if shape["vocab"] > 10_000 else 20_000)
    tokenizer.train_from_iterator([corpus[i:i + 100_000] for i in range(0, len(corpus), 100_000)], trainer)
    eos = tokenizer.token_to_id("<|endoftext|>")
    source = workdir / "gpt2-source"
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(source)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=tokenizer.get_vocab_size(), n_layer=shape["n_layer"], n_head=shape["n_head"],
                        n_embd=shape["n_embd"], bos_token_id=eos, eos_token_id=eos)
    GPT2LMHeadModel(config).save_pretrained(source)
    export(source, artifact, ExportOptions(quant="int8", validate=False))
    return artifact


def build_llama(workdir: Path, small: bool) -> Path:
    """bench_llama.py's random LLaMA (32000 tokens) in Q8_0; --small shrinks the layers, not the vocabulary."""
    if small:
        bench_llama.CONFIG = {**bench_llama.CONFIG, "hidden_size": 64, "intermediate_size": 128,
                              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1}
    bench_llama.QUANTS = ("Q8_0",)
    return bench_llama.prepare(workdir)["Q8_0"]


# -- measuring ----------------------------------------------------------------------------------
def decode_once(model, prompt: str, decode: int, schema) -> float:
    """Decode tokens/s of one greedy run of exactly `decode` tokens."""
    extra = {"json_schema": schema} if schema is not None else {}
    done = model.complete(prompt, max_tokens=decode, temperature=0, **extra)
    assert done.completion_tokens == decode, (done.completion_tokens, done.finish_reason, done.text[:80])
    return (decode - 1) / (done.timings["total_s"] - done.timings["prefill_s"])


def first_mask_ms(model, width: int, schema) -> float:
    """Compile the schema, create the matcher, compute the first mask (adapter already built)."""
    from edgelm.runtime.core.constraint_vocab import llg_vocabulary
    from edgelm.runtime.core.constraints import GrammarMask, json_schema_constraint

    started = time.perf_counter()
    mask = GrammarMask(json_schema_constraint(schema), lambda: llg_vocabulary(model))
    allowed = mask.allowed(width)
    elapsed = time.perf_counter() - started
    assert allowed.any()
    return elapsed * 1000


def measure(name: str, path: Path, threads: int, decode: int, reps: int) -> dict:
    import edgelm
    from edgelm.runtime.core.constraint_vocab import llg_vocabulary

    model = edgelm.load(path, threads=threads)
    model.eos_id, model.end_ids = None, set()  # random weights: always decode the full length
    prompt = "The answer, as JSON:"
    width = len(model.decoder.prefill(model.encode(prompt)))
    started = time.perf_counter()
    llg_vocabulary(model)
    adapter_ms = (time.perf_counter() - started) * 1000
    for schema in MODES.values():  # warm-up
        decode_once(model, prompt, 4, schema)
    rounds: dict[str, list[float]] = {mode: [] for mode in MODES}
    for rep in range(reps):
        order = list(MODES.items()) if rep % 2 == 0 else list(MODES.items())[::-1]
        for mode, schema in order:
            rounds[mode].append(decode_once(model, prompt, decode, schema))
    masks = {mode: statistics.median(first_mask_ms(model, width, s) for _ in range(max(reps, 3)))
             for mode, s in MODES.items() if s is not None}
    model.close()
    return {"model": name, "vocab": width, "adapter_ms": adapter_ms,
            "tg": {mode: statistics.median(r) for mode, r in rounds.items()}, "first_mask_ms": masks}


def table(results: list[dict], threads: int, decode: int) -> str:
    lines = [f"| model | vocab | threads | constraint | tg{decode} tok/s | vs none | first mask ms | adapter ms |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        base = r["tg"]["none"]
        for mode, tg in r["tg"].items():
            mask = f"{r['first_mask_ms'][mode]:.1f}" if mode in r["first_mask_ms"] else "-"
            adapter = f"{r['adapter_ms']:.0f}" if mode == "none" else ""
            lines.append(f"| {r['model']} | {r['vocab']} | {threads} | {mode} | {tg:.2f} | {tg / base:.3f} "
                         f"| {mask} | {adapter} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="Tiny models and few tokens: a smoke run.")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path("/tmp/edgelm-bench-constraints" + ("-small" if args.small else ""))
    workdir.mkdir(parents=True, exist_ok=True)
    gpt2 = build_gpt2(workdir, GPT2_SMALL if args.small else GPT2_FULL)
    llama_dir = workdir / "llama" if args.small else Path("/tmp/edgelm-bench-llama")
    llama_dir.mkdir(parents=True, exist_ok=True)
    llama = build_llama(llama_dir, args.small)
    results = []
    for name, path in (("gpt2-124M int8" if not args.small else "gpt2-tiny int8", gpt2),
                       ("llama Q8_0" if not args.small else "llama-tiny Q8_0", llama)):
        print(f"measuring {name} ...", flush=True)
        results.append(measure(name, path, args.threads, args.decode, args.reps))
    print()
    print(table(results, args.threads, args.decode))
    print("targets: tg vs none >= 0.90; first mask <= 50 ms (adapter: once per loaded model)")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
