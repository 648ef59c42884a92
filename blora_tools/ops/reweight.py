"""Reweight: multiply each module's ΔW by its block's weight, the way runtime strength does.

Linear in the weight: exactly one factor per module is scaled (`kinds.scaled_params`: `lora_up`,
`hada_w1_a`, `lokr_w1`/`lokr_w1_a`, `diff`+`diff_b`, `w_norm`+`b_norm`), in float32, and written back in the
tensor's own dtype. Scaling both factors would square the effect. Weight 0 removes the module (as prune does),
weight 1 copies it byte for byte. Alphas stay as they are. DoRA modules accept only 0 and 1.

On Flux.1 and SD3 a weight may address part of a fused layer (`D05.img.q=0.5`, `BlockWeights.rows`): those
rows of the one factor holding ΔW's rows are multiplied (`ops.rows`), the others copied bit for bit. Vectors
resolve by absolute block index whatever blocks the file holds (`taxonomy.weights.dit_vectors`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from blora_tools.adapter.alpha import zero_alpha_warning
from blora_tools.adapter.metadata import updated_metadata
from blora_tools.adapter.model import Adapter, Module
from blora_tools.adapter.writer import Entry
from blora_tools.errors import BloraError
from blora_tools.ops.result import (
    Result,
    copied,
    loader_notes,
)
from blora_tools.ops.rows import check_row_scalable, unit_rows
from blora_tools.ops.uniform import module_entries, uniform_alphas
from blora_tools.spec import ModuleFacts
from blora_tools.taxonomy.blocks import table
from blora_tools.taxonomy.weights import BlockWeights

__all__ = ["reweight"]


def reweight(adapter: Adapter, weights: BlockWeights, *, text: str = "", uniform_alpha: bool = False) -> Result:
    """Scale every module by `weights[module.block]`; modules that fit no block are left as they are.

    `text` is the user's weight string, recorded in the history. `uniform_alpha` also gives the kept modules
    one alpha (`ops.uniform`; the fold and the weight multiply the same factor). Raises BloraError when a DoRA
    module gets a weight other than 0 or 1, or when every module would get weight 0.
    """
    arch = adapter.arch
    if weights.arch is not arch:
        raise BloraError(f"weights were resolved for {weights.arch.value} but the file is {arch.value}", adapter.path)
    warnings = list(adapter.warnings)

    def rows_of(module: Module) -> tuple[tuple[int, int, float], ...]:
        ranges = weights.rows(module.placement) if module.block is not None else ((0, 1, 1.0),)
        return tuple((start, stop, float(w)) for start, stop, w in ranges)

    def removed_by(ranges: tuple[tuple[int, int, float], ...]) -> bool:
        return all(w == 0.0 for _, _, w in ranges)

    kept_modules = [m for m in adapter.modules.values() if not removed_by(rows_of(m))]
    alphas = uniform_alphas(adapter, kept_modules) if uniform_alpha and kept_modules else {}
    entries: list[Entry] = []
    kept: list[Module] = []
    per_group: dict[str, dict[str, object]] = {}
    removed = scaled = 0
    for module in adapter.modules.values():
        ranges = rows_of(module)
        row = per_group.setdefault(module.group, {"modules": 0, "weights": set(), "removed": 0})
        row["modules"] += 1
        row["weights"] |= {w for _, _, w in ranges}
        if removed_by(ranges):
            removed += 1
            row["removed"] += 1
            continue
        if len(ranges) > 1:
            check_row_scalable(module, f"weights {text or '(given)'}", adapter.path)
            weight, rows = 1.0, unit_rows(module, ranges, adapter.path)
        else:
            weight, rows = ranges[0][2], None
        if module.dora and weight != 1.0:
            raise BloraError(
                f"module {module.stem} (block {module.block}) is DoRA and gets weight {weight:g}; DoRA renormalises "
                "the weight by its magnitude vector, so scaling a factor does not scale its effect: "
                "only 0 (drop) and 1 (keep) are exact for DoRA modules",
                adapter.path,
            )
        kept.append(module)
        scaled += weight != 1.0 or rows is not None
        entries += module_entries(adapter, module, None, alphas.get(module.stem), weight=weight, rows=rows)
    if not any(m.block is not None for m in kept):
        raise BloraError(
            f"weights {text or '(given)'} are 0 for every block this file has modules in; nothing written",
            adapter.path,
        )
    entries += [copied(adapter, key) for key in adapter.passthrough]
    warnings += loader_notes(kept, arch, one_alpha=uniform_alpha, passthrough=adapter.passthrough)
    warnings += [w for w in (zero_alpha_warning(kept),) if w]

    arguments = {"weights": text, "resolved": _nontrivial(weights)}
    if alphas:
        arguments["uniform_alpha"] = next(iter(alphas.values())).value
    facts = [ModuleFacts.of(m) for m in kept]
    metadata = updated_metadata(
        adapter.metadata,
        operation="reweight",
        inputs=[adapter.path],
        arguments=arguments,
        arch=arch,
        modules=[replace(f, alpha=alphas[m.stem].value) if m.stem in alphas else f for f, m in zip(facts, kept)],
    )
    order = {g: i for i, g in enumerate(_group_order(arch))}
    blocks = {
        g: {"modules": r["modules"], "removed": r["removed"], "weights": sorted(r["weights"])}
        for g, r in sorted(per_group.items(), key=lambda kv: order.get(kv[0], len(order)))
    }
    summary = {
        "operation": "reweight",
        "input": str(adapter.path),
        "arch": arch.value,
        "weights": text,
        "modules_before": len(adapter.modules),
        "modules_after": len(kept),
        "scaled": scaled,
        "removed": removed,
        "blocks": blocks,
    }
    return Result("reweight", entries, metadata, (Path(adapter.path),), warnings, summary)


def _nontrivial(weights: BlockWeights) -> dict[str, float]:
    """Blocks, and parts of DiT blocks (`D05.img.attn.q`), whose weight is not 1 (what the history records)."""
    parts = {atom.replace(":", "."): w for atom, w in weights.parts.items() if w != 1.0}
    return {b: w for b, w in weights.values.items() if w != 1.0} | parts


def _group_order(arch) -> tuple[str, ...]:
    layout = table(arch)
    return (*layout.groups, "none")
