"""Training GPT-2, LLaMA and BERT on a text file or the built-in corpus, saved as Hugging Face folders.

The folder holds what a downloaded checkpoint holds (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json, generation_config.json for the decoders), plus
held_out.txt, the slice never trained on, which `edgelm eval` scores by default. config.json
records the run under "edgelm_training", which is also how `train --out` knows a folder is its own.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from edgelm.errors import UsageError
from edgelm.export.quiet import quiet_loggers
from edgelm.metrics import perplexity, perplexity_chunks, scored_positions
from edgelm.models.corpus import builtin_text, split_held_out
from edgelm.models.hf_recipes import DEFAULTS, RECIPES, Recipe, build_model, masked_batch, word_pieces
from edgelm.models.train import TrainResult, _warmup_cosine, check_output_folder, optimizer_step

HF_FAMILIES = tuple(RECIPES)
HELD_OUT_CHUNKS = 32  # at most, for the perplexity train prints (eval scores the whole slice)


@dataclass
class HfTrainOptions:
    family: str = "gpt2"
    hidden: int | None = None  # None everywhere: the family's default (hf_recipes.DEFAULTS)
    layers: int | None = None
    heads: int | None = None
    vocab_size: int | None = None
    steps: int | None = None
    seq_len: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.family not in RECIPES:
            raise UsageError(f"model must be one of {', '.join(RECIPES)}, got {self.family!r}")
        for name, value in DEFAULTS[self.family].items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def check(self) -> None:
        for name in ("hidden", "layers", "heads", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name.replace('_', '-')} must be at least 1")
        if self.seq_len < 8:
            raise UsageError("seq-len must be at least 8")
        if self.hidden % self.heads:
            raise UsageError(f"hidden {self.hidden} must be a multiple of heads {self.heads}")
        if self.vocab_size < 300:
            raise UsageError("vocab-size must be at least 300")
        if not 0 < self.lr < 1:
            raise UsageError(f"lr must be in (0, 1), got {self.lr}")

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def train_hf(out: Path, opts: HfTrainOptions, text: str | None = None,
             on_step: Callable[[int, float], None] | None = None, force: bool = False) -> TrainResult:
    """Train one family's model and save it as a Hugging Face folder at `out`."""
    opts.check()
    out = Path(out)
    check_output_folder(out, force)
    started = time.perf_counter()
    recipe = RECIPES[opts.family]
    train_text, held_out = split_text(builtin_text() if text is None else text, opts)
    torch.manual_seed(opts.seed)
    tokenizer = recipe.tokenizer(recipe.training_text(train_text), opts.vocab_size)
    data = torch.tensor(_ids(tokenizer, recipe.training_text(train_text)), dtype=torch.long)
    window = opts.seq_len if recipe.causal else opts.seq_len - 2  # BERT adds [CLS] and [SEP]
    if len(data) <= window + 1:
        raise UsageError(f"training text is too short: {len(data)} tokens for seq-len {opts.seq_len}")
    _check_held_out_length(len(_ids(tokenizer, held_out)), window, recipe, opts)  # before, not after, training
    config = recipe.config(tokenizer, opts.as_dict())
    model = build_model(recipe, config)
    with quiet_loggers("transformers"):  # its notes (e.g. the loss type it picks) are for model authors
        loss = _fit(model, recipe, tokenizer, data, window, opts, on_step)
    model.eval()
    ppl = held_out_perplexity(model, recipe, tokenizer, held_out, opts)
    model.config.edgelm_training = {**opts.as_dict(), "held_out_perplexity": ppl,
                                    "held_out_measure": "masked-token" if not recipe.causal else "llama-perplexity"}
    _save(out, model, tokenizer, held_out)
    n_params = sum(p.numel() for p in model.parameters())
    return TrainResult(out, opts.steps, loss, ppl, n_params, time.perf_counter() - started)


