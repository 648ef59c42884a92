"""Per-layer numbers on Flux.1 and SD3: what is finer than a block.

A `BlockSpec` gives every block one rank, alpha and learning-rate weight. On a diffusion transformer a layer's
numbers can also come from:

* sub-selector terms (`block_ranks=D05.img=16`, `block_lr=S10.linear1.mlp=0.5`): the layers holding a chosen
  part take the value. A fused layer (`img_attn.qkv`, single `linear1`) is ONE module, so a sub-selector that
  names some of its rows (`D05.img.q`, `S10.linear1.mlp`) trains the whole fused layer with the part's value —
  a LoRA on a fused weight cannot give its row parts different ranks (with `split_qkv` each part is its own
  pair of factors, but they share the rank). Later terms win, whole blocks and parts alike;
* `blocks=` with sub-selectors: only the layers holding a chosen part are trained;
* kohya's own lora_flux / lora_sd3 arguments, with kohya's meaning and precedence (sd-scripts 48d368f
  `create_modules`): per-type dims (`img_attn_dim`, `single_dim`, `x_mlp_dim`, …: the first type whose
  identifiers the module name contains; 0 = skip) replace the block's rank; `train_blocks` and
  `train_*_block_indices` leave other blocks untrained; `network_reg_dims` (first regex that `re.search`
  finds in the name; alpha = `--network_alpha`) wins over both; `in_dims` / `emb_dims` give the layers outside
  the blocks their rank (kohya trains none of them otherwise); `network_reg_lrs` sets an absolute learning
  rate. None of them reaches a layer that `preset`/`blocks` leaves out (the embedders are in `BASE`), a
  learning-rate weight of 0 leaves a layer untrained, and T5 is trained only with `train_t5xxl`. A BASE term
  these rules would ignore (no `in_dims`/`emb_dims`, a BASE alpha, Flux.1's final layer) is refused earlier, by
  `kohya_plugin.args._check_unwrapped_terms`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

from blora_tools.spec import BlockSpec
from blora_tools.taxonomy.arch import Arch
from blora_tools.taxonomy.blocks import OTHER, Component, Placement
from blora_tools.taxonomy.selectors import coverage
from kohya_plugin.targets import Target, embedder_slot

TYPE_DIMS: Mapping[Arch, tuple[tuple[str, tuple[str, ...]], ...]] = MappingProxyType({
    Arch.FLUX: (
        ("img_attn_dim", ("img_attn",)),
        ("txt_attn_dim", ("txt_attn",)),
        ("img_mlp_dim", ("img_mlp",)),
        ("txt_mlp_dim", ("txt_mlp",)),
        ("img_mod_dim", ("img_mod",)),
        ("txt_mod_dim", ("txt_mod",)),
        ("single_dim", ("single_blocks", "linear")),
        ("single_mod_dim", ("modulation",)),
    ),
    Arch.SD3: (
        ("context_attn_dim", ("context_block", "attn")),
        ("context_mlp_dim", ("context_block", "mlp")),
        ("context_mod_dim", ("context_block", "adaLN_modulation")),
        ("x_attn_dim", ("x_block", "attn")),
        ("x_mlp_dim", ("x_block", "mlp")),
        ("x_mod_dim", ("x_block", "adaLN_modulation")),
    ),
})
"""kohya's per-type dims, in kohya's order, with the substrings a module name must all contain (sd-scripts
48d368f: `single_dim` hits `linear1` and `linear2`; `x_attn_dim` also hits SD3.5's `attn2`)."""

RegexValues = tuple[tuple[re.Pattern, float], ...]


class LayerNumbers(NamedTuple):
    """One layer's rank, training alpha, learning-rate weight and absolute learning rate (None: from the
    trainer's rate times the weight)."""

    rank: int
    alpha: float
    lr_weight: float
    lr: float | None = None


@dataclass(frozen=True)
class LayerRules:
    """The per-layer rules of one network (see the module docstring)."""

    terms: Mapping[str, tuple[tuple[frozenset[str], float], ...]] = field(default_factory=dict)
    """field (`rank`, `alpha`, `lr_weight`) → every named term given for it, in order."""
    selection: frozenset[str] | None = None
    """blocks and atoms chosen by `preset`/`blocks` (None: everything)."""
    kohya_blocks: frozenset[str] | None = None
    """blocks `train_blocks` / `train_*_block_indices` allow (None: all)."""
    type_dims: tuple[tuple[tuple[str, ...], int], ...] = ()
    embedder_dims: tuple[int, ...] = ()
    reg_dims: RegexValues = ()
    reg_lrs: RegexValues = ()
    t5: bool = False
    network_alpha: float = 1.0

    def numbers(self, spec: BlockSpec, target: Target) -> LayerNumbers:
        """The numbers of one target layer (rank 0: no module)."""
        placement = target.placement
        setting = spec.setting(placement)
        lr_weight = setting.lr_weight
        if self.selection is not None and coverage(placement, self.selection).none:
            return LayerNumbers(0, 1.0, lr_weight)
        if placement.component is Component.TE3 and not self.t5:
            return LayerNumbers(0, 1.0, lr_weight)
        if placement.component is not Component.UNET:
            rank, alpha = spec.rank_alpha(placement, target.kind)
        elif placement.block == OTHER:
            slot = embedder_slot(spec.arch, target.name)
            rank = self.embedder_dims[slot] if self.embedder_dims and slot is not None else 0
            alpha = self.network_alpha
        else:
            rank, alpha = spec.rank_alpha(placement, target.kind)
            rank = int(self._part_value("rank", placement, rank))
            alpha = self._part_value("alpha", placement, alpha) or float(rank)
            lr_weight = self._part_value("lr_weight", placement, lr_weight)
            if rank > 0:
                rank = next((d for ids, d in self.type_dims if all(i in target.name for i in ids)), rank)
            if self.kohya_blocks is not None and placement.block not in self.kohya_blocks:
                rank = 0
        if lr_weight == 0:
            return LayerNumbers(0, alpha, lr_weight)
        return self._regex(target.name, rank, alpha, lr_weight)

    def learning_rate(self, target: Target, lr_weight: float) -> tuple[float, float | None]:
        """(learning-rate weight, absolute rate or None) of a layer of a network built from a file."""
        placement = target.placement
        if placement.component is Component.UNET and placement.block != OTHER:
            lr_weight = self._part_value("lr_weight", placement, lr_weight)
        return lr_weight, next((v for pattern, v in self.reg_lrs if pattern.search(target.name)), None)

    def _part_value(self, name: str, placement: Placement, value: float) -> float:
        """The value of the last term that names this layer: the block's own (`value`) when that term names the
        whole block, the term's when it names a part the layer holds."""
        for chosen, term_value in reversed(self.terms.get(name, ())):
            if placement.block in chosen:
                return value
            if not coverage(placement, chosen).none:
                return term_value
        return value

    def _regex(self, name: str, rank: int, alpha: float, lr_weight: float) -> LayerNumbers:
        reg_rank = next((int(d) for pattern, d in self.reg_dims if pattern.search(name)), None)
        if reg_rank is not None:
            rank, alpha = reg_rank, self.network_alpha
        lr = next((v for pattern, v in self.reg_lrs if pattern.search(name)), None)
        return LayerNumbers(rank, alpha, lr_weight, lr)
