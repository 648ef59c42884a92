"""The command-line values of `render`: adapters (`--lora`), grid axes (`--grid-x`/`--grid-y`) and `--size`.

Each parser raises SelectorError with a one-line message on bad syntax. No torch, no PIL. The syntax:

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
* a size: `WIDTHxHEIGHT`, multiples of 8, e.g. `512x768`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from blora_tools.names import Named
from blora_tools.errors import SelectorError
from blora_tools.taxonomy.selectors import parse_selector

OFF = "none"
"""The block selector of an axis value that renders without the adapter (the base model's weights)."""

ALL = "all"

_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
_NAME_PREFIX = re.compile(r"^([A-Za-z0-9_.+-]+)=(.+)$")
_WEIGHT_SUFFIX = re.compile(r"^(.*):([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)$")


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



class AxisKind(Named):
    """What an axis varies."""

    BLOCKS = "blocks"
    WEIGHT = "weight"
    SEED = "seed"
    PROMPT = "prompt"
    ADAPTER = "lora"
    CFG = "cfg"
    STEPS = "steps"


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



def parse_size(text: str) -> tuple[int, int]:
    """`WIDTHxHEIGHT` (multiples of 8, at least 8) as (width, height)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text)
    if not m:
        raise SelectorError(f"{text!r} is not WIDTHxHEIGHT, e.g. 512x768")
    width, height = int(m.group(1)), int(m.group(2))
    if width < 8 or height < 8 or width % 8 or height % 8:
        raise SelectorError(f"{text!r}: width and height must be multiples of 8 (at least 8)")
    return width, height
