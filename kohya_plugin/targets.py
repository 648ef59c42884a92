"""Which layers a kohya-compatible LoRA wraps, and the kohya names it gives them.

The rules are kohya `networks.lora`'s (docs/architecture.md §2, §4), restated here:

* U-Net: every `nn.Linear` and 1×1 `nn.Conv2d` anywhere inside a module whose class is `Transformer2DModel`;
  with conv targets also inside `ResnetBlock2D`, `Downsample2D` and `Upsample2D`, where 3×3 convs count too.
* Text encoders: every `nn.Linear` inside the CLIP attention and MLP modules.
* Name: `lora_unet_` / `lora_te_` (SD1/SD2) / `lora_te1_`, `lora_te2_` (SDXL) + the module path with `.` → `_`.
  Text-encoder names always use transformers 4's path (`text_model.encoder.layers.…`), which every file in the
  wild uses, even under transformers 5 where `CLIPTextModel` lost its `text_model` level.

Flux.1 and SD3 (sd-scripts 48d368f `networks/lora_flux.py`, `networks/lora_sd3.py`): every `Linear` inside a
`DoubleStreamBlock` / `SingleStreamBlock` (Flux) or `SingleDiTBlock` (SD3, both streams of a joint block), named
by its attribute path (`lora_unet_double_blocks_0_img_attn_qkv`); the embedders and final layers only where
kohya's `in_dims` / `emb_dims` name them (`EMBEDDER_FILTERS`: a layer belongs to the first filter its name
contains); text encoders `[clip_l, t5xxl]` / `[clip_l, clip_g, t5xxl]` with the CLIP classes plus `T5Attention`
and `T5DenseGatedActDense`, T5 under `lora_te3_` with its own paths (`encoder.block.0.layer.0.SelfAttention.q`).

Unlike kohya, the class lists are immutable tuples and every call builds its own lists, so one network built in
a process never changes what a later one wraps.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from types import MappingProxyType

from torch import nn

from blora_tools.errors import SpecError
from blora_tools.taxonomy.arch import Arch, is_dit
from blora_tools.taxonomy.blocks import OTHER, Component, Placement, place, table
from blora_tools.taxonomy.detect import arch_from_widths
from blora_tools.taxonomy.dit import BFL, layer_index
from blora_tools.taxonomy.layouts import DIFFUSERS_ROOTS, record

__all__ = [
    "Target",
    "UNET_ATTENTION_CLASSES",
    "UNET_CONV_CLASSES",
    "TE_CLASSES",
    "T5_CLASSES",
    "DIT_BLOCK_CLASSES",
    "EMBEDDER_FILTERS",
    "EMBEDDER_ARGS",
    "embedder_slot",
    "embedder_leaves",
    "unwrapped_unet_blocks",
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

T5_CLASSES: tuple[str, ...] = ("T5Attention", "T5DenseGatedActDense")
"""T5-XXL modules whose Linear layers are wrapped (Flux/SD3 with `train_t5xxl`)."""

DIT_BLOCK_CLASSES: Mapping[Arch, tuple[str, ...]] = MappingProxyType({
    Arch.FLUX: ("DoubleStreamBlock", "SingleStreamBlock"),
    Arch.SD3: ("SingleDiTBlock",),
})
"""The transformer blocks whose Linear layers kohya's lora_flux / lora_sd3 wrap."""

EMBEDDER_FILTERS: Mapping[Arch, tuple[str, ...]] = MappingProxyType({
    Arch.FLUX: ("_img_in", "_time_in", "_vector_in", "_guidance_in", "_txt_in"),
    Arch.SD3: ("context_embedder", "_t_embedder", "x_embedder", "y_embedder", "final_layer_adaLN_modulation",
               "final_layer_linear"),
})
"""kohya's `in_dims` (Flux, 5 values) / `emb_dims` (SD3, 6 values) slots: a layer outside the blocks whose kohya
name contains the filter takes that slot's rank (sd-scripts matches substrings of the name, in this order)."""

