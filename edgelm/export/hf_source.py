"""Reading a Hugging Face model folder without loading it: weights, tokenizer, special tokens.

Everything here is checked before an export starts, so a folder that cannot work fails in one
line before torch is even imported. Nothing here is specific to one architecture.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from edgelm.artifact import sha256_of
from edgelm.errors import UnsupportedModelError

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TOKENIZER_JSON = "tokenizer.json"
# files from which transformers can rebuild a tokenizer.json (byte-level BPE, WordPiece, SentencePiece)
TOKENIZER_SOURCES = (
    ("vocab.json", "merges.txt"),
    ("vocab.txt",),
    ("tokenizer.model",),
    ("spiece.model",),
)
MAX_HEADER_BYTES = 100 << 20  # a safetensors header larger than this is a corrupt file, not a model


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights (pickled .bin checkpoints are refused)."""
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UnsupportedModelError(f"{index}: not a valid safetensors index") from None
        files = [folder / name for name in names]
    else:
        files = [folder / SAFETENSORS]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        pickled = (folder / "pytorch_model.bin").is_file()
        hint = (
            " (only pickled pytorch_model.bin found; edgelm reads safetensors only)"
            if pickled
            else ""
        )
        raise UnsupportedModelError(f"{folder}: missing weight file(s) {', '.join(missing)}{hint}")
    return files


def tensor_shapes(folder: Path) -> dict[str, list[int]]:
    """Name -> shape of every tensor, read from the safetensors headers (no tensor data loaded)."""
    shapes: dict[str, list[int]] = {}
    for path in weight_files(folder):
        with open(path, "rb") as handle:
            raw = handle.read(8)
            size = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
            if not 0 < size <= MAX_HEADER_BYTES:
                raise UnsupportedModelError(f"{path}: not a safetensors file (bad header length)")
            try:
                header = json.loads(handle.read(size))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise UnsupportedModelError(
                    f"{path}: not a safetensors file (header is not JSON)"
                ) from None
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def weights_sha256(folder: Path) -> dict[str, str]:
    """sha256 of each weight file, recorded in the manifest as the export's provenance."""
    return {path.name: sha256_of(path) for path in weight_files(folder)}


def require_tokenizer(folder: Path) -> None:
    """Fail early when the folder holds no tokenizer at all."""
    if (folder / TOKENIZER_JSON).is_file():
        return
    if any(all((folder / name).is_file() for name in group) for group in TOKENIZER_SOURCES):
        return
    raise UnsupportedModelError(
        f"{folder}: no tokenizer files (expected {TOKENIZER_JSON}, or vocab.json + merges.txt)"
    )


def write_tokenizer_json(folder: Path, dest: Path) -> None:
    """Copy tokenizer.json, or have transformers build it from the older vocabulary files."""
    if (folder / TOKENIZER_JSON).is_file():
        dest.write_bytes((folder / TOKENIZER_JSON).read_bytes())
        return
    from transformers import AutoTokenizer

    try:
        fast = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
        text = fast.backend_tokenizer.to_str()
    except Exception as err:  # noqa: BLE001 - transformers raises many types for broken folders
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UnsupportedModelError(
            f"{folder}: tokenizer files could not be read ({first})"
        ) from None
    dest.write_text(text)


def special_token_id(
    tokenizer, config: dict[str, Any], key: str, fallback_text: str | None
) -> int | None:
    """config.json's `<key>_token_id` if set, else the id of a known token string, else None."""
    value = config.get(f"{key}_token_id")
    if isinstance(value, list):  # some configs list several eos ids; the first is the canonical one
        value = value[0] if value else None
    if value is None and fallback_text is not None:
        value = tokenizer.token_to_id(fallback_text)
    return int(value) if value is not None else None
