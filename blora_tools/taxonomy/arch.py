"""Architectures and their detection from module names, tensor shapes and metadata."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from enum import Enum


class Arch(str, Enum):
    """A Stable Diffusion family. The value is the name used in files, JSON and on the command line."""

    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value


KNOWN_ARCHS = (Arch.SD1, Arch.SD2, Arch.SDXL)

# Width of the text-encoder context each U-Net cross-attends to (attn2 to_k/to_v input features).
_CONTEXT_DIM = {768: Arch.SD1, 1024: Arch.SD2, 2048: Arch.SDXL}

_ATTN2_KV = re.compile(r"^lora_unet_.*attn2_to_[kv]$")
_TE_LAYER = re.compile(r"^lora_te_(?:text_model_)?encoder_layers_(\d+)_")
_TE_Q_PROJ = re.compile(r"^lora_te_(?:text_model_)?encoder_layers_\d+_self_attn_q_proj$")
_LDM_ANY = re.compile(r"^lora_unet_(?:input_blocks|output_blocks|middle_block)_\d+_")
_LDM_DEEP = re.compile(r"^lora_unet_(?:input|output)_blocks_(\d+)_")
_TRANSFORMER_DEPTH = re.compile(r"_transformer_blocks_([2-9]|\d\d+)_")
# Attention in the deepest up level exists only on SDXL; attention in the outermost down level only on SD1/SD2.
_SDXL_ONLY_ATTENTION = re.compile(r"^lora_unet_(?:up_blocks_0_attentions|output_blocks_[0-2]_1)_")
_SD_ONLY_ATTENTION = re.compile(r"^lora_unet_(?:down_blocks_0_attentions|input_blocks_[1-2]_1)_")


def arch_from_metadata(metadata: Mapping[str, str]) -> Arch | None:
    """The architecture a file's kohya or modelspec metadata claims, if any."""
    spec = metadata.get("modelspec.architecture", "").lower()
    base = metadata.get("ss_base_model_version", "").lower()
    for claim in (spec, base):
        if not claim:
            continue
        if "xl" in claim:
            return Arch.SDXL
        if "v2" in claim or "sd2" in claim or "v-2" in claim:
            return Arch.SD2
        if "v1" in claim or "sd1" in claim or "v-1" in claim:
            return Arch.SD1
    if metadata.get("ss_v2", "").lower() == "true":
        return Arch.SD2
    return None


def detect_arch(
    stems: Iterable[str],
    in_features: Mapping[str, int] | None = None,
    metadata: Mapping[str, str] | None = None,
    linear_proj_in: bool = False,
) -> tuple[Arch, list[str]]:
    """Detect the architecture from kohya module stems, their input widths and metadata.

    `stems` are kohya names (`lora_unet_…`, `lora_te…`). Names decide first (SDXL has two text encoders
    and three U-Net levels); shapes split SD1 from SD2 (context width, text-encoder width and depth,
    `linear_proj_in`: the file's U-Net `proj_in` factors are 2-D, as in diffusers SD2). Metadata fills in when names and shapes say nothing; when it disagrees with them,
    the result is what the tensors say and a warning says so.
    """
    stems = list(stems)
    warnings: list[str] = []
    from_names, confident = _arch_from_names(stems, in_features or {}, linear_proj_in)
    claimed = arch_from_metadata(metadata or {})
    if from_names is None or (claimed is not None and not confident):
        return (claimed or from_names or Arch.UNKNOWN), warnings
    if claimed is not None and claimed != from_names:
        warnings.append(
            f"metadata says {claimed.value} but the tensors are {from_names.value}; using {from_names.value}"
        )
    return from_names, warnings


def _arch_from_names(stems: list[str], widths: Mapping[str, int], linear_proj_in: bool) -> tuple[Arch | None, bool]:
    """(architecture, whether the evidence is conclusive); inconclusive guesses yield to metadata."""
    if any(s.startswith(("lora_te1_", "lora_te2_")) for s in stems):
        return Arch.SDXL, True
    unet = [s for s in stems if s.startswith("lora_unet_")]
    for stem in unet:
        if _ATTN2_KV.match(stem) and widths.get(stem) in _CONTEXT_DIM:
            return _CONTEXT_DIM[widths[stem]], True
    levels_of_four = any(
        s.startswith(("lora_unet_down_blocks_3_", "lora_unet_up_blocks_3_")) for s in unet
    ) or any(int(m.group(1)) > 8 for s in unet if (m := _LDM_DEEP.match(s)))
    levels_of_four = levels_of_four or any(_SD_ONLY_ATTENTION.match(s) for s in unet)
    three_levels = any(_TRANSFORMER_DEPTH.search(s) or _SDXL_ONLY_ATTENTION.match(s) for s in unet)
    if three_levels and not levels_of_four:
        return Arch.SDXL, True
    te_layers = {int(m.group(1)) for s in stems if (m := _TE_LAYER.match(s))}
    te_width = {widths.get(s) for s in stems if _TE_Q_PROJ.match(s)}
    if (te_layers and max(te_layers) >= 12) or 1024 in te_width:
        return Arch.SD2, True
    if 768 in te_width:
        return Arch.SD1, True
    if not levels_of_four and any(_LDM_ANY.match(s) for s in unet):
        # kohya writes SDXL with LDM names and SD1/SD2 with diffusers names; LDM SD1 files show IN09+.
        return Arch.SDXL, False
    if linear_proj_in:
        return Arch.SD2, False
    # Nothing that tells the widths apart: SD1, the older and more common family.
    return (Arch.SD1 if (levels_of_four or te_layers or unet) else None), False
