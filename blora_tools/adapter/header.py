"""Read and check a safetensors header without torch: 8-byte length, JSON, tensor table.

Everything a file claims is checked before anything trusts it: the header length, JSON shape,
dtype names, shapes against byte sizes, and that the tensors' byte ranges tile the data section.
Pickle files are recognised and refused with the way to convert them.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from blora_tools.errors import AdapterFileError

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""safetensors' own limit on the header size."""

DTYPE_BYTES: Mapping[str, int] = MappingProxyType(
    {
        "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
        "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
        "I32": 4, "U32": 4, "F32": 4,
        "F64": 8, "I64": 8, "U64": 8,
    }
)
"""Bytes per element of each safetensors dtype, in safetensors' own dtype order (used for data order)."""

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_CONVERT_HINT = (
    "pickle files can run code when loaded and are refused; convert it once in a trusted environment, "
    "e.g. python -c \"import torch, safetensors.torch as s; "
    "s.save_file(torch.load('IN', weights_only=True), 'OUT.safetensors')\""
)


@dataclass(frozen=True)
class TensorInfo:
    """One tensor's entry: dtype name, shape and byte range relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Header:
    """A checked safetensors header."""

    path: Path
    metadata: Mapping[str, str]
    tensors: Mapping[str, TensorInfo]
    data_start: int
    file_size: int


def read_header(path: str | Path) -> Header:
    """Read and validate the header of a `.safetensors` file; AdapterFileError on any problem."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFileError(_CONVERT_HINT, path)
    if not path.exists():
        raise AdapterFileError("no such file", path)
    if path.is_dir():
        raise AdapterFileError("is a directory, not a .safetensors file", path)
    if not path.is_file():  # a FIFO or device: opening it could block forever
        raise AdapterFileError("is not a regular file (a FIFO, socket or device), not a .safetensors file", path)
    try:
        with path.open("rb") as f:
            size = path.stat().st_size
            head = f.read(8)
            if len(head) < 8:
                raise AdapterFileError(
                    f"not a safetensors file: {size} bytes, shorter than the 8-byte header length", path
                )
            (length,) = struct.unpack("<Q", head)
            _refuse_pickle(head, f.read(1), path)
            f.seek(8)
            if length > MAX_HEADER_BYTES:
                raise AdapterFileError(f"header length {length} is over the {MAX_HEADER_BYTES}-byte limit", path)
            if 8 + length > size:
                raise AdapterFileError(f"header length {length} runs past the end of the {size}-byte file", path)
            raw = f.read(length)
    except OSError as err:
        raise AdapterFileError(f"cannot read: {err.strerror or err}", path) from None
    return parse_header(raw, path, size)


def parse_header(raw: bytes, path: Path, file_size: int) -> Header:
    """Validate header bytes (the JSON after the 8-byte length)."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdapterFileError("header is not valid JSON: not a safetensors file or corrupt", path) from None
    if not isinstance(doc, dict):
        raise AdapterFileError("header is not a JSON object: not a safetensors file", path)
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise AdapterFileError("metadata must map strings to strings", path)
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    tensors = {name: _tensor_info(name, entry, path) for name, entry in doc.items()}
    _check_tiling(tensors, data_size, path)
    return Header(path, MappingProxyType(metadata), MappingProxyType(tensors), data_start, file_size)


def _refuse_pickle(head: bytes, first_header_byte: bytes, path: Path) -> None:
    """A safetensors header starts with `{` after its length; pickle and torch zip files start otherwise."""
    if first_header_byte == b"{":
        return
    if (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:4] == b"PK\x03\x04":
        raise AdapterFileError("is a pickle/zip file renamed to .safetensors; " + _CONVERT_HINT, path)


def _tensor_info(name: str, entry: object, path: Path) -> TensorInfo:
    if not isinstance(entry, dict):
        raise AdapterFileError(f"tensor {name!r}: entry is not an object", path)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise AdapterFileError(f"tensor {name!r}: unknown dtype {dtype!r}", path)
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise AdapterFileError(f"tensor {name!r}: shape {shape!r} is not a list of sizes", path)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_size(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise AdapterFileError(f"tensor {name!r}: bad data_offsets {offsets!r}", path)
    info = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    if info.numel * DTYPE_BYTES[dtype] != info.nbytes:
        raise AdapterFileError(
            f"tensor {name!r}: shape {list(shape)} of {dtype} needs {info.numel * DTYPE_BYTES[dtype]} bytes "
            f"but its offsets give {info.nbytes}",
            path,
        )
    return info


def _is_size(value: object) -> bool:
    """A JSON whole number ≥ 0 (`true` is a bool in JSON, though Python counts it as an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_tiling(tensors: dict[str, TensorInfo], data_size: int, path: Path) -> None:
    position = 0
    for info in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if info.begin != position:
            problem = "overlaps another tensor" if info.begin < position else "leaves a gap before it"
            raise AdapterFileError(f"tensor {info.name!r}: byte range {problem}", path)
        position = info.end
    if position != data_size:
        raise AdapterFileError(
            f"tensor data covers {position} bytes but the file holds {data_size} after the header", path
        )
