"""Which external data files an ONNX model refers to, read from its protobuf bytes, and the identity that covers them.

Models over protobuf's 2 GB limit keep their weights in files beside the .onnx, and ONNX Runtime loads them. A run's
identity (model_sha256) must change when such a file changes, and `tagger run` needs neither the onnx package nor the
weights in memory to find them: so the few fields on the path from the model to each tensor are read here by hand.
"""

from __future__ import annotations

import hashlib
import mmap
import os
from pathlib import Path
from typing import Iterator, Mapping

from tagger.errors import TaggerError, one_line
from tagger.storage import sha256_file


def model_sha256(path: str | os.PathLike[str]) -> str:
    """The model's identity: sha256 of the .onnx file; with external data, sha256 over that digest and each data
    file's location and digest, so editing a weights file beside the model changes it too."""
    path = Path(path)
    digest = sha256_file(path)
    locations = external_data_files(path)
    if not locations:
        return digest
    combined = hashlib.sha256(digest.encode())
    for location in locations:
        try:
            data_digest = sha256_file(path.parent / location)
        except OSError as e:
            raise TaggerError(f"cannot read external data {location} of {path}: {one_line(e)}") from None
        combined.update(b"\0" + location.encode("utf-8", "surrogateescape") + b"\0" + data_digest.encode())
    return combined.hexdigest()


# ONNX protobuf field numbers (onnx.proto; stable by protobuf's rules) of the messages that can hold a tensor:
# message -> {field: child message}. Read by hand so that `tagger run` needs neither the onnx package nor the weights.
_TENSOR_HOLDERS: Mapping[str, Mapping[int, str]] = {
    "model": {7: "graph", 25: "function"},  # ModelProto.graph, .functions
    "graph": {1: "node", 5: "tensor", 15: "sparse"},  # GraphProto.node, .initializer, .sparse_initializer
    "function": {7: "node"},  # FunctionProto.node
    "node": {5: "attribute"},  # NodeProto.attribute
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},  # t, g, tensors...
    "sparse": {1: "tensor", 2: "tensor"},  # SparseTensorProto.values, .indices
}
_TENSOR_EXTERNAL_DATA = 13  # TensorProto.external_data: repeated {1: key, 2: value}
_TENSOR_DATA_LOCATION = 14  # TensorProto.data_location; 1 = EXTERNAL
_EXTERNAL = 1


def external_data_files(path: str | os.PathLike[str]) -> tuple[str, ...]:
    """The external data files a model's tensors point to (their `location`, relative to the model's folder), sorted.

    Walks the protobuf's wire format, skipping tensor bytes unread; a model without the word "location" anywhere
    (every external reference has that key) is not walked at all.
    """
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return ()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            if data.find(b"location") < 0:
                return ()
            content = memoryview(data.read())  # a copy: slices of the mmap itself would keep it from closing
    locations: set[str] = set()
    try:
        _collect_locations(content, "model", locations)
    except (IndexError, ValueError) as e:
        raise TaggerError(f"{path} is not a loadable ONNX model: {one_line(e)}") from None
    return tuple(sorted(locations))


def _collect_locations(buf: memoryview, kind: str, locations: set[str]) -> None:
    if kind == "tensor":
        external, location = False, None
        for number, value in _fields(buf):
            if number == _TENSOR_DATA_LOCATION:
                external = value == _EXTERNAL
            elif number == _TENSOR_EXTERNAL_DATA and isinstance(value, memoryview):
                entry = {k: bytes(v).decode("utf-8", "surrogateescape") for k, v in _fields(value) if isinstance(v, memoryview)}
                if entry.get(1) == "location":
                    location = entry.get(2)
        if external and location:
            locations.add(location)
        return
    children = _TENSOR_HOLDERS[kind]
    for number, value in _fields(buf):
        if number in children and isinstance(value, memoryview):
            _collect_locations(value, children[number], locations)


def _fields(buf: memoryview) -> Iterator[tuple[int, int | memoryview]]:
    """(field number, value) of one protobuf message: an int for varints, a slice for length-delimited fields;
    fixed-size fields are skipped (yielded as 0)."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, value
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > end:
                raise ValueError("truncated protobuf field")
            yield number, buf[pos : pos + size]
            pos += size
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
            yield number, 0
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
