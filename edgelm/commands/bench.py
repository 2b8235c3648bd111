"""`edgelm bench`: artifacts measured side by side, each in its own process, rounds interleaved.

Every measurement runs in a fresh child process (`python -m edgelm.commands.bench ARTIFACT ...`),
so a row's peak RSS is that artifact's own and one backend's caches never help another. Round r
measures every artifact once before round r+1 starts, so drift on a busy machine spreads over all
rows; each row reports the median over rounds (peak RSS: the largest).

Text generators: a prompt of exactly --prompt-tokens ids runs in one prefill (its time is the
time to first token: the prefill's logits give the first new token), then --new-tokens greedy
steps. Embedders: a batch of texts is embedded and texts/s reported.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from edgelm.errors import ArtifactError, InputError, UsageError

ROW_KEYS = ("artifact", "family", "format", "quant", "size_bytes", "peak_rss_bytes",
            "prefill_tok_s", "decode_tok_s", "ttft_s")
EMBED_TEXTS = 32
WARMUP_TOKENS = 8


def artifact_size(path: Path) -> int:
    """Bytes on disk: a bare .gguf file, or every file an artifact's manifest lists."""
    from edgelm.runtime import info

    if path.is_file():
        return path.stat().st_size
    return sum(int(meta["size"]) for meta in info(path).files.values())


