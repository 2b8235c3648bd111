"""Reading a Hugging Face model folder without loading it: weights, tokenizer, special tokens.

Everything here is checked before an export starts, so a folder that cannot work fails in one
line before torch is even imported. Nothing here is specific to one architecture.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

from edgelm.artifact import sha256_of
from edgelm.errors import UnsupportedModelError, first_line
from edgelm.paths import confined, read_source_json

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


def source_file(folder: Path, name: Any, what: str) -> Path:
    """A file a source folder names, confined to it (links into its Hugging Face cache allowed)."""
    return confined(folder, name, what, error=UnsupportedModelError, hf_cache=True)


def check_source_links(folder: Path, max_entries: int = 10_000) -> None:
    """Every link in a source folder must stay inside it (or its Hugging Face cache's blobs).

    transformers, optimum and tokenizers open files of the folder themselves, by names edgelm
    never sees; checking every link up front confines those reads too.
    """
    seen = 0
    for top, dirs, files in os.walk(folder):  # links to folders are listed, never followed
        for name in sorted(dirs + files):
            seen += 1
            if seen > max_entries:
                raise UnsupportedModelError(f"{folder}: more than {max_entries} files; not a model folder")
            path = Path(top) / name
            if path.is_symlink():
                source_file(folder, str(path.relative_to(folder)), "linked file")


def config_int(config: dict[str, Any], key: str, where: Path, minimum: int = 1) -> int:
    """An integer field of config.json, or one line naming it."""
    value = config.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise UnsupportedModelError(f"{where}: config.json {key} must be an integer >= {minimum}, got {value!r}")
    return value


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the weights (pickled .bin checkpoints are refused)."""
    if (folder / SAFETENSORS_INDEX).is_file():
        index = read_source_json(folder, SAFETENSORS_INDEX, "safetensors index")
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UnsupportedModelError(f"{folder / SAFETENSORS_INDEX}: weight_map must map tensor names to files")
        files = [source_file(folder, name, "weight shard") for name in sorted(set(weight_map.values()))]
    else:
        files = [source_file(folder, SAFETENSORS, "weight file")]
    missing = [str(f.relative_to(folder)) for f in files if not f.is_file()]
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
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
                raise UnsupportedModelError(
                    f"{path}: not a safetensors file (header is not JSON)"
                ) from None
        entries = header.items() if isinstance(header, dict) else [("", None)]
        for name, info in entries:
            if name == "__metadata__":
                continue
            shape = info.get("shape") if isinstance(info, dict) else None
            if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise UnsupportedModelError(f"{path}: not a safetensors file (tensor {name!r} has no valid shape)")
            shapes[name] = shape
    return shapes


def weights_sha256(folder: Path) -> dict[str, str]:
    """sha256 of each weight file, recorded in the manifest as the export's provenance."""
    return {str(path.relative_to(folder)): sha256_of(path) for path in weight_files(folder)}


def require_tokenizer(folder: Path) -> None:
    """Fail early when the folder holds no tokenizer at all (or one that links outside it)."""
    if (folder / TOKENIZER_JSON).is_file():
        source_file(folder, TOKENIZER_JSON, "tokenizer file")
        return
    for group in TOKENIZER_SOURCES:
        if all((folder / name).is_file() for name in group):
            for name in group:
                source_file(folder, name, "tokenizer file")
            return
    raise UnsupportedModelError(
        f"{folder}: no tokenizer files (expected {TOKENIZER_JSON}, or vocab.json + merges.txt)"
    )


def write_tokenizer_json(folder: Path, dest: Path) -> None:
    """Copy tokenizer.json, or have transformers build it from the older vocabulary files."""
    if (folder / TOKENIZER_JSON).is_file():
        dest.write_bytes(source_file(folder, TOKENIZER_JSON, "tokenizer file").read_bytes())
        return
    require_tokenizer(folder)  # transformers reads these files: each must lie inside the folder
    from transformers import AutoTokenizer

    try:
        fast = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
        text = fast.backend_tokenizer.to_str()
    except Exception as err:  # noqa: BLE001 - transformers raises many types for broken folders
        raise UnsupportedModelError(
            f"{folder}: tokenizer files could not be read ({first_line(err, limit=160)})"
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
