"""Module trees of Flux.1 and SD3/SD3.5 as sd-scripts builds them, from the taxonomy's records, for planning.

A network module chooses layers by the class name of their parent block and names them by attribute path
(docs/architecture.md §4), so planning needs only the tree: every layer of the record in its BFL/SAI naming
as an `nn.Linear` / `nn.Conv2d` at its path, under containers with sd-scripts' class names (48d368f
`library/flux_models.py`: `DoubleStreamBlock`, `SingleStreamBlock`; `library/sd3_models.py`: `MMDiTBlock`,
`SingleDiTBlock`). There is no forward: the trees are built on the meta device (no memory) for `blora-tools plan`.

SD3 variants (`SD3_VARIANTS`) differ in depth and in which x-blocks have SD3.5 Medium's second attention; in every
variant the last joint block's context stream is pre-only (`attn.qkv` and a 2·width modulation), as sd-scripts
builds it. Text encoders: CLIP-L (and CLIP-G on SD3) from `blora_tools.models`, and a T5-XXL `T5EncoderModel`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import MappingProxyType

import torch
from torch import nn

from blora_tools.taxonomy.arch import Arch
from blora_tools.taxonomy.dit import BFL, dit_record

__all__ = ["SD3_VARIANTS", "build_dit", "build_dit_text_encoders"]


@dataclass(frozen=True)
class _Sd3Variant:
    depth: int
    attn2: tuple[int, ...]


SD3_VARIANTS = MappingProxyType({
    "sd3-medium": _Sd3Variant(24, ()),
    "sd3.5-medium": _Sd3Variant(24, tuple(range(13))),
    "sd3.5-large": _Sd3Variant(38, ()),
})
"""SD3 family members: depth and the x-blocks with a second attention (sd-scripts `sd3_models` configs)."""

_CONTAINERS = {
    Arch.FLUX: (("double_blocks", 2, "DoubleStreamBlock"), ("single_blocks", 2, "SingleStreamBlock")),
    Arch.SD3: (("joint_blocks", 2, "MMDiTBlock"), ("joint_blocks", 3, "SingleDiTBlock")),
}
"""(root attribute, path depth of the container, class name): the containers kohya matches by class name."""


def _named_class(name: str) -> type[nn.Module]:
    return type(name, (nn.Module,), {})


def _sd3_keeps(path: str, variant: _Sd3Variant) -> bool:
    """Whether a record layer exists in an SD3 variant (its depth, attn2 blocks, the pre-only last context)."""
    parts = path.split(".")
    if parts[0] != "joint_blocks":
        return True
    index = int(parts[1])
    if index >= variant.depth:
        return False
    if "attn2" in parts:
        return index in variant.attn2
    last_context = index == variant.depth - 1 and parts[2] == "context_block"
    return not last_context or path.endswith(("attn.qkv", "adaLN_modulation.1"))


def _sd3_shape(path: str, shape: tuple[int, ...], variant: _Sd3Variant, width: int) -> tuple[int, ...]:
    """The modulation's rows: 9·width with attn2, 6·width without, 2·width in the pre-only last context block."""
    if not path.endswith("adaLN_modulation.1") or not path.startswith("joint_blocks"):
        return shape
    index = int(path.split(".")[1])
    if "context_block" in path:
        return ((2 if index == variant.depth - 1 else 6) * width, shape[1])
    return ((9 if index in variant.attn2 else 6) * width, shape[1])


def build_dit(arch: Arch | str, variant: str | None = None, device: str | torch.device = "meta") -> nn.Module:
    """The transformer of `arch` ("flux", or "sd3" with an `SD3_VARIANTS` name, default SD3.5 Large)."""
    arch = Arch(arch)
    record = dit_record(arch)
    sd3 = None
    if arch is Arch.SD3:
        sd3 = SD3_VARIANTS.get(variant or "sd3.5-large")
        if sd3 is None:
            raise ValueError(f"unknown SD3 variant {variant!r}; known: {', '.join(SD3_VARIANTS)}")
        record = replace(record, depth=sd3.depth, width=64 * sd3.depth)
    elif variant is not None:
        raise ValueError("Flux.1 has no variants here (dev and schnell differ only in guidance_in)")
    root = _named_class("Flux" if arch is Arch.FLUX else "MMDiT")()
    classes = {(r, d): _named_class(n) for r, d, n in _CONTAINERS[arch]}
    with torch.device(device):
        for layer in record.layers():
            if layer.naming != BFL or (sd3 is not None and not _sd3_keeps(layer.path, sd3)):
                continue
            shape = _sd3_shape(layer.path, layer.shape, sd3, record.width) if sd3 is not None else layer.shape
            parts = layer.path.split(".")
            parent = root
            for depth, name in enumerate(parts[:-1], start=1):
                child = parent._modules.get(name)
                if child is None:
                    cls = classes.get((parts[0], depth), nn.Module)
                    child = cls()
                    parent.add_module(name, child)
                parent = child
            if len(shape) == 4:
                leaf = nn.Conv2d(shape[1], shape[0], tuple(shape[2:]), stride=tuple(shape[2:]))
            else:
                leaf = nn.Linear(shape[1], shape[0])
            parent.add_module(parts[-1], leaf)
    return root


def build_dit_text_encoders(arch: Arch | str, device: str | torch.device = "meta") -> list[nn.Module]:
    """The trainer's text-encoder list at full size: Flux `[clip_l, t5xxl]`, SD3 `[clip_l, clip_g, t5xxl]`."""
    from transformers import T5Config, T5EncoderModel

    from blora_tools.models import build_text_encoders

    arch = Arch(arch)
    clips = build_text_encoders(Arch.SDXL, "full", device)
    t5_record = dit_record(arch).text_encoders[-1]
    config = T5Config(vocab_size=t5_record.vocabulary, d_model=t5_record.width, d_kv=t5_record.head_width,
                      d_ff=t5_record.mlp_width, num_layers=t5_record.depth, num_heads=t5_record.heads,
                      feed_forward_proj="gated-gelu")
    with torch.device(device):
        t5 = T5EncoderModel(config)
    return [clips[0], t5] if arch is Arch.FLUX else [*clips, t5]
