"""Training the recurrent language models on a text file or the built-in corpus."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from edgelm.errors import UsageError
from edgelm.models.corpus import builtin_text, split_held_out
from edgelm.models.recurrent import RecurrentConfig, RecurrentLM, save_model
from edgelm.models.tokenizer import train_bpe_tokenizer, train_char_tokenizer

# An RNN step costs about half an LSTM step and the RNN learns more slowly, so it gets more
# of them; both defaults took about 2m20s on an idle 2-core machine.
DEFAULT_STEPS = {"lstm": 500, "rnn": 1100}


@dataclass
class TrainOptions:
    cell: str = "lstm"
    tokenizer: str = "char"  # "char" or "bpe"
    vocab_size: int = 2000  # bpe only
    hidden: int = 256
    layers: int = 2
    steps: int | None = None  # None: the cell's default (DEFAULT_STEPS)
    seq_len: int = 96
    batch_size: int = 32
    lr: float = 3e-3
    dropout: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps is None:
            self.steps = DEFAULT_STEPS.get(self.cell, DEFAULT_STEPS["lstm"])

    def check(self) -> None:
        if self.cell not in ("rnn", "lstm"):
            raise UsageError(f"model must be rnn or lstm, got {self.cell!r}")
        if self.tokenizer not in ("char", "bpe"):
            raise UsageError(f"tokenizer must be char or bpe, got {self.tokenizer!r}")
        for name in ("hidden", "layers", "steps", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1")
        if self.tokenizer == "bpe" and self.vocab_size < 300:
            raise UsageError("vocab-size must be at least 300 for a byte-level BPE (256 bytes + merges)")
        if not 0 < self.lr < 1:
            raise UsageError(f"lr must be in (0, 1), got {self.lr}")


@dataclass
class TrainResult:
    out: Path
    steps: int
    final_loss: float
    held_out_perplexity: float
    params: int
    seconds: float


TRAINED_MODEL_TYPES = ("edgelm-rnn", "edgelm-lstm")
TRAINED_FILES = frozenset({"config.json", "model.safetensors", "tokenizer.json", "held_out.txt",
                           # the Hugging Face folders of the transformer families (edgelm.models.hf_train)
                           "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                           "vocab.txt", "chat_template.jinja"})


def check_output_folder(out: Path, force: bool = False) -> None:
    """Refuse to write into a folder that holds anything but a previous `edgelm train` output.

    Training overwrites config.json, model.safetensors and tokenizer.json; in someone else's
    model folder that would destroy their files, so it takes --force (force=True)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out} is a file, not a folder to train into")
    if force or not out.exists():
        return
    names = {p.name for p in out.iterdir()}
    if not names:
        return
    foreign = sorted(names - TRAINED_FILES)
    if foreign:
        raise UsageError(f"{out} holds files edgelm train did not write (e.g. {foreign[0]!r}); "
                         "choose an empty folder or pass --force")
    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
        # recurrent models have their own model_type; transformer folders record their run
        owned = config.get("model_type") in TRAINED_MODEL_TYPES or isinstance(config.get("edgelm_training"), dict)
    except (OSError, ValueError, AttributeError):
        owned = False
    if not owned:
        raise UsageError(f"{out} is not empty and is not a model edgelm trained (its config.json is not one); "
                         "choose an empty folder or pass --force")


def split_training_text(text: str, opts: TrainOptions) -> tuple[str, str]:
    """(train, held_out), or a UsageError when the text cannot fill a few training windows."""
    train_text, held_out = split_held_out(text)
    if len(train_text) < opts.seq_len * 4 or len(held_out) < 2:
        raise UsageError(f"training text is too short ({len(text)} characters) for seq-len {opts.seq_len}")
    return train_text, held_out


def _token_ids(tokenizer, text: str) -> np.ndarray:
    # the whole text at once, exactly as a prompt is encoded at run time: encoding line by
    # line would split whitespace runs at line ends differently and teach other statistics
    return np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int64)


def train(out: Path, opts: TrainOptions, text: str | None = None,
          on_step: Callable[[int, float], None] | None = None, force: bool = False) -> TrainResult:
    opts.check()
    check_output_folder(out, force)
    started = time.perf_counter()
    torch.manual_seed(opts.seed)
    train_text, held_out = split_training_text(builtin_text() if text is None else text, opts)
    tokenizer = (train_char_tokenizer(train_text) if opts.tokenizer == "char"
                 else train_bpe_tokenizer(train_text, opts.vocab_size))
    data = torch.from_numpy(_token_ids(tokenizer, train_text))
    config = RecurrentConfig(cell=opts.cell, vocab_size=tokenizer.get_vocab_size(),
                             embed_size=opts.hidden, hidden_size=opts.hidden,
                             num_layers=opts.layers, dropout=opts.dropout)
    model = RecurrentLM(config)
    loss = _fit(model, data, opts, on_step)
    model.eval()
    ppl = perplexity(model, torch.from_numpy(_token_ids(tokenizer, held_out)), opts.seq_len)
    training = {"steps": opts.steps, "seq_len": opts.seq_len, "batch_size": opts.batch_size,
                "lr": opts.lr, "seed": opts.seed, "held_out_perplexity": ppl}
    save_model(model, tokenizer, Path(out), {"tokenizer_kind": opts.tokenizer, "training": training})
    # the held-out slice travels with the model so that export can score perplexity on it
    (Path(out) / "held_out.txt").write_text(held_out)
    n_params = sum(p.numel() for p in model.parameters())
    return TrainResult(Path(out), opts.steps, loss, ppl, n_params, time.perf_counter() - started)


def _fit(model: RecurrentLM, data: torch.Tensor, opts: TrainOptions,
         on_step: Callable[[int, float], None] | None) -> float:
    generator = torch.Generator().manual_seed(opts.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(opts.steps))
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    smooth = float("nan")
    for step in range(opts.steps):
        starts = torch.randint(0, len(data) - opts.seq_len - 1, (opts.batch_size,), generator=generator)
        window = torch.stack([data[s : s + opts.seq_len + 1] for s in starts.tolist()])  # (B, T+1)
        logits = model(window[:, :-1], *model.initial_state(opts.batch_size))[0]  # (B, T, V)
        loss = loss_fn(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        smooth = optimizer_step(model, optimizer, schedule, loss, smooth)
        if on_step:
            on_step(step + 1, smooth)
    return smooth


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer,
                   schedule: torch.optim.lr_scheduler.LRScheduler, loss: torch.Tensor, smooth: float) -> float:
    """One clipped AdamW step and a scheduler step; returns the loss smoothed over recent steps."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    schedule.step()
    return loss.item() if math.isnan(smooth) else 0.95 * smooth + 0.05 * loss.item()


def _warmup_cosine(steps: int) -> Callable[[int], float]:
    """Learning-rate factor: a short linear warm-up, then a cosine decay to 10%."""
    warmup = max(1, steps // 20)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def perplexity(model: RecurrentLM, ids: torch.Tensor, chunk: int = 256) -> float:
    """Per-token perplexity over a whole sequence, carrying the state across chunks."""
    state = model.initial_state(1)
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, chunk):
        x = ids[start : start + chunk].unsqueeze(0)  # (1, T)
        y = ids[start + 1 : start + chunk + 1]
        x = x[:, : len(y)]
        logits, *state = model(x, *state)
        total += nn.functional.cross_entropy(logits[0], y, reduction="sum").item()
        count += len(y)
    return math.exp(total / max(count, 1))