EMBEDDER_ARGS: Mapping[Arch, tuple[str, str]] = MappingProxyType({
    Arch.FLUX: ("in_dims", "img,time,vector,guidance,txt"),
    Arch.SD3: ("emb_dims", "context,t,x,y,final_mod,final_linear"),
})
"""The `--network_args` key holding `EMBEDDER_FILTERS`' ranks and its slots as kohya's comment names them
(sd-scripts 48d368f `lora_flux.py`: `# in_dims [img, time, vector, guidance, txt]`; `lora_sd3.py`: `# emb_dims
[context_embedder, t_embedder, x_embedder, y_embedder, final_mod, final_linear]`)."""

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
    """SD1, SD2, SDXL, Flux.1 or SD3, from the denoiser's module names and layer widths only.

    `double_blocks` and `single_blocks` children mean Flux.1 and `joint_blocks` SD3 (sd-scripts' own model
    classes); an `input_blocks` child means SDXL (kohya's LDM-named SDXL U-Net). Otherwise SD1 or SD2 from the
    cross-attention width (`attn2.to_k` input features) and whether `proj_in` is Linear
    (`taxonomy.detect.arch_from_widths`).
    """
    children = dict(unet.named_children())
    if "double_blocks" in children and "single_blocks" in children:
        return Arch.FLUX
    if "joint_blocks" in children:
        return Arch.SD3
    if "input_blocks" in children:
        return Arch.SDXL
    if "down_blocks" not in children:
        raise SpecError(
            f"{type(unet).__name__} is not a Stable Diffusion U-Net or a Flux.1/SD3 transformer "
            "(no down_blocks, input_blocks, double_blocks or joint_blocks child)"
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


def embedder_slot(arch: Arch, name: str) -> int | None:
    """The `in_dims` / `emb_dims` slot of a kohya module name outside the blocks (first filter it contains)."""
    return next((i for i, f in enumerate(EMBEDDER_FILTERS.get(arch, ())) if f in name), None)


@cache
def embedder_leaves(arch: Arch) -> frozenset[str]:
    """The leaves (`in.img`, `out.final`) of the layers outside the blocks that `in_dims`/`emb_dims` can give a
    module: every one on SD3; on Flux.1 not the final layer, which no kohya argument trains."""
    return frozenset(
        leaf.name for layer in layer_index(arch).values()
        if layer.block is None and layer.naming == BFL and embedder_slot(arch, layer.stem) is not None
        for leaf in layer.leaves
    )


_WRAPPED_CONTAINERS: tuple[str, ...] = ("attentions", "resnets", "downsamplers", "upsamplers")
"""Where diffusers' `UNet2DConditionModel` keeps its `UNET_ATTENTION_CLASSES` and `UNET_CONV_CLASSES` modules
(`down_blocks.0.attentions.0`, `up_blocks.1.upsamplers.0`); `test_targets` checks the two against the full-size
models."""


@cache
def unwrapped_unet_blocks(arch: Arch) -> Mapping[str, tuple[str, ...]]:
    """SD1/SD2/SDXL: the U-Net blocks where kohya's `networks.lora` wraps no layer, even with conv targets (`IN00`:
    `conv_in`; `OTHER`: the embeddings and `conv_out`), each with the top-level modules it holds."""
    held: dict[str, dict[str, None]] = {}
    wrapped: set[str] = set()
    for stem, _ in record(arch).layer_shapes():
        path = stem.removeprefix("lora_unet_")
        placement = place(stem, arch)
        if path == stem or not path.startswith(DIFFUSERS_ROOTS) or placement is None:
            continue
        parts = path.split("_")
        if any(container in parts for container in _WRAPPED_CONTAINERS):
            wrapped.add(placement.block)
        else:
            held.setdefault(placement.block, {})[_root(path)] = None
    return MappingProxyType({block: tuple(roots) for block, roots in held.items() if block not in wrapped})


def _root(path: str) -> str:
    """The diffusers top-level module of an underscored U-Net path (`time_embedding_linear_1` → `time_embedding`)."""
    return max((root for root in DIFFUSERS_ROOTS if path.startswith(root)), key=len)


def _collect(
    root: nn.Module,
    classes: Iterable[str],
    prefix: str,
    arch: Arch,
    with_3x3: bool,
    text_encoder: bool,
    clip: bool = True,
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
            if text_encoder and clip:
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
    if is_dit(arch):
        return arch, _dit_targets(arch, _as_list(text_encoders), unet)
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


def _dit_targets(arch: Arch, encoders: list[nn.Module | None], transformer: nn.Module) -> list[Target]:
    """Flux.1 / SD3: text encoders (T5 included: planning decides whether it is trained), the blocks' layers,
    then the layers outside the blocks that an `in_dims` / `emb_dims` slot names."""
    components: tuple[Component, ...] = table(arch).text_encoders
    if len(encoders) > len(components):
        raise SpecError(
            f"{arch.value} has {len(components)} text encoders ({', '.join(c.value for c in components)}) "
            f"but {len(encoders)} were given"
        )
    targets: list[Target] = []
    for component, encoder in zip(components, encoders):
        if encoder is None:
            continue
        t5 = component is Component.TE3
        targets += _collect(encoder, T5_CLASSES if t5 else TE_CLASSES, f"lora_{component.value}_", arch, False,
                            True, clip=not t5)
    targets += _collect(transformer, DIT_BLOCK_CLASSES[arch], "lora_unet_", arch, False, False)
    seen = {t.name for t in targets}
    for path, layer in transformer.named_modules():
        kind = layer_kind(layer)
        name = "lora_unet_" + path.replace(".", "_")
        if kind is None or name in seen or embedder_slot(arch, name) is None:
            continue
        placement = place(name, arch)
        if placement is None or placement.block != OTHER:
            continue
        targets.append(Target(name, layer, kind, placement))
    return targets
