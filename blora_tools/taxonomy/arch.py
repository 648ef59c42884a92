"""The supported architectures, and what a file's metadata claims (the evidence itself: `detect`)."""

from __future__ import annotations

from collections.abc import Mapping

from blora_tools.names import Named


class Arch(Named):
    """A model family. The value is the name used in files, JSON and on the command line."""

    SD1 = "sd1"
    SD2 = "sd2"
    SDXL = "sdxl"
    FLUX = "flux"
    SD3 = "sd3"
    UNKNOWN = "unknown"


UNET_ARCHS = (Arch.SD1, Arch.SD2, Arch.SDXL)
"""The Stable Diffusion U-Net families."""
DIT_ARCHS = (Arch.FLUX, Arch.SD3)
"""The diffusion-transformer families: Flux.1 (dev, schnell) and SD3 / SD3.5."""
KNOWN_ARCHS = UNET_ARCHS + DIT_ARCHS
"""Every supported family, in the order ambiguous evidence prefers them."""


def is_dit(arch: "Arch | str") -> bool:
    """Whether `arch` is a diffusion transformer (blocks D/S/J instead of U-Net levels)."""
    return Arch(arch) in DIT_ARCHS


def arch_from_metadata(metadata: Mapping[str, str]) -> Arch | None:
    """The architecture a file's kohya or modelspec metadata claims, if any."""
    spec = metadata.get("modelspec.architecture", "").lower()
    base = metadata.get("ss_base_model_version", "").lower()
    for claim in (spec, base):
        if not claim:
            continue
        if "flux" in claim:
            return Arch.FLUX
        if "v3" in claim or "sd3" in claim or "-3" in claim:
            return Arch.SD3
        if "xl" in claim:
            return Arch.SDXL
        if "v2" in claim or "sd2" in claim or "v-2" in claim:
            return Arch.SD2
        if "v1" in claim or "sd1" in claim or "v-1" in claim:
            return Arch.SD1
    if metadata.get("ss_v2", "").lower() == "true":
        return Arch.SD2
    return None
