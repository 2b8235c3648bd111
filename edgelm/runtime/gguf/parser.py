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

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelm.errors import ArtifactError

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: a tensor name and its NUL must fit
MAPPED_ALIGNMENT = 32  # ggml's TENSOR_ALIGNMENT: tensors are used in place from the memory-mapped file
SHORT_ARRAY = 1024  # numeric arrays up to this length are read (per-layer values), longer ones skipped
VOCABULARY_KEY = "tokenizer.ggml.tokens"  # its strings must be unique: llama.cpp asserts it

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
    """An array key-value, summarised: strings and long arrays are skipped, not loaded."""

    element_type: str
    length: int
    values: tuple = ()  # the numbers of a short numeric array (per-layer sizes), the vocabulary's tokens


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
    types: dict[str, str] = field(default_factory=dict)  # key -> "uint32", "string", "array[int32]", ...
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0
    file_size: int = 0

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def tensor(self, name: str) -> TensorInfo | None:
        return next((t for t in self.tensors if t.name == name), None)


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

    def raw_string(self, what: str) -> bytes:
        length = self.scalar("<Q", f"length of {what}")
        self.need(length, f"{what} ({length} bytes)")
        raw = bytes(self.buffer[self.pos : self.pos + length])
        self.pos += length
        return raw

    def string(self, what: str) -> str:
        return self.raw_string(what).decode("utf-8", errors="replace")


def _read_value(cur: _Cursor, type_id: int, key: str) -> tuple[Any, str]:
    """The value of a key and its type's name."""
    if type_id in SCALAR_TYPES:
        name, fmt = SCALAR_TYPES[type_id]
        return cur.scalar(fmt, f"value of {key!r}"), name
    if type_id == STRING:
        return cur.string(f"string value of {key!r}"), "string"
    if type_id == ARRAY:
        array = _read_array(cur, key)
        return array, f"array[{array.element_type}]"
    raise MalformedGguf(f"key {key!r} has unknown value type {type_id}")


def _read_array(cur: _Cursor, key: str) -> ArrayValue:
    element = cur.scalar("<I", f"array type of {key!r}")
    length = cur.scalar("<Q", f"array length of {key!r}")
    if element in SCALAR_TYPES:
        name, fmt = SCALAR_TYPES[element]
        width = struct.calcsize(fmt)
        cur.need(length * width, f"array {key!r} of {length} {name}")
        values = struct.unpack_from(f"<{length}{fmt[1]}", cur.buffer, cur.pos) if length <= SHORT_ARRAY else ()
        cur.pos += length * width
        return ArrayValue(name, length, values)
    if element == ARRAY:  # ggml's reader has no nested arrays; no real file holds one
        raise MalformedGguf(f"key {key!r} is an array of arrays, which llama.cpp cannot read")
    if element != STRING:
        raise MalformedGguf(f"array {key!r} has unknown element type {element}")
    cur.need(length * 8, f"array {key!r} of {length} elements")  # each holds at least a u64
    tokens = _skip_strings(cur, length, key, unique=key == VOCABULARY_KEY)
    return ArrayValue("string", length, tokens)


def _skip_strings(cur: _Cursor, count: int, key: str, unique: bool = False) -> tuple[bytes, ...]:
    """Step over `count` length-prefixed strings; a tight loop, vocabularies hold 100k+ of them.
    With `unique`, also refuse a repeated string (llama.cpp aborts on a repeated token) and
    return the strings, in no order (the vocabulary's tokens, which the metadata checks look into)."""
    read_length, buffer, size, pos = U64.unpack_from, cur.buffer, cur.size, cur.pos
    seen: set[bytes] = set()
    for i in range(count):  # noqa: B007  (i names the string in the error below)
        if pos + 8 > size:
            break
        length = read_length(buffer, pos)[0]
        if unique:
            # as llama.cpp sees a token: a C string, cut at its first NUL; an empty one renamed "[EMPTY_<i>]"
            text = bytes(buffer[pos + 8 : pos + 8 + length]).split(b"\0", 1)[0] or b"[EMPTY_%d]" % i
            if text in seen:
                raise MalformedGguf(f"{key!r} holds the token {text[:40]!r} twice (again at index {i})")
            seen.add(text)
        pos += 8 + length
        if pos > size:
            break
    else:
        cur.pos = pos
        return tuple(seen) if unique else ()
    raise MalformedGguf(f"truncated or corrupt: element {i} of {key!r} runs past the end of the file "
                        f"({size} bytes)")


