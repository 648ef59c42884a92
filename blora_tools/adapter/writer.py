"""Streaming, atomic safetensors writer.

The output is byte-for-byte what `safetensors.torch.save` would write for the same tensors and metadata
(tensors ordered by dtype, then name; compact JSON header padded to 8 bytes), so the `sshs_*` hashes
sd-scripts computes match. Tensors are produced one at a time by callables: untouched tensors are
copied from the input as bytes, computed ones encoded as they come. The file appears only once
complete: it is written to a temporary file beside the target, fsynced and renamed.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import json
import os
import queue
import stat
import struct
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from blora_tools.adapter.header import DTYPE_BYTES
from blora_tools.errors import OutputError

if TYPE_CHECKING:
    import torch

__all__ = [
    "BackgroundHash",
    "Entry",
    "Origin",
    "write_order",
    "check_output",
    "header_bytes",
    "write_entries",
    "atomic_file",
    "write_bytes_atomic",
    "check_readable",
    "save_state_dict",
]

_DTYPE_ORDER = {name: i for i, name in enumerate(DTYPE_BYTES)}
_HASH_KEYS = ("sshs_model_hash", "sshs_legacy_hash")
_PLACEHOLDER = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "0" * 8}
_LEGACY_OFFSET, _LEGACY_LENGTH = 0x100000, 0x10000


@dataclass(frozen=True)
class Origin:
    """Where a copied tensor's bytes lie unchanged: the file, the offset of its first byte, its key there."""

    path: Path
    offset: int
    key: str


@dataclass(frozen=True)
class Entry:
    """One tensor to write: its name, dtype name, shape and a callable giving its bytes; `origin` when the
    bytes are an input's, unchanged (so the input's hash can be taken from the bytes copied)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    produce: Callable[[], bytes]
    origin: Origin | None = None

    @property
    def nbytes(self) -> int:
        n = DTYPE_BYTES[self.dtype]
        for d in self.shape:
            n *= d
        return n


def check_output(
    path: str | Path, inputs: Iterable[str | Path] = (), force: bool = False, suffixes: Sequence[str] = (".safetensors",)
) -> Path:
    """The one rule for every file a command writes (adapters, charts, render's PNG and JSON, preset exports).

    Refused: a name not ending in one of `suffixes`, the path of an input (by name, through a symbolic link or
    a hard link), a directory, a missing folder, and without `force` anything already at the path, a dangling
    symbolic link included. The write itself (`atomic_file`) checks existence again when it commits.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError("output is a directory; give a file name", path)
    if path.suffix.lower() not in suffixes:
        raise OutputError(f"output must end in {' or '.join(suffixes)}", path)
    for source in inputs:
        if _same_file(path, Path(source)):
            raise OutputError("output is one of the inputs; write to a new file", path)
    if not path.parent.is_dir():
        raise OutputError(f"output folder {path.parent} does not exist", path)
    if os.path.lexists(path) and not force:
        raise OutputError("output exists; pass --force to replace it", path)
    return path


def _same_file(path: Path, source: Path) -> bool:
    try:
        if path.resolve() == source.resolve():
            return True
        return path.exists() and source.exists() and path.samefile(source)
    except (OSError, RuntimeError):  # an unreadable folder or a symbolic-link loop: not provably the same
        return False


def write_order(entries: Iterable[Entry]) -> list[Entry]:
    """The order the entries are written in, safetensors' data order: larger dtypes first (its dtype order,
    descending), then by name."""
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
    late: Callable[[], Mapping[str, str]] | None = None,
) -> Path:
    """Write tensors atomically. With `hashes`, add `sshs_model_hash`/`sshs_legacy_hash` as sd-scripts does.

    `late()`, called once the data is written, gives metadata values known only then (input digests hashed
    meanwhile); each must encode to the length of the value it replaces, as the header is rewritten in place.
    """
    path = check_output(path, inputs, force)
    items = write_order(entries)
    names = [e.name for e in items]
    if len(set(names)) != len(names):
        raise ValueError("duplicate tensor names in output")
    meta = {k: v for k, v in metadata.items() if k not in _HASH_KEYS}
    if hashes:
        meta.update(_PLACEHOLDER)
    head = header_bytes(items, meta)
    with atomic_file(path, force=force, verify=check_readable) as f:
        f.write(struct.pack("<Q", len(head)) + head)
        data_hash = BackgroundHash()
        writeback = _Writeback(f.fileno(), 8 + len(head))
        try:
            for e in items:
                data = e.produce()
                if len(data) != e.nbytes:
                    raise ValueError(f"tensor {e.name}: produced {len(data)} bytes, expected {e.nbytes}")
                data_hash.update(data)
                f.write(data)
                writeback.wrote(len(data))
        finally:
            digest = data_hash.hexdigest()
        if late is not None:
            meta.update(late())
        if hashes:
            meta["sshs_model_hash"] = digest
            meta["sshs_legacy_hash"] = _legacy_hash(f, items, meta, 8 + len(head))
        if hashes or late is not None:
            final = header_bytes(items, meta)
            assert len(final) == len(head), "placeholders keep the header length"
            f.seek(8)
            f.write(final)
    return path


class BackgroundHash:
    """sha256 on a worker thread, so hashing overlaps reading and writing (hashlib releases the GIL).

    `hexdigest()` ends the thread; call it on every path, failures included."""

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


_WRITEBACK_STEP = 1 << 26
"""Bytes written between two requests to start writing them to disk (64 MiB)."""
_SYNC_FILE_RANGE_WRITE = 2


