"""Block-weight vectors: named weights, LBW vectors and presets, and exports (docs/architecture.md §2).

Every form resolves to a `BlockWeights` mapping: block → float for every block of an architecture.
Named weights (`in0=1,out3=0.5,te=0`) leave unnamed blocks at 1.0. LBW vectors (17/26 on SD1/SD2,
12/20 on SDXL) give blocks they do not name 0, as the LBW extension and supermerger do; `fill=1.0`
gives kohya `--lbws` semantics instead.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from blora_tools.errors import SelectorError
from blora_tools.taxonomy.arch import Arch
from blora_tools.taxonomy.blocks import ArchTable, table
from blora_tools.taxonomy.selectors import check_term, resolve_term


def _vector(text: str) -> tuple[float, ...]:
    values = tuple(float(v) for v in text.split(","))
    if not all(math.isfinite(v) for v in values):
        raise SelectorError(f"LBW vector {_shorten(text)!r} has a value that is not finite")
    return values


LBW_PRESETS: Mapping[str, tuple[float, ...]] = MappingProxyType(
    {
        "NONE": (0.0,) * 17,
        "ALL": (1.0,) * 17,
        "INS": _vector("1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"),
        "IND": _vector("1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0"),
        "INALL": _vector("1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0"),
        "MIDD": _vector("1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"),
        "OUTD": _vector("1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"),
        "OUTS": _vector("1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"),
        "OUTALL": _vector("1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"),
        "ALL0.5": (0.5,) * 17,
    }
)
"""The LBW extension's built-in presets (17 values, BASE first)."""

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_VECTOR = re.compile(rf"^\s*{_NUMBER}(?:\s*,\s*{_NUMBER})*\s*$")
_NAMED = re.compile(r"^\s*([^=,\s]+)\s*=\s*(\S+)\s*$")


@dataclass(frozen=True)
class BlockWeights:
    """A weight for every block of one architecture."""

    arch: Arch
    values: Mapping[str, float]

    def __getitem__(self, block: str) -> float:
        return self.values[block]

    def nonzero(self) -> frozenset[str]:
        """Blocks whose weight is not 0."""
        return frozenset(b for b, w in self.values.items() if w != 0.0)


@dataclass(frozen=True)
class WeightSpec:
    """Parsed weights, not yet tied to an architecture: named terms or an LBW vector."""

    text: str
    named: tuple[tuple[str, float], ...] = ()
    vector: tuple[float, ...] | None = None

    def resolve(self, arch: Arch | str, fill: float = 0.0) -> BlockWeights:
        """Weights for every block of `arch`. `fill` is what an LBW vector gives blocks it does not name."""
        layout = table(arch)
        if self.vector is not None:
            return _from_lbw_vector(self.vector, layout, fill, self.text)
        values = dict.fromkeys(layout.blocks, 1.0)
        for term, weight in self.named:
            for block in resolve_term(term, layout):
                values[block] = weight
        return BlockWeights(layout.arch, MappingProxyType(values))


MAX_PRESET_FILE_BYTES = 1 << 20
"""A preset file is a few lines; anything over 1 MiB is not one (and is refused before it is read)."""


