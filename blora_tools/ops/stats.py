"""Per-block figures of an adapter: modules, ranks, scales, parameters, bytes, and norms from factors.

Norms never build a dense ΔW for LoRA kinds (Gram identity in `kinds.frobenius_norm`); without
statistics nothing but the header (and the few bytes of each alpha) is read.

On Flux.1 and SD3 the report also has every block's figures (`per_block`: BASE, D00…, S00… / J00…), the
namings of the file's layers (`naming`: bfl, diffusers, part) and what it trains (`trained`: blocks as ranges,
and per group the layer parts it adapts); the U-Net advice (attention-only files) does not apply there.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from blora_tools.adapter.layers import is_conv, layer_shape
from blora_tools.adapter.metadata import SPEC_KEY, training_summary
from blora_tools.adapter.model import Adapter, Module
from blora_tools.compute import in_order, on_device
from blora_tools.errors import SpecError
from blora_tools.spec import BlockSpec
from blora_tools.taxonomy.arch import Arch, is_dit
from blora_tools.taxonomy.blocks import OTHER, table
from blora_tools.taxonomy.selectors import block_runs

__all__ = ["SCHEMA", "row_order", "inspect_adapter"]

SCHEMA = "blora-inspect/1"


@dataclass
class _BlockFigures:
    """Running totals for one row of the per-block table."""

    modules: int = 0
    ranks: list[int] = field(default_factory=list)
    scales: set[float] = field(default_factory=set)
    params: int = 0
    bytes: int = 0
    norm_sq: float | None = None

    def add(self, module: Module, nbytes: int) -> None:
        """Count one module (its norm is added by the caller, once computed)."""
        self.modules += 1
        if module.rank is not None:
            self.ranks.append(module.rank)
            self.scales.add(round(module.scale, 6))
        self.params += module.params
        self.bytes += nbytes

    def to_json(self, total_sq: float | None) -> dict:
        finite = self.norm_sq is not None and math.isfinite(self.norm_sq)  # NaN/Inf modules: no norm (and valid JSON)
        norm = math.sqrt(self.norm_sq) if finite else None
        share = self.norm_sq / total_sq if finite and total_sq else None
        return {
            "modules": self.modules,
            "rank_min": min(self.ranks) if self.ranks else None,
            "rank_max": max(self.ranks) if self.ranks else None,
            "scale_min": min(self.scales) if self.scales else None,
            "scale_max": max(self.scales) if self.scales else None,
            "params": self.params,
            "bytes": self.bytes,
            "norm": norm,
            "share": share,
        }


def _row_key(module: Module, fine: bool) -> str:
    """The row a module counts in: its paper group, or with `fine` its LBW ID (`BASE` for text encoders)."""
    if module.placement is None:
        return "none"
    if fine:
        return module.placement.lbw or "OTHER"
    return module.placement.group


def row_order(arch: Arch, fine: bool) -> list[str]:
    layout = table(arch)
    if fine:
        return list(layout.lbw_full) + ([] if is_dit(arch) else ["OTHER"])  # a DiT's OTHER layers count in BASE
    return list(layout.groups)


def _module_norm(adapter: Adapter, module: Module, device) -> tuple[float, bool]:
    """(‖ΔW‖_F, whether the module's values are all finite) of one module (finite values may still overflow).

    One pass over the data: NaN/Inf in any factor makes the norm NaN/Inf (a Gram diagonal holds every entry's
    square), so only a non-finite norm needs the element-wise check."""
    from blora_tools.adapter.kinds import frobenius_norm

    tensors = on_device(adapter.tensors(module), device)
    norm = frobenius_norm(module.kind, tensors, module.scale, module.weight_shape)
    return norm, math.isfinite(norm) or all(bool(t.float().isfinite().all()) for t in tensors.values())


def inspect_adapter(
    adapter: Adapter,
    *,
    fine: bool = False,
    with_stats: bool = True,
    on_module: Callable[[], None] | None = None,
    device=None,
) -> dict:
    """The `inspect --json` object for one adapter (schema `blora-inspect/1`, documented in the README).

    `device` is where the norms are computed (default: the CPU)."""
    dit = is_dit(adapter.arch)
    rows: dict[str, _BlockFigures] = {k: _BlockFigures() for k in row_order(adapter.arch, fine)}
    per_block = {k: _BlockFigures() for k in row_order(adapter.arch, True)} if dit else {}
    warnings = list(adapter.warnings)
    nonfinite: list[str] = []
    modules = list(adapter.modules.values())
    norms = in_order(lambda m: _module_norm(adapter, m, device), modules) if with_stats else iter(())
    for module in modules:  # the norms computed side by side on the thread policy's workers, summed in order
        counted = [rows.setdefault(_row_key(module, fine), _BlockFigures())]
        if dit and module.placement is not None:
            counted.append(per_block[_row_key(module, True)])
        for figures in counted:
            figures.add(module, sum(adapter.info(k).nbytes for k in module.keys.values()))
        if with_stats:
            norm, finite_values = next(norms)
            if not finite_values:
                nonfinite.append(module.stem)
            elif not math.isfinite(norm):
                warnings.append(f"module {module.stem}: its norm overflows float32; left out of the norms")
                norm = 0.0
            for figures in counted:
                figures.norm_sq = (figures.norm_sq or 0.0) + norm * norm
        if on_module:
            on_module()
    if nonfinite:
        warnings.append(f"{len(nonfinite)} module(s) hold NaN or Inf values, e.g. {nonfinite[0]}")
    warnings += _empty_block_warnings(adapter, rows, fine)
    warnings += _alpha_warnings(adapter)
    finite = [f.norm_sq for f in rows.values() if f.norm_sq is not None and math.isfinite(f.norm_sq)]
    total_sq = sum(finite) if with_stats else None
    dtypes = adapter.dtypes()
    extra = {}
    if dit:
        extra = {
            "per_block": {k: f.to_json(total_sq) for k, f in per_block.items()},
            "naming": _namings(adapter),
            "trained": _dit_trained(adapter),
        }
    return {
        "schema": SCHEMA,
        "path": str(adapter.path),
        "arch": adapter.arch.value,
        "format": adapter.format.value,
        "dialect": adapter.dialect.value,
        "kinds": _kind_counts(adapter),
        "modules": len(adapter.modules),
        "dtypes": dict(dtypes),
        "size": adapter.header.file_size,
        "blocks": {k: f.to_json(total_sq) for k, f in rows.items()},
        "norm": math.sqrt(total_sq) if total_sq is not None else None,
        "passthrough": list(adapter.passthrough),
        "warnings": warnings,
        "training": training_summary(adapter.metadata),
        "metadata": dict(adapter.metadata),
        **extra,
    }


def _kind_counts(adapter: Adapter) -> dict[str, int]:
    counts = Counter(m.kind.value for m in adapter.modules.values())
    dora = sum(1 for m in adapter.modules.values() if m.dora)
    if dora:
        counts["dora"] = dora
    return dict(counts)


def _empty_block_warnings(adapter: Adapter, rows: dict[str, _BlockFigures], fine: bool) -> list[str]:
    """Groups the file's own `blora_spec` trains, or that an attention-only file cannot reach, with no modules."""
    if fine:
        return []
    layout = table(adapter.arch)
    wanted: set[str] = set()
    warnings = []
    raw_spec = adapter.metadata.get(SPEC_KEY)
    if raw_spec:
        try:
            wanted = {layout.group_of(b) for b in BlockSpec.from_json(raw_spec).trained_blocks}
        except SpecError as err:
            warnings.append(f"its blora_spec cannot be read ({err.message}); it is ignored")
    empty = [g for g in rows if g in wanted and rows[g].modules == 0]
    if empty:
        warnings.append(f"blocks {', '.join(empty)} are in this file's blora_spec but hold no modules")
    if is_dit(adapter.arch):
        return warnings  # every DiT block has attention: the U-Net advice below does not apply
    unet_groups = [g for g in layout.unet_groups if rows.get(g) and rows[g].modules]
    no_attention = sorted(set(layout.unet_groups) - layout.attention_groups)
    # A LoCon file pruned to attention blocks still holds their resnet convolutions: not attention-only.
    convs = any(is_conv(layer_shape(m, adapter.arch)) for m in adapter.modules.values())
    if unet_groups and set(unet_groups) <= layout.attention_groups and not raw_spec and not convs:
        warnings.append(
            f"attention-only file: blocks {', '.join(no_attention)} have no attention layers, so no module here "
            "can touch them (train with conv_dim / LoCon to reach them)"
        )
    return warnings


_PART_FAMILY = {"q": "qkv", "k": "qkv", "v": "qkv", "0": "", "2": "", "fc1": "", "fc2": ""}
"""Leaf-name endings folded into their layer family for the `trained` parts (q/k/v rows → qkv, MLP layers → mlp)."""


def _namings(adapter: Adapter) -> list[str]:
    """The namings (`taxonomy.dit`: bfl, diffusers, part) of a DiT file's layers, judged by its block layers
    where it has any (SD3's embedders have one path in both namings)."""
    layers = [m.placement.layer for m in adapter.modules.values() if m.placement and m.placement.layer]
    telling = [layer for layer in layers if layer.block is not None] or layers
    return sorted({layer.naming for layer in telling})


def _dit_trained(adapter: Adapter) -> dict:
    """What a Flux.1/SD3 file trains: blocks as ranges (`D00-D18`; `base`: the embedders and final layer), the
    blocks it leaves out, and per group the layer parts its modules adapt (`img.attn.qkv`, `txt.mlp`, `in.img`)."""
    layout = table(adapter.arch)
    blocks = {m.block for m in adapter.modules.values() if m.block is not None}
    parts: dict[str, set[str]] = {}
    for m in adapter.modules.values():
        if m.placement is None:
            continue
        group = m.placement.group
        layer = m.placement.layer
        if layer is None:
            parts.setdefault(group, set()).add("(all)")
            continue
        for leaf in layer.leaves:
            head, _, last = leaf.name.rpartition(".")
            family = _PART_FAMILY.get(last)
            parts.setdefault(group, set()).add(leaf.name if family is None or not head else f"{head}.{family}".rstrip("."))
    base = {c.value for c in layout.text_encoders} | {OTHER}

    def outside(chosen: set[str]) -> list[str]:
        return ["base" if b == OTHER else b for b in layout.blocks if b in chosen & base]

    return {
        "blocks": ",".join(block_runs(blocks, layout) + outside(blocks)),
        "untrained": ",".join(block_runs(set(layout.unet_lbw) - blocks, layout) + outside(base - blocks)),
        "parts": {g: sorted(p) for g, p in parts.items()},
    }


def _alpha_warnings(adapter: Adapter) -> list[str]:
    """Alphas loaders read differently: several values (diffusers mis-scales them), and stored 0."""
    from blora_tools.adapter.alpha import zero_alpha_warning

    warnings = []
    alphas = {
        m.effective_alpha
        for m in adapter.modules.values()
        if m.kind.is_lora and m.placement is not None and m.rank is not None
    }
    if len(alphas) > 1:
        warnings.append(
            f"modules have {len(alphas)} different alpha values; diffusers loads such files with some modules "
            "mis-scaled. Repair: blora-tools convert FILE --to kohya --uniform-alpha -o OUT"
        )
    zero = zero_alpha_warning(adapter.modules.values())
    if zero:
        warnings.append(zero + "; prune or retrain those modules")
    return warnings
