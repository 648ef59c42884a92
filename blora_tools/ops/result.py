"""What every surgery operation returns: tensors to write, metadata, warnings and a summary.

Operations are pure (Adapter + resolved spec → Result). Entries are lazy: untouched tensors are copied
from the input as raw bytes when the writer asks for them, computed tensors are made one module at a time,
so a write holds one module, not the file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blora_tools.adapter.writer import Entry, write_entries
from blora_tools.errors import AdapterFileError

if TYPE_CHECKING:
    import torch

    from blora_tools.adapter.model import Adapter, Module
    from blora_tools.taxonomy.arch import Arch

Progress = Callable[[int], None]
"""A callback told how many units of work just finished (modules, or bytes while writing)."""


@dataclass
class Result:
    """An operation's output, not yet written."""

    operation: str
    entries: list[Entry]
    metadata: dict[str, str]
    inputs: tuple[Path, ...]
    warnings: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    def save(self, path: str | Path, *, force: bool = False, on_bytes: Progress | None = None) -> Path:
        """Write atomically (never onto an input; an existing file only with `force`)."""
        entries = self.entries if on_bytes is None else [_reporting(e, on_bytes) for e in self.entries]
        return write_entries(path, entries, self.metadata, inputs=self.inputs, force=force)


def _reporting(entry: Entry, on_bytes: Progress) -> Entry:
    def produce() -> bytes:
        data = entry.produce()
        on_bytes(len(data))
        return data

    return Entry(entry.name, entry.dtype, entry.shape, produce)


def copied(adapter: "Adapter", key: str, name: str | None = None) -> Entry:
    """An entry whose bytes are the input tensor's, unchanged."""
    info = adapter.info(key)
    return Entry(name or key, info.dtype, info.shape, lambda: adapter.raw(key))


def copied_module(adapter: "Adapter", module: "Module") -> list[Entry]:
    """Every key of a module, byte-identical."""
    return [copied(adapter, key) for key in module.keys.values()]


def computed(name: str, dtype: str, shape: tuple[int, ...], make: Callable[[], "torch.Tensor"]) -> Entry:
    """An entry made when written: `make()` is called then, and its tensor cast to `dtype`."""

    def produce() -> bytes:
        from blora_tools.adapter.tensors import TORCH_DTYPE, encode

        return encode(make().to(TORCH_DTYPE[dtype]).reshape(shape))

    return Entry(name, dtype, shape, produce)


def known_arch(adapter: "Adapter") -> "Arch":
    """The adapter's architecture; an error when it cannot be told (blocks would mean nothing)."""
    from blora_tools.taxonomy.arch import Arch

    if adapter.arch is Arch.UNKNOWN:
        raise AdapterFileError(
            "cannot tell the architecture (SD1, SD2 or SDXL) from the module names or metadata, "
            "so its blocks are unknown",
            adapter.path,
        )
    return adapter.arch


def effective_alpha(module: "Module") -> float | None:
    """The alpha a loader uses (the stored one, else the rank); None for kinds without a rank."""
    if module.rank is None:
        return None
    return float(module.rank if module.alpha is None else module.alpha)


def group_counts(modules: Iterable["Module"]) -> dict[str, int]:
    """Modules per paper group (`none` for unplaced modules), in a stable order."""
    counts: dict[str, int] = {}
    for m in modules:
        counts[m.group] = counts.get(m.group, 0) + 1
    return dict(sorted(counts.items()))


def spec_without_groups(metadata: Mapping[str, str], remaining_groups: set[str]) -> str | None:
    """The source's `blora_spec` with groups that no longer hold modules set to rank 0 (None if absent)."""
    from blora_tools.adapter.metadata import SPEC_KEY

    raw = metadata.get(SPEC_KEY)
    if raw is None:
        return None
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError:
        return raw
    blocks = spec.get("blocks") if isinstance(spec, dict) else None
    if not isinstance(blocks, dict):
        return raw
    for group, entry in blocks.items():
        if group not in remaining_groups and isinstance(entry, dict):
            for key in ("rank", "conv_rank"):
                if key in entry:
                    entry[key] = 0
    return json.dumps(spec, sort_keys=True)


def diffusers_warning(modules: Iterable["Module"]) -> str | None:
    """A warning when diffusers will not load these modules as they are (DESIGN §3), else None."""
    from blora_tools.adapter.kinds import Kind

    reasons = []
    kinds = {m.kind for m in modules}
    if Kind.LOHA in kinds or Kind.LOKR in kinds:
        reasons.append("LoHa/LoKr modules")
    if Kind.TUCKER in kinds:
        reasons.append("lora_mid (Tucker) cores")
    if Kind.FULL in kinds or Kind.NORM in kinds:
        reasons.append("full/norm modules")
    if any(m.dora for m in modules):
        reasons.append("DoRA scales (dropped by diffusers)")
    if not reasons:
        return None
    return f"diffusers will not load this file as it is: it has {', '.join(reasons)} (A1111, ComfyUI and LyCORIS do)"