def read_preset_file(path: str | Path) -> dict[str, tuple[float, ...]]:
    """Read an LBW preset file: lines `NAME:v1,v2,…`; `#` starts a comment, blank lines are ignored.

    UTF-8 with or without a byte-order mark; a name defined twice, a line of another form, a file over
    `MAX_PRESET_FILE_BYTES` or anything but a regular file (a FIFO, a device) is a SelectorError naming the file
    (and the line).
    """
    from blora_tools.inputs import read_text_bounded

    path = Path(path)
    text = read_text_bounded(path, MAX_PRESET_FILE_BYTES, SelectorError, "a preset file")
    presets: dict[str, tuple[float, ...]] = {}
    defined_on: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        body = line.partition("#")[0].strip()
        if not body:
            continue
        name, sep, values = body.partition(":")
        name = name.strip()
        if not sep or not name or not _VECTOR.match(values):
            raise SelectorError(f"line {number} is not 'NAME:v1,v2,…': {_shorten(line.strip())!r}", path)
        if name in defined_on:
            raise SelectorError(f"line {number}: preset {name!r} is already defined on line {defined_on[name]}", path)
        try:
            presets[name] = _vector(values.replace(" ", ""))
        except SelectorError as err:
            raise SelectorError(f"line {number}: {err.message}", path) from None
        defined_on[name] = number
    return presets


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_weights(text: str, presets: Mapping[str, tuple[float, ...]] | None = None) -> WeightSpec:
    """Parse block weights: `in0=1,out3=0.5`, an LBW vector `1,0,0,…`, a preset name, or `lbw=…` verbatim.

    `presets` adds user presets (from `read_preset_file`) to the built-in LBW names; user names win.
    """
    body = text.strip()
    if body.lower().startswith("lbw="):
        body = body[4:].strip()
    if not body:
        raise SelectorError("empty weights: give 'in0=1,out3=0.5', an LBW vector or a preset name")
    known = {**LBW_PRESETS, **(presets or {})}
    if body in known or body.upper() in LBW_PRESETS:
        return WeightSpec(text, vector=known.get(body, LBW_PRESETS.get(body.upper())))
    if _VECTOR.match(body):
        return WeightSpec(text, vector=_vector(body.replace(" ", "")))
    named: list[tuple[str, float]] = []
    for part in body.split(","):
        m = _NAMED.match(part)
        if not m:
            names = ", ".join(sorted(known))
            raise SelectorError(
                f"cannot read weights {text!r} at {part.strip()!r}: write 'block=weight' pairs "
                f"(e.g. in0=1,out3=0.5), an LBW vector of 12/17/20/26 values, or a preset ({names})"
            )
        check_term(m.group(1))
        named.append((m.group(1), _weight_value(m.group(2), text)))
    return WeightSpec(text, named=tuple(named))


def _weight_value(raw: str, text: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise SelectorError(f"weight {raw!r} in {text!r} is not a number") from None
    if not math.isfinite(value):
        raise SelectorError(f"weight {raw!r} in {text!r} is not finite")
    return value


def _from_lbw_vector(vector: tuple[float, ...], layout: ArchTable, fill: float, text: str) -> BlockWeights:
    layouts = {len(layout.lbw_short): layout.lbw_short, len(layout.lbw_full): layout.lbw_full}
    names = layouts.get(len(vector))
    if names is None:
        raise SelectorError(
            f"LBW vector {text!r} has {len(vector)} values; {layout.arch.value} takes "
            f"{len(layout.lbw_short)} or {len(layout.lbw_full)}"
        )
    if not all(math.isfinite(v) for v in vector):
        raise SelectorError(f"LBW vector {text!r} has a value that is not finite")
    values = dict.fromkeys(layout.blocks, fill)
    for name, weight in zip(names, vector):
        for block in resolve_term(name, layout):
            values[block] = weight
    return BlockWeights(layout.arch, MappingProxyType(values))


def uniform_weights(arch: Arch | str, blocks: frozenset[str], inside: float = 1.0, outside: float = 0.0) -> BlockWeights:
    """`inside` for the given blocks, `outside` for every other block."""
    layout = table(arch)
    values = {b: (inside if b in blocks else outside) for b in layout.blocks}
    return BlockWeights(layout.arch, MappingProxyType(values))


# --- exports ---------------------------------------------------------------------------------------


def to_kohya(weights: BlockWeights) -> list[float]:
    """kohya positional list (`block_dims` / `block_lr` order): 25 values on SD1/SD2, 23 on SDXL."""
    return [weights[b] for b in table(weights.arch).kohya_slots]


def to_lbw(weights: BlockWeights, short: bool = False) -> list[float]:
    """LBW vector: 26/20 values (or 17/12 with `short`), BASE = the first text encoder's weight."""
    layout = table(weights.arch)
    names = layout.lbw_short if short else layout.lbw_full
    base = layout.text_encoders[0].value
    return [weights[base if n == "BASE" else n] for n in names]


def to_diffusers(weights: BlockWeights) -> dict:
    """The diffusers `set_adapters` dict. Only blocks with attention are addressable there."""
    layout = table(weights.arch)
    attention = layout.attention_lbw
    down: dict[str, list[float]] = {}
    up: dict[str, list[float]] = {}
    for level in range(layout.levels):
        ins = [b for b in layout.group_members[f"in{level}"] if b in attention]
        outs = [b for b in layout.group_members[f"out{level}"] if b in attention]
        if ins:
            down[f"block_{level}"] = [weights[b] for b in ins]
        if outs:
            up[f"block_{level}"] = [weights[b] for b in outs]
    result: dict = {"unet": {"down": down, "mid": weights["M00"], "up": up}}
    names = ("text_encoder", "text_encoder_2")
    for name, te in zip(names, layout.text_encoders):
        result[name] = weights[te.value]
    return result
