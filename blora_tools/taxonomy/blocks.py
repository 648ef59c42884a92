"""Block tables per architecture and the one parser from a kohya module name to its block.

Three naming layers meet here for U-Nets (docs/architecture.md §2): paper groups (`in0`…`out3`, `mid`, `te`), LBW IDs
(`BASE`, `IN00`…, `M00`, `OUT00`…) and kohya block indices (25 slots on SD1/SD2, 23 on SDXL).
A *block* — the unit selectors pick and weights address — is an LBW ID for U-Net modules, the component
name (`te`, `te1`, `te2`) for text-encoder modules, and `OTHER` for U-Net modules outside every LBW block
(time embedding, `conv_out`).

On a diffusion transformer the blocks are `D00`…/`S00`… (Flux.1) or `J00`… (SD3), its groups `double`,
`single` (`joint`), and `OTHER` holds the embedders and final layer; kohya has no block slots there.

The tables are derived from the architecture records in `layouts`; nothing here states a layout fact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Mapping

from blora_tools.taxonomy.arch import KNOWN_ARCHS, Arch, is_dit
from blora_tools.taxonomy.layouts import Component, record

if TYPE_CHECKING:
    from blora_tools.taxonomy.dit import DiTLayer

OTHER = "OTHER"
"""The block of denoiser modules that no block covers: the U-Net's time/label embedding, `conv_out`, `out`; a
diffusion transformer's embedders and final layer (Inspire's BASE)."""


@dataclass(frozen=True)
class Placement:
    """Where one module sits, in every naming at once."""

    component: Component
    block: str
    lbw: str | None
    group: str
    kohya_index: int | None
    """U-Net: kohya's block slot; diffusion transformer: the block's position among all blocks (D00 = 0,
    S00 = 19 on Flux)."""
    layer: "DiTLayer | None" = None
    """A diffusion transformer's layer (naming, fused rows, leaves); None on U-Nets and text encoders."""


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
        """The paper group of a block (`none` for IN00 and the U-Net's OTHER; `base` for a diffusion
        transformer's OTHER, as its placements say)."""
        if block in {c.value for c in self.text_encoders}:
            return block
        for group, members in self.group_members.items():
            if block in members:
                return group
        return "base" if block == OTHER and is_dit(self.arch) else "none"

    @property
    def mid_slots(self) -> tuple[int, ...]:
        """The kohya slots of the middle block: (12,) on SD1/SD2, its three LDM parts (10, 11, 12) on SDXL."""
        return tuple(i for i, block in enumerate(self.kohya_slots) if block == "M00")

    def level_groups(self, level: int) -> tuple[str, str]:
        """The (input, output) group pair of a resolution level, 0 = outermost."""
        return f"in{level}", f"out{self.levels - 1 - level}"


def table(arch: Arch | str) -> ArchTable:
    """The block table of a known architecture."""
    arch = Arch(arch)
    if arch not in KNOWN_ARCHS:
        raise ValueError(f"no block table for architecture {arch.value!r}")
    return _table(arch)


@cache
def _table(arch: Arch) -> ArchTable:
    return record(arch).block_table()


_TE_PREFIX = re.compile(r"^lora_(te\d*)_")


@cache
def place(stem: str, arch: Arch) -> Placement | None:
    """Place a kohya module stem (`lora_unet_…`, `lora_te…_…`) in `arch`'s blocks; None if it fits nowhere.

    Reads kohya's diffusers-style names (SD1/SD2, and SDXL as some tools write it), LDM names (SDXL as kohya
    writes it, SD1 as A1111 writes it) and text-encoder names with or without transformers 4's `text_model`.
    """
    arch = Arch(arch)
    if arch not in KNOWN_ARCHS:
        return None
    layout = _table(arch)
    te = _TE_PREFIX.match(stem)
    if te:
        component = next((c for c in layout.text_encoders if c.value == te.group(1)), None)
        if component is None:
            return None
        return Placement(component, component.value, "BASE", component.value, None)
    if not stem.startswith("lora_unet_"):
        return None
    return record(arch).placement(stem[len("lora_unet_") :])
