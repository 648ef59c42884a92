"""Block-weight vectors: named weights, LBW vectors and presets, and exports (docs/architecture.md §2).

Every form resolves to a `BlockWeights` mapping: block → float for every block of an architecture.
Named weights (`in0=1,out3=0.5,te=0`) leave unnamed blocks at 1.0. LBW vectors (17/26 on SD1/SD2,
12/20 on SDXL) give blocks they do not name 0, as the LBW extension and supermerger do; `fill=1.0`
gives kohya `--lbws` semantics instead.

Flux.1 and SD3 take the vectors users paste from other tools (`dit_vectors`), every value resolved by absolute
block index whatever blocks a file holds (Inspire-Pack #191 is the bug of counting the blocks present) and a
short vector never repeating its last value (Inspire-Pack #165). Named weights may address parts of a block
(`D05.img=0.5`, `S10.linear1.mlp=0`); those land in `BlockWeights.parts`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from blora_tools.errors import SelectorError
from blora_tools.taxonomy.arch import Arch, is_dit
from blora_tools.taxonomy.blocks import OTHER, ArchTable, Placement, table
from blora_tools.taxonomy.selectors import (
    atoms_of, check_term, describe_blocks, index_ranges, leaves_of, resolve_atoms, resolve_term,
)


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
    parts: Mapping[str, float] = field(default_factory=lambda: MappingProxyType({}))
    """Weights of single parts of DiT blocks (`D05:img.attn.q` → 0.5), overriding their block's value."""

    def __getitem__(self, block: str) -> float:
        return self.values[block]

    def nonzero(self) -> frozenset[str]:
        """Blocks whose weight is not 0 (for a block with part weights: any part not 0)."""
        partly = {atom.partition(":")[0] for atom, w in self.parts.items() if w != 0.0}
        return frozenset(b for b, w in self.values.items() if w != 0.0) | partly

    def rows(self, placement: Placement | None) -> tuple[tuple[int, int, float], ...]:
        """(unit start, unit stop, weight) for each leaf of a module's layer; one entry covering the module
        (`0, 1`) when its layer has no parts or no part weight differs from its block's."""
        if placement is None:
            return ((0, 1, 1.0),)
        weight = self.values.get(placement.block, 1.0)
        layer = placement.layer
        if layer is None or not self.parts:
            return ((0, 1, weight),)
        rows = tuple(
            (leaf.start, leaf.stop, self.parts.get(f"{placement.block}:{leaf.name}", weight)) for leaf in layer.leaves
        )
        if len({w for _, _, w in rows}) == 1:
            return ((0, 1, rows[0][2]),)
        return tuple((start, stop, w) for start, stop, w in rows)


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
        parts: dict[str, float] = {}
        for term, weight in self.named:
            _assign(values, parts, resolve_atoms(term, layout), weight)
        _fold_whole_blocks(values, parts, layout)
        return BlockWeights(layout.arch, MappingProxyType(values), MappingProxyType(parts))


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


def _assign(values: dict[str, float], parts: dict[str, float], atoms: frozenset[str], weight: float) -> None:
    """Give `weight` to resolved atoms: a whole block (its earlier part weights dropped) or one part of one."""
    for atom in atoms:
        block, _, leaf = atom.partition(":")
        if leaf:
            parts[atom] = weight
        else:
            values[block] = weight
            for old in [a for a in parts if a.startswith(block + ":")]:
                del parts[old]


def _fold_whole_blocks(values: dict[str, float], parts: dict[str, float], layout: ArchTable) -> None:
    """A block whose every part has one weight holds it as its own value (no part entries)."""
    by_block: dict[str, dict[str, float]] = {}
    for atom, weight in parts.items():
        block, _, leaf = atom.partition(":")
        by_block.setdefault(block, {})[leaf] = weight
    for block, leaves in by_block.items():
        every = {leaf.name for leaf in leaves_of(layout, block)}
        if set(leaves) >= every and len(set(leaves.values())) == 1:
            values[block] = next(iter(leaves.values()))
            for leaf in leaves:
                del parts[f"{block}:{leaf}"]


