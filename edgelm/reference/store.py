"""The reference file: validation's probe inputs and torch's outputs for them, as plain arrays.

It is an `.npz` (a zip of `.npy` arrays) written with numpy and read back by a parser of its own:
the file comes from an artifact made elsewhere, so nothing is unpickled, every size is bounded
before anything is allocated (a 100-byte header can claim a terabyte array), and every array's
name, type and number of dimensions is checked against the family's schema. Any problem is one
ArtifactError naming the file.
"""

from __future__ import annotations

import io
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgelm.errors import ArtifactError, first_line
from edgelm.paths import bounded_size

REFERENCE_NAME = "reference.npz"
MAX_REFERENCE_BYTES = 64 << 20  # what exporters write stays within a few MiB (rows are budgeted)
MAX_ARRAYS = 32
MAX_HEADER_BYTES = 4096
LOGIT_BUDGET = 1 << 20  # float32 logits per reference file (4 MiB): long rows are kept for fewer positions
MAX_TOP_K = 1024  # tokens per position in a stored top-k (edgelm writes TOP_K)
TOP_K = 128  # torch's most likely tokens kept per position: the coarsened KL's resolution (metrics.py)
MASS_SLACK = 1e-3  # float32 log-probs of a top-k may sum to a hair over probability 1
ARRAY_NAME = re.compile(r"[a-z][a-z0-9_]{0,63}")
KINDS = {"float": ("f", (4, 8)), "int": ("i", (4, 8)), "text": ("U", None)}


@dataclass(frozen=True)
class Field:
    """One array a family's reference holds: its kind (float, int, text) and number of dimensions."""

    kind: str
    ndim: int
    required: bool = True


def write_reference(folder: Path, arrays: dict[str, np.ndarray]) -> Path:
    """Write the arrays as `reference.npz` in `folder` (uncompressed: float rows do not compress)."""
    path = Path(folder) / REFERENCE_NAME
    with open(path, "wb") as handle:
        np.savez(handle, **{name: np.asarray(value) for name, value in arrays.items()})
    return path


def read_reference(path: Path, schema: dict[str, Field]) -> dict[str, np.ndarray]:
    """The arrays of a reference file, each checked against `schema`; ArtifactError on any problem."""
    bounded_size(path, MAX_REFERENCE_BYTES, "reference file")
    try:
        arrays = _read_members(path, schema)
    except ArtifactError:
        raise
    except Exception as err:  # noqa: BLE001 - zipfile and zlib raise many types on hostile bytes
        raise ArtifactError(f"{path}: not a readable reference file ({first_line(err)})") from None
    missing = [name for name, f in schema.items() if f.required and name not in arrays]
    if missing:
        raise ArtifactError(f"{path}: reference file has no array {missing[0]!r}")
    return arrays


def _read_members(path: Path, schema: dict[str, Field]) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as archive:
        members = archive.infolist()
        if len(members) > MAX_ARRAYS:
            raise ArtifactError(f"{path}: reference file holds {len(members)} members (at most {MAX_ARRAYS})")
        claimed = sum(member.file_size for member in members)  # deflated members could expand far past the file
        if claimed > MAX_REFERENCE_BYTES:
            raise ArtifactError(f"{path}: reference file's arrays hold {claimed} bytes (at most {MAX_REFERENCE_BYTES})")
        budget = MAX_REFERENCE_BYTES
        for member in members:
            name = member.filename.removesuffix(".npy")
            if not member.filename.endswith(".npy") or not ARRAY_NAME.fullmatch(name) or name not in schema:
                raise ArtifactError(f"{path}: unexpected member {member.filename[:60]!r} in the reference file")
            if name in arrays:
                raise ArtifactError(f"{path}: array {name!r} appears twice in the reference file")
            with archive.open(member) as handle:
                data = handle.read(budget + 1)  # a member's claimed size is not trusted either
            if len(data) > budget:
                raise ArtifactError(f"{path}: reference file's arrays hold over {MAX_REFERENCE_BYTES} bytes")
            budget -= len(data)
            arrays[name] = _check_field(_parse_npy(data, name, path), schema[name], name, path)
    return arrays


