"""The supported architectures, and what a file's metadata claims (the evidence itself: `detect`)."""

from __future__ import annotations

from collections.abc import Mapping
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
