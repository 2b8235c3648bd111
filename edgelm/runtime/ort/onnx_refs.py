"""What an ONNX file refers to, read from its protobuf bytes without the `onnx` package.

onnxruntime opens whatever file a tensor's `external_data` `location` names, relative to the
model. The runtime must only open files the manifest lists, so the locations are read first:
a walk over protobuf's wire format that descends only into the messages that can hold tensors
(graph, node, attribute, function, sparse tensor) and skips everything else by its length. The
bytes come from strangers, so every length is checked against the file's size. The same walk
records the main graph's initializer shapes, for checks such as a position table's length.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path

from edgelm.errors import ArtifactError

# message -> {field number: message it holds}; field numbers from onnx.proto
MODEL, GRAPH, NODE, ATTRIBUTE, FUNCTION, TRAINING, SPARSE, TENSOR, ENTRY = range(9)
SUBMESSAGES = {
    MODEL: {7: GRAPH, 20: TRAINING, 25: FUNCTION},
    TRAINING: {1: GRAPH, 2: GRAPH},
    GRAPH: {1: NODE, 5: TENSOR, 15: SPARSE},
    NODE: {5: ATTRIBUTE},
    FUNCTION: {7: NODE, 11: ATTRIBUTE},
    ATTRIBUTE: {5: TENSOR, 6: GRAPH, 10: TENSOR, 11: GRAPH, 22: SPARSE, 23: SPARSE},
    SPARSE: {1: TENSOR, 2: TENSOR},
    TENSOR: {13: ENTRY},
}
MAX_MESSAGES = 10_000_000  # far beyond real graphs; bounds the work a hostile file can cause


class _Malformed(Exception):
    pass


@dataclass
class OnnxRefs:
    locations: set[str] = field(default_factory=set)  # external-data file names, as written
    initializers: dict[str, tuple[int, ...]] = field(default_factory=dict)  # main graph: name -> dims


def _varint(data, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed("truncated or overlong varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(data, start: int, end: int):
    """(field number, wire type, value or (start, end) of its bytes) for one message's bytes."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos, end)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            if length > end - pos:
                raise _Malformed("a field runs past the end of its message")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _Malformed("a fixed-size field runs past the end")
        else:  # groups (3, 4) are not used by onnx.proto
            raise _Malformed(f"unexpected wire type {wire}")


def _entry(data, start: int, end: int) -> tuple[bytes, bytes]:
    key = value = b""
    for number, wire, span in _fields(data, start, end):
        if wire == 2 and number in (1, 2):
            text = bytes(data[span[0]:span[1]])
            key, value = (text, value) if number == 1 else (key, text)
    return key, value


def _tensor_dims(data, start: int, end: int) -> tuple[str, tuple[int, ...]]:
    """A TensorProto's name (field 8) and dims (field 1, packed or not)."""
    name, dims = "", []
    for number, wire, value in _fields(data, start, end):
        if number == 8 and wire == 2:
            name = bytes(data[value[0]:value[1]]).decode("utf-8", errors="replace")
        elif number == 1 and wire == 0:
            dims.append(value)
        elif number == 1 and wire == 2:
            pos = value[0]
            while pos < value[1]:
                dim, pos = _varint(data, pos, value[1])
                dims.append(dim)
    return name, tuple(dims)


def scan(data, size: int) -> OnnxRefs:
    """Every external-data `location` in a serialized ModelProto, and the main graph's initializer shapes."""
    refs = OnnxRefs()
    found = refs.locations
    stack = [(MODEL, 0, size, False)]
    visited = 0
    while stack:
        kind, start, end, main = stack.pop()
        visited += 1
        if visited > MAX_MESSAGES:
            raise _Malformed("too many nested messages")
        if kind == ENTRY:
            key, value = _entry(data, start, end)
            if key == b"location":
                try:
                    found.add(value.decode("utf-8"))
                except UnicodeDecodeError:
                    raise _Malformed("an external-data location is not UTF-8") from None
            continue
        if kind == TENSOR and main:
            name, dims = _tensor_dims(data, start, end)
            refs.initializers[name] = dims
        children = SUBMESSAGES[kind]
        for number, wire, span in _fields(data, start, end):
            if wire == 2 and number in children:
                # the main graph is ModelProto.graph; its initializers are field 5
                stack.append((children[number], *span, (kind == MODEL and number == 7) or (main and number == 5)))
    return refs


def read_refs(path: Path) -> OnnxRefs:
    """What `path` refers to; an ArtifactError when its bytes do not parse."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            if size == 0:
                raise ArtifactError(f"{path}: the model file is empty")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                return scan(data, size)
    except OSError as err:
        raise ArtifactError(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from None
    except _Malformed as err:
        raise ArtifactError(f"{path}: not a valid ONNX file ({err})") from None
