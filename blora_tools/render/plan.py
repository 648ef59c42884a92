"""The render plan: the settings of each cell of a grid, and which modules each adapter's selector picks.

`plan_grid` turns base settings and up to two axes into cells (row by row); `resolve_plan` resolves every
(adapter, selector) pair the cells use on the adapter's architecture. No torch, no PIL.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from blora_tools.errors import BloraError, SelectorError
from blora_tools.render.args import OFF, Axis, AxisKind


@dataclass(frozen=True)
class LoraUse:
    """How one adapter takes part in one cell: its weight and the blocks it is applied to."""

    name: str
    weight: float
    selector: str

    @property
    def active(self) -> bool:
        """False when the cell renders with this adapter off (weight 0 or selector `none`)."""
        return self.weight != 0.0 and self.selector != OFF

    def to_json(self) -> dict:
        return {"name": self.name, "weight": self.weight, "blocks": self.selector}


@dataclass(frozen=True)
class CellSettings:
    """Everything that decides one image."""

    prompt: str
    negative: str
    seed: int
    steps: int
    cfg: float
    loras: tuple[LoraUse, ...] = ()
    off: frozenset[str] = frozenset()
    """Adapters switched off in this cell (by a `lora:` axis), whatever their weight and blocks."""

    @property
    def adapter_state(self) -> tuple[LoraUse, ...]:
        """The adapters this cell applies: cells with equal states share one merge."""
        return tuple(u for u in self.loras if u.active and u.name not in self.off)

    def with_lora(self, name: str, **changes) -> "CellSettings":
        loras = tuple(replace(u, **changes) if u.name == name else u for u in self.loras)
        return replace(self, loras=loras)

    def to_json(self) -> dict:
        return {
            "prompt": self.prompt,
            "negative": self.negative,
            "seed": self.seed,
            "steps": self.steps,
            "cfg": self.cfg,
            "loras": [u.to_json() | ({"off": True} if u.name in self.off else {}) for u in self.loras],
        }


def apply_axis(axis: Axis, settings: CellSettings, value) -> CellSettings:
    """The settings of a cell at `value` of `axis`."""
    if axis.kind is AxisKind.BLOCKS:
        return settings.with_lora(axis.target, selector=value)
    if axis.kind is AxisKind.WEIGHT:
        return settings.with_lora(axis.target, weight=value)
    if axis.kind is AxisKind.SEED:
        return replace(settings, seed=value)
    if axis.kind is AxisKind.PROMPT:
        return replace(settings, prompt=value)
    if axis.kind is AxisKind.ADAPTER:
        return replace(settings, off=settings.off | (frozenset(axis.values) - {value}))
    if axis.kind is AxisKind.CFG:
        return replace(settings, cfg=value)
    return replace(settings, steps=value)


@dataclass(frozen=True)
class Cell:
    """One image of the grid: its column, row, settings and labels."""

    col: int
    row: int
    settings: CellSettings
    x_label: str | None = None
    y_label: str | None = None


@dataclass(frozen=True)
class GridPlan:
    """The cells of a render, row by row, and the axes that made them."""

    cells: tuple[Cell, ...]
    x: Axis | None = None
    y: Axis | None = None

    @property
    def columns(self) -> int:
        return len(self.x.values) if self.x else 1

    @property
    def rows(self) -> int:
        return len(self.y.values) if self.y else 1

    @property
    def is_grid(self) -> bool:
        return self.x is not None or self.y is not None

    def run_order(self) -> list[Cell]:
        """Cells in rendering order: grouped by adapter state so equal merges run back to back."""
        first: dict = {}
        for cell in self.cells:
            first.setdefault(cell.settings.adapter_state, len(first))
        return sorted(self.cells, key=lambda c: first[c.settings.adapter_state])

    @property
    def total_steps(self) -> int:
        return sum(c.settings.steps for c in self.cells)


def plan_grid(base: CellSettings, x: Axis | None = None, y: Axis | None = None) -> GridPlan:
    """The cells for base settings and up to two axes; BloraError when an axis names an unknown adapter."""
    names = {u.name for u in base.loras}
    for axis, flag in ((x, "--grid-x"), (y, "--grid-y")):
        if axis is None:
            continue
        wanted = [axis.target] if axis.target is not None else []
        if axis.kind is AxisKind.ADAPTER:
            wanted = [v for v in axis.values if v != OFF]
        for name in wanted:
            if name not in names:
                known = ", ".join(sorted(names)) or "none given"
                raise BloraError(f"{flag} {axis.text!r}: no adapter named {name!r} (adapters: {known}); "
                                 "name one with --lora NAME=FILE")
    if x is not None and y is not None and (x.kind, x.target) == (y.kind, y.target):
        raise BloraError(f"--grid-x and --grid-y both vary {x.title}; give the values on one axis")
    xs = list(x.values) if x else [None]
    ys = list(y.values) if y else [None]
    cells = []
    for row, yv in enumerate(ys):
        for col, xv in enumerate(xs):
            settings = base
            if y is not None:
                settings = apply_axis(y, settings, yv)
            if x is not None:
                settings = apply_axis(x, settings, xv)
            cells.append(
                Cell(col, row, settings, x.label(xv) if x else None, y.label(yv) if y else None)
            )
    return GridPlan(tuple(cells), x, y)


@dataclass(frozen=True)
class Selection:
    """The modules of one adapter a selector picks, and the named groups where it has none."""

    name: str
    selector: str
    blocks: frozenset[str]
    stems: tuple[str, ...]
    empty_groups: tuple[str, ...] = ()

    def to_json(self, arch) -> dict:
        from blora_tools.taxonomy.selectors import describe_blocks

        return {
            "adapter": self.name,
            "blocks": self.selector,
            "resolved": describe_blocks(self.blocks, arch) if self.blocks else "(nothing)",
            "modules": len(self.stems),
            "empty": list(self.empty_groups),
        }


_WHOLE = frozenset({"all", "character", "unet"})


def select_modules(name: str, adapter, selector: str, arch) -> Selection:
    """The modules of `adapter` in the blocks `selector` names on `arch`.

    Raises SelectorError when the selector names only blocks where the adapter has no modules (the
    message names them and the blocks that do have modules). Named groups that are empty while others
    are not are reported in `empty_groups` (a warning for the caller).
    """
    from blora_tools.taxonomy.blocks import table
    from blora_tools.taxonomy.selectors import coverage, describe_blocks, resolve_selector

    if selector == OFF:
        return Selection(name, selector, frozenset(), ())
    try:
        blocks = resolve_selector(selector, arch)
    except SelectorError as err:
        raise SelectorError(f"adapter {name!r}, blocks {selector!r}: {err.message}") from None
    stems = tuple(s for s, m in adapter.modules.items() if coverage(m.placement, blocks).whole)
    present = {m.block for m in adapter.modules.values() if m.block is not None}
    if not stems:
        has = describe_blocks(frozenset(present), arch) if present else "no block"
        raise SelectorError(
            f"{adapter.path.name}: blocks {selector!r} ({describe_blocks(blocks, arch)}) hold none of adapter "
            f"{name!r}'s modules; it has modules in {has}"
        )
    layout = table(arch)
    empty: list[str] = []
    if selector.strip().lower() not in _WHOLE:
        by_group: dict[str, set[str]] = {}
        for block in blocks:
            group = layout.group_of(block)
            if group != "none":
                by_group.setdefault(group, set()).add(block)
        order = list(layout.groups)
        empty = [g for g in order if g in by_group and not (by_group[g] & present)]
    return Selection(name, selector, blocks, stems, tuple(empty))


def resolve_plan(plan: GridPlan, adapters: dict) -> tuple[dict[tuple[str, str], Selection], list[str]]:
    """Every (adapter, selector) pair the plan uses, resolved on the adapter's architecture; and warnings
    naming selected groups where an adapter has no modules. `adapters` maps names to opened `Adapter`s."""
    selections: dict[tuple[str, str], Selection] = {}
    warnings: list[str] = []
    for cell in plan.cells:
        for use in cell.settings.loras:
            key = (use.name, use.selector)
            if key in selections:
                continue
            adapter = adapters[use.name]
            selection = select_modules(use.name, adapter, use.selector, adapter.arch)
            selections[key] = selection
            if selection.empty_groups:
                warnings.append(
                    f"adapter {use.name!r}, blocks {use.selector!r}: no modules in "
                    f"{', '.join(selection.empty_groups)} (rendered with the other blocks)"
                )
    return selections, warnings
