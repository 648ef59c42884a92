"""Block tables per architecture and the one parser from a kohya module name to its block.

Three naming layers meet here (DESIGN.md §2): paper groups (`in0`…`out3`, `mid`, `te`), LBW IDs
(`BASE`, `IN00`…, `M00`, `OUT00`…) and kohya block indices (25 slots on SD1/SD2, 23 on SDXL).
A *block* — the unit selectors pick and weights address — is an LBW ID for U-Net modules, the component
name (`te`, `te1`, `te2`) for text-encoder modules, and `OTHER` for U-Net modules outside every LBW block
(time embedding, `conv_out`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from functools import cache
from types import MappingProxyType
from typing import Mapping

from blora_tools.taxonomy.arch import Arch

OTHER = "OTHER"
"""The block of U-Net modules that no LBW block covers: time/label embedding, `conv_out`, `out`."""


class Component(str, Enum):
    """Which network a module belongs to; also the kohya key prefix after `lora_`."""

    UNET = "unet"
    TE = "te"
    TE1 = "te1"
    TE2 = "te2"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Placement:
    """Where one module sits, in every naming at once."""

    component: Component
    block: str
    lbw: str | None
    group: str
    kohya_index: int | None


@dataclass(frozen=True)
class ArchTable:
    """The block layout of one architecture."""

    arch: Arch
    levels: int
    text_encoders: tuple[Component, ...]
    unet_lbw: tuple[str, ...]
    group_members: Mapping[str, tuple[str, ...]]
    attention_lbw: frozenset[str]
    kohya_slots: tuple[str, ...]

    @property
    def unet_groups(self) -> tuple[str, ...]:
        """U-Net paper groups, outermost input first: `in0`…, `mid`, `out0`…."""
        return tuple(self.group_members)

    @property
    def groups(self) -> tuple[str, ...]:
        """Every paper group, text encoders first: `te` (or `te1`, `te2`), `in0`…, `mid`, `out0`…."""
        return tuple(c.value for c in self.text_encoders) + self.unet_groups

    @property
    def blocks(self) -> tuple[str, ...]:
        """Every block of the architecture, in LBW order (text encoders first, `OTHER` last)."""
        return tuple(c.value for c in self.text_encoders) + self.unet_lbw + (OTHER,)

    @property
    def lbw_full(self) -> tuple[str, ...]:
        """The long LBW vector layout: 26 on SD1/SD2, 20 on SDXL."""
        return ("BASE",) + self.unet_lbw

    @property
    def lbw_short(self) -> tuple[str, ...]:
        """The short LBW vector layout (blocks with attention): 17 on SD1/SD2, 12 on SDXL."""
        return ("BASE",) + tuple(b for b in self.unet_lbw if b in self.attention_lbw)

    @property
    def attention_groups(self) -> frozenset[str]:
        """Paper groups that contain attention layers (what an attention-only LoRA can train)."""
        return frozenset(g for g, m in self.group_members.items() if self.attention_lbw & set(m))

    def group_of(self, block: str) -> str:
        """The paper group of a block (`none` for IN00 and OTHER)."""
        if block in {c.value for c in self.text_encoders}:
            return block
        for group, members in self.group_members.items():
            if block in members:
                return group
        return "none"

    def level_groups(self, level: int) -> tuple[str, str]:
        """The (input, output) group pair of a resolution level, 0 = outermost."""
        return f"in{level}", f"out{self.levels - 1 - level}"


def _lbw_range(prefix: str, start: int, stop: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i:02d}" for i in range(start, stop))


def _make_table(arch: Arch, levels: int, text_encoders: tuple[Component, ...], attention: str) -> ArchTable:
    per_level = 3
    n_in = n_out = per_level * levels  # the innermost input level has no downsampler: IN00..IN11 / IN00..IN08
    unet_lbw = _lbw_range("IN", 0, n_in) + ("M00",) + _lbw_range("OUT", 0, n_out)
    groups: dict[str, tuple[str, ...]] = {}
    for level in range(levels):
        first = 1 + per_level * level
        groups[f"in{level}"] = tuple(b for b in _lbw_range("IN", first, first + per_level) if b in unet_lbw)
    groups["mid"] = ("M00",)
    for level in range(levels):
        groups[f"out{level}"] = _lbw_range("OUT", per_level * level, per_level * (level + 1))
    if arch is Arch.SDXL:
        slots = (OTHER,) + _lbw_range("IN", 0, n_in) + ("M00",) * 3 + _lbw_range("OUT", 0, n_out) + (OTHER,)
    else:
        slots = _lbw_range("IN", 0, n_in) + ("M00",) + _lbw_range("OUT", 0, n_out)
    return ArchTable(
        arch=arch,
        levels=levels,
        text_encoders=text_encoders,
        unet_lbw=unet_lbw,
        group_members=MappingProxyType(groups),
        attention_lbw=frozenset(attention.split()),
        kohya_slots=slots,
    )


_SD_ATTENTION = "IN01 IN02 IN04 IN05 IN07 IN08 M00 " + " ".join(_lbw_range("OUT", 3, 12))
_SDXL_ATTENTION = "IN04 IN05 IN07 IN08 M00 " + " ".join(_lbw_range("OUT", 0, 6))

_TABLES = MappingProxyType(
    {
        Arch.SD1: _make_table(Arch.SD1, 4, (Component.TE,), _SD_ATTENTION),
        Arch.SD2: _make_table(Arch.SD2, 4, (Component.TE,), _SD_ATTENTION),
        Arch.SDXL: _make_table(Arch.SDXL, 3, (Component.TE1, Component.TE2), _SDXL_ATTENTION),
    }
)


def table(arch: Arch | str) -> ArchTable:
    """The block table of a known architecture."""
    arch = Arch(arch)
    if arch not in _TABLES:
        raise ValueError(f"no block table for architecture {arch.value!r}")
    return _TABLES[arch]


# --- module name → placement -------------------------------------------------------------------

_TE_PREFIX = re.compile(r"^lora_(te[12]?)_")
_DIFFUSERS_STAGE = re.compile(r"^(down|up)_blocks_(\d+)_(attentions|resnets|downsamplers|upsamplers)_(\d+)(?:_|$)")
_DIFFUSERS_MID = re.compile(r"^mid_block_(attentions|resnets)_(\d+)(?:_|$)")
_LDM_STAGE = re.compile(r"^(input|output)_blocks_(\d+)_")
_LDM_MID = re.compile(r"^middle_block_(\d+)_")
_EMBEDDING = ("time_embedding_", "time_embed_", "label_emb_", "add_embedding_")
_OUTPUT = ("conv_out", "conv_norm_out", "out_")


@cache
def place(stem: str, arch: Arch) -> Placement | None:
    """Place a kohya module stem (`lora_unet_…`, `lora_te…_…`) in `arch`'s blocks; None if it fits nowhere.

    Reads kohya's diffusers-style names (SD1/SD2, and SDXL as some tools write it), LDM names (SDXL as kohya
    writes it, SD1 as A1111 writes it) and text-encoder names with or without transformers 4's `text_model`.
    """
    arch = Arch(arch)
    if arch not in _TABLES:
        return None
    layout = _TABLES[arch]
    te = _TE_PREFIX.match(stem)
    if te:
        component = Component(te.group(1))
        if component not in layout.text_encoders:
            return None
        return Placement(component, component.value, "BASE", component.value, None)
    if not stem.startswith("lora_unet_"):
        return None
    path = stem[len("lora_unet_") :]
    lbw, index = _unet_lbw_and_kohya_index(path, arch)
    if lbw is None and index is None:
        if not path.startswith(_EMBEDDING + _OUTPUT):
            return None
        is_embedding = path.startswith(_EMBEDDING)
        index = (0 if is_embedding else 22) if arch is Arch.SDXL else None
        return Placement(Component.UNET, OTHER, None, "none", index)
    if lbw not in layout.unet_lbw:
        return None
    return Placement(Component.UNET, lbw, lbw, layout.group_of(lbw), index)


def _unet_lbw_and_kohya_index(path: str, arch: Arch) -> tuple[str | None, int | None]:
    """LBW ID and kohya slot of a U-Net module path (underscored); (None, None) if not in a stage."""
    xl = arch is Arch.SDXL
    if path.startswith("conv_in"):
        return "IN00", (1 if xl else 0)
    m = _DIFFUSERS_STAGE.match(path)
    if m:
        side, level, part, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        if part in ("downsamplers", "upsamplers"):
            j = 2
        if side == "down":
            n = 1 + 3 * level + j if part != "downsamplers" else 3 + 3 * level
            return f"IN{n:02d}", (1 + n if xl else n)
        n = 3 * level + j
        return f"OUT{n:02d}", 13 + n
    m = _DIFFUSERS_MID.match(path)
    if m:
        # SDXL's middle_block 0/1/2 are resnets_0, attentions_0, resnets_1.
        slot = {"resnets": 2 * int(m.group(2)), "attentions": 1}[m.group(1)]
        return "M00", (10 + slot if xl else 12)
    m = _LDM_STAGE.match(path)
    if m:
        n = int(m.group(2))
        if m.group(1) == "input":
            return f"IN{n:02d}", (1 + n if xl else n)
        return f"OUT{n:02d}", 13 + n
    m = _LDM_MID.match(path)
    if m:
        return "M00", (10 + int(m.group(1)) if xl else 12)
    return None, None