def _read_metadata(cur: _Cursor, count: int, header: GgufHeader) -> None:
    cur.need(count * 12, f"{count} key-values")  # each: u64 key length + u32 type at least
    for i in range(count):
        key = cur.string(f"key {i}")
        if not key:
            raise MalformedGguf(f"key {i} is empty")
        if key in header.metadata:
            raise MalformedGguf(f"key {key!r} appears twice")
        header.metadata[key], header.types[key] = _read_value(cur, cur.scalar("<I", f"type of {key!r}"), key)


def _read_tensor_info(cur: _Cursor, index: int) -> TensorInfo:
    raw_name = cur.raw_string(f"name of tensor {index}")
    name = raw_name.decode("utf-8", errors="replace")
    if len(raw_name) >= MAX_NAME:
        raise MalformedGguf(f"tensor {name[:40]!r}... has a name of {len(raw_name)} bytes (at most {MAX_NAME - 1})")
    n_dims = cur.scalar("<I", f"dimension count of {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise MalformedGguf(f"tensor {name!r} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
    shape = tuple(cur.scalar("<Q", f"shape of {name!r}") for _ in range(n_dims))
    type_id = cur.scalar("<I", f"type of {name!r}")
    offset = cur.scalar("<Q", f"offset of {name!r}")
    if type_id not in GGML_TYPES:
        raise MalformedGguf(f"tensor {name!r} has unknown ggml type {type_id}")
    type_name, block, block_bytes = GGML_TYPES[type_id]
    if 0 in shape:  # llama.cpp aborts on an empty weight rather than refusing it
        raise MalformedGguf(f"tensor {name!r} has an empty dimension in its shape {shape}")
    elements = 1
    for dim in shape:
        elements *= dim
    if elements >= 1 << 62:
        raise MalformedGguf(f"tensor {name!r} has an impossible shape {shape}")
    if shape[0] % block:
        raise MalformedGguf(f"tensor {name!r} of type {type_name} has rows of {shape[0]}, not a multiple of {block}")
    return TensorInfo(name, shape, type_name, offset, elements // block * block_bytes)


def _check_tensor_data(header: GgufHeader, alignment: int) -> None:
    """Each tensor inside the file, aligned, and where ggml looks for it: in the order of the
    infos, each starting where the previous one ends (padded to the alignment)."""
    room = header.file_size - header.data_offset
    expected, previous = 0, None
    for tensor in header.tensors:
        if tensor.offset % alignment:
            raise MalformedGguf(f"tensor {tensor.name!r} offset {tensor.offset} is not aligned to {alignment}")
        if (header.data_offset + tensor.offset) % MAPPED_ALIGNMENT:  # ggml aborts on a misaligned mapping
            where = header.data_offset + tensor.offset
            raise MalformedGguf(f"tensor {tensor.name!r} lies at byte {where} of the file, not on the "
                                f"{MAPPED_ALIGNMENT}-byte boundary llama.cpp maps tensors at")
        if tensor.offset + tensor.nbytes > room:
            raise MalformedGguf(
                f"truncated: tensor {tensor.name!r} needs bytes up to "
                f"{header.data_offset + tensor.offset + tensor.nbytes}"
                f" but the file has {header.file_size} bytes"
            )
        if tensor.offset < expected:
            raise MalformedGguf(f"tensors {previous!r} and {tensor.name!r} overlap")
        if tensor.offset > expected:
            raise MalformedGguf(f"tensor {tensor.name!r} starts at data offset {tensor.offset}; "
                                f"the tensors before it end at {expected}")
        expected = -(-(tensor.offset + tensor.nbytes) // alignment) * alignment
        previous = tensor.name


def parse_gguf_header(buffer, size: int) -> GgufHeader:
    """Parse and check a GGUF header held in `buffer` (bytes or mmap); MalformedGguf if bad.

    This is the file's structure only; `check_model_metadata` checks what its values mean."""
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
    header = GgufHeader(version, file_size=size)
    _read_metadata(cur, n_kv, header)
    cur.need(n_tensors * 24, f"{n_tensors} tensor infos")  # name length, dims, type, offset at least
    names = set()
    for i in range(n_tensors):
        tensor = _read_tensor_info(cur, i)
        if tensor.name in names:
            raise MalformedGguf(f"tensor {tensor.name!r} appears twice")
        names.add(tensor.name)
        header.tensors.append(tensor)
    alignment = header.get("general.alignment", DEFAULT_ALIGNMENT)
    if "general.alignment" in header.types and header.types["general.alignment"] != "uint32":
        raise MalformedGguf(f"general.alignment is a {header.types['general.alignment']}, not a uint32")
    if alignment <= 0 or alignment & (alignment - 1):
        raise MalformedGguf(f"general.alignment {alignment!r} is not a power of two")
    header.data_offset = -(-cur.pos // alignment) * alignment
    _check_tensor_data(header, alignment)
    return header


TOKENIZER_KINDS = {"llama": "spm", "gpt2": "bpe", "bert": "wordpiece"}
POOLING_TYPES = {1: "mean", 2: "cls"}  # {arch}.pooling_type values edgelm's GGUF embedder reports


def manifest_from_header(path: Path, header: GgufHeader):
    """A manifest standing in for a bare GGUF file's missing edgelm.json, from its metadata; each
    section built straight in its typed form (edgelm/contract.py), every value from the file checked."""
    from edgelm.artifact import Manifest
    from edgelm.contract import GenerationSection, SourceSection, TokenizerSection, model_class, parse_section
    from edgelm.families import family_for_gguf_arch, quant_name_of_ftype

    arch = header.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ArtifactError(f"{path}: GGUF file has no general.architecture; cannot tell what model it holds")
    file_type = header.get("general.file_type")
    model_kind = header.get("tokenizer.ggml.model")

    def token_id(key: str) -> int | None:
        value = header.get(f"tokenizer.ggml.{key}")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    def section(cls: type, name: str, data: dict):
        return parse_section(cls, data, name, str(path), required=False)

    family = family_for_gguf_arch(arch)
    embedder = family is not None and family.spec("gguf").tasks == ("embed",)
    family_name = getattr(family, "name", arch)  # an architecture edgelm does not export keeps its own name
    return Manifest(
        family=family_name, task="embed" if embedder else "text-generation", format="gguf",
        quant=quant_name_of_ftype(file_type if isinstance(file_type, int) else None),
        tokenizer=section(TokenizerSection, "tokenizer", {
            "kind": TOKENIZER_KINDS.get(model_kind, model_kind), "file": path.name,
            "bos_id": token_id("bos_token_id"), "eos_id": token_id("eos_token_id"),
            "pad_id": token_id("padding_token_id")}),
        generation=section(GenerationSection, "generation", {
            "add_bos": bool(header.get("tokenizer.ggml.add_bos_token", model_kind == "llama")),
            "chat_template": header.get("tokenizer.chat_template") or ""}),
        source=section(SourceSection, "source", {"path": str(path), "bare_gguf": True}),
        validation_skipped=True,
        model=section(model_class(family_name, "gguf"), "model", {
            "file": path.name, "architecture": arch, "tensors": len(header.tensors),
            "context_length": header.get(f"{arch}.context_length"),
            **(_embedder_fields(path, header, arch) if embedder else {})}),
    )


def _embedder_fields(path: Path, header: GgufHeader, arch: str) -> dict:
    """Pooling and width of an embedder file (llama.cpp pools; edgelm reports what it did)."""
    pooling = POOLING_TYPES.get(header.get(f"{arch}.pooling_type"))
    if pooling is None:
        raise ArtifactError(f"{path}: {arch}.pooling_type {header.get(f'{arch}.pooling_type')!r} is not a pooling "
                            f"edgelm's GGUF embedder runs ({', '.join(POOLING_TYPES.values())})")
    return {"pooling": [pooling], "dim": header.get(f"{arch}.embedding_length"), "normalize": False}
