"""Prune: remove whole modules by block; every kept tensor is copied byte for byte.

A module goes with all its keys (`alpha`, `dora_scale`, `lora_mid`, `hada_t*`, …), so no orphan is left
(an orphan key makes A1111 reject the file) and no alpha is dropped alone. Modules that fit no block of the
architecture are kept, and pass-through keys (e.g. textual-inversion bundles) are kept; both with a warning.
"""

from __future__ import annotations

from pathlib import Path

from blora_tools.adapter.metadata import SPEC_KEY, updated_metadata
from blora_tools.adapter.model import Adapter, Module
from blora_tools.errors import BloraError
from blora_tools.ops.result import (
    Result,
    copied,
    loader_notes,
    effective_alpha,
    group_counts,
    known_arch,
    spec_without_groups,
)
from blora_tools.ops.uniform import module_entries, uniform_alphas
from blora_tools.taxonomy.blocks import table
from blora_tools.taxonomy.selectors import describe_blocks


def prune(
    adapter: Adapter, blocks: frozenset[str], *, keep: bool, selector: str = "", uniform_alpha: bool = False
) -> Result:
    """Keep (`keep=True`) or drop (`keep=False`) the modules whose block is in `blocks`.

    `selector` is the user's text, recorded in the history. `uniform_alpha` gives the kept modules one alpha
    (`ops.uniform`; ΔW unchanged). Raises BloraError when nothing would be left.
    """
    arch = known_arch(adapter)
    layout = table(arch)
    warnings: list[str] = list(adapter.warnings)  # unplaced modules and pass-through keys are named there
    kept: list[Module] = []
    dropped: list[Module] = []
    for module in adapter.modules.values():
        if module.block is None:
            kept.append(module)
        elif (module.block in blocks) == keep:
            kept.append(module)
        else:
            dropped.append(module)
    present = {m.block for m in adapter.modules.values()}
    named_empty = [b for b in layout.blocks if b in blocks and b not in present]
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
    if not dropped:
        warnings.append("no module matched: the output has the same tensors as the input")
    alphas = uniform_alphas(adapter, kept) if uniform_alpha else {}
    warnings += loader_notes(kept, arch, one_alpha=uniform_alpha, passthrough=adapter.passthrough)

    entries = [e for m in kept for e in module_entries(adapter, m, None, alphas.get(m.stem))]
    entries += [copied(adapter, key) for key in adapter.passthrough]
    metadata = updated_metadata(
        adapter.metadata,
        operation="prune",
        arguments={"input": Path(adapter.path).name, "keep" if keep else "drop": selector or sorted(blocks)},
        ranks=[m.rank for m in kept],
        alphas=[alphas[m.stem].value if m.stem in alphas else a for m in kept if (a := effective_alpha(m)) is not None],
    )
    spec = spec_without_groups(adapter.metadata, {m.group for m in kept})
    if spec is not None:
        metadata[SPEC_KEY] = spec
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
    }
    return Result("prune", entries, metadata, (Path(adapter.path),), warnings, summary)
