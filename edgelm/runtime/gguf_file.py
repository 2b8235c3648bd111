"""Checking a GGUF file's header in pure Python before llama.cpp is allowed to open it.

llama.cpp trusts the lengths and offsets it reads; a truncated download or a corrupted file can
take down the whole process that embeds edgelm. Here every count, string length, array length,
tensor shape and tensor offset is checked against the file's real size first, and the first
problem found becomes a one-line ArtifactError. Only the header is read (through mmap), never
the tensor data, so the check costs milliseconds even for a multi-gigabyte model.

Layout (little-endian): magic "GGUF", u32 version, u64 tensor count, u64 key-value count,
the key-values, the tensor infos, padding to the alignment, then the tensor data.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm.errors import ArtifactError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 3  # arrays of arrays of ...; real files use one level

# GGUF value types: id -> (name, struct format); STRING (8) and ARRAY (9) are variable-sized
SCALAR_TYPES = {
    0: ("uint8", "<B"), 1: ("int8", "<b"), 2: ("uint16", "<H"), 3: ("int16", "<h"),
    4: ("uint32", "<I"), 5: ("int32", "<i"), 6: ("float32", "<f"), 7: ("bool", "<?"),
    10: ("uint64", "<Q"), 11: ("int64", "<q"), 12: ("float64", "<d"),
}
STRING, ARRAY = 8, 9
U64 = struct.Struct("<Q")

# ggml tensor types: id -> (name, elements per block, bytes per block), pinned to ggml's values
GGML_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176),
    14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74),
    18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17),
}


class MalformedGguf(Exception):
    """The reason a header is unreadable; `read_gguf_header` adds the file name."""


@dataclass(frozen=True)
class ArrayValue:
    """An array key-value, summarised: its contents are skipped, not loaded."""

    element_type: str
    length: int


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: the row length first
    ggml_type: str
    offset: int  # from the start of the data section
    nbytes: int


@dataclass
class GgufHeader:
    version: int
    metadata: dict[str, Any] = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0
    file_size: int = 0

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


class _Cursor:
    """Reads little-endian values from a buffer, refusing to step past its end."""

    def __init__(self, buffer, size: int):
        self.buffer, self.size, self.pos = buffer, size, 0

    def need(self, nbytes: int, what: str) -> None:
        if nbytes < 0 or self.pos + nbytes > self.size:
            raise MalformedGguf(
                f"truncated or corrupt: {what} needs {nbytes} bytes at offset {self.pos}, "
                f"but the file has {self.size} bytes"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        width = struct.calcsize(fmt)
        self.need(width, what)
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += width
        return value

    def string(self, what: str) -> str:
        length = self.scalar("<Q", f"length of {what}")
        self.need(length, f"{what} ({length} bytes)")
        raw = bytes(self.buffer[self.pos : self.pos + length])
        self.pos += length
        return raw.decode("utf-8", errors="replace")


def _read_value(cur: _Cursor, type_id: int, key: str, depth: int = 0) -> Any:
    if type_id in SCALAR_TYPES:
        return cur.scalar(SCALAR_TYPES[type_id][1], f"value of {key!r}")
    if type_id == STRING:
        return cur.string(f"string value of {key!r}")
    if type_id == ARRAY:
        return _read_array(cur, key, depth)
    raise MalformedGguf(f"key {key!r} has unknown value type {type_id}")


def _read_array(cur: _Cursor, key: str, depth: int) -> ArrayValue:
    if depth >= MAX_NESTING:
        raise MalformedGguf(f"key {key!r} nests arrays more than {MAX_NESTING} deep")
    element = cur.scalar("<I", f"array type of {key!r}")
    length = cur.scalar("<Q", f"array length of {key!r}")
    if element in SCALAR_TYPES:
        width = struct.calcsize(SCALAR_TYPES[element][1])
        cur.need(length * width, f"array {key!r} of {length} {SCALAR_TYPES[element][0]}")
        cur.pos += length * width
        return ArrayValue(SCALAR_TYPES[element][0], length)
    if element not in (STRING, ARRAY):
        raise MalformedGguf(f"array {key!r} has unknown element type {element}")
    cur.need(length * 8, f"array {key!r} of {length} elements")  # each holds at least a u64
    if element == STRING:
        _skip_strings(cur, length, key)
    else:
        for i in range(length):
            _read_array(cur, f"{key}[{i}]", depth + 1)
    return ArrayValue("string" if element == STRING else "array", length)


def _skip_strings(cur: _Cursor, count: int, key: str) -> None:
    """Step over `count` length-prefixed strings; a tight loop, vocabularies hold 100k+ of them."""
    read_length, buffer, size, pos = U64.unpack_from, cur.buffer, cur.size, cur.pos
    for i in range(count):  # noqa: B007  (i names the string in the error below)
        if pos + 8 > size:
            break
        pos += 8 + read_length(buffer, pos)[0]
        if pos > size:
            break
    else:
        cur.pos = pos
        return
    raise MalformedGguf(f"truncated or corrupt: element {i} of {key!r} runs past the end of the file "
                        f"({size} bytes)")


def _read_metadata(cur: _Cursor, count: int) -> dict[str, Any]:
    cur.need(count * 12, f"{count} key-values")  # each: u64 key length + u32 type at least
    metadata: dict[str, Any] = {}
    for i in range(count):
        key = cur.string(f"key {i}")
        if key in metadata:
            raise MalformedGguf(f"key {key!r} appears twice")
        metadata[key] = _read_value(cur, cur.scalar("<I", f"type of {key!r}"), key)
    return metadata


def _read_tensor_info(cur: _Cursor, index: int) -> TensorInfo:
    name = cur.string(f"name of tensor {index}")
    n_dims = cur.scalar("<I", f"dimension count of {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise MalformedGguf(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    shape = tuple(cur.scalar("<Q", f"shape of {name!r}") for _ in range(n_dims))
    type_id = cur.scalar("<I", f"type of {name!r}")
    offset = cur.scalar("<Q", f"offset of {name!r}")
    if type_id not in GGML_TYPES:
        raise MalformedGguf(f"tensor {name!r} has unknown ggml type {type_id}")
    type_name, block, block_bytes = GGML_TYPES[type_id]
    elements = 1
    for dim in shape:
        elements *= dim
    if elements >= 1 << 62:
        raise MalformedGguf(f"tensor {name!r} has an impossible shape {shape}")
    if shape[0] % block:
        raise MalformedGguf(f"tensor {name!r} of type {type_name} has rows of {shape[0]}, not a multiple of {block}")
    return TensorInfo(name, shape, type_name, offset, elements // block * block_bytes)


def _check_tensor_data(header: GgufHeader, alignment: int) -> None:
    room = header.file_size - header.data_offset
    end_of_previous, previous = 0, None
    for tensor in sorted(header.tensors, key=lambda t: t.offset):
        if tensor.offset % alignment:
            raise MalformedGguf(f"tensor {tensor.name!r} offset {tensor.offset} is not aligned to {alignment}")
        if tensor.offset + tensor.nbytes > room:
            raise MalformedGguf(
                f"truncated: tensor {tensor.name!r} needs bytes up to "
                f"{header.data_offset + tensor.offset + tensor.nbytes}"
                f" but the file has {header.file_size} bytes"
            )
        if tensor.offset < end_of_previous:
            raise MalformedGguf(f"tensors {previous!r} and {tensor.name!r} overlap")
        end_of_previous, previous = tensor.offset + tensor.nbytes, tensor.name


def parse_gguf_header(buffer, size: int) -> GgufHeader:
    """Parse and check a GGUF header held in `buffer` (bytes or mmap); MalformedGguf if bad."""
    cur = _Cursor(buffer, size)
    cur.need(4, "the magic number")
    magic = bytes(buffer[:4])
    if magic != MAGIC:
        raise MalformedGguf(f"not a GGUF file (starts with {magic!r}, expected {MAGIC!r})")
    cur.pos = 4
    version = cur.scalar("<I", "the version")
    if version not in SUPPORTED_VERSIONS:
        hint = " (a big-endian file?)" if version >= 1 << 16 else ""
        raise MalformedGguf(f"GGUF version {version} is not supported{hint}; supported: 2, 3")
    n_tensors = cur.scalar("<Q", "the tensor count")
    n_kv = cur.scalar("<Q", "the key-value count")
    header = GgufHeader(version, _read_metadata(cur, n_kv), file_size=size)
    cur.need(n_tensors * 24, f"{n_tensors} tensor infos")  # name length, dims, type, offset at least
    names = set()
    for i in range(n_tensors):
        tensor = _read_tensor_info(cur, i)
        if tensor.name in names:
            raise MalformedGguf(f"tensor {tensor.name!r} appears twice")
        names.add(tensor.name)
        header.tensors.append(tensor)
    alignment = header.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise MalformedGguf(f"general.alignment {alignment!r} is not a power of two")
    header.data_offset = -(-cur.pos // alignment) * alignment
    _check_tensor_data(header, alignment)
    return header


def read_gguf_header(path: str | Path) -> GgufHeader:
    """Check a GGUF file from its header to the end of its last tensor; ArtifactError if bad."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            size = path.stat().st_size
            if size == 0:
                raise ArtifactError(f"{path}: not a valid GGUF file (the file is empty)")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
                return parse_gguf_header(view, size)
    except MalformedGguf as err:
        raise ArtifactError(f"{path}: not a valid GGUF file ({err})") from None
    except OSError as err:
        raise ArtifactError(f"{path}: cannot read the file ({err.strerror or err})") from None


