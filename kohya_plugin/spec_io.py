"""The `blora_spec` of the plugin's files: the spec a set of modules states, and the spec a file states.

A saved file's `blora_spec` is `BlockSpec.to_json` of the spec its modules state (`spec_of_modules`): per block,
the rank and training alpha its modules have (rank 0 for a block without modules, e.g. one asked for but
without attention layers, or text encoders dropped by `apply_to`), with the learning-rate weights of training,
plus `file_alpha` (the one alpha stored in the file) and `module_alphas` for any module whose alpha the block
table does not state. Reading a file back (`read_file_spec`) restores the training alphas from it; a
`blora_spec` that cannot be read is an AdapterFileError naming the file.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from blora_tools.errors import AdapterFileError, SpecError
from blora_tools.jsonio import loads_strict
from blora_tools.spec import CONV_KINDS, Algo, BlockSetting, BlockSpec
from blora_tools.taxonomy.arch import Arch
from blora_tools.taxonomy.blocks import ArchTable, Component, Placement, table

from kohya_plugin.targets import Target

if TYPE_CHECKING:
    from kohya_plugin.planning import PlannedModule


@dataclass(frozen=True)
class FileSpec:
    """What a plugin file's `blora_spec` says: the spec and the training alphas of modules it does not cover."""

    spec: BlockSpec
    module_alphas: Mapping[str, float]


def read_file_spec(metadata: Mapping[str, str], arch: Arch, source: str) -> FileSpec | None:
    """The `blora_spec` of a file (None where it has none: other producers); AdapterFileError when it is there
    but unreadable or for another architecture."""
    text = metadata.get("blora_spec")
    if not text:
        return None
    try:
        spec = BlockSpec.from_json(text)
    except SpecError as err:
        raise AdapterFileError(f"blora_spec metadata is unreadable: {err.message}", source) from None
    if spec.arch is not arch:
        raise AdapterFileError(f"the file was trained for {spec.arch.value} but the U-Net is {arch.value}", source)
    extra = loads_strict(text).get("module_alphas") or {}
    if not isinstance(extra, Mapping):
        raise AdapterFileError("blora_spec metadata: module_alphas is not an object", source)
    alphas: dict[str, float] = {}
    for stem, value in extra.items():
        number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
        if not math.isfinite(number) or number < 0:
            raise AdapterFileError(f"blora_spec metadata: module_alphas.{stem} is {value!r}, not a number ≥ 0",
                                   source)
        alphas[stem] = float(number)
    return FileSpec(spec, alphas)


def training_alpha(stem: str, placement: Placement, kind: str, rank: int, file_alpha: float,
                   file_spec: FileSpec | None) -> float:
    """The alpha a module was trained with, where the file says so; else the file's own alpha."""
    if file_spec is None:
        return file_alpha
    if stem in file_spec.module_alphas:
        return file_spec.module_alphas[stem]
    spec_rank, spec_alpha = file_spec.spec.rank_alpha(placement, kind)
    return spec_alpha if spec_rank == rank else file_alpha


Unit = tuple[str, "int | None"]
"""A block, or on SDXL one kohya slot of the middle block (the finest level a BlockSpec states)."""


def unit_of(placement: Placement) -> Unit:
    """A layer's unit: its block, or for a U-Net middle-block layer with a kohya slot of its own, that slot."""
    if placement.block == "M00" and placement.component is Component.UNET and placement.kohya_index is not None:
        return "M00", placement.kohya_index
    return placement.block, None


def layer_kinds(targets: Iterable[Target]) -> frozenset[tuple[Unit, bool]]:
    """(unit, is a conv-kind layer) for every layer a network could adapt: where a spec's rank of 0 says
    something (a unit without conv layers has no conv rank to state)."""
    return frozenset((unit_of(t.placement), t.kind in CONV_KINDS) for t in targets)


