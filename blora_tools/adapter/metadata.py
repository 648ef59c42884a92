"""Metadata of written files: keep `ss_*`/`modelspec.*`, update dim/alpha, record `blora_spec` and history.

Every writing command calls `updated_metadata` once: it states the output's modules as `blora_spec`
(`BlockSpec.from_modules`) and appends one `blora_history` entry (`_history_entry`) naming the inputs (file name
and short sha256) and the arguments. The `sshs_*` hashes and the inputs' sha256 are filled in by the writer:
inputs are hashed on worker threads while the output is written (`InputDigests`), the output as it is written.
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from blora_tools.spec import ModuleFacts
    from blora_tools.taxonomy.arch import Arch

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
    """The short sha256 of each input file, each hashed on its own worker thread from construction on, so the
    hashing overlaps the write (hashlib releases the GIL); `values()` maps each placeholder to its digest."""

    def __init__(self, inputs: Sequence[str | Path]):
        self._hashes = [hashlib.sha256() for _ in inputs]
        self._errors: list[OSError] = []
        self._threads = [
            threading.Thread(target=self._run, args=(Path(p), h), daemon=True) for p, h in zip(inputs, self._hashes)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, path: Path, digest) -> None:
        try:
            with path.open("rb", buffering=0) as f:
                while chunk := f.read(1 << 22):
                    digest.update(chunk)
        except OSError as err:
            self._errors.append(err)

    def values(self) -> dict[str, str]:
        """placeholder → short sha256, once every thread is done; OSError when an input could not be read."""
        for thread in self._threads:
            thread.join()
        if self._errors:
            raise self._errors[0]
        return {_input_placeholder(i): h.hexdigest()[:_SHORT_HASH] for i, h in enumerate(self._hashes)}


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