def split_text(text: str, opts: HfTrainOptions) -> tuple[str, str]:
    train_text, held_out = split_held_out(text)
    if len(train_text) < opts.seq_len * 16 or len(held_out) < opts.seq_len * 4:
        raise UsageError(f"training text is too short ({len(text)} characters) for seq-len {opts.seq_len}")
    return train_text, held_out


def _check_held_out_length(tokens: int, window: int, recipe: Recipe, opts: HfTrainOptions) -> None:
    """The held-out slice must fill what held_out_perplexity scores: two chunks (decoders), one window (BERT)."""
    needed = 2 * opts.seq_len if recipe.causal else window + 1
    if tokens < needed:
        raise UsageError(f"the held-out slice (the text's last 5%) has {tokens} tokens; seq-len {opts.seq_len} "
                         f"needs at least {needed}: give a longer text or a smaller --seq-len")


def _ids(tokenizer, text: str) -> list[int]:
    # encoded in one piece, as a prompt is at run time, with no special tokens added around it
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _fit(model, recipe: Recipe, tokenizer, data: torch.Tensor, window: int, opts: HfTrainOptions,
         on_step: Callable[[int, float], None] | None) -> float:
    generator = torch.Generator().manual_seed(opts.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=opts.lr, weight_decay=0.01, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _warmup_cosine(opts.steps))
    words = None if recipe.causal else word_pieces(tokenizer)
    model.train()
    smooth = float("nan")
    for step in range(opts.steps):
        starts = torch.randint(0, len(data) - window, (opts.batch_size,), generator=generator)
        batch = torch.stack([data[s : s + window] for s in starts.tolist()])  # (B, T)
        if recipe.causal:
            loss = model(input_ids=batch, labels=batch).loss
        else:
            inputs, labels = masked_batch(batch, tokenizer, generator, words)
            loss = model(input_ids=inputs, labels=labels).loss
        smooth = optimizer_step(model, optimizer, schedule, loss, smooth)
        if on_step:
            on_step(step + 1, smooth)
    return smooth


@torch.no_grad()
def held_out_perplexity(model, recipe: Recipe, tokenizer, held_out: str, opts: HfTrainOptions) -> float:
    """Decoders: llama-perplexity's protocol at the model's context (what `edgelm eval` reports).
    BERT: the perplexity of 15% masked tokens, with fixed masks."""
    ids = _ids(tokenizer, held_out)
    if recipe.causal:
        bos = tokenizer.bos_token_id if opts.family == "llama" else None
        chunks = perplexity_chunks(ids, opts.seq_len, bos)[:HELD_OUT_CHUNKS]
        logits = model(input_ids=torch.tensor(chunks)).logits.float().numpy()  # (N, T, V)
        scored = list(scored_positions(opts.seq_len))
        return _nll_perplexity(logits[:, scored], np.asarray(chunks)[:, [p + 1 for p in scored]])
    width = opts.seq_len - 2
    windows = torch.tensor([ids[i : i + width] for i in range(0, len(ids) - width, width)][:HELD_OUT_CHUNKS])
    inputs, labels = masked_batch(windows, tokenizer, torch.Generator().manual_seed(1234), word_pieces(tokenizer))
    loss = model(input_ids=inputs, labels=labels).loss
    return float(math.exp(loss.item()))


def _nll_perplexity(logits: np.ndarray, targets: np.ndarray) -> float:
    from edgelm.metrics import token_nll

    return perplexity(token_nll(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)))


def _save(out: Path, model, tokenizer, held_out: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    template = getattr(tokenizer, "chat_template", None)
    tokenizer.save_pretrained(out, legacy_format=False)  # tokenizer.json only, no slow-tokenizer files
    jinja = out / "chat_template.jinja"
    if template:  # in tokenizer_config.json, where transformers and llama.cpp's converters both look
        config_path = out / "tokenizer_config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config["chat_template"] = template
        config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        if jinja.exists():
            jinja.unlink()
    (out / "held_out.txt").write_text(held_out, encoding="utf-8")
