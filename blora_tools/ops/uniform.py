"""One alpha for every module, and a module's kohya tensors with a factor folded into its scaled parameter.

diffusers (0.42) mis-scales kohya files whose modules have different alphas (docs/architecture.md §3). `uniform_alphas` gives
every module the file's most common alpha and says by how much each module's scaled parameter (the one factor
a reweight multiplies, `kinds.scaled_params`) must grow so ΔW stays the same for every loader. `module_entries`
writes one module that way; convert, prune and reweight (`--uniform-alpha`) all go through it.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace

from blora_tools.adapter.alpha import alpha_storage
from blora_tools.adapter.formats import Format
from blora_tools.adapter.kinds import row_params, scaled_params
from blora_tools.adapter.model import Adapter, Module
from blora_tools.adapter.writer import Entry
from blora_tools.errors import BloraError
from blora_tools.ops.result import copied, scalar, scaled
from blora_tools.ops.rows import RowWeights

__all__ = ["Alpha", "uniform_alphas", "rank_alphas", "folded", "module_entries"]


@dataclass(frozen=True)
class Alpha:
    """The alpha a module is written with, and the factor its scaled parameter is multiplied by."""

    value: float
    dtype: str
    ratio: float


def uniform_alphas(adapter: Adapter, modules: Iterable[Module] | None = None) -> dict[str, Alpha]:
    """Per module with a rank (of `modules`, default all): their most common positive alpha and the fold
    ratio that keeps ΔW.

    Alpha 0 is never chosen (a module scaled by alpha/rank = 0 cannot carry another module's scale).
    """
    pool = adapter.modules.values() if modules is None else modules
    ranked = [m for m in pool if m.rank is not None and m.kind.has_rank]
    if not ranked:
        raise BloraError("no module has a rank and an alpha; --uniform-alpha has nothing to do", adapter.path)
    counts = Counter(a for m in ranked if (a := m.effective_alpha) is not None and a > 0)
    if not counts:
        raise BloraError("every module has alpha 0 (no effect); --uniform-alpha has no alpha to keep", adapter.path)
    top = max(counts.values())
    value = max(a for a, n in counts.items() if n == top)  # ties: the larger alpha keeps factors smaller
    dtypes = Counter(adapter.info(m.keys["alpha"]).dtype for m in ranked if "alpha" in m.keys)
    value, dtype = alpha_storage(value, dtypes.most_common(1)[0][0] if dtypes else "F32", "the common alpha", adapter.path)
    return {m.stem: Alpha(value, dtype, m.scale / (value / m.rank)) for m in ranked}


def rank_alphas(adapter: Adapter) -> dict[str, Alpha]:
    """alpha = rank for every module with a rank (its whole scale folded): what loaders that ignore PEFT's
    `lora_adapter_metadata` assume."""
    return {
        m.stem: Alpha(float(m.rank), "F32", m.scale)
        for m in adapter.modules.values()
        if m.rank is not None and m.kind.has_rank
    }


def folded(adapter: Adapter, module: Module, param: str, name: str, ratio: float) -> Entry:
    """The module's `param` multiplied by `ratio` in float32, written in its own dtype. An overflow to Inf is
    refused as it is written (`Result.save`, naming the module and the output)."""
    return scaled(adapter, module.keys[param], name, ratio)


def module_entries(
    adapter: Adapter,
    module: Module,
    stem: str | None,
    alpha: Alpha | None,
    *,
    weight: float = 1.0,
    rows: RowWeights | None = None,
    complete_alpha: bool = False,
) -> list[Entry]:
    """A module's tensors: its scaled parameter multiplied by `weight` × the alpha fold ratio, the alpha
    replaced by `alpha` (None: kept), everything else copied byte for byte. Named `<stem>.<kohya param>`, or
    with `stem` None under the keys the file has (`alpha` is then only given for kohya files).

    `rows` (`ops.rows`: ranges of ΔW's output rows and their weights) also multiplies those rows of the factor
    holding them (`kinds.row_params`); the caller has checked the module allows it (`rows.check_row_scalable`).

    `complete_alpha` writes an alpha tensor for a module that has none (alpha = rank), so every loader reads
    the same scale (a PEFT source keeps its alphas in metadata).
    """
    ratio = weight * (alpha.ratio if alpha is not None else 1.0)
    replaced = alpha is not None and (alpha.ratio != 1.0 or "alpha" not in module.keys)
    multiplied = set(scaled_params(module.kind, frozenset(module.keys))) if ratio != 1.0 else set()
    row_axes = dict(row_params(module.kind, frozenset(module.keys))) if rows else {}
    entries = []
    for param, key in module.keys.items():
        name = key if stem is None else f"{stem}.{param}"
        if param == "alpha" and replaced:
            continue
        if param in row_axes:
            entries.append(scaled(adapter, key, name, ratio, rows, row_axes[param]))
        elif param in multiplied:
            entries.append(folded(adapter, module, param, name, ratio))
        elif param == "dora_scale" and stem is not None and adapter.format is Format.PEFT:
            entries.append(_kohya_dora_scale(adapter, module, key, name))
        else:
            entries.append(copied(adapter, key, name))
    if stem is None and replaced and adapter.format is not Format.KOHYA:
        raise BloraError(
            f"--uniform-alpha writes alpha tensors, which a {adapter.format.value} file has no place for; "
            "convert it instead (`convert --to kohya --uniform-alpha`, or `--to peft`, which sets alpha = rank)",
            adapter.path,
        )
    prefix = _own_prefix(module) if stem is None else stem  # a LyCORIS/ComfyUI/OMI file keeps its own spelling
    if replaced:
        entries.append(scalar(f"{prefix}.alpha", alpha.dtype, alpha.value))
    elif complete_alpha and "alpha" not in module.keys and module.rank is not None and module.kind.has_rank:
        value, dtype = alpha_storage(module.effective_alpha, "F32", f"module {module.stem}: alpha", adapter.path)
        entries.append(scalar(f"{prefix}.alpha", dtype, value))
    return entries


def _own_prefix(module: Module) -> str:
    """The text before `.<param>` in the module's own keys (`lycoris_x`, `diffusion_model.x`; kohya: the stem)."""
    param, key = next(iter(module.keys.items()))
    return key[: -len(param) - 1]


def _kohya_dora_scale(adapter: Adapter, module: Module, key: str, name: str) -> Entry:
    """PEFT's DoRA magnitude as kohya's `dora_scale`: the same values (one per output row), in LyCORIS's
    out×1… shape, so loaders that tell the norm axis by shape (ComfyUI, LyCORIS) take the output axis."""
    shape = (module.weight_shape[0],) + (1,) * (len(module.weight_shape) - 1)
    info = adapter.info(key)
    if math.prod(info.shape) != shape[0]:
        raise BloraError(
            f"module {module.stem}: lora_magnitude_vector has shape {list(info.shape)}, not one value per output "
            f"row ({shape[0]})",
            adapter.path,
        )
    return replace(copied(adapter, key, name), shape=shape)
