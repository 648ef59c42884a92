"""Planning: which layers get a module, with which rank, training alpha and learning-rate weight.

A plan is a list of `PlannedModule` records, one per module, made while only reading the models: from a
`BlockSpec` (`plan_modules`, a fresh network) or from a kohya file's modules (`plan_from_file`). Every refusal
happens here, before `BlockwiseNetwork` creates a module and long before anything touches the models:
nothing to train, ranks above the widest layer, a file whose modules fit no layer.

Rank bound: a rank above the widest layer the network would adapt — the largest min(fan-in, fan-out) over its
target layers (1280 on SD1/SD2/SDXL) — is refused, not clamped. ΔW = U·D of a layer has rank ≤ min(fan-in,
fan-out), so such a rank cannot add anything anywhere and only costs memory (and a typo such as
`block_ranks=in0=1e30` would otherwise try to allocate it); clamping would silently train something other
than what was asked for and write a file whose ranks differ from the arguments. Ranks between a layer's own
width and the bound stay allowed, as in kohya (e.g. rank 1024 on SDXL reaches the 768-wide CLIP-L layers).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from blora_tools.adapter.formats import stem_from_path
from blora_tools.errors import AdapterFileError, SpecError
from blora_tools.spec import CONV_KINDS, BlockSpec
from blora_tools.taxonomy.arch import Arch
from blora_tools.taxonomy.blocks import Component, place, table
from blora_tools.taxonomy.selectors import describe_blocks
from kohya_plugin.args import WeightsArgs
from kohya_plugin.layer_rules import LayerRules
from kohya_plugin.spec_io import FileSpec, Unit, layer_kinds, training_alpha
from kohya_plugin.targets import Target, find_targets, layer_kind
from kohya_plugin.weights_io import Modules, module_alpha, shapes_fit

TextEncoders = nn.Module | Sequence[nn.Module | None] | None


@dataclass(frozen=True)
class PlannedModule:
    """One module of a network: the layer, its rank, training alpha and learning-rate weight."""

    target: Target
    rank: int
    alpha: float
    lr_weight: float
    lr: float | None = None
    """An absolute learning rate (kohya's `network_reg_lrs`); None: the trainer's rate × `lr_weight`."""
    row_parts: tuple[int, ...] | None = None
    """`split_qkv`: the rows of each part of a fused layer, trained as one LoRA each (`LoRAModule`)."""

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def is_text_encoder(self) -> bool:
        return self.target.placement.component is not Component.UNET

    @property
    def params(self) -> int:
        """Trainable parameters: rank · (fan-in · k·k + fan-out); split parts: n·r · fan-in + r · fan-out (each
        part's up covers its own rows only)."""
        fan_out, fan_in = _fans(self.target.layer)
        up_rank = self.rank // len(self.row_parts) if self.row_parts else self.rank
        return self.rank * fan_in + up_rank * fan_out


@dataclass(frozen=True)
class ModulePlan:
    """A network's modules, what to warn about, and which kinds of layer each block has (for the saved spec)."""

    modules: tuple[PlannedModule, ...]
    warnings: tuple[str, ...]
    layers: frozenset[tuple[Unit, bool]]


def _fans(layer: nn.Module) -> tuple[int, int]:
    """(fan-out, fan-in · k·k) of a Linear or Conv2d weight."""
    shape = tuple(layer.weight.shape)
    fan_in = 1
    for d in shape[1:]:
        fan_in *= d
    return shape[0], fan_in


def row_parts(target: Target) -> tuple[int, ...] | None:
    """The rows of each part of a fused DiT layer (q | k | v, single `linear1`'s q | k | v | mlp), from the
    taxonomy's leaves in units of the layer's width; None for a layer of one part."""
    layer = target.placement.layer
    if layer is None or len(layer.leaves) < 2:
        return None
    per_unit = _fans(target.layer)[0] // layer.units
    return tuple((leaf.stop - leaf.start) * per_unit for leaf in layer.leaves)


def widest_rank(targets: Sequence[Target]) -> int:
    """The largest useful rank: max over the targets of min(fan-in, fan-out) (see the module docstring)."""
    return max((min(_fans(t.layer)) for t in targets), default=0)


def _check_rank_bound(planned: Sequence[PlannedModule], targets: Sequence[Target], arch: Arch, chooser: str) -> None:
    bound = widest_rank(targets)
    over = [p for p in planned if p.rank > bound]
    if over:
        p = max(over, key=lambda q: q.rank)
        what = "conv rank" if p.target.kind in CONV_KINDS else "rank"
        raise SpecError(
            f"{chooser}: {what} {p.rank} for {p.target.placement.block} is above {bound}, the widest layer of this "
            f"{arch.value} model (a LoRA's ΔW has rank ≤ min(fan-in, fan-out)); give a rank ≤ {bound}"
        )


def plan_modules(
    text_encoder: TextEncoders,
    unet: nn.Module,
    spec: BlockSpec,
    *,
    explicit: bool = True,
    chooser: str = "network_args",
    rules: LayerRules | None = None,
    split_qkv: bool = False,
) -> ModulePlan:
    """Decide every module from the spec (models are only read).

    A module exists where its block's rank (k×k convs: conv rank) is > 0. Layers that only a LoCon network
    wraps (inside ResNet, down- and upsampling blocks: their linear and 1×1 layers too) exist only where the
    block's conv rank is > 0. With `explicit`, trained U-Net groups that get no module are warned about;
    a spec that would train nothing, or a rank above the widest layer, raises SpecError. On Flux.1/SD3 `rules`
    (`kohya_plugin.layer_rules`) decide each layer's numbers, and `split_qkv` gives each fused layer one LoRA
    of the layer's rank r and alpha α per part: a module of rank n·r and alpha n·α (`row_parts`).
    """
    arch, attention = find_targets(text_encoder, unet, include_conv=False)
    if arch is not spec.arch:
        raise SpecError(f"the spec is for {spec.arch.value} but the U-Net is {arch.value}")
    _, every = find_targets(text_encoder, unet, include_conv=True)
    attention_names = {t.name for t in attention}
    planned: list[PlannedModule] = []
    for target in every:
        if rules is not None:
            numbers = rules.numbers(spec, target)
            if numbers.rank > 0:
                parts = row_parts(target) if split_qkv else None
                n = len(parts) if parts else 1
                planned.append(PlannedModule(target, numbers.rank * n, numbers.alpha * n, numbers.lr_weight,
                                             numbers.lr, parts))
            continue
        setting = spec.setting(target.placement)
        if target.name not in attention_names and setting.conv_rank == 0:
            continue
        rank, alpha = spec.rank_alpha(target.placement, target.kind)
        if rank > 0:
            planned.append(PlannedModule(target, rank, alpha, setting.lr_weight))

    layout = table(arch)
    covered = {m.target.placement.group for m in planned}
    has_conv = {t.placement.group for t in every if t.name not in attention_names}
    empty = [
        g for g, members in layout.group_members.items()
        if rules is None and g not in covered and any(s.trained for b in members for s in spec.settings_of(b))
    ]
    if not planned:
        chosen = describe_blocks(spec.trained_blocks, arch)
        if empty and set(empty) <= has_conv:
            raise SpecError(
                f"{chooser} selects {chosen} on {arch.value}, but {', '.join(empty)} hold no attention layers, "
                f"so a LoRA there would be empty: conv_dim is needed; add conv_dim=N (LoCon), e.g. conv_dim=8"
            )
        raise SpecError(f"{chooser} selects {chosen} on {arch.value}, but no layer there can take an adapter")
    _check_rank_bound(planned, every, arch, chooser)
    messages = []
    if explicit and empty:
        names = ", ".join(f"{g} ({'/'.join(layout.group_members[g])})" for g in empty)
        hint = ("give them a conv rank (conv_dim=N, LoCon) to train their convolutions" if set(empty) <= has_conv
                else "they hold no layer this network can train")
        messages.append(f"blocks {names} are asked for but get no module (no attention layers): {hint}")
    return ModulePlan(tuple(planned), tuple(messages), layer_kinds(every))


def plan_from_file(
    text_encoder: TextEncoders,
    unet: nn.Module,
    arch: Arch,
    modules: Modules,
    file_spec: FileSpec | None,
    lr: WeightsArgs,
    source: str,
) -> ModulePlan:
    """One module per module of a kohya file (checked by `weights_io.group_modules`): rank from the shapes,
    training alpha from the file's `blora_spec` where it has one, else the file's alpha (missing: the rank).

    Modules come in target order. A module that fits no layer, or a file with no module for this
    model, is an AdapterFileError naming the file.
    """
    _, targets = find_targets(text_encoder, unet, include_conv=True)
    by_name = {t.name: t for t in targets}
    have_te = any(t.placement.component is not Component.UNET for t in targets)
    other_layers: dict[str, Target] | None = None
    planned: list[PlannedModule] = []
    unmatched: list[str] = []
    skipped_te: list[str] = []
    for stem, tensors in modules.items():
        target = by_name.get(stem)
        if target is None:
            if other_layers is None:
                other_layers = _other_layers(text_encoder, unet, arch, by_name)
            target = other_layers.get(stem)
        if target is None:
            placement = place(stem, arch)
            is_te = placement is not None and placement.component is not Component.UNET
            (skipped_te if is_te and not have_te else unmatched).append(stem)
            continue
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        weight_shape = tuple(target.layer.weight.shape)
        delta_shape = (up.shape[0], *down.shape[1:])
        if not shapes_fit(delta_shape, weight_shape):
            raise AdapterFileError(
                f"{stem} has factors for a {list(delta_shape)} weight but the layer's is "
                f"{list(weight_shape)}; is the file for another model?", source
            )
        rank = int(down.shape[0])
        alpha = training_alpha(stem, target.placement, target.kind, rank, module_alpha(stem, tensors, source),
                               file_spec)
        planned.append(PlannedModule(target, rank, alpha, *_lr_of(target, lr)))
    if unmatched:
        shown = ", ".join(sorted(unmatched)[:3])
        raise AdapterFileError(
            f"{len(unmatched)} module(s) match no layer of this {arch.value} model "
            f"(e.g. {shown}); is the file for another architecture?", source
        )
    if not planned:
        raise AdapterFileError(f"no LoRA/LoCon module in the file matches this {arch.value} model", source)
    notes = [f"{source}: {len(skipped_te)} text-encoder modules skipped: no text encoder was given"
             ] if skipped_te else []
    order = {t.name: i for i, t in enumerate(targets)}
    planned.sort(key=lambda p: (order.get(p.name, len(order)), p.name))
    layers = layer_kinds([*targets, *(other_layers or {}).values()])
    return ModulePlan(tuple(planned), tuple(notes), layers)


def _lr_of(target: Target, lr: WeightsArgs) -> tuple[float, float | None]:
    """(learning-rate weight, absolute rate or None) of a module of a network built from a file."""
    placement = target.placement
    if placement.component is Component.UNET and placement.kohya_index in lr.lr_slot and lr.rules is None:
        return lr.lr_slot[placement.kohya_index], None
    weight = lr.lr_block[placement.block]
    return lr.rules.learning_rate(target, weight) if lr.rules is not None else (weight, None)


def _other_layers(text_encoder: TextEncoders, unet: nn.Module, arch: Arch,
                  known: Mapping[str, Target]) -> dict[str, Target]:
    """Every other Linear/Conv2d of the models under its kohya name: LyCORIS-style files also adapt layers
    kohya does not (conv_in, time embeddings, conv_out)."""
    if text_encoder is None or isinstance(text_encoder, nn.Module):
        encoders = [text_encoder]
    else:
        encoders = list(text_encoder)
    roots = [("unet", unet)]
    roots += [(c.value, m) for c, m in zip(table(arch).text_encoders, encoders) if m is not None]
    found: dict[str, Target] = {}
    for component, root in roots:
        for path, layer in root.named_modules():
            kind = layer_kind(layer)
            name = stem_from_path(component, path) if kind else None
            placement = place(name, arch) if name else None
            if name and name not in known and placement is not None:
                found[name] = Target(name, layer, kind, placement)
    return found

