"""The selector grammar: one parser for the plugin and every CLI command (docs/architecture.md §2).

A selector is a comma- or space-separated list of terms; the result is a set of blocks. Terms are paper
groups (`in0`, `mid`, `out3`, `te`, `te1`, `te2`), `unet`, `all`, LBW IDs (`IN05`, `M00`/`MID`, `BASE`),
LBW ranges (`IN05-OUT05`), level presets (`upper`/`style`, `middle`, `bottom`, `character`) and `NOT` or
`!term` for exclusion. Parsing checks the syntax and the vocabulary; resolving against an architecture
checks that each term exists there.

Negation is written once: `NOT` excludes every term after it, `!term` excludes one term, and neither
toggles. So a doubled negation is an error in every spelling — `NOT NOT in0`, `!!in0` and `NOT !in0` —
rather than a silent double (or single) negation.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from blora_tools.errors import SelectorError
from blora_tools.taxonomy.arch import Arch
from blora_tools.taxonomy.blocks import OTHER, ArchTable, table

_LEVEL_PRESETS = {"upper": 0, "style": 0, "middle": 1, "bottom": 2}
"""Level presets, counted from the outermost resolution level (the paper's three ablation settings)."""

_ALL_NAMES = ("all", "character")
_GROUP = re.compile(r"^(in|out)(\d)$")
_LBW = re.compile(r"^(in|out)(\d\d)$")
_SPLIT = re.compile(r"[,\s]+")


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
        """The blocks this selector names on `arch`; unknown terms raise SelectorError listing valid names."""
        layout = table(arch)
        starts_excluding = self.terms[0].exclude
        chosen: set[str] = set(layout.blocks) if starts_excluding else set()
        for term in self.terms:
            blocks = resolve_term(term.text, layout)
            if term.exclude:
                chosen -= blocks
            else:
                chosen |= blocks
        return frozenset(chosen)


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
    try:
        resolve_term(name, table(Arch.SDXL))
        return
    except SelectorError:
        pass
    try:
        resolve_term(name, table(Arch.SD1))
    except SelectorError as err:
        if err.message.startswith("unknown block"):
            raise SelectorError(f"unknown block {name!r}; {vocabulary_hint()}") from None
        raise


def vocabulary_hint(layout: ArchTable | None = None) -> str:
    """A one-line list of valid terms (for one architecture, or in general)."""
    if layout is None:
        return (
            "valid: paper groups in0..in3, mid, out0..out3, te, te1, te2, unet, all; "
            "LBW IDs BASE, IN00..IN11, M00/MID, OUT00..OUT11 and ranges like IN04-OUT05; "
            "presets upper/style, middle, bottom, character; NOT or !term to exclude"
        )
    groups = ", ".join(layout.groups)
    return (
        f"valid on {layout.arch.value}: {groups}, unet, all; LBW IDs BASE, "
        f"{layout.unet_lbw[0]}..{layout.unet_lbw[-1]} (MID = M00) and ranges; "
        "presets upper/style, middle, bottom, character"
    )


def resolve_term(name: str, layout: ArchTable) -> frozenset[str]:
    """The blocks one term names on an architecture."""
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
        lbw = _lbw_id(end)
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
    for lbw in order[first : last + 1]:
        blocks |= {c.value for c in layout.text_encoders} if lbw == "BASE" else {lbw}
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
    parts.extend(b for b in layout.blocks if b in remaining)
    return ",".join(parts) if parts else "(nothing)"
