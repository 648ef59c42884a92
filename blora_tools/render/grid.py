"""Render plans: adapter arguments, grid axes, the cells they make, and the labelled grid image.

Nothing here imports torch or diffusers; PIL is imported by `draw_grid` only. The syntax:

* an adapter: `[NAME=]FILE[:WEIGHT][@SELECTOR]`, e.g. `style.safetensors`, `style=v3.safetensors:0.8`,
  `char.safetensors:1@NOT te`. NAME defaults to the file's stem; WEIGHT to 1; SELECTOR to `all`.
* an axis (`--grid-x`, `--grid-y`), values separated by `|` (commas also work for numbers):
  - `NAME@SEL|SEL|…`        blocks of adapter NAME, e.g. `style@upper|middle|bottom|all`; `none` turns it off
  - `weight:NAME@W,W,…`     weights of adapter NAME, e.g. `weight:style@0,0.5,1`
  - `seed:S,S,…`            seeds, e.g. `seed:1,2,3`
  - `prompt:P|P|…`          whole prompts, e.g. `prompt:a cat|a dog`
  - `lora:NAME|NAME|…`       which adapter is on (the others of the list off; `none` = all off), e.g. to
                              put an adapter trained block-wise beside one pruned at inference
  - `cfg:C,C,…`, `steps:N,N,…`
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from blora_tools.errors import BloraError, SelectorError
from blora_tools.taxonomy.selectors import parse_selector

if TYPE_CHECKING:
    from PIL import Image

OFF = "none"
"""The block selector of an axis value that renders without the adapter (the base model's weights)."""

ALL = "all"

_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_NAME_PREFIX = re.compile(r"^([A-Za-z0-9_.+-]+)=(.+)$")
_WEIGHT_SUFFIX = re.compile(r"^(.*):([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)$")


# --- adapters ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraArg:
    """One `--lora` argument: a named adapter file with its default weight and block selector."""

    name: str
    path: Path
    weight: float = 1.0
    selector: str = ALL

    @classmethod
    def from_text(cls, text: str) -> "LoraArg":
        """Read `[NAME=]FILE[:WEIGHT][@SELECTOR]`; raises SelectorError on bad syntax."""
        rest = text.strip()
        if not rest:
            raise SelectorError("empty --lora value; give FILE, FILE:WEIGHT or NAME=FILE:WEIGHT@SELECTOR")
        if Path(rest).is_file():  # an existing file name wins over the syntax ('a=b@c.safetensors')
            return cls(_default_name(Path(rest)), Path(rest))
        name = None
        m = _NAME_PREFIX.match(rest)
        if m and "/" not in m.group(1) and "\\" not in m.group(1):
            name, rest = m.group(1), m.group(2)
        selector = ALL
        head, at, tail = rest.rpartition("@")
        if at and tail and "/" not in tail and "\\" not in tail and not tail.endswith(".safetensors"):
            selector, rest = tail.strip(), head
            _check_selector(selector, text)
        weight = 1.0
        m = _WEIGHT_SUFFIX.match(rest)
        if m:
            rest, weight = m.group(1), float(m.group(2))
        if not rest:
            raise SelectorError(f"--lora {text!r}: no file given")
        path = Path(rest)
        if name is None:
            name = _default_name(path)
        if not math.isfinite(weight):
            raise SelectorError(f"--lora {text!r}: weight must be a finite number")
        return cls(name, path, weight, selector)


def _default_name(path: Path) -> str:
    """An adapter's name: the file stem, with characters outside [A-Za-z0-9_.+-] replaced by '_'."""
    stem = path.stem if path.suffix.lower() == ".safetensors" else path.name
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", stem) or "lora"


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


# --- axes -------------------------------------------------------------------------------------------------


class AxisKind(str, Enum):
    """What an axis varies."""

    BLOCKS = "blocks"
    WEIGHT = "weight"
    SEED = "seed"
    PROMPT = "prompt"
    ADAPTER = "lora"
    CFG = "cfg"
    STEPS = "steps"

    def __str__(self) -> str:
        return self.value


_PREFIXED = {k.value: k for k in AxisKind}
AXIS_HELP = (
    "NAME@SEL|SEL|… (blocks of adapter NAME; 'none' = off), weight:NAME@W,W,…, seed:S,S,…, "
    "prompt:P|P|…, lora:NAME|NAME|…, cfg:C,C,…, steps:N,N,…"
)


@dataclass(frozen=True)
class Axis:
    """One grid axis: what it varies, for which adapter, and its values in order."""

    kind: AxisKind
    values: tuple
    target: str | None = None
    text: str = ""

    @classmethod
    def from_text(cls, text: str) -> "Axis":
        """Read an axis (syntax in the module docstring); raises SelectorError on bad syntax."""
        raw = text.strip()
        head, colon, body = raw.partition(":")
        kind = _PREFIXED.get(head.strip().lower()) if colon else None
        if kind is None:
            if "@" not in raw:
                raise SelectorError(f"axis {text!r}: expected one of {AXIS_HELP}")
            kind, body = AxisKind.BLOCKS, raw
        target = None
        if kind in (AxisKind.BLOCKS, AxisKind.WEIGHT):
            target, at, body = body.partition("@")
            target = target.strip()
            if not at or not _NAME.match(target):
                raise SelectorError(
                    f"axis {text!r}: name the adapter before '@', e.g. "
                    + ("'style@upper|all'" if kind is AxisKind.BLOCKS else "'weight:style@0,0.5,1'")
                )
        values = _axis_values(kind, body, text)
        if len(set(values)) != len(values):
            raise SelectorError(f"axis {text!r}: a value is repeated")
        return cls(kind, tuple(values), target, raw)

    @property
    def title(self) -> str:
        """The axis title drawn on the image."""
        if self.kind is AxisKind.BLOCKS:
            return f"{self.target}: blocks"
        if self.kind is AxisKind.WEIGHT:
            return f"{self.target}: weight"
        return {
            AxisKind.SEED: "seed", AxisKind.PROMPT: "prompt", AxisKind.ADAPTER: "adapter", AxisKind.CFG: "CFG",
            AxisKind.STEPS: "steps",
        }[self.kind]

    def label(self, value) -> str:
        """A value's label as drawn on the image."""
        if isinstance(value, float):
            return f"{value:g}"
        return str(value)

    def apply(self, settings: CellSettings, value) -> CellSettings:
        """The settings of a cell at this value."""
        if self.kind is AxisKind.BLOCKS:
            return settings.with_lora(self.target, selector=value)
        if self.kind is AxisKind.WEIGHT:
            return settings.with_lora(self.target, weight=value)
        if self.kind is AxisKind.SEED:
            return replace(settings, seed=value)
        if self.kind is AxisKind.PROMPT:
            return replace(settings, prompt=value)
        if self.kind is AxisKind.ADAPTER:
            return replace(settings, off=settings.off | (frozenset(self.values) - {value}))
        if self.kind is AxisKind.CFG:
            return replace(settings, cfg=value)
        return replace(settings, steps=value)


def _split(body: str, numbers: bool) -> list[str]:
    parts = re.split(r"[|,]" if numbers else r"\|", body)
    return [p.strip() for p in parts]


def _axis_values(kind: AxisKind, body: str, text: str) -> list:
    numbers = kind in (AxisKind.WEIGHT, AxisKind.SEED, AxisKind.CFG, AxisKind.STEPS)
    parts = _split(body, numbers)
    if not body.strip() or any(not p for p in parts):
        raise SelectorError(f"axis {text!r}: an empty value; separate values with '|'" + (" or ','" if numbers else ""))
    if kind is AxisKind.BLOCKS:
        for p in parts:
            if p.lower() != OFF:
                _check_selector(p, text)
        return [OFF if p.lower() == OFF else p for p in parts]
    if kind is AxisKind.PROMPT:
        return parts
    if kind is AxisKind.ADAPTER:
        for p in parts:
            if not _NAME.match(p):
                raise SelectorError(f"axis {text!r}: {p!r} is not an adapter name (letters, digits, _.+-)")
        return [OFF if p.lower() == OFF else p for p in parts]
    values: list = []
    for p in parts:
        try:
            value = int(p) if kind in (AxisKind.SEED, AxisKind.STEPS) else float(p)
        except ValueError:
            what = "an integer" if kind in (AxisKind.SEED, AxisKind.STEPS) else "a number"
            raise SelectorError(f"axis {text!r}: {p!r} is not {what}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise SelectorError(f"axis {text!r}: {p!r} is not a finite number")
        if kind is AxisKind.STEPS and value < 1:
            raise SelectorError(f"axis {text!r}: steps must be at least 1")
        if kind is AxisKind.SEED and not 0 <= value < 2**63:
            raise SelectorError(f"axis {text!r}: seeds run from 0 to 2**63-1")
        values.append(value)
    return values


def _check_selector(selector: str, text: str) -> None:
    try:
        parse_selector(selector)
    except SelectorError as err:
        raise SelectorError(f"{text!r}: {err.message}") from None


# --- the plan -----------------------------------------------------------------------------------------


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
                settings = y.apply(settings, yv)
            if x is not None:
                settings = x.apply(settings, xv)
            cells.append(
                Cell(col, row, settings, x.label(xv) if x else None, y.label(yv) if y else None)
            )
    return GridPlan(tuple(cells), x, y)


# --- drawing ------------------------------------------------------------------------------------------


@dataclass
class Layout:
    """Where everything goes on the grid image (pixels)."""

    width: int
    height: int
    boxes: list[tuple[int, int, int, int]] = field(default_factory=list)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def _wrap(draw, text: str, font, width: int) -> list[str]:
    """Greedy word wrap to `width` pixels; words longer than a line are broken by characters."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        line = ""
        for word in paragraph.split(" "):
            candidate = word if not line else f"{line} {word}"
            if _text_width(draw, candidate, font) <= width:
                line = candidate
                continue
            if line:
                lines.append(line)
            line = ""
            for ch in word:
                if line and _text_width(draw, line + ch, font) > width:
                    lines.append(line)
                    line = ""
                line += ch
        lines.append(line)
    return lines


def draw_grid(plan: GridPlan, images: Sequence["Image.Image"]) -> tuple["Image.Image", Layout]:
    """The labelled grid: axis titles, column and row labels, cells in plan order. A single cell
    without axes is returned as it is."""
    from PIL import Image, ImageDraw

    if len(images) != len(plan.cells):
        raise ValueError(f"{len(images)} images for {len(plan.cells)} cells")
    cell_w, cell_h = images[0].size
    if not plan.is_grid:
        return images[0], Layout(cell_w, cell_h, [(0, 0, cell_w, cell_h)])
    size = max(10, min(48, cell_w // 16))
    font, title_font = _font(size), _font(size + size // 4)
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = size + size // 3
    title_h = size + size // 4 + size // 2
    pad, gap = max(4, size // 2), max(2, size // 4)

    col_lines = [_wrap(scratch, plan.x.label(v), font, cell_w - 2) for v in plan.x.values] if plan.x else []
    top = pad + title_h + max(len(lines) for lines in col_lines) * line_h + pad if plan.x else pad
    left_w = 0
    row_lines: list[list[str]] = []
    if plan.y:
        label_w = max(cell_w // 2, min(cell_w, max(_text_width(scratch, plan.y.label(v), font) for v in plan.y.values)))
        row_lines = [_wrap(scratch, plan.y.label(v), font, label_w) for v in plan.y.values]
        left_w = pad + title_h + label_w + pad
    left = left_w or pad
    width = left + plan.columns * cell_w + (plan.columns - 1) * gap + pad
    height = top + plan.rows * cell_h + (plan.rows - 1) * gap + pad
    grid = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(grid)

    def x0(col: int) -> int:
        return left + col * (cell_w + gap)

    def y0(row: int) -> int:
        return top + row * (cell_h + gap)

    if plan.x:
        body_w = plan.columns * cell_w + (plan.columns - 1) * gap
        tw = _text_width(draw, plan.x.title, title_font)
        draw.text((left + (body_w - tw) // 2, pad), plan.x.title, fill="black", font=title_font)
        for col, lines in enumerate(col_lines):
            y = pad + title_h
            for line in lines:
                w = _text_width(draw, line, font)
                draw.text((x0(col) + (cell_w - w) // 2, y), line, fill="black", font=font)
                y += line_h
    if plan.y:
        body_h = plan.rows * cell_h + (plan.rows - 1) * gap
        tw = _text_width(draw, plan.y.title, title_font)
        strip = Image.new("RGB", (tw + 2, title_h), "white")
        ImageDraw.Draw(strip).text((0, 0), plan.y.title, fill="black", font=title_font)
        strip = strip.rotate(90, expand=True)
        grid.paste(strip, (pad, top + max(0, (body_h - strip.size[1]) // 2)))
        for row, lines in enumerate(row_lines):
            y = y0(row) + max(0, (cell_h - len(lines) * line_h) // 2)
            for line in lines:
                draw.text((pad + title_h, y), line, fill="black", font=font)
                y += line_h
    layout = Layout(width, height)
    for cell, image in zip(plan.cells, images):
        box = (x0(cell.col), y0(cell.row), x0(cell.col) + cell_w, y0(cell.row) + cell_h)
        grid.paste(image, box[:2])
        layout.boxes.append(box)
    return grid, layout


# --- the cell → settings map ----------------------------------------------------------------------


def grid_map(plan: GridPlan, layout: Layout, common: dict) -> dict:
    """The JSON document describing a rendered grid (schema blora-render/1)."""
    cells = []
    for i, (cell, box) in enumerate(zip(plan.cells, layout.boxes)):
        cells.append({
            "index": i,
            "col": cell.col,
            "row": cell.row,
            "x_label": cell.x_label,
            "y_label": cell.y_label,
            "box": list(box),
            "settings": cell.settings.to_json(),
        })
    return {
        "schema": "blora-render/1",
        "image": {"width": layout.width, "height": layout.height},
        "columns": plan.columns,
        "rows": plan.rows,
        "x": _axis_json(plan.x),
        "y": _axis_json(plan.y),
        **common,
        "cells": cells,
    }


def _axis_json(axis: Axis | None) -> dict | None:
    if axis is None:
        return None
    return {
        "kind": axis.kind.value,
        "adapter": axis.target,
        "title": axis.title,
        "values": list(axis.values),
        "labels": [axis.label(v) for v in axis.values],
    }


def dumps(doc: dict) -> str:
    from blora_tools.jsonio import dumps as valid_json

    return valid_json(doc, indent=2, ensure_ascii=False)


# --- which modules each selector picks ---------------------------------------------------------------


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
    from blora_tools.taxonomy.selectors import describe_blocks, resolve_selector

    if selector == OFF:
        return Selection(name, selector, frozenset(), ())
    try:
        blocks = resolve_selector(selector, arch)
    except SelectorError as err:
        raise SelectorError(f"adapter {name!r}, blocks {selector!r}: {err.message}") from None
    stems = tuple(s for s, m in adapter.modules.items() if m.block in blocks)
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
    from blora_tools.taxonomy.arch import Arch

    selections: dict[tuple[str, str], Selection] = {}
    warnings: list[str] = []
    for cell in plan.cells:
        for use in cell.settings.loras:
            key = (use.name, use.selector)
            if key in selections:
                continue
            adapter = adapters[use.name]
            if adapter.arch is Arch.UNKNOWN:
                raise BloraError("cannot tell which model family this adapter is for (no U-Net or text-encoder "
                                 "module names it recognises)", adapter.path)
            selection = select_modules(use.name, adapter, use.selector, adapter.arch)
            selections[key] = selection
            if selection.empty_groups:
                warnings.append(
                    f"adapter {use.name!r}, blocks {use.selector!r}: no modules in "
                    f"{', '.join(selection.empty_groups)} (rendered with the other blocks)"
                )
    return selections, warnings


# --- output files ---------------------------------------------------------------------------------


def check_image_output(path: Path, force: bool, with_json: bool = False, inputs: Sequence[Path] = ()) -> list[Path]:
    """The files a render writes (the PNG, and its .json with `with_json`) after checking they may be written
    (writer.check_output: the rules of every output)."""
    from blora_tools.adapter.writer import check_output

    targets = [check_output(path, inputs, force, suffixes=(".png",))]
    if with_json:
        targets.append(check_output(json_path_for(path), inputs, force, suffixes=(".json",)))
    return targets


def json_path_for(path: Path) -> Path:
    """Where `--json` writes the cell map: beside the PNG, same stem."""
    return Path(path).with_suffix(".json")


def png_bytes(image: "Image.Image", doc: dict | None = None) -> bytes:
    """The image as PNG bytes, with the render map as a `blora-render` text chunk when given."""
    import io

    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if doc is not None:
        from blora_tools.jsonio import dumps as valid_json

        info.add_itxt("blora-render", valid_json(doc, ensure_ascii=False, separators=(",", ":")))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()