def _stated(base: BlockSetting, modules: Iterable["PlannedModule"], kinds: set[bool]) -> BlockSetting:
    """`base` with the rank and alpha most of the modules have, per kind. Rank 0 for a unit without modules and
    for a kind the unit has layers of but no module; a kind it has no layer of keeps `base`'s numbers (so a
    LoCon block whose downsampler has only a conv does not read as a block of another rank)."""
    found: dict[bool, Counter] = {False: Counter(), True: Counter()}
    for m in modules:
        found[m.target.kind in CONV_KINDS][(m.rank, m.alpha)] += 1
    empty = not (found[False] or found[True])

    def pick(conv: bool, rank: int, alpha: float) -> tuple[int, float]:
        if found[conv]:
            return found[conv].most_common(1)[0][0]
        return (0, alpha) if (empty or conv in kinds) else (rank, alpha)

    rank, alpha = pick(False, base.rank, base.alpha)
    conv_rank, conv_alpha = pick(True, base.conv_rank, base.conv_alpha)
    return BlockSetting(rank, alpha, conv_rank, conv_alpha, base.lr_weight)


def spec_of_modules(
    arch: Arch,
    planned: Iterable["PlannedModule"],
    layers: frozenset[tuple[Unit, bool]],
    base: Callable[[str, int | None], BlockSetting],
    network_dim: int | None = None,
    network_alpha: float | None = None,
) -> BlockSpec:
    """The spec a set of modules states: per block (SDXL middle-block slot where they differ) the most common
    rank and alpha of its modules, 0 where the block has layers (`layer_kinds`) but no module;
    `base(block, slot)` gives the learning-rate weight, and the numbers of kinds a block has no layer of.
    `network_dim`/`network_alpha` default to the most common rank and alpha. Not `BlockSpec.from_modules`, which
    states a file's facts only: this keeps the training facts a file does not hold (SDXL per-slot lr weights, the
    training numbers of a kind a block has no layer of or no module in) and states the most common rank, not the
    largest, so fewer modules need `module_alphas`."""
    planned = list(planned)
    per_unit: dict[Unit, list] = {}
    for m in planned:
        per_unit.setdefault(unit_of(m.target.placement), []).append(m)
    kinds: dict[Unit, set[bool]] = {}
    for unit, conv in layers:
        kinds.setdefault(unit, set()).add(conv)
    layout = table(arch)
    blocks = {
        b: _stated(base(b, None), [m for u, ms in per_unit.items() if u[0] == b for m in ms],
                   {c for u, cs in kinds.items() if u[0] == b for c in cs})
        for b in layout.blocks
    }
    slots = {s: _stated(base("M00", s), per_unit.get(("M00", s), []), kinds.get(("M00", s), set()))
             for s in _mid_slots(layout)}
    if len(set(slots.values())) <= 1:
        slots = {}
    algo = Algo.LOCON if any(m.target.kind in CONV_KINDS for m in planned) else Algo.LORA
    dims = Counter(m.rank for m in planned if m.target.kind not in CONV_KINDS) or Counter(m.rank for m in planned)
    alphas = Counter(m.alpha for m in planned)
    dim = network_dim if network_dim is not None else (dims.most_common(1)[0][0] if dims else 0)
    alpha = network_alpha if network_alpha is not None else (alphas.most_common(1)[0][0] if alphas else 1.0)
    return BlockSpec(arch, algo, blocks, slots, dim, alpha)


def _mid_slots(layout: ArchTable) -> tuple[int, ...]:
    """The kohya slots of the middle block with settings of their own (SDXL: middle_block_0..2; SD1/SD2 none)."""
    slots = tuple(i for i, b in enumerate(layout.kohya_slots) if b == "M00")
    return slots if len(slots) > 1 else ()


def unstated_alphas(spec: BlockSpec, planned: Iterable["PlannedModule"]) -> dict[str, float]:
    """Training alphas of the modules whose rank or alpha the spec's block table does not state."""
    exceptions: dict[str, float] = {}
    for m in planned:
        if spec.rank_alpha(m.target.placement, m.target.kind) != (m.rank, m.alpha):
            exceptions[m.target.name] = m.alpha
    return exceptions


def saved_spec_json(spec: BlockSpec, planned: Iterable["PlannedModule"], file_alpha: float) -> str:
    """The `blora_spec` value of a saved file: the spec, its one alpha, and the alphas the spec does not state."""
    extra: dict = {"file_alpha": file_alpha}
    exceptions = unstated_alphas(spec, planned)
    if exceptions:
        extra["module_alphas"] = exceptions
    return spec.to_json(extra)
