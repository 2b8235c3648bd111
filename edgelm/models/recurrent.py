"""RNN and LSTM language models: embedding -> recurrent stack -> linear head."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"


@dataclass
class RecurrentConfig:
    cell: str = "lstm"  # "rnn" (tanh Elman) or "lstm"
    vocab_size: int = 256
    embed_size: int = 256  # equal to hidden_size when weights are tied
    hidden_size: int = 256
    num_layers: int = 2
    dropout: float = 0.1  # between recurrent layers and before the head, training only
    tie_weights: bool = True  # share the embedding matrix with the output head

    @property
    def model_type(self) -> str:
        return f"edgelm-{self.cell}"

    def to_json(self) -> dict:
        return {"model_type": self.model_type, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict) -> RecurrentConfig:
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in data.items() if k in fields})


class RecurrentLM(nn.Module):
    """Takes token ids and the previous state, returns logits and the next state.

    The state is explicit (h, and c for LSTM) so an exported graph can prefill a prompt in
    one call and then step one token at a time, carrying the state between calls.
    """

    def __init__(self, config: RecurrentConfig):
        super().__init__()
        if config.cell not in ("rnn", "lstm"):
            raise ValueError(f"cell must be 'rnn' or 'lstm', got {config.cell!r}")
        if config.tie_weights and config.embed_size != config.hidden_size:
            raise ValueError("tied weights need embed_size == hidden_size")
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.embed_size)
        rnn_cls = nn.LSTM if config.cell == "lstm" else nn.RNN
        inner_dropout = config.dropout if config.num_layers > 1 else 0.0
        self.rnn = rnn_cls(config.embed_size, config.hidden_size, config.num_layers,
                           dropout=inner_dropout, batch_first=True)
        self.drop = nn.Dropout(config.dropout)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        if config.tie_weights:
            self.head.weight = self.embed.weight

    def initial_state(self, batch: int) -> tuple[torch.Tensor, ...]:
        shape = (self.config.num_layers, batch, self.config.hidden_size)  # (L, B, H)
        zeros = torch.zeros(shape)
        return (zeros, zeros.clone()) if self.config.cell == "lstm" else (zeros,)

    def forward(self, ids: torch.Tensor, *state: torch.Tensor):
        x = self.drop(self.embed(ids))  # (B, T, E)
        rnn_state = state if self.config.cell == "lstm" else state[0]
        out, new_state = self.rnn(x, rnn_state)  # out: (B, T, H)
        logits = self.head(self.drop(out))  # (B, T, V)
        if self.config.cell == "lstm":
            return (logits, *new_state)  # logits, h_n (L, B, H), c_n (L, B, H)
        return logits, new_state


def save_model(model: RecurrentLM, tokenizer, folder: Path, extra: dict | None = None) -> None:
    """config.json (+ `extra` facts such as tokenizer kind), model.safetensors, tokenizer.json."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = {**model.config.to_json(), **(extra or {})}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    # tied weights share storage; safetensors refuses shared tensors, so store the head only if untied
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_weights:
        tensors.pop("head.weight")
    save_file(tensors, str(folder / WEIGHTS_NAME))
    tokenizer.save(str(folder / TOKENIZER_NAME))


def load_model(folder: Path, config_data: dict | None = None) -> RecurrentLM:
    from safetensors.torch import load_file

    data = config_data or json.loads((folder / CONFIG_NAME).read_text())
    model = RecurrentLM(RecurrentConfig.from_json(data))
    tensors = load_file(str(folder / WEIGHTS_NAME))
    if model.config.tie_weights:
        tensors["head.weight"] = tensors["embed.weight"]
    model.load_state_dict(tensors)
    return model.eval()
