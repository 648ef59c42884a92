"""Metadata of written files: keep `ss_*`/`modelspec.*`, update dim/alpha, record `blora_spec` and history.

Every writing command calls `updated_metadata` once: it states the output's modules as `blora_spec`
(`BlockSpec.from_modules`) and appends one `blora_history` entry (`_history_entry`) naming the inputs (file name
and short sha256) and the arguments. The `sshs_*` hashes and the inputs' sha256 are filled in by the writer:
inputs are hashed while the output is written (`InputDigests`: from the very bytes copied into the output where
the copies run in file order, so such an input is read once), the output as it is written.
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blora_tools.adapter.writer import Entry, Origin
    from blora_tools.spec import ModuleFacts
    from blora_tools.taxonomy.arch import Arch

from blora_tools.errors import AdapterFileError
from blora_tools.inputs import open_regular, read_exact
from blora_tools.jsonio import dumps, json_value, loads_strict

__all__ = [
    "SPEC_KEY",
    "HISTORY_KEY",
    "InputDigests",
    "filled_history",
    "updated_metadata",
    "training_summary",
    "top_tags",
]

SPEC_KEY = "blora_spec"
HISTORY_KEY = "blora_history"
_SHORT_HASH = 10
"""Hex digits of an input's sha256 kept in the history: A1111's and Civitai's short ("AutoV2") hash of a file."""
_DROPPED = ("sshs_model_hash", "sshs_legacy_hash")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _dim_and_alpha(ranks: Iterable[int | None], alphas: Iterable[float]) -> tuple[str, str]:
    """`ss_network_dim` / `ss_network_alpha` values: the common value, or "Dynamic" when modules differ."""
    rank_set = {r for r in ranks if r is not None}
    alpha_set = set(alphas)
    dim = _number(rank_set.pop()) if len(rank_set) == 1 else "Dynamic"
    alpha = _number(alpha_set.pop()) if len(alpha_set) == 1 else "Dynamic"
    return dim, alpha


def _input_placeholder(index: int) -> str:
    """What the history holds for input `index`'s short sha256 until the writer fills it in (same length)."""
    return f"?{index:0{_SHORT_HASH - 1}d}"


class InputDigests:
    """The short sha256 of each input file for its history entry, hashed while the output is written.

    An input whose copied tensors (entries with an `origin` in it) are written in file order, as prune,
    reweight and convert write them when names keep their order, is read once: `through` gives those entries
    their bytes from one forward pass over the file that hashes every byte it passes, the header and the
    tensors between copied ones included, and `values()` hashes what is left after the last. Any other input
    is read and hashed whole on its own thread from construction on. Hashing runs on worker threads
    (hashlib releases the GIL). `close()` ends them and closes the files; `values()` does so too.
    """

    def __init__(self, inputs: Sequence[str | Path], entries: Sequence["Entry"] = ()):
        """`entries`: the entries in the order they are written (`writer.write_order`)."""
        self._passes: list[_ForwardPass | _WholeFile] = []
        self._forward: dict[Path, _ForwardPass] = {}
        try:
            for path in map(Path, inputs):
                spans = [(e.origin.offset, e.nbytes) for e in entries if e.origin is not None and e.origin.path == path]
                if path not in self._forward and _in_file_order(spans):
                    self._forward[path] = _ForwardPass(path)
                    self._passes.append(self._forward[path])
                else:
                    self._passes.append(_WholeFile(path))
        except BaseException:
            self.close()
            raise

    def through(self, entry: "Entry") -> "Entry":
        """`entry`, reading its bytes through its input's forward pass when it has one (else unchanged)."""
        origin = entry.origin
        reader = self._forward.get(origin.path) if origin is not None else None
        if reader is None:
            return entry
        return replace(entry, produce=lambda: reader.read(origin, entry.nbytes))

    def values(self) -> dict[str, str]:
        """placeholder → short sha256, once every input is hashed; OSError when an input could not be read."""
        try:
            digests = [p.hexdigest() for p in self._passes]
        finally:
            self.close()
        return {_input_placeholder(i): d[:_SHORT_HASH] for i, d in enumerate(digests)}

    def close(self) -> None:
        """Stop hashing and close the inputs (after a failed write; idempotent)."""
        for p in self._passes:
            p.close()


def _in_file_order(spans: Sequence[tuple[int, int]]) -> bool:
    """Whether (offset, length) spans, as they will be asked for, move forward through the file."""
    return bool(spans) and all(start >= before + n for (before, n), (start, _) in zip(spans, spans[1:]))


_CHUNK = 1 << 23
"""Bytes per read where the hash reads a file by itself (8 MiB: few system calls, bounded memory)."""


class _ForwardPass:
    """One input read front to back: tensors handed out as they are asked for (in file order), everything
    passed on the way fed to a background sha256."""

    def __init__(self, path: Path):
        from blora_tools.adapter.writer import BackgroundHash

        self.path = path
        self._file = open_regular(path, AdapterFileError, "a .safetensors file")
        self._hash = BackgroundHash()
        self._position = 0
        self._digest: str | None = None

    def read(self, origin: "Origin", n: int) -> bytes:
        """The `n` bytes at `origin`, hashing the file up to their end."""
        what = f"tensor {origin.key!r}"
        while self._position < origin.offset:
            step = min(_CHUNK, origin.offset - self._position)
            self._hash.update(read_exact(self._file.fileno(), self._position, step, self.path, what, AdapterFileError))
            self._position += step
        data = read_exact(self._file.fileno(), origin.offset, n, self.path, what, AdapterFileError)
        self._hash.update(data)
        self._position = origin.offset + n
        return data

    def hexdigest(self) -> str:
        """The file's sha256: the rest of the file hashed, to its end."""
        if self._digest is None:
            while chunk := os.pread(self._file.fileno(), _CHUNK, self._position):
                self._hash.update(chunk)
                self._position += len(chunk)
            self._digest = self._hash.hexdigest()
        return self._digest

    def close(self) -> None:
        if self._digest is None:
            self._hash.hexdigest()  # ends the worker thread; the digest of a part of the file is no digest
            self._digest = ""
        self._file.close()


