"""A plan without a model: the modules and trainable parameters `--network_args` would create, per block.

`plan_network("sd1", "preset=style conv_dim=8")` builds the full-size U-Net and text encoders of the
architecture on PyTorch's meta device (no weights, no memory), resolves the arguments exactly as training
does and counts, per paper group, the modules and parameters the network would have, with the warnings
training would print. A configuration training would reject raises the same SpecError. This backs
`blora-tools plan --arch sd1 --network-args "preset=style conv_dim=8" [--json]`.

On Flux.1 and SD3 the count is per block (`te1`, `te3`, `D00`…`S37`, `BASE` for the embedders and final
layers), on the transformer and text encoders sd-scripts builds (`blora_tools.dit_trees`; SD3 by `variant`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from blora_tools.jsonio import dumps
from blora_tools.spec import BlockSpec
from blora_tools.taxonomy.arch import Arch, is_dit
from blora_tools.taxonomy.blocks import OTHER, table
from kohya_plugin.args import parse_network_args, split_network_args
from kohya_plugin.planning import plan_modules


@dataclass(frozen=True)
class GroupPlan:
    """What one paper group would get."""

    modules: int
    params: int


@dataclass(frozen=True)
class Plan:
    """Per paper group (text encoders first, then `in0`…`out3`), or per block on Flux.1/SD3: modules and
    trainable parameters."""

    arch: Arch
    spec: BlockSpec
    blocks: Mapping[str, GroupPlan]
    warnings: tuple[str, ...]

    @property
    def modules(self) -> int:
        return sum(g.modules for g in self.blocks.values())

    @property
    def params(self) -> int:
        return sum(g.params for g in self.blocks.values())

    def to_dict(self) -> dict:
        """`{"arch", "blocks": {group: {"modules", "params", "rank", "alpha", "conv_rank", "conv_alpha",
        "lr_weight"}}, "total": {"modules", "params"}, "warnings"}`."""
        summary = self.spec.group_summary()
        if is_dit(self.arch):
            summary = {("BASE" if b == OTHER else b): s.to_dict() for b, s in self.spec.blocks.items()}
        blocks = {
            group: {"modules": g.modules, "params": g.params, **summary.get(group, {})}
            for group, g in self.blocks.items()
        }
        return {
            "arch": self.arch.value,
            "algo": self.spec.algo.value,
            "blocks": blocks,
            "total": {"modules": self.modules, "params": self.params},
            "warnings": list(self.warnings),
        }

    def to_json(self) -> str:
        """`to_dict` as JSON by the product's rules (`jsonio.dumps`: never NaN or Infinity)."""
        return dumps(self.to_dict(), indent=2)


def plan_network(
    arch: Arch | str,
    network_args: str | Mapping[str, object] = "",
    network_dim: int | None = None,
    network_alpha: float | None = None,
    variant: str | None = None,
) -> Plan:
    """Plan the network `--network_args` (a `"k=v k=v"` string or a dict) would build on `arch`.

    `network_dim`/`network_alpha` are the trainer's (None: 4 and 1.0); `variant` picks an SD3 family member
    (`blora_tools.dit_trees.SD3_VARIANTS`). Raises SpecError where training would.
    """
    arch = Arch(arch)
    kwargs = split_network_args(network_args) if isinstance(network_args, str) else dict(network_args)
    parsed = parse_network_args(kwargs, arch, network_dim, network_alpha)
    layout = table(arch)
    dit = is_dit(arch)
    if dit:
        from blora_tools.dit_trees import build_dit, build_dit_text_encoders

        unet = build_dit(arch, variant)
        text_encoders = build_dit_text_encoders(arch)
        counts = {b: [0, 0] for b in (*layout.blocks[:-1], "BASE")}
    else:
        from blora_tools.models import build_text_encoders, build_unet

        unet = build_unet(arch, "full", "meta")
        text_encoders = build_text_encoders(arch, "full", "meta")
        counts = {c.value: [0, 0] for c in layout.text_encoders}
        counts.update({g: [0, 0] for g in layout.unet_groups})
    plan = plan_modules(text_encoders, unet, parsed.spec, explicit=parsed.explicit_blocks, chooser=parsed.chooser,
                        rules=parsed.rules, split_qkv=parsed.options.split_qkv)
    for module in plan.modules:
        placement = module.target.placement
        key = ("BASE" if placement.block == OTHER else placement.block) if dit else placement.group
        entry = counts.setdefault(key, [0, 0])
        entry[0] += 1
        entry[1] += module.params
    blocks = {g: GroupPlan(n, p) for g, (n, p) in counts.items()}
    return Plan(arch, parsed.spec, blocks, (*parsed.notes, *plan.warnings))
