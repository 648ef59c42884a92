"""Some rows of a module's ΔW scaled (or zeroed) through one factor: what a sub-selector does to a fused layer.

A Flux.1/SD3 layer can hold several named parts as row ranges (`taxonomy.dit.Leaf`: q | k | v of a fused qkv,
Flux's single-block `linear1` with its MLP rows). ΔW's rows are the up factor's rows times the down factor,
so multiplying those rows of the up factor (`kinds.row_params`; `adapter.floats.scaled_bytes` multiplies) scales
exactly that part: same rank, the other rows bit for bit where their weight is 1 (F64 factors are computed in
float32, so theirs are rounded to it). Row positions come in *units* of the layer's width; a module's rows per
unit are its output rows divided by its layer's units (never a hard-coded width).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from blora_tools.adapter.kinds import row_params
from blora_tools.adapter.model import Module
from blora_tools.errors import BloraError

__all__ = ["RowWeights", "unit_rows", "check_row_scalable"]

RowWeights = tuple[tuple[int, int, float], ...]
"""(first row, end row, weight) ranges covering a module's output rows."""


def unit_rows(module: Module, units: Sequence[tuple[int, int, float]], path: str | Path) -> RowWeights:
    """Ranges in units of the module's layer (`BlockWeights.rows`) as ranges of its ΔW rows."""
    layer = module.placement.layer if module.placement is not None else None
    out = module.weight_shape[0]
    if layer is None or out % layer.units:
        raise BloraError(
            f"module {module.stem}: its {out} output rows do not split into the {layer.units if layer else 1} "
            "parts of its layer, so part of it cannot be chosen",
            path,
        )
    per_unit = out // layer.units
    return tuple((start * per_unit, stop * per_unit, float(w)) for start, stop, w in units)


def check_row_scalable(module: Module, what: str, path: str | Path) -> None:
    """Refuse modules whose rows no single factor holds (LoKr) or whose rows do not scale linearly (DoRA)."""
    if not row_params(module.kind, frozenset(module.keys)):
        raise BloraError(
            f"module {module.stem} is {module.kind.value}: its ΔW rows are a Kronecker product, so {what} "
            "(part of the layer) cannot be applied exactly; choose whole blocks or layers for it",
            path,
        )
    if module.dora:
        raise BloraError(
            f"module {module.stem} is DoRA: it renormalises every output row by its magnitude, so {what} "
            "(part of the layer) is not exact; choose whole blocks or layers for it",
            path,
        )
