"""The architecture table: every layout fact of each supported model family, written once (docs/architecture.md §2).

One record per architecture says what the real network is — resolution levels, channels and transformer
depth per level, cross-attention context width, text encoders with width, depth and MLP width, and how kohya
numbers its block slots. Everything else is derived from these records: the block table (LBW lists, paper
groups, attention blocks, kohya slots, vector lengths; `blocks.table`), the LDM ↔ diffusers stage table
(`stage_rows`, `rename_unet`), where a module name sits (`UNet.place_path`) and every real layer shape
(`taxonomy.shapes`).

A record type is a family: `UNet` covers SD1, SD2 and SDXL; the diffusion transformers (Flux.1, SD3) are the
record types of `taxonomy.dit`. Every record has the same duties — `block_table()`, `placement()` and
`layer_shapes()` — and an entry in `_RECORDS`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

from blora_tools.taxonomy.arch import Arch
from blora_tools.taxonomy.dit import FLUX_RECORD, SD3_RECORD, DiT
from blora_tools.taxonomy.encoders import Component, TextEncoder, encoder_layer_shapes

if TYPE_CHECKING:
    from blora_tools.taxonomy.blocks import ArchTable, Placement


@dataclass(frozen=True)
class UNet:
    """A Stable Diffusion U-Net family: the facts every U-Net table and check is derived from."""

    arch: Arch
    channels: tuple[int, ...]
    """Output channels per resolution level, outermost first."""
    attention_depth: tuple[int, ...]
    """Transformer blocks per attention module, per level (0: the level has no attention)."""
    mid_depth: int
    context_width: int
    """Width of the text the cross-attention reads (attn2 to_k/to_v input features)."""
    linear_projection: bool
    """Transformer `proj_in`/`proj_out` are Linear (else 1×1 convs) in the model as diffusers ships it."""
    text_encoders: tuple[TextEncoder, ...]
    kohya_ldm_slots: bool
    """kohya numbers this family's blocks in LDM order (23 slots on SDXL: embeddings, input blocks, the
    middle block's three parts, output blocks, out) instead of LBW order (25 slots on SD1/SD2)."""
    label_width: int | None = None
    """Input width of SDXL's `label_emb` (pooled text + size conditioning); None where there is none."""
    latent_channels: int = 4
    input_channels: int = 9
    """What `conv_in` may read: the latents, or up to 9 channels in the family's inpainting variants (latents,
    masked image latents, mask); depth (5) and instruct-pix2pix (8) variants fit under it."""

    @property
    def levels(self) -> int:
        return len(self.channels)

    @property
    def time_width(self) -> int:
        """Width of the time embedding every residual block reads."""
        return 4 * self.channels[0]

    def attention(self, level: int) -> bool:
        return self.attention_depth[level] > 0

    # --- the block table ---------------------------------------------------------------------------

    def block_table(self) -> "ArchTable":
        """LBW IDs, paper groups, attention blocks and kohya slots, all from the level structure.

        Going down, each level has two residual blocks (IN ids 1+3l, 2+3l) and, except the innermost, a
        downsampler (3+3l); `IN00` is `conv_in`. Going up, each level has three (OUT ids 3u..3u+2, u = 0 the
        deepest). A block has attention when its level does; the middle block when `mid_depth` > 0.
        """
        from blora_tools.taxonomy.blocks import OTHER, ArchTable

        n = 3 * self.levels  # IN00..IN(3L-1): the innermost level has no downsampler
        ins, outs = _ids("IN", 0, n), _ids("OUT", 0, n)
        groups: dict[str, tuple[str, ...]] = {}
        for level in range(self.levels):
            groups[f"in{level}"] = tuple(b for b in _ids("IN", 1 + 3 * level, 4 + 3 * level) if b in ins)
        groups["mid"] = ("M00",)
        for up in range(self.levels):
            groups[f"out{up}"] = _ids("OUT", 3 * up, 3 * up + 3)
        attention = {f"IN{1 + 3 * level + j:02d}" for level in range(self.levels) if self.attention(level) for j in (0, 1)}
        attention |= {f"OUT{3 * up + j:02d}" for up in range(self.levels) if self.attention(self.levels - 1 - up) for j in range(3)}
        if self.mid_depth:
            attention.add("M00")
        if self.kohya_ldm_slots:
            slots = (OTHER,) + ins + ("M00",) * 3 + outs + (OTHER,)
        else:
            slots = ins + ("M00",) + outs
        return ArchTable(
            arch=self.arch,
            levels=self.levels,
            text_encoders=tuple(te.component for te in self.text_encoders),
            unet_lbw=ins + ("M00",) + outs,
            group_members=MappingProxyType(groups),
            attention_lbw=frozenset(attention),
            kohya_slots=slots,
        )

    # --- module name → block -----------------------------------------------------------------------

    def placement(self, path: str) -> "Placement | None":
        """Where an underscored U-Net module path sits; None when it is in no block of this family."""
        from blora_tools.taxonomy.blocks import OTHER, Placement

        found = self.place_path(path)
        if found is None:
            return None
        lbw, index = found
        if lbw is None:
            return Placement(Component.UNET, OTHER, None, "none", index)
        from blora_tools.taxonomy.blocks import table

        return Placement(Component.UNET, lbw, lbw, table(self.arch).group_of(lbw), index)

    def place_path(self, path: str) -> tuple[str | None, int | None] | None:
        """(LBW ID or None for `OTHER`, kohya slot) of a U-Net module path (underscored, no `lora_unet_`);
        None when the path is in no block of this family.

        Reads diffusers names (kohya's SD1/SD2, some SDXL tools) and LDM names (kohya's SDXL, A1111's SD1).
        """
        from blora_tools.taxonomy.blocks import OTHER, table

        layout = table(self.arch)
        slots = layout.kohya_slots
        lbw, part = _lbw_of_path(path)
        if lbw is None:
            if not path.startswith(_EMBEDDING_PATHS + _OUTPUT_PATHS):
                return None
            if slots[0] != OTHER:
                return None, None
            return None, (0 if path.startswith(_EMBEDDING_PATHS) else len(slots) - 1)
        if lbw not in layout.unet_lbw:
            return None
        if lbw == "M00":
            mid = layout.mid_slots
            return lbw, mid[part] if len(mid) > 1 else mid[0]
        return lbw, slots.index(lbw)

    # --- LDM ↔ diffusers names -------------------------------------------------------------------

    def stage_rows(self) -> tuple[tuple[str, str, str], ...]:
        """(LDM prefix, diffusers prefix, inside) per U-Net stage module; `inside` says how the rest of a path
        maps: `resnet` through `_RESNET_PARTS`, `same` unchanged, `leaf` not at all (the prefix is the path)."""
        return _stage_rows(self.arch)

    # --- real layer shapes -----------------------------------------------------------------------

    def layer_shapes(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(kohya stem, weight shape) of every layer with a weight, under every stem files use for it: U-Net
        layers in diffusers and LDM names, text-encoder layers with and without transformers 4's `text_model`.
        Shapes: Linear (out, in), Conv2d (out, in, kh, kw), GroupNorm/LayerNorm (C,), Embedding (n, width)."""
        for path, shape in _unet_layers(self):
            yield _stem("unet", path), shape
            yield _stem("unet", rename_unet(path, self.arch, to_diffusers=False)), shape
        yield from encoder_layer_shapes(self.text_encoders)


def _stem(component: str, path: str) -> str:
    return f"lora_{component}_" + path.replace(".", "_")


def _ids(prefix: str, start: int, stop: int) -> tuple[str, ...]:
    return tuple(f"{prefix}{i:02d}" for i in range(start, stop))


# --- the records -------------------------------------------------------------------------------------------

_CLIP_L = dict(width=768, depth=12, mlp_width=3072)

_UNET_RECORDS: Mapping[Arch, UNet] = MappingProxyType(
    {
        Arch.SD1: UNet(
            Arch.SD1, (320, 640, 1280, 1280), (1, 1, 1, 0), 1, 768, False,
            (TextEncoder(Component.TE, **_CLIP_L),), kohya_ldm_slots=False,
        ),
        Arch.SD2: UNet(
            Arch.SD2, (320, 640, 1280, 1280), (1, 1, 1, 0), 1, 1024, True,
            (TextEncoder(Component.TE, width=1024, depth=23, mlp_width=4096),), kohya_ldm_slots=False,
        ),
        Arch.SDXL: UNet(
            Arch.SDXL, (320, 640, 1280), (0, 2, 10), 10, 2048, True,
            (
                TextEncoder(Component.TE1, **_CLIP_L),
                TextEncoder(Component.TE2, width=1280, depth=32, mlp_width=5120, projection=1280),
            ),
            kohya_ldm_slots=True,
            label_width=2816,
        ),
    }
)
"""SD1.5 (CLIP-L), SD2.x (OpenCLIP-H as kohya converts it: 23 layers) and SDXL base (CLIP-L + OpenCLIP-bigG);
widths from the models sd-scripts 48d368f builds (docs/architecture.md §2, the golden kohya manifests)."""


_RECORDS: Mapping[Arch, "UNet | DiT"] = MappingProxyType(
    {**_UNET_RECORDS, Arch.FLUX: FLUX_RECORD, Arch.SD3: SD3_RECORD}
)
"""Every family's record: the U-Nets above and the diffusion transformers (`taxonomy.dit`)."""


def record(arch: Arch | str) -> "UNet | DiT":
    """The architecture record of a supported family; ValueError for any other."""
    arch = Arch(arch)
    if arch not in _RECORDS:
        raise ValueError(f"no architecture record for {arch.value!r}")
    return _RECORDS[arch]


# --- U-Net names -------------------------------------------------------------------------------------------

LDM_ROOTS = ("input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "out")
DIFFUSERS_ROOTS = (
    "down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
    "add_embedding",
)
_EMBEDDING_PATHS = ("time_embedding_", "time_embed_", "label_emb_", "add_embedding_")
_OUTPUT_PATHS = ("conv_out", "conv_norm_out", "out_")

_RESNET_PARTS = (
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("emb_layers.1", "time_emb_proj"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("skip_connection", "conv_shortcut"),
)
"""Inside a residual block: LDM `ResBlock` layer → diffusers `ResnetBlock2D` layer."""

_OUTSIDE_STAGES = (
    ("input_blocks.0.0", "conv_in"),
    ("time_embed.0", "time_embedding.linear_1"),
    ("time_embed.2", "time_embedding.linear_2"),
    ("label_emb.0.0", "add_embedding.linear_1"),
    ("label_emb.0.2", "add_embedding.linear_2"),
    ("out.0", "conv_norm_out"),
    ("out.2", "conv_out"),
)
"""Layers outside the down/mid/up stages (`label_emb` exists only on SDXL)."""

_DIFFUSERS_STAGE = re.compile(r"^(down|up)_blocks_(\d+)_(attentions|resnets|downsamplers|upsamplers)_(\d+)(?:_|$)")
_DIFFUSERS_MID = re.compile(r"^mid_block_(attentions|resnets)_(\d+)(?:_|$)")
_LDM_STAGE = re.compile(r"^(input|output)_blocks_(\d+)_")
_LDM_MID = re.compile(r"^middle_block_(\d+)_")


def _lbw_of_path(path: str) -> tuple[str | None, int]:
    """(LBW ID, middle-block part 0..2) of an underscored U-Net path in either naming; (None, 0) outside
    the stages. The index rules of docs/architecture.md §2 hold for every U-Net family."""
    if path.startswith("conv_in"):
        return "IN00", 0
    m = _DIFFUSERS_STAGE.match(path)
    if m:
        side, level, part, j = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        if side == "down":
            return f"IN{(3 + 3 * level) if part == 'downsamplers' else (1 + 3 * level + j):02d}", 0
        return f"OUT{3 * level + (2 if part == 'upsamplers' else j):02d}", 0
    m = _DIFFUSERS_MID.match(path)
    if m:  # the LDM middle block's parts 0/1/2 are resnets_0, attentions_0, resnets_1
        return "M00", (1 if m.group(1) == "attentions" else 2 * int(m.group(2)))
    m = _LDM_STAGE.match(path)
    if m:
        return f"{'IN' if m.group(1) == 'input' else 'OUT'}{int(m.group(2)):02d}", 0
    m = _LDM_MID.match(path)
    if m:
        return "M00", int(m.group(1))
    return None, 0


@cache
def _stage_rows(arch: Arch) -> tuple[tuple[str, str, str], ...]:
    unet = _UNET_RECORDS[arch]
    levels = unet.levels
    rows: list[tuple[str, str, str]] = []
    n = 1
    for level in range(levels):
        for j in range(2):
            rows.append((f"input_blocks.{n}.0", f"down_blocks.{level}.resnets.{j}", "resnet"))
            if unet.attention(level):
                rows.append((f"input_blocks.{n}.1", f"down_blocks.{level}.attentions.{j}", "same"))
            n += 1
        if level < levels - 1:
            rows.append((f"input_blocks.{n}.0.op", f"down_blocks.{level}.downsamplers.0.conv", "leaf"))
            n += 1
    rows += [
        ("middle_block.0", "mid_block.resnets.0", "resnet"),
        ("middle_block.1", "mid_block.attentions.0", "same"),
        ("middle_block.2", "mid_block.resnets.1", "resnet"),
    ]
    n = 0
    for up in range(levels):
        attn = unet.attention(levels - 1 - up)
        for j in range(3):
            rows.append((f"output_blocks.{n}.0", f"up_blocks.{up}.resnets.{j}", "resnet"))
            if attn:
                rows.append((f"output_blocks.{n}.1", f"up_blocks.{up}.attentions.{j}", "same"))
            if j == 2 and up < levels - 1:
                rows.append((f"output_blocks.{n}.{2 if attn else 1}.conv", f"up_blocks.{up}.upsamplers.0.conv", "leaf"))
            n += 1
    rows += [(ldm, diffusers, "leaf") for ldm, diffusers in _OUTSIDE_STAGES]
    return tuple(rows)


def rename_unet(path: str, arch: Arch | str, *, to_diffusers: bool) -> str:
    """A dotted U-Net module path in the other naming (LDM ↔ diffusers); BloraError when it has none."""
    from blora_tools.errors import BloraError

    arch = Arch(arch)
    if arch not in _UNET_RECORDS:
        raise BloraError(f"no U-Net name table for architecture {arch.value!r}")
    source, target = (0, 1) if to_diffusers else (1, 0)
    best = None
    for row in _stage_rows(arch):
        prefix = row[source]
        if (path == prefix or path.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[source])):
            best = row
    wanted = "diffusers" if to_diffusers else "LDM"
    if best is None:
        raise BloraError(f"U-Net module {path!r} has no {wanted} counterpart in {arch.value}")
    rest = path[len(best[source]) :].lstrip(".")
    if best[2] == "same" or not rest:
        if best[2] == "resnet" and not rest:
            raise BloraError(f"U-Net module {path!r} is a whole residual block, not a layer")
        return best[target] + ("." + rest if rest else "")
    if best[2] == "leaf":
        raise BloraError(f"U-Net module {path!r} has no {wanted} counterpart in {arch.value}")
    for ldm_part, diffusers_part in _RESNET_PARTS:
        part_source, part_target = (ldm_part, diffusers_part) if to_diffusers else (diffusers_part, ldm_part)
        if rest == part_source or rest.startswith(part_source + "."):
            return f"{best[target]}.{part_target}{rest[len(part_source):]}"
    raise BloraError(f"U-Net module {path!r}: {rest!r} is not a layer of a residual block")


# --- real layers (diffusers UNet2DConditionModel / transformers CLIPTextModel structure) ---------------------


def _unet_layers(unet: UNet) -> Iterator[tuple[str, tuple[int, ...]]]:
    c, t, levels = unet.channels, unet.time_width, unet.levels
    yield "conv_in", (c[0], unet.input_channels, 3, 3)
    yield "time_embedding.linear_1", (t, c[0])
    yield "time_embedding.linear_2", (t, t)
    if unet.label_width is not None:
        yield "add_embedding.linear_1", (t, unet.label_width)
        yield "add_embedding.linear_2", (t, t)
    skips = [c[0]]
    width = c[0]
    for level in range(levels):
        for j in range(2):
            yield from _resnet(f"down_blocks.{level}.resnets.{j}", width, c[level], t)
            width = c[level]
            if unet.attention(level):
                yield from _transformer(f"down_blocks.{level}.attentions.{j}", width, unet.attention_depth[level], unet)
            skips.append(width)
        if level < levels - 1:
            yield f"down_blocks.{level}.downsamplers.0.conv", (width, width, 3, 3)
            skips.append(width)
    yield from _resnet("mid_block.resnets.0", width, width, t)
    yield from _transformer("mid_block.attentions.0", width, unet.mid_depth, unet)
    yield from _resnet("mid_block.resnets.1", width, width, t)
    for up in range(levels):
        level = levels - 1 - up
        for j in range(3):
            yield from _resnet(f"up_blocks.{up}.resnets.{j}", width + skips.pop(), c[level], t)
            width = c[level]
            if unet.attention(level):
                yield from _transformer(f"up_blocks.{up}.attentions.{j}", width, unet.attention_depth[level], unet)
        if up < levels - 1:
            yield f"up_blocks.{up}.upsamplers.0.conv", (width, width, 3, 3)
    yield "conv_norm_out", (width,)
    yield "conv_out", (unet.latent_channels, width, 3, 3)


def _resnet(prefix: str, fan_in: int, out: int, time_width: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield f"{prefix}.norm1", (fan_in,)
    yield f"{prefix}.conv1", (out, fan_in, 3, 3)
    yield f"{prefix}.time_emb_proj", (out, time_width)
    yield f"{prefix}.norm2", (out,)
    yield f"{prefix}.conv2", (out, out, 3, 3)
    if fan_in != out:
        yield f"{prefix}.conv_shortcut", (out, fan_in, 1, 1)


def _transformer(prefix: str, width: int, depth: int, unet: UNet) -> Iterator[tuple[str, tuple[int, ...]]]:
    projection = (width, width) if unet.linear_projection else (width, width, 1, 1)
    yield f"{prefix}.norm", (width,)
    yield f"{prefix}.proj_in", projection
    for i in range(depth):
        block = f"{prefix}.transformer_blocks.{i}"
        for norm in ("norm1", "norm2", "norm3"):
            yield f"{block}.{norm}", (width,)
        for attn, context in (("attn1", width), ("attn2", unet.context_width)):
            yield f"{block}.{attn}.to_q", (width, width)
            yield f"{block}.{attn}.to_k", (width, context)
            yield f"{block}.{attn}.to_v", (width, context)
            yield f"{block}.{attn}.to_out.0", (width, width)
        yield f"{block}.ff.net.0.proj", (8 * width, width)  # GEGLU: value and gate, 4×width each
        yield f"{block}.ff.net.2", (width, 4 * width)
    yield f"{prefix}.proj_out", projection
