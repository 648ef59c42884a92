"""Metadata of written files: keep `ss_*`/`modelspec.*`, update dim/alpha, record `blora_spec` and history.

The `sshs_*` hashes are computed by the writer (they depend on the bytes written).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone

from blora_tools.jsonio import dumps, json_value

SPEC_KEY = "blora_spec"
HISTORY_KEY = "blora_history"
_DROPPED = ("sshs_model_hash", "sshs_legacy_hash")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def dim_and_alpha(ranks: Iterable[int | None], alphas: Iterable[float]) -> tuple[str, str]:
    """`ss_network_dim` / `ss_network_alpha` values: the common value, or "Dynamic" when modules differ."""
    rank_set = {r for r in ranks if r is not None}
    alpha_set = set(alphas)
    dim = _number(rank_set.pop()) if len(rank_set) == 1 else "Dynamic"
    alpha = _number(alpha_set.pop()) if len(alpha_set) == 1 else "Dynamic"
    return dim, alpha


def updated_metadata(
    source: Mapping[str, str],
    *,
    operation: str,
    arguments: Mapping[str, object],
    ranks: Iterable[int | None],
    alphas: Iterable[float],
    spec: Mapping[str, object] | None = None,
) -> dict[str, str]:
    """The metadata for an output derived from `source`: everything kept except stale hashes, plus
    updated `ss_network_dim`/`ss_network_alpha`, `blora_spec` (when given) and a `blora_history` entry."""
    from blora_tools import __version__

    meta = {k: v for k, v in source.items() if k not in _DROPPED}
    dim, alpha = dim_and_alpha(ranks, alphas)
    meta["ss_network_dim"] = dim
    meta["ss_network_alpha"] = alpha
    if spec is not None:
        meta[SPEC_KEY] = dumps(spec, sort_keys=True)
    history = read_history(source)
    history.append(
        {
            "operation": operation,
            "arguments": dict(arguments),
            "tool": f"blora-tools {__version__}",
            "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    )
    meta[HISTORY_KEY] = dumps(history, sort_keys=True)
    return meta


def read_history(metadata: Mapping[str, str]) -> list[dict]:
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