# general.file_type values (llama.cpp's llama_ftype) -> the names edgelm uses for --quant
FILE_TYPES = {
    0: "f32", 1: "f16", 2: "q4_0", 3: "q4_1", 7: "q8_0", 8: "q5_0", 9: "q5_1", 10: "q2_k",
    11: "q3_k_s", 12: "q3_k_m", 13: "q3_k_l", 14: "q4_k_s", 15: "q4_k_m", 16: "q5_k_s",
    17: "q5_k_m", 18: "q6_k", 32: "bf16",
}
TOKENIZER_KINDS = {"llama": "spm", "gpt2": "bpe"}


def manifest_from_header(path: Path, header: GgufHeader):
    """A manifest standing in for a bare GGUF file's missing edgelm.json, from its metadata."""
    from edgelm.artifact import Manifest

    arch = header.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ArtifactError(f"{path}: GGUF file has no general.architecture; cannot tell what model it holds")
    file_type = header.get("general.file_type")
    model_kind = header.get("tokenizer.ggml.model")

    def token_id(key: str) -> int | None:
        value = header.get(f"tokenizer.ggml.{key}")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    return Manifest(
        family="llama", task="text-generation", format="gguf",
        quant=FILE_TYPES.get(file_type, f"file_type {file_type}") if file_type is not None else "unknown",
        tokenizer={"kind": TOKENIZER_KINDS.get(model_kind, model_kind), "file": path.name},
        generation={
            "bos_id": token_id("bos_token_id"), "eos_id": token_id("eos_token_id"),
            "pad_id": token_id("padding_token_id"),
            "add_bos": bool(header.get("tokenizer.ggml.add_bos_token", model_kind == "llama")),
            "context_length": header.get(f"{arch}.context_length"),
            "chat_template": header.get("tokenizer.chat_template") or "",
            "stop": [],
        },
        source={"path": str(path), "bare_gguf": True},
        validation_skipped=True,
        model={"file": path.name, "architecture": arch, "tensors": len(header.tensors)},
    )


def load_bare_gguf(path: Path, options):
    """Run a GGUF file that came without an edgelm.json (from elsewhere): checked, then loaded."""
    from edgelm.runtime.llama import load_llama

    path = Path(path)
    manifest = manifest_from_header(path, read_gguf_header(path))
    return load_llama(path.parent, manifest, options)
