"""Which base-model layer a module adapts: one identity across namings, and the layer's weight shape.

The same layer has several names in the wild: SD U-Net layers in LDM form (`input_blocks_4_1_…`, kohya's SDXL
names, old A1111 SD1 files) and in diffusers form (`down_blocks_1_attentions_0_…`), PEFT keys, and text-encoder
paths with or without transformers 4's `text_model.` level. `layer_id` maps all of them to one key, so every
command that combines files (merge, compare) sees one layer once; `stem_in_naming` writes a layer back in the
naming a file uses.

`layer_shape` recovers the base layer's weight shape where a module's factors do not carry it: LyCORIS stores
LoHa/LoKr factors of a convolution without a Tucker core flattened (`hada_w1_b` r×(in·k·k)), so only the
layer's name says it is a k×k (or 1×1) convolution. Loaders need conv-shaped LoRA factors for conv layers
(sd-scripts' `LoRAModule` builds `lora_down` as a Conv2d with the layer's kernel).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from blora_tools.adapter.formats import (
    diffusers_to_ldm,
    ldm_to_diffusers,
    path_from_stem,
    stem_from_path,
    unet_naming,
)
from blora_tools.errors import BloraError
from blora_tools.taxonomy.arch import Arch
from blora_tools.taxonomy.blocks import Component
from blora_tools.taxonomy.shapes import layer_shape as real_layer_shape

if TYPE_CHECKING:
    from blora_tools.adapter.model import Adapter, Module

__all__ = ["NAMINGS", "layer_id", "stem_in_naming", "unet_naming_of", "modules_by_layer", "layer_shape", "is_conv"]

NAMINGS = ("ldm", "diffusers")
"""U-Net namings a kohya file can use."""


def _parsed(stem: str, arch: Arch) -> tuple[Component, str] | None:
    """(component, path) with U-Net paths in diffusers naming; None for names outside the vocabulary."""
    try:
        component, path = path_from_stem(stem, arch)
        if component is Component.UNET and unet_naming(path) == "ldm":
            path = ldm_to_diffusers(path, arch)
    except BloraError:
        return None
    if component is Component.TE and arch is Arch.SDXL:
        component = Component.TE1
    return component, path


def layer_id(stem: str, arch: Arch) -> str:
    """One key per base-model layer: the kohya stem in diffusers U-Net naming and transformers 4 text-encoder
    naming (SDXL's first text encoder as `te1`). A name outside the SD vocabulary is its own key."""
    parsed = _parsed(stem, arch)
    if parsed is None:
        return stem
    return stem_from_path(parsed[0].value, parsed[1])


def stem_in_naming(stem: str, arch: Arch, naming: str | None) -> str:
    """`stem` with its U-Net path in `naming` (`ldm` or `diffusers`); unchanged when `naming` is None, the
    module is not a U-Net layer, or the layer has no name in that naming."""
    if naming is None:
        return stem
    if naming not in NAMINGS:
        raise BloraError(f"unknown naming {naming!r}; valid: {', '.join(NAMINGS)}")
    parsed = _parsed(stem, arch)
    if parsed is None or parsed[0] is not Component.UNET:
        return stem
    path = parsed[1]
    if naming == "ldm":
        try:
            path = diffusers_to_ldm(path, arch)
        except BloraError:
            return stem
    return stem_from_path(Component.UNET.value, path)


def unet_naming_of(adapter: "Adapter") -> str | None:
    """The U-Net naming most of an adapter's U-Net modules use (None when it has none)."""
    counts = {"ldm": 0, "diffusers": 0}
    for module in adapter.modules.values():
        if module.stem.startswith("lora_unet_"):
            root = module.stem[len("lora_unet_") :]
            for naming, prefixes in (("ldm", ("input_blocks", "middle_block", "output_blocks")),
                                     ("diffusers", ("down_blocks", "mid_block", "up_blocks"))):
                if root.startswith(prefixes):
                    counts[naming] += 1
    if not any(counts.values()):
        return None
    return max(counts, key=lambda n: counts[n])


def modules_by_layer(adapter: "Adapter") -> dict[str, "Module"]:
    """The adapter's modules keyed by `layer_id`; BloraError when two of them adapt the same layer."""
    keyed: dict[str, "Module"] = {}
    for module in adapter.modules.values():
        key = layer_id(module.stem, adapter.arch)
        if key in keyed:
            raise BloraError(
                f"modules {keyed[key].stem} and {module.stem} adapt the same layer (LDM and diffusers names of it)",
                adapter.path,
            )
        keyed[key] = module
    return keyed


def layer_shape(module: "Module", arch: Arch) -> tuple[int, ...]:
    """The base layer's weight shape: the module's own where it is 4-D, else (out, in, k, k) when the real layer
    (`taxonomy.shapes`) is a k×k convolution whose kernel divides the flattened fan-in, else the module's 2-D
    shape (SD2's projections are Linear in diffusers and 1×1 convs in LDM checkpoints: a flattened factor keeps
    what the file has there)."""
    shape = module.weight_shape
    if len(shape) != 2:
        return shape
    real = real_layer_shape(module.stem, arch)
    if real is None or len(real) != 4:
        return shape
    out, fan_in = shape
    taps = math.prod(real[2:])
    if fan_in % taps:
        return shape
    return (out, fan_in // taps) + tuple(real[2:])


def is_conv(shape: tuple[int, ...]) -> bool:
    """A k×k convolution with k > 1 (the layers `--conv-rank` applies to)."""
    return len(shape) == 4 and math.prod(shape[2:]) > 1
