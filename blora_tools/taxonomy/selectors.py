"""The selector grammar: one parser for the plugin and every CLI command (docs/architecture.md §2).

A selector is a comma- or space-separated list of terms; the result is a set of blocks. Terms are paper
groups (`in0`, `mid`, `out3`, `te`, `te1`, `te2`), `unet`, `all`, LBW IDs (`IN05`, `M00`/`MID`, `BASE`),
LBW ranges (`IN05-OUT05`), level presets (`upper`/`style`, `middle`, `bottom`, `character`) and `NOT` or
`!term` for exclusion. Parsing checks the syntax and the vocabulary; resolving against an architecture
checks that each term exists there.

On Flux.1 and SD3 the terms are block IDs (`D05`, `S10`, `J03`), ranges (`D03-D07`, `S10-S37`), the groups
`double`, `single` (`joint`), `BASE` (the text encoders and every layer outside the blocks, as Inspire
counts it), research presets labelled with their source (`RESEARCH_PRESETS`) and sub-selectors: a term, a
dot and the words of a part (`D05.img`, `D05.img.q`, `S10.linear1.mlp`, `J03.ctx`, `J02.x.attn2`, `base.out`)
choose the matching row parts of the block's layers (`taxonomy.dit.Leaf`). A selection then holds blocks and,
where only some parts of a block are chosen, *atoms* `D05:img.attn.q` (block, colon, leaf name);
`coverage` says which rows of one module a selection covers.

Negation is written once: `NOT` excludes every term after it, `!term` excludes one term, and neither
toggles. So a doubled negation is an error in every spelling — `NOT NOT in0`, `!!in0` and `NOT !in0` —
rather than a silent double (or single) negation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from blora_tools.errors import SelectorError
from blora_tools.taxonomy.arch import Arch, is_dit
from blora_tools.taxonomy.blocks import OTHER, ArchTable, Placement, table
from blora_tools.taxonomy.dit import Leaf, block_leaves

_LEVEL_PRESETS = {"upper": 0, "style": 0, "middle": 1, "bottom": 2}
"""Level presets, counted from the outermost resolution level (the paper's three ablation settings)."""

_ALL_NAMES = ("all", "character")
_GROUP = re.compile(r"^(in|out)(\d)$")
_LBW = re.compile(r"^(in|out)(\d\d)$")
_DIT_ID = re.compile(r"^([dsj])(\d\d?)$")
_SPLIT = re.compile(r"[,\s]+")

RESEARCH_PRESETS = {
    "flux": {
        "splitflux-content": ("S00-S09", "SplitFlux (Yang et al., arXiv 2511.15258): early single blocks carry content"),
        "splitflux-style": ("S10-S37", "SplitFlux (Yang et al., arXiv 2511.15258): later single blocks carry style"),
        "stableflow-vital": ("D00,D01,D17,D18,S06,S09,S34,S35,S37",
                             "Stable Flow (Avrahami et al., CVPR 2025, arXiv 2411.14430): vital layers of FLUX.1-dev"),
        "dbl-front7": ("D00-D06", "Inspire-Pack group preset FLUX-DBL-FRONT7"),
        "dbl-mid6": ("D07-D12", "Inspire-Pack group preset FLUX-DBL-MID6"),
        "dbl-tail6": ("D13-D18", "Inspire-Pack group preset FLUX-DBL-TAIL6"),
        "sgl-1to10": ("S00-S09", "Inspire-Pack group preset FLUX-SGL-1to10 (1-based)"),
        "sgl-11to20": ("S10-S19", "Inspire-Pack group preset FLUX-SGL-11to20 (1-based)"),
        "sgl-21to30": ("S20-S29", "Inspire-Pack group preset FLUX-SGL-21to30 (1-based)"),
        "sgl-31to37": ("S30-S37", "Inspire-Pack group preset FLUX-SGL-31to37 (1-based; 8 blocks)"),
    },
    "sd3": {
        "slg-layers": ("J07-J09", "Stability's SD3.5 Medium reference sampler skips J07-J09 (skip-layer guidance)"),
    },
}
"""Named block sets from research and other tools, per family: (selector, source). None is a settled fact
beyond what its source shows; `blocks --arch flux` prints each with its source."""


@dataclass(frozen=True)
class Term:
    """One parsed selector term; `exclude` marks terms after `NOT` or written `!term`."""

    text: str
    exclude: bool = False


@dataclass(frozen=True)
class Selector:
    """A parsed selector: resolve it against an architecture to get its blocks."""

    text: str
    terms: tuple[Term, ...]

    def resolve(self, arch: Arch | str) -> frozenset[str]:
        """The blocks (and, for parts of DiT blocks, atoms) this selector names on `arch`; unknown terms raise
        SelectorError listing valid names."""
        layout = table(arch)
        starts_excluding = self.terms[0].exclude
        chosen: set[str] = atoms_of(frozenset(layout.blocks), layout) if starts_excluding else set()
        for term in self.terms:
            atoms = atoms_of(resolve_atoms(term.text, layout), layout)
            if term.exclude:
                chosen -= atoms
            else:
                chosen |= atoms
        return _collapse(chosen, layout)


def parse_selector(text: str) -> Selector:
    """Parse a selector string; raises SelectorError for empty input or unknown terms."""
    raw = [t for t in _SPLIT.split(text.strip()) if t]
    if not raw:
        raise SelectorError("empty selector: name blocks, e.g. 'in0,out3', 'style' or 'all'")
    terms: list[Term] = []
    excluding = False
    for token in raw:
        if token.upper() == "NOT" or token.startswith("!!") or (excluding and token.startswith("!")):
            if excluding or token.upper() != "NOT":
                raise SelectorError(
                    f"selector {text!r} negates twice; negation is written once and does not toggle "
                    "(write 'NOT in0' or '!in0')"
                )
            excluding = True
            continue
        negated = token.startswith("!")
        name = token[1:] if negated else token
        if not name:
            raise SelectorError(f"'!' must be followed by a block name in selector {text!r}")
        check_term(name)
        terms.append(Term(name, excluding or negated))
    if not terms:
        raise SelectorError(f"selector {text!r} has NOT but no block after it")
    return Selector(text, tuple(terms))


def check_term(name: str) -> None:
    """Raise SelectorError unless `name` is a term of the selector vocabulary on some architecture."""
    looks_dit = "." in name or _DIT_ID.match(name.lower())  # for which family's message to show
    errors: dict[Arch, SelectorError] = {}
    for arch in (Arch.SDXL, Arch.SD1, Arch.FLUX, Arch.SD3):
        try:
            resolve_atoms(name, table(arch))
            return
        except SelectorError as err:
            errors[arch] = err
    first = errors[Arch.FLUX if looks_dit else Arch.SD1]
    if first.message.startswith("unknown block"):
        raise SelectorError(f"unknown block {name!r}; {vocabulary_hint()}") from None
    raise first


def vocabulary_hint(layout: ArchTable | None = None) -> str:
    """A one-line list of valid terms (for one architecture, or in general)."""
    if layout is None:
        return (
            "valid: paper groups in0..in3, mid, out0..out3, te, te1, te2, unet, all; "
            "LBW IDs BASE, IN00..IN11, M00/MID, OUT00..OUT11 and ranges like IN04-OUT05; "
            "presets upper/style, middle, bottom, character; Flux D00..D18, S00..S37, double, single; "
            "SD3 J00..J37; sub-selectors like D05.img.q; NOT or !term to exclude"
        )
    groups = ", ".join(layout.groups)
    if is_dit(layout.arch):
        blocks = layout.unet_lbw
        presets = ", ".join(RESEARCH_PRESETS.get(layout.arch.value, {}))
        return (
            f"valid on {layout.arch.value}: {groups}, BASE, all; block IDs {blocks[0]}..{blocks[-1]} and ranges; "
            f"presets {presets}; sub-selectors like {_example_part(layout)}"
        )
    return (
        f"valid on {layout.arch.value}: {groups}, unet, all; LBW IDs BASE, "
        f"{layout.unet_lbw[0]}..{layout.unet_lbw[-1]} (MID = M00) and ranges; "
        "presets upper/style, middle, bottom, character"
    )


def resolve_term(name: str, layout: ArchTable) -> frozenset[str]:
    """The blocks one term names on an architecture (a sub-selector names the blocks it touches)."""
    return frozenset(atom.partition(":")[0] for atom in resolve_atoms(name, layout))


def resolve_atoms(name: str, layout: ArchTable) -> frozenset[str]:
    """What one term names on an architecture: whole blocks, and atoms `BLOCK:leaf` for the blocks a
    sub-selector chooses only some parts of."""
    if "." in name:
        return _collapse(_resolve_parts(name, layout), layout)
    return _resolve_blocks(name, layout)


def _resolve_blocks(name: str, layout: ArchTable) -> frozenset[str]:
    if is_dit(layout.arch):
        return _resolve_dit(name, layout)
    low = name.lower()
    if low in _ALL_NAMES:
        return frozenset(layout.blocks)
    if low == "unet":
        return frozenset(layout.unet_lbw + (OTHER,))
    te_names = {c.value for c in layout.text_encoders}
    if low in ("te", "base"):
        return frozenset(te_names)
    if low in te_names:
        return frozenset({low})
    if low in _LEVEL_PRESETS:
        groups = layout.level_groups(_LEVEL_PRESETS[low])
        return frozenset(b for g in groups for b in layout.group_members[g])
    if low == "mid" or low == "m00":
        return frozenset({"M00"})
    if _GROUP.match(low):
        if low not in layout.group_members:
            raise SelectorError(f"no block group {name!r} on {layout.arch.value}; {vocabulary_hint(layout)}")
        return frozenset(layout.group_members[low])
    if "-" in name:
        return _resolve_range(name, layout)
    lbw = _lbw_id(name)
    if lbw is None:
        raise SelectorError(f"unknown block {name!r}; {vocabulary_hint(layout)}")
    if lbw not in layout.unet_lbw:
        raise SelectorError(f"no LBW block {lbw} on {layout.arch.value}; {vocabulary_hint(layout)}")
    return frozenset({lbw})


def _resolve_dit(name: str, layout: ArchTable) -> frozenset[str]:
    """One block term on Flux.1 or SD3."""
    low = name.lower()
    te_names = {c.value for c in layout.text_encoders}
    if low in _ALL_NAMES:
        return frozenset(layout.blocks)
    if low in ("unet", "transformer"):
        return frozenset(layout.unet_lbw + (OTHER,))
    if low == "te":
        return frozenset(te_names)
    if low in te_names:
        return frozenset({low})
    if low == "base":
        return frozenset(te_names | {OTHER})
    if low in layout.group_members:
        return frozenset(layout.group_members[low])
    presets = RESEARCH_PRESETS.get(layout.arch.value, {})
    if low in presets:
        return frozenset(b for term in presets[low][0].split(",") for b in _resolve_dit(term, layout))
    if low in _LEVEL_PRESETS or _GROUP.match(low) or _lbw_id(name) not in (None, "BASE"):
        hint = f"; research presets: {', '.join(presets)}" if presets else ""
        raise SelectorError(
            f"{name!r} names U-Net blocks; {layout.arch.value} has blocks {layout.unet_lbw[0]}..{layout.unet_lbw[-1]}"
            f" and groups {', '.join(layout.group_members)}{hint}"
        )
    if "-" in name:
        return _resolve_range(name, layout)
    block = _dit_id(name, layout)
    if block is None:
        raise SelectorError(f"unknown block {name!r}; {vocabulary_hint(layout)}")
    return frozenset({block})


def _dit_id(name: str, layout: ArchTable) -> str | None:
    """Canonical DiT block ID (`d5` → `D05`) when `layout` has it; raises for an ID it lacks."""
    m = _DIT_ID.match(name.lower())
    if not m:
        return None
    block = f"{m.group(1).upper()}{int(m.group(2)):02d}"
    if block not in layout.unet_lbw:
        raise SelectorError(
            f"no block {block} on {layout.arch.value} (blocks {layout.unet_lbw[0]}..{layout.unet_lbw[-1]}); "
            f"{vocabulary_hint(layout)}"
        )
    return block


def atoms_of(blocks: frozenset[str], layout: ArchTable) -> set[str]:
    """Blocks as atoms: a DiT block with parts becomes one atom per leaf, anything else stays itself."""
    if not is_dit(layout.arch):
        return set(blocks)
    atoms: set[str] = set()
    for block in blocks:
        if ":" in block:
            atoms.add(block)
            continue
        leaves = leaves_of(layout, block)
        atoms |= {f"{block}:{leaf.name}" for leaf in leaves} if leaves else {block}
    return atoms


def leaves_of(layout: ArchTable, block: str) -> tuple[Leaf, ...]:
    """The row parts a block's sub-selectors choose from (`OTHER`: the layers outside the blocks); none for a
    text encoder or a U-Net block."""
    if not is_dit(layout.arch) or block in {c.value for c in layout.text_encoders}:
        return ()
    return block_leaves(layout.arch, None if block == OTHER else block)


def _collapse(atoms: set[str], layout: ArchTable) -> frozenset[str]:
    """Atoms back to blocks where every leaf of a block is chosen."""
    if not is_dit(layout.arch):
        return frozenset(atoms)
    by_block: dict[str, set[str]] = {}
    for atom in atoms:
        block, _, leaf = atom.partition(":")
        by_block.setdefault(block, set()).add(leaf)
    result: set[str] = set()
    for block, leaves in by_block.items():
        every = {leaf.name for leaf in leaves_of(layout, block)}
        if not every or leaves >= every:
            result.add(block)
        else:
            result |= {f"{block}:{leaf}" for leaf in leaves}
    return frozenset(result)


def _resolve_parts(name: str, layout: ArchTable) -> set[str]:
    """A sub-selector `TERM.word[.word…]`: the leaves of TERM's blocks whose tags hold every word."""
    base, *words = name.split(".")
    if not base or not all(words):
        raise SelectorError(f"sub-selector {name!r} is not TERM.part (e.g. {_example_part(layout)})")
    if not is_dit(layout.arch):
        raise SelectorError(
            f"sub-selector {name!r}: parts of blocks exist on Flux.1 and SD3 only, not {layout.arch.value}"
        )
    wanted = {w.lower() for w in words}
    blocks = _resolve_blocks(base, layout)
    vocabulary: set[str] = set()
    atoms: set[str] = set()
    for block in blocks:
        for leaf in leaves_of(layout, block):
            vocabulary |= leaf.tags
            if wanted <= leaf.tags:
                atoms.add(f"{block}:{leaf.name}")
    if not atoms:
        raise SelectorError(
            f"sub-selector {name!r} matches no part of {base}; its parts are named with "
            f"{', '.join(sorted(vocabulary)) or '(none: text encoders have no parts)'}"
        )
    return atoms


def _example_part(layout: ArchTable) -> str:
    return "D05.img.q, S10.linear1.mlp" if layout.arch is Arch.FLUX else "J03.ctx, J02.x.attn2"


def _lbw_id(name: str) -> str | None:
    """Canonical LBW ID for a name (`in05` → `IN05`, `MID` → `M00`), or None."""
    low = name.lower()
    if low in ("mid", "m00"):
        return "M00"
    if low == "base":
        return "BASE"
    m = _LBW.match(low)
    return f"{m.group(1).upper()}{m.group(2)}" if m else None


def _resolve_range(name: str, layout: ArchTable) -> frozenset[str]:
    start_text, _, stop_text = name.partition("-")
    order = layout.lbw_full
    ends = []
    for end in (start_text, stop_text):
        lbw = _dit_id(end, layout) if is_dit(layout.arch) and end.lower() != "base" else _lbw_id(end)
        if lbw is None or lbw not in order:
            raise SelectorError(
                f"range {name!r}: {end!r} is not an LBW ID on {layout.arch.value} "
                f"(ranges run over {order[0]}, {order[1]}..{order[-1]})"
            )
        ends.append(order.index(lbw))
    first, last = ends
    if first > last:
        raise SelectorError(f"range {name!r} runs backwards; write it in LBW order ({order[0]} first)")
    blocks = set()
    base = {c.value for c in layout.text_encoders} | ({OTHER} if is_dit(layout.arch) else set())
    for lbw in order[first : last + 1]:
        blocks |= base if lbw == "BASE" else {lbw}
    return frozenset(blocks)


def resolve_selector(text: str, arch: Arch | str) -> frozenset[str]:
    """Parse and resolve in one step."""
    return parse_selector(text).resolve(arch)


def describe_blocks(blocks: frozenset[str] | set[str], arch: Arch | str) -> str:
    """A short human description of a block set: whole groups by name, the rest by LBW ID."""
    layout = table(arch)
    remaining = set(blocks)
    parts: list[str] = []
    for te in layout.text_encoders:
        if te.value in remaining:
            parts.append(te.value)
            remaining.discard(te.value)
    for group, members in layout.group_members.items():
        if set(members) <= remaining:
            parts.append(group)
            remaining -= set(members)
    if is_dit(layout.arch):
        parts.extend(block_runs(remaining & set(layout.unet_lbw), layout))
        parts.extend("BASE" if b == OTHER else b for b in layout.blocks if b in remaining - set(layout.unet_lbw))
    else:
        parts.extend(b for b in layout.blocks if b in remaining)
    parts.extend(sorted(a.replace(":", ".") for a in remaining if ":" in a))
    return ",".join(parts) if parts else "(nothing)"


def block_runs(blocks: frozenset[str] | set[str], layout: ArchTable) -> list[str]:
    """DiT block IDs in table order with runs of consecutive blocks of one group written as ranges
    (`D00-D05`, `S10-S37`): how a selector would name them."""
    runs: list[list[str]] = []
    previous = None
    for block in layout.unet_lbw:
        if block in blocks:
            if previous is not None and runs and runs[-1][-1] == previous and previous[0] == block[0]:
                runs[-1].append(block)
            else:
                runs.append([block])
        previous = block
    return [run[0] if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs]


def index_ranges(indices: list[int] | tuple[int, ...]) -> str:
    """Sorted 0-based indices as kohya's `train_*_block_indices` write them: `0-1,4-5,7`."""
    runs: list[list[int]] = []
    for i in sorted(set(indices)):
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ",".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)


@dataclass(frozen=True)
class Coverage:
    """Which rows of one module a selection covers: all, none, or some leaves (row parts) of the layer."""

    whole: bool
    leaves: tuple[Leaf, ...] = ()

    @property
    def none(self) -> bool:
        return not self.whole and not self.leaves


def coverage(placement: Placement | None, selection: frozenset[str]) -> Coverage:
    """How much of a module a resolved selection covers (atoms address leaves of DiT layers)."""
    if placement is None:
        return Coverage(False)
    if placement.block in selection:
        return Coverage(True)
    layer = placement.layer
    if layer is None:
        return Coverage(False)
    chosen = tuple(leaf for leaf in layer.leaves if f"{placement.block}:{leaf.name}" in selection)
    if len(chosen) == len(layer.leaves):
        return Coverage(True)
    return Coverage(False, chosen)
