"""Streaming, atomic safetensors writer.

The output is byte-for-byte what `safetensors.torch.save` would write for the same tensors and metadata
(tensors ordered by dtype, then name; compact JSON header padded to 8 bytes), so the `sshs_*` hashes
sd-scripts computes match. Tensors are produced one at a time by callables: untouched tensors are
copied from the input as bytes, computed ones encoded as they come. The file appears only once
complete: it is written to a temporary file beside the target, fsynced and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import struct
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from blora_tools.adapter.header import DTYPE_BYTES
from blora_tools.errors import OutputError

if TYPE_CHECKING:
    import torch

_DTYPE_ORDER = {name: i for i, name in enumerate(DTYPE_BYTES)}
_HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")
_PLACEHOLDER = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}
_LEGACY_OFFSET, _LEGACY_LENGTH = 0x100000, 0x10000


@dataclass(frozen=True)
class Entry:
    """One tensor to write: its name, dtype name, shape and a callable giving its bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], bytes]

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def check_output(path: str | Path, inputs: Iterable[str | Path] = (), force: bool = False) -> Path:
    """Refuse an output path that is an input, exists without `force`, or whose folder is missing."""
    path = Path(path)
    for source in inputs:
        source = Path(source)
        if path.resolve() == source.resolve() or (path.exists() and source.exists() and path.samefile(source)):
            raise OutputError("output is one of the inputs; write to a new file", path)
    if path.is_dir():
        raise OutputError("output is a directory; give a file name", path)
    if not path.parent.is_dir():
        raise OutputError(f"output folder {path.parent} does not exist", path)
    if path.exists() and not force:
        raise OutputError("output exists; pass --force to replace it", path)
    if path.suffix.lower() != ".safetensors":
        raise OutputError("output must end in .safetensors", path)
    return path


def ordered(entries: Iterable[Entry]) -> list[Entry]:
    """safetensors' data order: larger dtypes first (its dtype order, descending), then by name."""
    return sorted(entries, key=lambda e: (-_DTYPE_ORDER[e.dtype], e.name))


def header_bytes(entries: list[Entry], metadata: Mapping[str, str]) -> bytes:
    """The JSON header safetensors writes for these (ordered) entries, padded to a multiple of 8."""
    doc: dict = {}
    if metadata:
        doc["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for e in entries:
        doc[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def write_entries(
    path: str | Path,
    entries: Iterable[Entry],
    metadata: Mapping[str, str],
    *,
    inputs: Iterable[str | Path] = (),
    force: bool = False,
    hashes: bool = True,
) -> Path:
    """Write tensors atomically. With `hashes`, add `sshs_model_hash`/`sshs_legacy_hash` as sd-scripts does."""
    path = check_output(path, inputs, force)
    items = ordered(entries)
    names = [e.name for e in items]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names in output")
    meta = {k: v for k, v in metadata.items() if k not in _HASH_KEYS}
    if hashes:
        meta.update(_PLACEHOLDER)
    head = header_bytes(items, meta)
    with atomic_file(path) as f:
        f.write(struct.pack("<Q", len(head)) + head)
        data_hash = _BackgroundHash()
        try:
            for e in items:
                data = e.produce()
                if len(data) != e.nbytes:
                    raise ValueError(f"tensor {e.name}: produced {len(data)} bytes, expected {e.nbytes}")
                data_hash.update(data)
                f.write(data)
        finally:
            digest = data_hash.hexdigest()
        if hashes:
            meta["sshs_model_hash"] = digest
            meta["sshs_legacy_hash"] = _legacy_hash(f, items, meta, 8 + len(head))
            final = header_bytes(items, meta)
            assert len(final) == len(head), "hash placeholders keep the header length"
            f.seek(8)
            f.write(final)
    return path


class _BackgroundHash:
    """sha256 on a worker thread, so hashing overlaps reading and writing (hashlib releases the GIL)."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._queue: queue.Queue = queue.Queue(maxsize=8)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            self._hash.update(data)

    def update(self, data: bytes) -> None:
        self._queue.put(data)

    def hexdigest(self) -> str:
        self._queue.put(None)
        self._thread.join()
        return self._hash.hexdigest()


@contextmanager
def atomic_file(path: Path) -> Iterator[BinaryIO]:
    """A file opened for writing that appears at `path` only when the block completes.

    It is a temporary file beside `path`, fsynced and renamed into place; on any exception (a full disk,
    Ctrl-C) it is removed and an existing file at `path` stays as it was. OSError becomes OutputError.
    """
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:  # a read-only or full folder: nothing was created
        raise OutputError(f"cannot write in {path.parent}: {err.strerror or err}; nothing was written", path) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write: {err.strerror or err}; nothing was written", path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (see `atomic_file`)."""
    path = Path(path)
    with atomic_file(path) as f:
        f.write(data)
    return path


def _legacy_hash(f, items: list[Entry], meta: Mapping[str, str], data_start: int) -> str:
    """sd-scripts' legacy hash: sha256 of 64 KiB at 1 MiB into the file it would write with only `ss_*` metadata."""
    ss_only = {k: v for k, v in meta.items() if k.startswith("ss_")}
    head = header_bytes(items, ss_only)
    prefix = struct.pack("<Q", len(head)) + head
    window = prefix[_LEGACY_OFFSET : _LEGACY_OFFSET + _LEGACY_LENGTH]
    data_from = max(0, _LEGACY_OFFSET - len(prefix))
    want = _LEGACY_LENGTH - len(window)
    if want > 0:
        f.seek(data_start + data_from)
        window += f.read(want)
    return hashlib.sha256(window).hexdigest()[:8]


def tensor_entry(name: str, tensor: "torch.Tensor") -> Entry:
    """An entry for an in-memory tensor."""
    from blora_tools.adapter.tensors import DTYPE_NAME, encode

    return Entry(name, DTYPE_NAME[tensor.dtype], tuple(tensor.shape), lambda: encode(tensor))


def save_state_dict(
    path: str | Path, tensors: Mapping[str, "torch.Tensor"], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write an in-memory state dict atomically with sd-scripts' hashes (replaces an existing file)."""
    return write_entries(path, [tensor_entry(k, t) for k, t in tensors.items()], metadata or {}, force=True)