class _WholeFile:
    """One input read and hashed whole on its own thread."""

    def __init__(self, path: Path):
        self._hash = hashlib.sha256()
        self._error: OSError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(path,), daemon=True)
        self._thread.start()

    def _run(self, path: Path) -> None:
        try:
            with path.open("rb", buffering=0) as f:
                while not self._stop.is_set() and (chunk := f.read(_CHUNK)):
                    self._hash.update(chunk)
        except OSError as err:
            self._error = err

    def hexdigest(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._hash.hexdigest()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def filled_history(history: str, digests: Mapping[str, str]) -> str:
    """`blora_history` JSON with the last entry's input placeholders replaced by `digests` (same length)."""
    entries = loads_strict(history)
    for record in entries[-1]["inputs"]:
        record["sha256"] = digests.get(record["sha256"], record["sha256"])
    return dumps(entries, sort_keys=True)


def _history_entry(operation: str, inputs: Sequence[str | Path], arguments: Mapping[str, object]) -> dict:
    """One `blora_history` entry: the operation, its inputs (file name, short sha256 placeholder that the writer
    fills from `InputDigests`) and its arguments."""
    from blora_tools import __version__

    return {
        "operation": operation,
        "inputs": [{"file": Path(p).name, "sha256": _input_placeholder(i)} for i, p in enumerate(inputs)],
        "arguments": dict(arguments),
        "tool": f"blora-tools {__version__}",
        "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def updated_metadata(
    source: Mapping[str, str],
    *,
    operation: str,
    inputs: Sequence[str | Path],
    arguments: Mapping[str, object],
    arch: "Arch",
    modules: Sequence["ModuleFacts"],
) -> dict[str, str]:
    """The metadata of an output holding `modules`, derived from `source`'s: everything kept except stale hashes,
    `ss_network_dim`/`ss_network_alpha` of the modules, a `blora_spec` stating them (learning-rate weights kept
    from the source's spec) and the source's `blora_history` plus this operation's entry."""
    from blora_tools.spec import BlockSpec

    meta = {k: v for k, v in source.items() if k not in _DROPPED}
    dim, alpha = _dim_and_alpha((m.rank for m in modules), (m.alpha for m in modules if m.alpha is not None))
    meta["ss_network_dim"] = dim
    meta["ss_network_alpha"] = alpha
    meta[SPEC_KEY] = BlockSpec.from_modules(arch, modules, _lr_weights(source)).to_json()
    history = _read_history(source)
    history.append(_history_entry(operation, inputs, arguments))
    meta[HISTORY_KEY] = dumps(history, sort_keys=True)
    return meta


def _lr_weights(source: Mapping[str, str]) -> dict[str, float]:
    """The learning-rate weights of the source's `blora_spec` (none when it has no readable one)."""
    from blora_tools.errors import SpecError
    from blora_tools.spec import BlockSpec

    raw = source.get(SPEC_KEY)
    if not raw:
        return {}
    try:
        spec = BlockSpec.from_json(raw)
    except SpecError:
        return {}
    return {block: setting.lr_weight for block, setting in spec.blocks.items()}


def _read_history(metadata: Mapping[str, str]) -> list[dict]:
    """The `blora_history` list of a file (empty when absent or unreadable)."""
    history = json_value(metadata.get(HISTORY_KEY, "[]"))
    return history if isinstance(history, list) else []


def training_summary(metadata: Mapping[str, str]) -> dict[str, object]:
    """The kohya training metadata a user wants to see, with the top tags of `ss_tag_frequency`."""
    fields = {
        "base_model": "ss_sd_model_name",
        "base_model_version": "ss_base_model_version",
        "network_module": "ss_network_module",
        "network_args": "ss_network_args",
        "network_dim": "ss_network_dim",
        "network_alpha": "ss_network_alpha",
        "steps": "ss_steps",
        "epochs": "ss_num_epochs",
        "resolution": "ss_resolution",
        "output_name": "ss_output_name",
        "learning_rate": "ss_learning_rate",
    }
    summary: dict[str, object] = {name: metadata[key] for name, key in fields.items() if key in metadata}
    tags = top_tags(metadata, 10)
    if tags:
        summary["top_tags"] = tags
    return summary


def top_tags(metadata: Mapping[str, str], limit: int) -> list[tuple[str, int]]:
    """Most frequent training tags across datasets of `ss_tag_frequency`.

    Only whole, finite, non-negative counts are read (kohya writes integers); a value that is not JSON (as
    `loads_strict` reads it) gives no tags.
    """
    per_dataset = json_value(metadata.get("ss_tag_frequency", "{}"))
    counts: Counter = Counter()
    if isinstance(per_dataset, dict):
        for tags in per_dataset.values():
            if isinstance(tags, dict):
                counts.update({str(t): int(n) for t, n in tags.items() if _is_count(n)})
    return counts.most_common(limit)


def _is_count(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return math.isfinite(value) and value >= 0 and float(value).is_integer()