def dit_vectors(layout: ArchTable) -> dict[int, tuple[tuple[tuple[str, ...], ...], float | None, str]]:
    """Vector length → (selector terms each value sets, the weight of everything unnamed — None: the fill —,
    where the convention comes from), for Flux.1 and SD3 (docs/architecture.md §2)."""
    blocks = layout.unet_lbw
    if layout.arch is Arch.SD3:
        return {1 + len(blocks): ((("base",),) + tuple((b,) for b in blocks), None, "BASE, J00..J37"),
                25: ((("base",),) + tuple((b,) for b in blocks[:24]), None, "BASE, J00..J23 (SD3 Medium, SD3.5 Medium)")}
    doubles = layout.group_members["double"]
    singles = layout.group_members["single"]
    each = tuple((b,) for b in doubles + singles)
    return {
        58: ((("base",),) + each, None, "BASE, D00..D18, S00..S37 (Inspire-Pack FLUX-ALL)"),
        57: (each, 1.0, "D00..D18, S00..S37 (the Forge lora-block-weight fork; BASE keeps 1)"),
        20: ((("base",),) + tuple((b,) for b in doubles), 1.0,
             "BASE, D00..D18 (Inspire-Pack FLUX-DBL presets; single blocks keep 1, the last value is not repeated)"),
        19: (tuple((d, singles[2 * i], singles[2 * i + 1]) for i, d in enumerate(doubles)), 1.0,
             "value i sets D_i, S_2i and S_2i+1 (the Forge fork's FL00..FL18; BASE keeps 1)"),
        61: ((("te1",), ("te3",), ("base.in",)) + each + (("base.out",),), None,
             "CLIP, T5, IN, D00..D18, S00..S37, OUT (supermerger)"),
    }


def _from_dit_vector(vector: tuple[float, ...], layout: ArchTable, fill: float, text: str) -> BlockWeights:
    conventions = dit_vectors(layout)
    found = conventions.get(len(vector))
    if found is None:
        lengths = " or ".join(str(n) for n in sorted(conventions))
        raise SelectorError(f"weight vector {text!r} has {len(vector)} values; {layout.arch.value} takes {lengths}")
    terms, keep, _ = found
    unnamed = fill if keep is None else keep
    values = dict.fromkeys(layout.blocks, unnamed)
    parts: dict[str, float] = {}
    for names, weight in zip(terms, vector):
        for name in names:
            _assign(values, parts, resolve_atoms(name, layout), weight)
    return BlockWeights(layout.arch, MappingProxyType(values), MappingProxyType(parts))


def _from_lbw_vector(vector: tuple[float, ...], layout: ArchTable, fill: float, text: str) -> BlockWeights:
    if not all(math.isfinite(v) for v in vector):
        raise SelectorError(f"LBW vector {text!r} has a value that is not finite")
    if is_dit(layout.arch):
        return _from_dit_vector(vector, layout, fill, text)
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
    """`inside` for the given blocks (and the parts of DiT blocks a selection's atoms name), `outside` for every
    other block."""
    layout = table(arch)
    values = {b: (inside if b in blocks else outside) for b in layout.blocks}
    parts = {atom: inside for atom in blocks if ":" in atom}
    return BlockWeights(layout.arch, MappingProxyType(values), MappingProxyType(parts))


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


# --- Flux.1 / SD3 exports ---------------------------------------------------------------------------


def _atom_weight(weights: BlockWeights, atom: str) -> float:
    return weights.parts.get(atom, weights.values[atom.partition(":")[0]])


def dit_vector_length(arch: Arch | str) -> int:
    """The full weight vector of a DiT family: BASE and every block (58 on Flux.1, 1 + depth on SD3)."""
    return 1 + len(table(arch).unet_lbw)


