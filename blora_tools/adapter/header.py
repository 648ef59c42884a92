"""Read and check a safetensors header without torch: 8-byte length, JSON, tensor table.

Everything a file claims is checked before anything trusts it, by safetensors' own rules (its Rust reader,
`safetensors/src/tensor.rs` and serde_json, as of safetensors 0.8; tests/bad_inputs/test_header_differential.py
compares this module with `safetensors.safe_open` on generated headers):

- the header length is at most 100,000,000 bytes and lies inside the file; the header is UTF-8 JSON;
- JSON as serde_json reads it: no NaN/Infinity, every number within a 64-bit float's range (integers within
  u64/i64, others read as floats), no lone surrogate escapes, nesting at most 127 levels deep;
- the top level is an object; `__metadata__` (at most once) is null or maps strings to strings;
- every tensor entry (every occurrence of a repeated name) has `dtype` (a safetensors dtype name), `shape`
  (whole numbers 0 ≤ n < 2**64) and `data_offsets` (two such numbers, begin ≤ end), each field once;
  a repeated tensor name or metadata key keeps its last value, as safetensors does;
- the element count and byte size computed from the shape do not overflow 64 bits and equal end - begin,
  and the byte ranges tile the data section exactly.

Refused beyond what safetensors refuses (documented extras):

- pickle and torch zip files (by suffix `.ckpt/.pt/.pth/.bin/.pkl`, or by content under a .safetensors name),
  with the way to convert them;
- JSON numbers of magnitude 1e308 or more (serde_json reads some of them as out of range, Python as the
  largest float; no real header holds one);
- safetensors dtypes this tool does not compute with: F4, F6_E2M3, F6_E3M2, F8_E8M0, F8_E4M3FNUZ,
  F8_E5M2FNUZ, C64;
- inputs that are not regular files (a FIFO, a device, a socket: see blora_tools.inputs).
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from blora_tools.errors import AdapterFileError
from blora_tools.inputs import open_regular
from blora_tools.jsonio import JsonObject, loads_strict

__all__ = ["MAX_HEADER_BYTES", "DTYPE_BYTES", "OTHER_SAFETENSORS_DTYPES", "TensorInfo", "Header", "read_header"]

MAX_HEADER_BYTES = 100_000_000
"""safetensors' own limit on the header size (MAX_HEADER_SIZE in tensor.rs)."""

DTYPE_BYTES: Mapping[str, int] = MappingProxyType(
    {
        "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1,
        "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
        "I32": 4, "U32": 4, "F32": 4,
        "F64": 8, "I64": 8, "U64": 8,
    }
)
"""Bytes per element of each safetensors dtype this tool handles, in safetensors' dtype order (data order)."""

