"""Which layers a kohya-compatible LoRA wraps, and the kohya names it gives them.

The rules are kohya `networks.lora`'s (docs/architecture.md §2, §4), restated here:

* U-Net: every `nn.Linear` and 1×1 `nn.Conv2d` anywhere inside a module whose class is `Transformer2DModel`;
  with conv targets also inside `ResnetBlock2D`, `Downsample2D` and `Upsample2D`, where 3×3 convs count too.
* Text encoders: every `nn.Linear` inside the CLIP attention and MLP modules.
* Name: `lora_unet_` / `lora_te_` (SD1/SD2) / `lora_te1_`, `lora_te2_` (SDXL) + the module path with `.` → `_`.
  Text-encoder names always use transformers 4's path (`text_model.encoder.layers.…`), which every file in the
  wild uses, even under transformers 5 where `CLIPTextModel` lost its `text_model` level.

Unlike kohya, the class lists are immutable tuples and every call builds its own lists, so one network built in
a process never changes what a later one wraps.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from torch import nn

from blora_tools.errors import SpecError
from blora_tools.taxonomy.arch import Arch
from blora_tools.taxonomy.blocks import Component, Placement, place, table
from blora_tools.taxonomy.detect import arch_from_widths

__all__ = [
    "Target",
    "UNET_ATTENTION_CLASSES",
    "UNET_CONV_CLASSES",
    "TE_CLASSES",
    "detect_unet_arch",
    "find_targets",
    "layer_kind",
]

UNET_ATTENTION_CLASSES: tuple[str, ...] = ("Transformer2DModel",)
"""U-Net modules whose layers a plain (attention-only) LoRA wraps."""

UNET_CONV_CLASSES: tuple[str, ...] = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
"""U-Net modules a LoCon (conv) network wraps in addition."""

TE_CLASSES: tuple[str, ...] = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
"""Text-encoder modules whose Linear layers are wrapped. transformers 5 has only `CLIPAttention` and `CLIPMLP`;
transformers 4 also picks `CLIPSdpaAttention` / `CLIPFlashAttention2` by attention implementation."""

_TE_ROOT = "text_model."


@dataclass(frozen=True)
class Target:
    """One layer to wrap: its kohya name, the layer itself, its kind and its place in the blocks."""

    name: str
    layer: nn.Module
    kind: str
    placement: Placement


def layer_kind(layer: nn.Module) -> str | None:
    """`linear`, `conv1x1` or `conv3x3` (any Conv2d that is not 1×1) for a wrappable layer, else None."""
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, nn.Conv2d):
        return "conv1x1" if tuple(layer.kernel_size) == (1, 1) else "conv3x3"
    return None


def detect_unet_arch(unet: nn.Module) -> Arch:
    """SD1, SD2 or SDXL, from the U-Net's module names and layer widths only.

    An `input_blocks` child means SDXL (kohya's LDM-named SDXL U-Net). Otherwise SD1 or SD2 from the
    cross-attention width (`attn2.to_k` input features) and whether `proj_in` is Linear
    (`taxonomy.detect.arch_from_widths`).
    """
    children = dict(unet.named_children())
    if "input_blocks" in children:
        return Arch.SDXL
    if "down_blocks" not in children:
        raise SpecError(
            f"{type(unet).__name__} is not a Stable Diffusion U-Net (no down_blocks or input_blocks child)"
        )
    modules = dict(unet.named_modules())
    context = next((m.in_features for n, m in modules.items() if n.endswith(".attn2.to_k") and isinstance(m, nn.Linear)), None)
    linear = any(n.endswith(".proj_in") and isinstance(m, nn.Linear) for n, m in modules.items())
    return arch_from_widths((Arch.SD1, Arch.SD2), context_width=context, linear_projection=linear)[0]


def _as_list(text_encoders: nn.Module | Sequence[nn.Module | None] | None) -> list[nn.Module | None]:
    if text_encoders is None:
        return []
    if isinstance(text_encoders, nn.Module):
        return [text_encoders]
    return list(text_encoders)


def _te_path(path: str) -> str:
    """transformers 4's canonical module path: insert `text_model.` where transformers 5 dropped it."""
    return path if path.startswith(_TE_ROOT) else _TE_ROOT + path


def _collect(
    root: nn.Module,
    classes: Iterable[str],
    prefix: str,
    arch: Arch,
    with_3x3: bool,
    text_encoder: bool,
) -> list[Target]:
    classes = frozenset(classes)
    found: list[Target] = []
    seen: set[str] = set()
    for path, module in root.named_modules():
        if type(module).__name__ not in classes:
            continue
        for child_path, child in module.named_modules():
            kind = layer_kind(child)
            if kind is None or (kind == "conv3x3" and not with_3x3) or (text_encoder and kind != "linear"):
                continue
            full = f"{path}.{child_path}" if path else child_path
            if text_encoder:
                full = _te_path(full)
            name = prefix + full.replace(".", "_")
            if name in seen:  # a target class nested in another: wrap once
                continue
            seen.add(name)
            placement = place(name, arch)
            if placement is None:
                raise RuntimeError(f"bug: target {name!r} has no place in the {arch.value} block table")
            found.append(Target(name, child, kind, placement))
    return found


def find_targets(
    text_encoders: nn.Module | Sequence[nn.Module | None] | None,
    unet: nn.Module,
    *,
    include_conv: bool,
) -> tuple[Arch, list[Target]]:
    """The architecture and every layer a kohya LoRA (or, with `include_conv`, LoCon) network wraps.

    `text_encoders` is None, one module, or a list: one encoder for SD1/SD2 (gen_img passes a list even
    there), two for SDXL; None entries are skipped. Text-encoder targets come first, in encoder order, then
    U-Net targets, each in `named_modules` order. Every call returns new lists.
    """
    arch = detect_unet_arch(unet)
    components: tuple[Component, ...] = table(arch).text_encoders
    encoders = _as_list(text_encoders)
    if len(encoders) > len(components):
        raise SpecError(
            f"{arch.value} has {len(components)} text encoder(s) but {len(encoders)} were given"
        )
    if arch is Arch.SDXL and len(encoders) == 1 and encoders[0] is not None:
        raise SpecError("an SDXL U-Net needs its two text encoders as a list [te1, te2]")

    targets: list[Target] = []
    for component, encoder in zip(components, encoders):
        if encoder is None:
            continue
        targets += _collect(encoder, TE_CLASSES, f"lora_{component.value}_", arch, False, True)
    unet_classes = UNET_ATTENTION_CLASSES + (UNET_CONV_CLASSES if include_conv else ())
    targets += _collect(unet, unet_classes, "lora_unet_", arch, include_conv, False)
    return arch, targets