def peak_rss_bytes() -> int:
    """This process's own peak resident memory (VmHWM), from /proc or getrusage."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere


# -- the child: one artifact, one measurement -------------------------------------------------

def _prompt_ids(model, count: int) -> list[int]:
    """Exactly `count` ids of ordinary text (the built-in corpus tokenised by the model itself)."""
    from edgelm.models.corpus import builtin_text

    text = builtin_text()
    ids: list[int] = []
    start = 0
    while len(ids) < count and start < len(text):
        ids += model.encode(text[start:start + 4 * count])
        start += 4 * count
    if len(ids) < count:
        raise InputError(f"could not build a prompt of {count} tokens")
    return ids[:count]


def measure_generator(model, prompt_tokens: int, new_tokens: int) -> dict:
    import numpy as np

    decoder = model.decoder
    limit = decoder.context_length
    if limit is not None and prompt_tokens + new_tokens > limit:
        raise UsageError(f"--prompt-tokens {prompt_tokens} plus --new-tokens {new_tokens} exceed the "
                         f"context length {limit}")
    ids = _prompt_ids(model, prompt_tokens)
    # warm-up on other ids whose first differs, so no backend can reuse a cached prefix
    warm = [next((t for t in ids if t != ids[0]), ids[0]), *ids[:WARMUP_TOKENS - 1]]
    decoder.step(int(np.argmax(decoder.prefill(warm))))
    started = time.perf_counter()
    logits = decoder.prefill(ids)
    token = int(np.argmax(logits))  # the first new token exists once the prefill is done
    ttft = time.perf_counter() - started
    started = time.perf_counter()
    for _ in range(new_tokens):
        token = int(np.argmax(decoder.step(token)))
    decode = time.perf_counter() - started
    return {"prefill_tok_s": prompt_tokens / ttft, "decode_tok_s": new_tokens / decode, "ttft_s": ttft}


def measure_embedder(model, prompt_tokens: int) -> dict:
    from edgelm.models.corpus import builtin_text

    words = builtin_text().split()
    texts = [" ".join(words[i * prompt_tokens // 2:(i + 1) * prompt_tokens // 2]) for i in range(EMBED_TEXTS)]
    model.embed(texts[:2])  # warm-up
    started = time.perf_counter()
    model.embed(texts)
    return {"texts_s": len(texts) / (time.perf_counter() - started)}


def measure_one(path: Path, prompt_tokens: int, new_tokens: int, threads: int | None) -> dict:
    """One measurement of one artifact, in this process."""
    import edgelm
    from edgelm.runtime import info
    from edgelm.runtime.capabilities import EmbeddingModel, TextModel

    manifest = info(path)
    row = {"artifact": str(path), "family": manifest.family, "format": manifest.format, "quant": manifest.quant,
           "task": manifest.task, "size_bytes": artifact_size(path)}
    with edgelm.load(path, threads=threads) as model:
        if isinstance(model, TextModel):
            row.update(measure_generator(model, prompt_tokens, new_tokens))
        elif isinstance(model, EmbeddingModel):
            row.update(measure_embedder(model, prompt_tokens))
        else:
            raise UsageError(f"{path}: bench measures text generators and embedders, not {manifest.task}")
    row["peak_rss_bytes"] = peak_rss_bytes()
    return row


def _child_main(argv: list[str]) -> None:
    from edgelm.errors import EdgelmError

    path, prompt_tokens, new_tokens, threads = argv
    try:
        row = measure_one(Path(path), int(prompt_tokens), int(new_tokens), int(threads) if threads != "-" else None)
    except EdgelmError as err:
        print(json.dumps({"error": str(err)}))
        return
    print(json.dumps(row))


# -- the parent: rounds over children, then the table ------------------------------------------

def _run_child(path: Path, prompt_tokens: int, new_tokens: int, threads: int | None) -> dict:
    command = [sys.executable, "-m", "edgelm.commands.bench", str(path), str(prompt_tokens), str(new_tokens),
               "-" if threads is None else str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ArtifactError(f"{path}: the measuring process failed ({last})")
    row = json.loads(lines[-1])
    if "error" in row:
        raise ArtifactError(row["error"])
    return row


def bench(paths: list[Path], prompt_tokens: int = 64, new_tokens: int = 64, threads: int | None = None,
          rounds: int = 3) -> list[dict]:
    """Rows (one per artifact) of medians over `rounds` interleaved measurements."""
    if prompt_tokens < 1 or new_tokens < 1 or rounds < 1:
        raise UsageError("--prompt-tokens, --new-tokens and --rounds must be positive")
    for path in paths:
        artifact_size(path)  # a missing or broken artifact fails before anything is measured
    samples: list[list[dict]] = [[] for _ in paths]
    for _ in range(rounds):
        for i, path in enumerate(paths):
            samples[i].append(_run_child(path, prompt_tokens, new_tokens, threads))
    return [_median_row(rows) for rows in samples]


def _median_row(rows: list[dict]) -> dict:
    row = dict(rows[0])
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_s", "texts_s"):
        values = [r[key] for r in rows if r.get(key) is not None]
        row[key] = statistics.median(values) if values else None
    row["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in rows)
    row["rounds"] = len(rows)
    return {**{key: row.get(key) for key in ROW_KEYS}, **row}


def verdicts(rows: list[dict]) -> list[str]:
    """Which artifact is fastest and by how much, per speed measured by more than one row."""
    lines = []
    for key, label in (("decode_tok_s", "decode"), ("prefill_tok_s", "prefill"), ("texts_s", "embedding")):
        ranked = sorted((r for r in rows if r.get(key)), key=lambda r: r[key], reverse=True)
        if len(ranked) > 1:
            best, next_best = ranked[0], ranked[1]
            lines.append(f"fastest {label}: {best['artifact']} ({best[key]:.1f}/s), "
                         f"{best[key] / next_best[key]:.2f}x {next_best['artifact']}")
    return lines


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f} MiB"


def _num(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def table(rows: list[dict]) -> list[str]:
    header = ("artifact", "family", "format", "quant", "size", "peak RSS", "prefill tok/s", "decode tok/s",
              "TTFT ms", "texts/s")
    cells = [header] + [(
        r["artifact"], r["family"], r["format"], r["quant"], _mib(r["size_bytes"]), _mib(r["peak_rss_bytes"]),
        _num(r.get("prefill_tok_s")), _num(r.get("decode_tok_s")), _num(r.get("ttft_s"), 1000),
        _num(r.get("texts_s"))) for r in rows]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(header))]
    return ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]


def run_bench(paths: tuple[Path, ...], prompt_tokens: int, new_tokens: int, threads: int | None, rounds: int,
              as_json: bool) -> None:
    import click

    rows = bench(list(paths), prompt_tokens, new_tokens, threads, rounds)
    if as_json:
        click.echo(json.dumps({"rows": rows}, indent=2))
        return
    for line in table(rows) + verdicts(rows):
        click.echo(line)


if __name__ == "__main__":
    _child_main(sys.argv[1:])
