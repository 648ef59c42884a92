"""The diffusion-transformer families, Flux.1 and SD3/SD3.5: every layer in both namings (docs/architecture.md §2).

Two namings meet in files (sources: sd-scripts 48d368f `library/flux_models.py`, `library/sd3_models.py`,
`networks/lora_flux.py`, `networks/lora_sd3.py`, `library/flux_utils.py` `BFL_TO_DIFFUSERS_MAP`; diffusers
0.42 `FluxTransformer2DModel`, `SD3Transformer2DModel` and `loaders/single_file_utils.py`):

* **BFL / SAI** (the checkpoints, kohya's `lora_unet_double_blocks_3_img_attn_qkv`, ComfyUI's `diffusion_model.`):
  attention projections are one *fused* layer (q | k | v rows), and Flux's single block fuses q, k, v and the
  MLP input into `linear1` (rows q | k | v | mlp = 1 | 1 | 1 | 4 times the width).
* **diffusers** (PEFT, ai-toolkit, SimpleTuner, `transformer.`): the same weights split per part (`attn.to_q`,
  `proj_mlp`). A split layer is rows of its fused layer; one layer, `norm_out.linear` (and SD3's last context
  modulation), holds the fused layer's rows with its shift and scale halves swapped.

Every layer is described once (`DiTLayer`): its path in its naming, its block, its real shape, which fused BFL
layer it is (a part of) and at which rows, and its *leaves* — the named row parts sub-selectors address
(`D05.img.q`, `S10.linear1.mlp`, `J03.ctx`). Row positions are counted in *units* of the layer's width (its
input features), so the same table serves the real models and tiny test models alike.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

from blora_tools.taxonomy.arch import Arch
from blora_tools.taxonomy.encoders import Component, Encoder, T5Encoder, TextEncoder, encoder_layer_shapes

if TYPE_CHECKING:
    from blora_tools.taxonomy.blocks import ArchTable, Placement

BFL = "bfl"
DIFFUSERS = "diffusers"
DIT_NAMINGS = (BFL, DIFFUSERS)
PART = "part"
"""A BFL-named layer that is only some rows of a fused layer: XLabs' single-block `qkv_lora`, which ComfyUI
calls `linear1_qkv` (the q, k, v rows of `linear1`)."""


@dataclass(frozen=True)
class Leaf:
    """A named row range of a layer, in units of the layer's width: what one sub-selector part addresses."""

    name: str
    start: int
    stop: int

    @property
    def tags(self) -> frozenset[str]:
        """The words a sub-selector may use for this leaf: its name's parts, plus `qkv` for q/k/v rows and
        `attn` for the attention rows of Flux's fused single-block `linear1` (not for SD3's `attn2`: `J00.x.attn`
        is the first image attention only)."""
        parts = set(self.name.split("."))
        if parts & {"q", "k", "v"}:
            parts.add("qkv")
            if "linear1" in parts:
                parts.add("attn")
        return frozenset(parts)


@dataclass(frozen=True)
class DiTLayer:
    """One adaptable layer of a diffusion transformer, in one naming."""

    path: str
    naming: str
    block: str | None
    """`D05`, `S10`, `J03`; None for the layers outside the blocks (Inspire's BASE)."""
    shape: tuple[int, ...]
    fused: str
    """The BFL path of the weight this layer is, or is rows of."""
    offset: int
    """Where this layer's rows start in the fused weight, in units."""
    units: int
    fused_units: int
    leaves: tuple[Leaf, ...]
    """Named row parts, relative to this layer (one leaf covering every row for an unfused layer)."""
    swappable: bool = False
    """Shift/scale halves are swapped between the namings when the fused layer has 2·width rows
    (Flux/SD3 `final_layer.adaLN_modulation.1` ↔ `norm_out.linear`, SD3's last context modulation)."""

    @property
    def stem(self) -> str:
        return "lora_unet_" + self.path.replace(".", "_")


def _whole(name: str) -> tuple[Leaf, ...]:
    return (Leaf(name, 0, 1),)


def _split(prefix: str, parts: tuple[tuple[str, int], ...]) -> tuple[Leaf, ...]:
    leaves, start = [], 0
    for name, size in parts:
        leaves.append(Leaf(f"{prefix}{name}", start, start + size))
        start += size
    return tuple(leaves)


_QKV = (("q", 1), ("k", 1), ("v", 1))