OTHER_SAFETENSORS_DTYPES = frozenset({"F4", "F6_E2M3", "F6_E3M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "C64"})
"""Dtypes safetensors 0.8 reads that this tool refuses (sub-byte floats, scaled fp8 variants, complex)."""

_FIELDS = ("dtype", "shape", "data_offsets")

_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_CONVERT_HINT = (
    "pickle files can run code when loaded and are refused; convert it once in a trusted environment, "
    "e.g. python -c \"import torch, safetensors.torch as s; "
    "s.save_file(torch.load('IN', weights_only=True), 'OUT.safetensors')\""
)
_U64_MAX = 2**64 - 1


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
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise AdapterFileError(_CONVERT_HINT, path)
    with open_regular(path, AdapterFileError, "a .safetensors file") as f:
        try:
            size = os.fstat(f.fileno()).st_size
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
    return _parse_header(raw, path, size)


def _parse_header(raw: bytes, path: Path, file_size: int) -> Header:
    """Validate header bytes (the JSON after the 8-byte length) of a file of `file_size` bytes."""
    try:
        doc = loads_strict(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise AdapterFileError("header is not valid JSON (not UTF-8): not a safetensors file or corrupt", path) from None
    except ValueError as err:
        reason = " ".join(str(err).split())[:120]
        raise AdapterFileError(f"header is not valid JSON ({reason}): not a safetensors file or corrupt", path) from None
    if not isinstance(doc, JsonObject):
        raise AdapterFileError("header is not a JSON object: not a safetensors file", path)
    metadata: dict[str, str] = {}
    seen_metadata = False
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.pairs:
        if name == "__metadata__":
            if seen_metadata:
                raise AdapterFileError("header has __metadata__ twice", path)
            seen_metadata = True
            metadata = _metadata(entry, path)
        else:
            tensors[name] = _tensor_info(name, entry, path)  # a repeated name keeps its last entry, as in safetensors
    for info in tensors.values():
        if info.dtype in OTHER_SAFETENSORS_DTYPES:
            raise AdapterFileError(f"tensor {info.name!r}: dtype {info.dtype} is not supported by blora-tools", path)
        _check_size(info, path)
    data_start = 8 + len(raw)
    _check_tiling(tensors, file_size - data_start, path)
    return Header(path, MappingProxyType(metadata), MappingProxyType(tensors), data_start, file_size)


def _metadata(value: object, path: Path) -> dict[str, str]:
    """`__metadata__`: null, or an object whose every value (repeats included) is a string."""
    if value is None:
        return {}
    if not isinstance(value, JsonObject) or not all(isinstance(v, str) for _, v in value.pairs):
        raise AdapterFileError("metadata must map strings to strings", path)
    return dict(value)


def _refuse_pickle(head: bytes, first_header_byte: bytes, path: Path) -> None:
    """A safetensors header starts with `{` after its length; pickle and torch zip files start otherwise."""
    if first_header_byte == b"{":
        return
    if (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:4] == b"PK\x03\x04":
        raise AdapterFileError("is a pickle/zip file renamed to .safetensors; " + _CONVERT_HINT, path)


def _tensor_info(name: str, entry: object, path: Path) -> TensorInfo:
    """The types of one entry: dtype, shape and data_offsets present once each (other fields are ignored)."""
    if not isinstance(entry, JsonObject):
        raise AdapterFileError(f"tensor {name!r}: entry is not an object", path)
    keys = [k for k, _ in entry.pairs if k in _FIELDS]
    repeated = next((k for k in _FIELDS if keys.count(k) > 1), None)
    if repeated:
        raise AdapterFileError(f"tensor {name!r}: field {repeated!r} appears twice", path)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or (dtype not in DTYPE_BYTES and dtype not in OTHER_SAFETENSORS_DTYPES):
        raise AdapterFileError(f"tensor {name!r}: unknown dtype {dtype!r}", path)
    if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
        raise AdapterFileError(f"tensor {name!r}: shape {_short(shape)} is not a list of sizes", path)
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_size(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise AdapterFileError(f"tensor {name!r}: bad data_offsets {_short(offsets)}", path)
    return TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])


def _check_size(info: TensorInfo, path: Path) -> None:
    """Element count and byte size in 64-bit arithmetic, left to right as safetensors multiplies them."""
    count = 1
    for d in info.shape:
        count *= d
        if count > _U64_MAX:
            raise AdapterFileError(f"tensor {info.name!r}: shape {list(info.shape)} overflows 64 bits", path)
    nbytes = count * DTYPE_BYTES[info.dtype]
    if nbytes > _U64_MAX:
        raise AdapterFileError(f"tensor {info.name!r}: shape {list(info.shape)} overflows 64 bits", path)
    if nbytes != info.nbytes:
        raise AdapterFileError(
            f"tensor {info.name!r}: shape {list(info.shape)} of {info.dtype} needs {nbytes} bytes "
            f"but its offsets give {info.nbytes}",
            path,
        )


def _is_size(value: object) -> bool:
    """A JSON whole number 0 ≤ n < 2**64 (`true` is a bool in JSON, though Python counts it as an int)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _U64_MAX


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
