"""Opening the files a user names as inputs: regular files only, never blocking, reads bounded.

A FIFO, a device or a socket given as an adapter, a preset file or found inside a scanned folder would make
a plain `open` wait forever (a FIFO without a writer) or read without end (`/dev/zero`); they are refused
before anything is read. The file is opened with O_NONBLOCK and checked again with `fstat`, so a path
swapped for a FIFO between the check and the open cannot block either.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from blora_tools.errors import BloraError

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_regular(mode: int) -> str | None:
    """What a non-regular file is, in words (None for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    return next((words for test, words in _KINDS if test(mode)), "not a regular file")


def open_regular(path: str | Path, error: type[BloraError], what: str = "file") -> BinaryIO:
    """Open `path` for binary reading if it is a regular file; otherwise raise `error` naming the path.

    `what` names the expected content in the message ("a .safetensors file", "a preset file").
    """
    path = Path(path)
    try:
        kind = _not_regular(os.stat(path).st_mode)
        if kind is None:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
            kind = _not_regular(os.fstat(fd).st_mode)
            if kind is not None:
                os.close(fd)
    except FileNotFoundError:
        raise error("no such file", path) from None
    except OSError as err:
        raise error(f"cannot read: {err.strerror or err}", path) from None
    if kind is not None:
        raise error(f"is {kind}, not a regular file ({what} expected)", path)
    return os.fdopen(fd, "rb")


def read_exact(fd: int, offset: int, n: int, path: str | Path, what: str, error: type[BloraError]) -> bytes:
    """`n` bytes of an open file at `offset` (short reads, as slow or network file systems give them, are
    continued); `error` naming `what` ("tensor 'x'") when the file ends first or cannot be read."""
    try:
        data = os.pread(fd, n, offset) if n else b""
        while 0 < len(data) < n:
            more = os.pread(fd, n - len(data), offset + len(data))
            if not more:
                break
            data += more
    except OSError as err:
        raise error(f"cannot read {what}: {err.strerror or err}", path) from None
    if len(data) != n:
        raise error(f"file ended inside {what}", path)
    return data


def refuse_special_file(path: str | Path, error: type[BloraError], what: str) -> None:
    """Refuse a path that exists and is neither a regular file nor a directory (a FIFO, a device, a socket),
    for inputs that may be either (a model: a diffusers folder or a single file)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # missing or unreadable: the caller's own check says so
    kind = _not_regular(mode)
    if kind is not None and not stat.S_ISDIR(mode):
        raise error(f"is {kind}, not a regular file ({what} expected)", path)


def read_text_bounded(path: str | Path, limit: int, error: type[BloraError], what: str = "a text file") -> str:
    """The UTF-8 text of a regular file of at most `limit` bytes (a leading byte-order mark is dropped)."""
    with open_regular(path, error, what) as f:
        try:
            data = f.read(limit + 1)
        except OSError as err:
            raise error(f"cannot read: {err.strerror or err}", path) from None
    if len(data) > limit:
        raise error(f"is larger than the {limit:,}-byte limit for {what}", path)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise error(f"is not UTF-8 text (byte {err.start})", path) from None
