"""A small GGUF re-writer for fuzz tests: parse a well-formed file into fields, change one, write.

Unlike the `gguf` package's writer, it writes whatever it is given, lies included: a string or
array length that is not the real one, counts that do not match, a tensor offset past the end.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
STRING, ARRAY = 8, 9
UINT32, INT32, FLOAT32, BOOL = 4, 5, 6, 7


@dataclass
class KeyValue:
    key: bytes
    type_id: int
    value: object  # int/float/bool, bytes for a string, list for an array
    element_type: int | None = None  # arrays only
    length_lie: int | None = None  # written instead of the real string length / array count


@dataclass
class Tensor:
    name: bytes
    dims: list[int]
    type_id: int
    offset: int


@dataclass
class Gguf:
    version: int
    kvs: list[KeyValue]
    tensors: list[Tensor]
    data: bytes
    alignment: int = 32
    n_kv_lie: int | None = None
    n_tensors_lie: int | None = None
    extra: dict = field(default_factory=dict)

    def find(self, key: str) -> KeyValue | None:
        return next((kv for kv in self.kvs if kv.key == key.encode()), None)

    def set(self, key: str, type_id: int, value, element_type: int | None = None) -> None:
        found = self.find(key)
        if found is None:
            self.kvs.append(KeyValue(key.encode(), type_id, value, element_type))
        else:
            found.type_id, found.value, found.element_type = type_id, value, element_type


class _Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, fmt: str):
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return value

    def string(self) -> bytes:
        length = self.take("Q")
        self.pos += length
        return self.data[self.pos - length : self.pos]

    def value(self, type_id: int):
        if type_id == STRING:
            return self.string()
        return self.take(SCALAR_FORMATS[type_id])


def parse(data: bytes) -> Gguf:
    """Parse a well-formed GGUF file (the seed); no checks, it is trusted."""
    r = _Reader(data)
    assert data[:4] == b"GGUF"
    r.pos = 4
    version, n_tensors, n_kv = r.take("I"), r.take("Q"), r.take("Q")
    kvs = []
    for _ in range(n_kv):
        key, type_id = r.string(), r.take("I")
        if type_id == ARRAY:
            element, count = r.take("I"), r.take("Q")
            kvs.append(KeyValue(key, ARRAY, [r.value(element) for _ in range(count)], element))
        else:
            kvs.append(KeyValue(key, type_id, r.value(type_id)))
    tensors = []
    for _ in range(n_tensors):
        name, n_dims = r.string(), r.take("I")
        dims = [r.take("Q") for _ in range(n_dims)]
        tensors.append(Tensor(name, dims, r.take("I"), r.take("Q")))
    start = -(-r.pos // 32) * 32
    return Gguf(version, kvs, tensors, data[start:])


def pack_scalar(type_id: int, value) -> bytes:
    fmt = SCALAR_FORMATS[type_id]
    if fmt in "fd":
        return struct.pack("<" + fmt, float(value))
    if fmt == "?":
        return struct.pack("<B", int(value) & 0xFF)
    bits = struct.calcsize(fmt) * 8
    wrapped = int(value) % (1 << bits)  # negative-as-unsigned and too-large values wrap, as in C
    if fmt.islower() and wrapped >= 1 << (bits - 1):
        wrapped -= 1 << bits
    return struct.pack("<" + fmt, wrapped)


def _string(raw: bytes, length_lie: int | None = None) -> bytes:
    return struct.pack("<Q", len(raw) if length_lie is None else length_lie % (1 << 64)) + raw


def _value(type_id: int, value, element_type: int | None, length_lie: int | None) -> bytes:
    if type_id == STRING:
        return _string(value if isinstance(value, bytes) else str(value).encode(), length_lie)
    if type_id == ARRAY:
        count = len(value) if length_lie is None else length_lie % (1 << 64)
        out = struct.pack("<IQ", element_type % (1 << 32), count)
        if element_type == ARRAY:  # an array of arrays: each element an empty array of uint8
            return out + b"".join(struct.pack("<IQ", 0, 0) for _ in value)
        return out + b"".join(_value(element_type, v, None, None) for v in value)
    if type_id in SCALAR_FORMATS:
        return pack_scalar(type_id, value)
    return b""  # an unknown type: nothing a reader could know the size of


def write(g: Gguf) -> bytes:
    n_kv = len(g.kvs) if g.n_kv_lie is None else g.n_kv_lie % (1 << 64)
    n_tensors = len(g.tensors) if g.n_tensors_lie is None else g.n_tensors_lie % (1 << 64)
    out = bytearray(b"GGUF" + struct.pack("<IQQ", g.version % (1 << 32), n_tensors, n_kv))
    for kv in g.kvs:
        out += _string(kv.key) + struct.pack("<I", kv.type_id % (1 << 32))
        out += _value(kv.type_id, kv.value, kv.element_type, kv.length_lie)
    for t in g.tensors:
        out += _string(t.name) + struct.pack("<I", len(t.dims) % (1 << 32))
        out += b"".join(struct.pack("<Q", d % (1 << 64)) for d in t.dims)
        out += struct.pack("<IQ", t.type_id % (1 << 32), t.offset % (1 << 64))
    out += b"\0" * (-len(out) % g.alignment)
    return bytes(out) + g.data


def relayout(g: Gguf) -> None:
    """Give every tensor the offset ggml expects for its current type and shape, with zero data:
    a changed type or shape then reaches what the values mean rather than the layout check."""
    from edgelm.runtime.gguf.parser import GGML_TYPES

    offset = 0
    for t in g.tensors:
        _, block, block_bytes = GGML_TYPES.get(t.type_id, ("?", 1, 4))
        elements = 1
        for d in t.dims:
            elements *= d % (1 << 64)  # as written: a negative dimension is a huge unsigned one
        t.offset = offset
        offset += -(-(elements // block * block_bytes) // g.alignment) * g.alignment
    g.data = bytes(min(offset, 1 << 26))  # past 64 MiB the file is cut short, a truncation case of its own