class _Writeback:
    """Starts the disk writes of a file as it grows, every `_WRITEBACK_STEP` bytes (Linux `sync_file_range`,
    which waits for nothing), so the fsync before the commit waits for the last part only, not for the whole
    file. Only a hint: where the call is missing or fails, the fsync does all the work as before."""

    def __init__(self, fd: int, position: int):
        self._fd = fd
        self._started = 0
        self._position = position
        self._call = _sync_file_range()

    def wrote(self, n: int) -> None:
        self._position += n
        if self._call is None or self._position - self._started < _WRITEBACK_STEP:
            return
        if self._call(self._fd, self._started, self._position - self._started, _SYNC_FILE_RANGE_WRITE) != 0:
            self._call = None
        self._started = self._position


@functools.cache
def _sync_file_range():
    """The C library's sync_file_range, or None (not Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


@contextmanager
def atomic_file(
    path: str | Path, force: bool = False, verify: Callable[[Path], None] | None = None
) -> Iterator[BinaryIO]:
    """A file opened for writing that appears at `path` only when the block completes.

    It is a short-named temporary file beside `path` (`.blora-XXXXXXXX.tmp`, so any name the folder allows
    works), fsynced, checked by `verify(temporary path)` when given, and then moved into place. Without
    `force` the move never replaces anything: a file that appeared at `path` while writing survives and the
    write fails ("appeared while writing"), so of two runs writing one new path exactly one wins. With
    `force` it replaces the file atomically and keeps that file's permission bits; a new file gets the
    permissions any new file gets (0666 less the umask), not mkstemp's 0600. On any exception (a full disk,
    Ctrl-C, SIGTERM) the temporary file is removed and `path` stays as it was. OSError becomes OutputError.
    """
    path = Path(path)
    mode = _mode_for(path, force)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=".blora-", suffix=".tmp", dir=path.parent)
    except OSError as err:  # a read-only or full folder: nothing was created
        raise OutputError(f"cannot write in {path.parent}: {err.strerror or err}; nothing was written", path) from None
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w+b") as f:
            if hasattr(os, "fchmod"):  # POSIX; elsewhere the platform's default permissions stay
                os.fchmod(f.fileno(), mode)
            yield f
            f.flush()
            os.fsync(f.fileno())
        if verify is not None:
            try:
                verify(tmp)
            except OutputError as err:
                raise OutputError(err.message, path) from None
        if force:
            os.replace(tmp, path)
        else:
            _move_without_replacing(tmp, path)
    except FileExistsError:
        tmp.unlink(missing_ok=True)
        raise OutputError("appeared while writing; nothing replaced", path) from None
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"cannot write: {err.strerror or err}; nothing was written", path) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _mode_for(path: Path, force: bool) -> int:
    """Permission bits for the output: the replaced file's with `force`, else 0666 less the umask."""
    if force:
        try:
            st = os.stat(path)
            if stat.S_ISREG(st.st_mode):
                return stat.S_IMODE(st.st_mode)
        except OSError:
            pass
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process umask, read without changing it where Linux reports it (else set and restored at once)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _move_without_replacing(tmp: Path, path: Path) -> None:
    """Move `tmp` to `path` unless something is there (FileExistsError), atomically.

    Linux renameat2(RENAME_NOREPLACE) where the kernel and file system support it; else a hard link (which
    fails when the name exists) and the temporary name removed; on file systems with neither (FAT, some
    network mounts) a last existence check and a rename, where only a file appearing in between is lost.
    """
    if _renameat2_noreplace(tmp, path):
        return
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(path)) from None
        os.rename(tmp, path)
        return
    os.unlink(tmp)


def _renameat2_noreplace(tmp: Path, path: Path) -> bool:
    """True when renameat2(RENAME_NOREPLACE) moved the file; False where it is not available."""
    libc = _libc()
    if libc is None:
        return False
    result = libc.renameat2(_AT_FDCWD, os.fsencode(tmp), _AT_FDCWD, os.fsencode(path), _RENAME_NOREPLACE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(path))  # EEXIST makes a FileExistsError


@functools.cache
def _libc():
    """The C library's renameat2, or None (not Linux, or glibc older than 2.28)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return libc


def write_bytes_atomic(path: str | Path, data: bytes, force: bool = False) -> Path:
    """Write `data` to `path` atomically (see `atomic_file`; without `force` an existing file is never replaced)."""
    path = Path(path)
    with atomic_file(path, force=force) as f:
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


def check_readable(path: Path) -> None:
    """Refuse a written file that safetensors' own reader or this tool's header check would not open.

    Header only (cheap): `safetensors.safe_open` parses and validates the header of the file on disk.
    """
    from safetensors import SafetensorError, safe_open

    from blora_tools.adapter.header import read_header
    from blora_tools.errors import AdapterFileError

    try:
        with safe_open(str(path), framework="numpy"):
            pass
        read_header(path)
    except (SafetensorError, AdapterFileError) as err:
        reason = err.message if isinstance(err, AdapterFileError) else str(err)
        raise OutputError(f"the file written would not load ({reason}); nothing was written") from None


def _tensor_entry(name: str, tensor: "torch.Tensor") -> Entry:
    """An entry for an in-memory tensor."""
    from blora_tools.adapter.tensors import DTYPE_NAME, encode

    return Entry(name, DTYPE_NAME[tensor.dtype], tuple(tensor.shape), lambda: encode(tensor))


def save_state_dict(
    path: str | Path, tensors: Mapping[str, "torch.Tensor"], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write an in-memory state dict atomically with sd-scripts' hashes (replaces an existing file)."""
    return write_entries(path, [_tensor_entry(k, t) for k, t in tensors.items()], metadata or {}, force=True)