def _parse_npy(data: bytes, name: str, path: Path) -> np.ndarray:
    """One `.npy` member (at most the file's budget of bytes), its claimed size checked against its bytes
    before any array is made."""
    where = f"{path}: array {name!r}"
    stream = io.BytesIO(data)
    version = np.lib.format.read_magic(stream)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ArtifactError(f"{where}: unsupported .npy version {version}")
    shape, fortran, dtype = readers[version](stream, max_header_size=MAX_HEADER_BYTES)
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise ArtifactError(f"{where}: dtype {str(dtype)[:40]} is not a plain number or text type")
    count = math.prod(shape)
    body = len(data) - stream.tell()
    if count * dtype.itemsize != body:
        raise ArtifactError(f"{where}: shape {shape} needs {count * dtype.itemsize} bytes, the file has {body}")
    flat = np.frombuffer(data, dtype=dtype, count=count, offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran else "C").astype(dtype.newbyteorder("="))


def _check_field(array: np.ndarray, field: Field, name: str, path: Path) -> np.ndarray:
    letter, sizes = KINDS[field.kind]
    if array.dtype.kind != letter or (sizes is not None and array.dtype.itemsize not in sizes):
        raise ArtifactError(f"{path}: array {name!r} must be of {field.kind} type, got {array.dtype}")
    if array.ndim != field.ndim:
        raise ArtifactError(f"{path}: array {name!r} must have {field.ndim} dimensions, got shape {array.shape}")
    return array


def expect_shape(arrays: dict[str, np.ndarray], name: str, shape: tuple[int | None, ...], path: Path) -> None:
    """An array's shape as the other arrays imply it (None: any length on that axis)."""
    actual = arrays[name].shape
    if len(actual) != len(shape) or any(want is not None and got != want for got, want in zip(actual, shape)):
        shown = tuple("*" if want is None else want for want in shape)
        raise ArtifactError(f"{path}: array {name!r} has shape {actual}, expected {shown}")


def check_top_k(arrays: dict[str, np.ndarray], ids: str, logp: str, positions: int, vocab: int,
                path: Path) -> None:
    """torch's top-k at every position: ids unique and within the vocabulary, log-probs finite, <= 0,
    most likely first, their mass at most 1 (the coarsened KL's rest bucket must not be negative)."""
    k = arrays[ids].shape[1] if arrays[ids].ndim == 2 else 0
    if not 2 <= k <= min(vocab, MAX_TOP_K):
        raise ArtifactError(f"{path}: array {ids!r} must keep 2..{min(vocab, MAX_TOP_K)} tokens per position")
    expect_shape(arrays, ids, (positions, k), path)
    expect_shape(arrays, logp, (positions, k), path)
    top, values = arrays[ids], arrays[logp].astype(np.float64)
    if not ((top >= 0) & (top < vocab)).all():
        raise ArtifactError(f"{path}: array {ids!r} holds token ids outside the vocabulary of {vocab}")
    ordered = np.sort(top, axis=-1)
    if (ordered[:, 1:] == ordered[:, :-1]).any():
        raise ArtifactError(f"{path}: array {ids!r} names a token twice at one position")
    check_log_probs(arrays, logp, path)
    if (np.diff(values, axis=-1) > 0).any() or (np.exp(values).sum(-1) > 1 + MASS_SLACK).any():
        raise ArtifactError(f"{path}: array {logp!r} is not most-likely-first or holds more than all the probability")


def check_log_probs(arrays: dict[str, np.ndarray], name: str, path: Path) -> None:
    values = arrays[name]
    if not (np.isfinite(values) & (values <= 0)).all():
        raise ArtifactError(f"{path}: array {name!r} holds log-probabilities that are not finite and <= 0")


def padded(rows: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Token sequences as one table right-padded with 0, and their lengths (how prompts are stored)."""
    width = max(len(r) for r in rows)
    table = np.zeros((len(rows), width), np.int64)
    for i, row in enumerate(rows):
        table[i, : len(row)] = row
    return table, np.asarray([len(r) for r in rows], np.int64)


def rows_within_budget(positions: int, width: int, minimum: int = 16) -> int:
    """How many logits rows of `width` the reference keeps: all that fit the budget, at least `minimum`."""
    return min(positions, max(minimum, LOGIT_BUDGET // max(width, 1)))


def scalar(arrays: dict[str, np.ndarray], name: str) -> float | None:
    value = arrays.get(name)
    return None if value is None else float(value)


def check_perplexities(arrays: dict[str, np.ndarray], path: Path, *names: str) -> None:
    """Stored perplexities (those present) are finite and >= 1: a ratio's denominator must not be 0 or NaN."""
    for name in names:
        value = scalar(arrays, name)
        if value is not None and not (math.isfinite(value) and value >= 1):
            raise ArtifactError(f"{path}: array {name!r} must be a finite perplexity >= 1, got {value}")