def to_dit_vector(weights: BlockWeights, length: int | None = None) -> list[float]:
    """The `length`-value vector (`dit_vectors`; default the full one) giving exactly these weights; SelectorError
    when it cannot: one value would have to set blocks of different weights, a block it leaves unnamed is not at
    the value the convention keeps there, or a weight is on part of a block."""
    layout = table(weights.arch)
    conventions = dit_vectors(layout)
    length = dit_vector_length(weights.arch) if length is None else length
    if length not in conventions:
        raise SelectorError(f"{layout.arch.value} has no {length}-value vector; it takes {', '.join(map(str, sorted(conventions)))}")
    terms, keep, source = conventions[length]
    every = atoms_of(frozenset(layout.blocks), layout)
    covered: set[str] = set()
    values = []
    for i, names in enumerate(terms):
        atoms = atoms_of(frozenset(a for name in names for a in resolve_atoms(name, layout)), layout)
        found = {_atom_weight(weights, a) for a in atoms}
        if len(found) > 1:
            raise SelectorError(
                f"value {i + 1} of the {length}-value vector ({source}) sets {'+'.join(names)} with one weight, "
                f"but these weights give them {', '.join(f'{w:g}' for w in sorted(found))}"
            )
        values.append(found.pop())
        covered |= atoms
    off = {a.partition(":")[0] for a in every - covered if keep is not None and _atom_weight(weights, a) != keep}
    if off:
        raise SelectorError(
            f"the {length}-value vector ({source}) keeps {describe_blocks(off, layout.arch)} at {keep:g}, "
            "but these weights do not"
        )
    return values


def to_kohya_dit_indices(weights: BlockWeights) -> dict[str, str]:
    """kohya's `lora_flux` / `lora_sd3` block arguments (`train_double_block_indices`, `train_single_block_indices`;
    SD3 `train_block_indices`: 0-based, `all`, `none` or `0,1,4-5`) training the blocks whose weight is not 0.
    SelectorError when a weight is on part of a block: kohya chooses whole blocks."""
    layout = table(weights.arch)
    partly = sorted({a.partition(":")[0] for a, w in weights.parts.items() if w != weights.values[a.partition(":")[0]]})
    partly = [b for b in partly if b in layout.unet_lbw]
    if partly:
        raise SelectorError(f"kohya's block indices choose whole blocks; {', '.join(partly)} are chosen in part")
    names = {"double": "train_double_block_indices", "single": "train_single_block_indices", "joint": "train_block_indices"}
    arguments = {}
    for group, members in layout.group_members.items():
        chosen = [i for i, b in enumerate(members) if weights.values[b] != 0.0]
        text = "all" if len(chosen) == len(members) else "none" if not chosen else index_ranges(chosen)
        arguments[names[group]] = text
    return arguments


def to_dit_diffusers(weights: BlockWeights) -> dict[str, float]:
    """diffusers module names → weight: a whole block by its prefix (`transformer.transformer_blocks.5`,
    `transformer.single_transformer_blocks.10`), a block whose parts differ by its layers
    (`transformer.transformer_blocks.5.attn.to_q`), the layers outside the blocks one by one, the text
    encoders by their pipeline names (`text_encoder`, `text_encoder_2`, …, in the family's order)."""
    from blora_tools.taxonomy.dit import DIFFUSERS, layer_index

    layout = table(weights.arch)
    result: dict[str, float] = {}
    for i, te in enumerate(layout.text_encoders):
        result["text_encoder" if i == 0 else f"text_encoder_{i + 1}"] = weights.values[te.value]
    layers = [layer for layer in layer_index(weights.arch).values() if layer.naming == DIFFUSERS]
    for block in (*layout.unet_lbw, OTHER):
        mine = [layer for layer in layers if (layer.block or OTHER) == block]
        found = {_atom_weight(weights, a) for a in atoms_of(frozenset({block}), layout)}
        if block != OTHER and len(found) == 1:
            result["transformer." + ".".join(mine[0].path.split(".")[:2])] = found.pop()
            continue
        for layer in mine:
            for leaf in layer.leaves:
                result[f"transformer.{layer.path}"] = _atom_weight(weights, f"{block}:{leaf.name}")
    return result
