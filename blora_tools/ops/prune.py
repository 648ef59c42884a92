"""Prune: remove whole modules by block; every kept tensor is copied byte for byte.

On Flux.1 and SD3 a sub-selector may choose part of a fused layer (`D05.img.q`: the q rows of
`img_attn.qkv`): such a module stays, same rank, with the rows of the parts that go zeroed in the factor holding
ΔW's rows (`ops.rows`); its other rows are copied bit for bit. LoKr and DoRA modules refuse part-pruning.

A module goes with all its keys (`alpha`, `dora_scale`, `lora_mid`, `hada_t*`, …), so no orphan is left
(an orphan key makes A1111 reject the file) and no alpha is dropped alone. Modules that fit no block of the
architecture are kept, and pass-through keys (e.g. textual-inversion bundles) are kept; both with a warning.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from blora_tools.adapter.alpha import zero_alpha_warning
from blora_tools.adapter.metadata import updated_metadata
from blora_tools.adapter.model import Adapter, Module
from blora_tools.errors import BloraError
from blora_tools.ops.result import (
    Result,
    copied,
    loader_notes,
    group_counts,
)
from blora_tools.ops.rows import RowWeights, check_row_scalable, unit_rows
from blora_tools.ops.uniform import module_entries, uniform_alphas
from blora_tools.spec import ModuleFacts
from blora_tools.taxonomy.blocks import table
from blora_tools.taxonomy.selectors import coverage, describe_blocks

__all__ = ["prune"]


def prune(
    adapter: Adapter, blocks: frozenset[str], *, keep: bool, selector: str = "", uniform_alpha: bool = False
) -> Result:
    """Keep (`keep=True`) or drop (`keep=False`) the modules whose block is in `blocks`.

    `blocks` is a resolved selection (blocks, and atoms `D05:img.attn.q` for parts of DiT blocks).
    `selector` is the user's text, recorded in the history. `uniform_alpha` gives the kept modules one alpha
    (`ops.uniform`; ΔW unchanged). Raises BloraError when nothing would be left, or when part of a LoKr or
    DoRA module is chosen.
    """
    arch = adapter.arch
    layout = table(arch)
    warnings: list[str] = list(adapter.warnings)  # unplaced modules and pass-through keys are named there
    kept: list[Module] = []
    dropped: list[Module] = []
    rows: dict[str, RowWeights] = {}
    zeroed: dict[str, list[str]] = {}
    request = f"--{'keep' if keep else 'drop'} {selector or describe_blocks(blocks, arch)}"
    for module in adapter.modules.values():
        cover = coverage(module.placement, blocks)
        if module.block is None or (cover.whole if keep else cover.none):
            kept.append(module)
        elif cover.whole or cover.none:
            dropped.append(module)
        else:
            check_row_scalable(module, request, adapter.path)
            chosen = set(cover.leaves)
            parts = [(leaf, (leaf in chosen) == keep) for leaf in module.placement.layer.leaves]
            rows[module.stem] = unit_rows(module, [(l.start, l.stop, float(stays)) for l, stays in parts], adapter.path)
            zeroed[module.stem] = [leaf.name for leaf, stays in parts if not stays]
            kept.append(module)
    present = {m.block for m in adapter.modules.values()}
    named_empty = [b for b in layout.blocks if b in {a.partition(":")[0] for a in blocks} and b not in present]
    if named_empty:
        warnings.append(
            f"{describe_blocks(frozenset(named_empty), arch)} hold(s) no modules in this file "
            f"(an attention-only file has none in blocks without attention)"
        )
    if not any(m.block is not None for m in kept):
        what = "keep" if keep else "drop"
        have = describe_blocks(frozenset(b for b in present if b is not None), arch)
        raise BloraError(
            f"--{what} {selector or describe_blocks(blocks, arch)} leaves no module "
            f"(the file has modules in {have}); nothing written",
            adapter.path,
        )
    if not dropped and not zeroed:
        warnings.append("no module matched: the output has the same tensors as the input")
    alphas = uniform_alphas(adapter, kept) if uniform_alpha else {}
    warnings += loader_notes(kept, arch, one_alpha=uniform_alpha, passthrough=adapter.passthrough)
    warnings += [w for w in (zero_alpha_warning(kept),) if w]

    entries = [e for m in kept for e in module_entries(adapter, m, None, alphas.get(m.stem), rows=rows.get(m.stem))]
    entries += [copied(adapter, key) for key in adapter.passthrough]
    arguments = {"keep" if keep else "drop": selector or describe_blocks(blocks, arch), "blocks": sorted(blocks)}
    if alphas:
        arguments["uniform_alpha"] = next(iter(alphas.values())).value
    facts = [ModuleFacts.of(m) for m in kept]
    metadata = updated_metadata(
        adapter.metadata,
        operation="prune",
        inputs=[adapter.path],
        arguments=arguments,
        arch=arch,
        modules=[replace(f, alpha=alphas[m.stem].value) if m.stem in alphas else f for f, m in zip(facts, kept)],
    )
    summary = {
        "operation": "prune",
        "input": str(adapter.path),
        "arch": arch.value,
        "selector": selector,
        "mode": "keep" if keep else "drop",
        "blocks": describe_blocks(blocks, arch),
        "modules_before": len(adapter.modules),
        "modules_after": len(kept),
        "kept": group_counts(kept),
        "dropped": group_counts(dropped),
        "dropped_modules": sorted(m.stem for m in dropped),
        "partial": group_counts(m for m in kept if m.stem in zeroed),
        "zeroed_rows": dict(sorted(zeroed.items())),
    }
    return Result("prune", entries, metadata, (Path(adapter.path),), warnings, summary)