class _Table:
    """Builds the layer list of one family: a fused BFL layer and its diffusers counterparts together."""

    def __init__(self) -> None:
        self.layers: list[DiTLayer] = []

    def fused(
        self,
        block: str | None,
        bfl: str,
        diffusers: tuple[str, ...],
        shape: tuple[int, ...],
        leaves: tuple[Leaf, ...],
        *,
        swappable: bool = False,
    ) -> None:
        """A BFL layer and, if it has `len(diffusers)` parts, one diffusers layer per leaf (else one for all)."""
        total = leaves[-1].stop
        self.layers.append(DiTLayer(bfl, BFL, block, shape, bfl, 0, total, total, leaves, swappable))
        if len(diffusers) == 1:
            self.layers.append(DiTLayer(diffusers[0], DIFFUSERS, block, shape, bfl, 0, total, total, leaves, swappable))
            return
        unit = shape[0] // total
        for path, leaf in zip(diffusers, leaves, strict=True):
            size = leaf.stop - leaf.start
            part_shape = (unit * size,) + tuple(shape[1:])
            self.layers.append(
                DiTLayer(path, DIFFUSERS, block, part_shape, bfl, leaf.start, size, total, (Leaf(leaf.name, 0, size),))
            )


class _Family:
    """What every diffusion-transformer record does with its layer list (the record duties of `layouts`)."""

    def layer_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(kohya stem, weight shape) of every layer in both namings, and of the text encoders."""
        return dit_layer_shapes(self)

    def placement(self, path: str) -> "Placement | None":
        """Where an underscored transformer module path sits; None when it is no layer of this family."""
        return place_dit(path, self)


@dataclass(frozen=True)
class Flux(_Family):
    """Flux.1 (dev, schnell): double-stream blocks D00…, single-stream blocks S00…, and BASE."""

    arch: Arch
    width: int
    double: int
    single: int
    mlp_ratio: int
    latent_width: int
    """`img_in` input features (16 latent channels × 2×2 patches)."""
    pooled_width: int
    """`vector_in` input features (CLIP-L's pooled output)."""
    context_width: int
    """`txt_in` input features (T5's width)."""
    time_width: int
    text_encoders: tuple[Encoder, ...]

    @property
    def blocks(self) -> tuple[str, ...]:
        return tuple(f"D{i:02d}" for i in range(self.double)) + tuple(f"S{i:02d}" for i in range(self.single))

    def block_table(self) -> "ArchTable":
        doubles = tuple(f"D{i:02d}" for i in range(self.double))
        singles = tuple(f"S{i:02d}" for i in range(self.single))
        return _dit_table(self, {"double": doubles, "single": singles})

    def layers(self) -> Iterator[DiTLayer]:
        h, m = self.width, self.mlp_ratio * self.width
        t = _Table()
        for bfl, diffusers, shape, leaf in (
            ("img_in", "x_embedder", (h, self.latent_width), "in.img"),
            ("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1", (h, self.time_width), "in.time"),
            ("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2", (h, h), "in.time"),
            ("vector_in.in_layer", "time_text_embed.text_embedder.linear_1", (h, self.pooled_width), "in.vector"),
            ("vector_in.out_layer", "time_text_embed.text_embedder.linear_2", (h, h), "in.vector"),
            ("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1", (h, self.time_width), "in.guidance"),
            ("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2", (h, h), "in.guidance"),
            ("txt_in", "context_embedder", (h, self.context_width), "in.txt"),
            ("final_layer.linear", "proj_out", (self.latent_width, h), "out.final"),
        ):
            t.fused(None, bfl, (diffusers,), shape, _whole(leaf))
        t.fused(None, "final_layer.adaLN_modulation.1", ("norm_out.linear",), (2 * h, h), _whole("out.final"),
                swappable=True)
        for i in range(self.double):
            block, d, x = f"D{i:02d}", f"double_blocks.{i}", f"transformer_blocks.{i}"
            for stream, attn, q, proj, ff, mod in (
                ("img", "attn", ("attn.to_q", "attn.to_k", "attn.to_v"), "attn.to_out.0", "ff", "norm1"),
                ("txt", "attn", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "attn.to_add_out",
                 "ff_context", "norm1_context"),
            ):
                t.fused(block, f"{d}.{stream}_mod.lin", (f"{x}.{mod}.linear",), (6 * h, h), _whole(f"{stream}.mod"))
                t.fused(block, f"{d}.{stream}_attn.qkv", tuple(f"{x}.{p}" for p in q), (3 * h, h),
                        _split(f"{stream}.{attn}.", _QKV))
                t.fused(block, f"{d}.{stream}_attn.proj", (f"{x}.{proj}",), (h, h), _whole(f"{stream}.attn.proj"))
                t.fused(block, f"{d}.{stream}_mlp.0", (f"{x}.{ff}.net.0.proj",), (m, h), _whole(f"{stream}.mlp.0"))
                t.fused(block, f"{d}.{stream}_mlp.2", (f"{x}.{ff}.net.2",), (h, m), _whole(f"{stream}.mlp.2"))
        for i in range(self.single):
            block, s, x = f"S{i:02d}", f"single_blocks.{i}", f"single_transformer_blocks.{i}"
            t.fused(block, f"{s}.linear1", (f"{x}.attn.to_q", f"{x}.attn.to_k", f"{x}.attn.to_v", f"{x}.proj_mlp"),
                    (3 * h + m, h), _split("linear1.", _QKV + (("mlp", self.mlp_ratio),)))
            qkv = _split("linear1.", _QKV)
            t.layers.append(DiTLayer(f"{s}.linear1_qkv", PART, block, (3 * h, h), f"{s}.linear1", 0, 3,
                                     3 + self.mlp_ratio, qkv))
            t.fused(block, f"{s}.linear2", (f"{x}.proj_out",), (h, h + m), _whole("linear2"))
            t.fused(block, f"{s}.modulation.lin", (f"{x}.norm.linear",), (3 * h, h), _whole("mod"))
        return iter(t.layers)


@dataclass(frozen=True)
class MMDiT(_Family):
    """SD3 / SD3.5 (MMDiT): joint blocks J00… with an image (`x`) and a text (`ctx`) stream, and BASE.

    Width is 64·depth (sd-scripts `MMDiT.__init__`); the table is the largest family member (SD3.5 Large,
    38 blocks) with SD3.5 Medium's second image attention (`attn2`) in every block, so every file of the
    family fits it; how deep a file is comes from the file.
    """

    arch: Arch
    depth: int
    width: int
    """64·depth in every published model (sd-scripts `MMDiT.__init__`)."""
    latent_channels: int
    patch: int
    pooled_width: int
    """`y_embedder` input features (CLIP-L + CLIP-G pooled outputs)."""
    context_width: int
    time_width: int
    text_encoders: tuple[Encoder, ...]

    @property
    def blocks(self) -> tuple[str, ...]:
        return tuple(f"J{i:02d}" for i in range(self.depth))

    def block_table(self) -> "ArchTable":
        return _dit_table(self, {"joint": self.blocks})

    def layers(self) -> Iterator[DiTLayer]:
        h, m = self.width, 4 * self.width
        out = self.patch * self.patch * self.latent_channels
        t = _Table()
        for bfl, diffusers, shape, leaf in (
            ("context_embedder", "context_embedder", (h, self.context_width), "in.context"),
            ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1", (h, self.time_width), "in.time"),
            ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2", (h, h), "in.time"),
            ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1", (h, self.pooled_width), "in.pooled"),
            ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2", (h, h), "in.pooled"),
            ("x_embedder.proj", "pos_embed.proj", (h, self.latent_channels, self.patch, self.patch), "in.latent"),
            ("final_layer.linear", "proj_out", (out, h), "out.final"),
        ):
            t.fused(None, bfl, (diffusers,), shape, _whole(leaf))
        t.fused(None, "final_layer.adaLN_modulation.1", ("norm_out.linear",), (2 * h, h), _whole("out.final"),
                swappable=True)
        for i in range(self.depth):
            block, j, x = f"J{i:02d}", f"joint_blocks.{i}", f"transformer_blocks.{i}"
            for stream, sai, attn_parts, proj, ff, mod in (
                ("x", "x_block", ("attn.to_q", "attn.to_k", "attn.to_v"), "attn.to_out.0", "ff", "norm1"),
                ("ctx", "context_block", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                 "attn.to_add_out", "ff_context", "norm1_context"),
            ):
                rows = 9 * h if stream == "x" else 6 * h  # x: 9·width with attn2 (SD3.5 Medium), else 6·width
                t.fused(block, f"{j}.{sai}.adaLN_modulation.1", (f"{x}.{mod}.linear",), (rows, h),
                        _whole(f"{stream}.mod"), swappable=stream == "ctx")
                t.fused(block, f"{j}.{sai}.attn.qkv", tuple(f"{x}.{p}" for p in attn_parts), (3 * h, h),
                        _split(f"{stream}.attn.", _QKV))
                t.fused(block, f"{j}.{sai}.attn.proj", (f"{x}.{proj}",), (h, h), _whole(f"{stream}.attn.proj"))
                t.fused(block, f"{j}.{sai}.mlp.fc1", (f"{x}.{ff}.net.0.proj",), (m, h), _whole(f"{stream}.mlp.fc1"))
                t.fused(block, f"{j}.{sai}.mlp.fc2", (f"{x}.{ff}.net.2",), (h, m), _whole(f"{stream}.mlp.fc2"))
            t.fused(block, f"{j}.x_block.attn2.qkv", (f"{x}.attn2.to_q", f"{x}.attn2.to_k", f"{x}.attn2.to_v"),
                    (3 * h, h), _split("x.attn2.", _QKV))
            t.fused(block, f"{j}.x_block.attn2.proj", (f"{x}.attn2.to_out.0",), (h, h), _whole("x.attn2.proj"))
        return iter(t.layers)


DiT = Flux | MMDiT


def _dit_table(dit: DiT, groups: Mapping[str, tuple[str, ...]]) -> "ArchTable":
    from blora_tools.taxonomy.blocks import ArchTable

    blocks = dit.blocks
    return ArchTable(
        arch=dit.arch,
        levels=0,
        text_encoders=tuple(te.component for te in dit.text_encoders),
        unet_lbw=blocks,
        group_members=MappingProxyType(dict(groups)),
        attention_lbw=frozenset(blocks),
        kohya_slots=(),
    )


_CLIP_L = TextEncoder(Component.TE1, width=768, depth=12, mlp_width=3072)

FLUX_RECORD = Flux(
    Arch.FLUX, width=3072, double=19, single=38, mlp_ratio=4, latent_width=64, pooled_width=768,
    context_width=4096, time_width=256, text_encoders=(_CLIP_L, T5Encoder(Component.TE3)),
)
"""Flux.1 dev/schnell (sd-scripts `flux_models.configs`: hidden 3072, 19 + 38 blocks, mlp_ratio 4)."""

SD3_RECORD = MMDiT(
    Arch.SD3, depth=38, width=64 * 38, latent_channels=16, patch=2, pooled_width=2048, context_width=4096, time_width=256,
    text_encoders=(
        _CLIP_L,
        TextEncoder(Component.TE2, width=1280, depth=32, mlp_width=5120, projection=1280),
        T5Encoder(Component.TE3),
    ),
)
"""SD3 / SD3.5 at SD3.5 Large's depth (38 blocks, width 2432), the family's largest member."""


# --- lookups ------------------------------------------------------------------------------------------------


@cache
def layer_index(arch: Arch) -> Mapping[str, DiTLayer]:
    """Underscored module path (a kohya stem without `lora_unet_`) → layer, for both namings."""
    dit = dit_record(arch)
    index: dict[str, DiTLayer] = {}
    for layer in dit.layers():  # a path both namings share (SD3's `context_embedder`) is the BFL layer
        index.setdefault(layer.path.replace(".", "_"), layer)
    return MappingProxyType(index)


@cache
def parts_of(arch: Arch) -> Mapping[tuple[str, str], tuple[DiTLayer, ...]]:
    """(fused BFL path, naming) → the layers of that naming that make up the fused weight, in row order."""
    found: dict[tuple[str, str], list[DiTLayer]] = {}
    for layer in layer_index(arch).values():
        found.setdefault((layer.fused, layer.naming), []).append(layer)
    return MappingProxyType({k: tuple(sorted(v, key=lambda l: l.offset)) for k, v in found.items()})


@cache
def block_leaves(arch: Arch, block: str | None) -> tuple[Leaf, ...]:
    """Every leaf a block has (None: the layers outside the blocks), once each by name, in table order: the
    universe its sub-selectors choose from."""
    seen: dict[str, Leaf] = {}
    for layer in layer_index(arch).values():
        if layer.block == block and layer.naming == BFL:
            for leaf in layer.leaves:
                seen.setdefault(leaf.name, leaf)
    return tuple(seen.values())


def dit_record(arch: Arch) -> DiT:
    if arch is Arch.FLUX:
        return FLUX_RECORD
    if arch is Arch.SD3:
        return SD3_RECORD
    raise ValueError(f"{arch.value} is not a diffusion-transformer family")


def dit_layer_shapes(dit: DiT) -> Iterator[tuple[str, tuple[int, ...]]]:
    for layer in dit.layers():
        yield layer.stem, layer.shape
    yield from encoder_layer_shapes(dit.text_encoders)


def place_dit(path: str, dit: DiT) -> "Placement | None":
    """The placement of an underscored transformer module path; None when it is no layer of the family."""
    from blora_tools.taxonomy.blocks import OTHER, Placement, table

    layer = layer_index(dit.arch).get(path)
    if layer is None:
        return None
    group = table(dit.arch).group_of(layer.block or OTHER)
    if layer.block is None:
        return Placement(Component.UNET, OTHER, "BASE", group, None, layer)
    return Placement(Component.UNET, layer.block, layer.block, group, _positions(dit.arch)[layer.block], layer)


@cache
def _positions(arch: Arch) -> Mapping[str, int]:
    """Block → its position among all blocks (D00 = 0, S00 = 19 on Flux)."""
    return MappingProxyType({block: i for i, block in enumerate(dit_record(arch).blocks)})
