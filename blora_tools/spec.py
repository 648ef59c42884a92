"""BlockSpec: the resolved per-block training specification, and its `blora_spec` JSON form.

A `BlockSpec` says, for every block of one architecture (docs/architecture.md §2: text encoders, LBW blocks, `OTHER`),
the LoRA rank and alpha of its linear and 1×1 layers, the rank and alpha of its k×k convolutions (LoCon) and
its learning-rate weight. Rank 0 means the block is not trained. It is what `kohya_plugin.args` makes of the
`--network_args` strings, and what the plugin writes into every file it saves under the metadata key
`blora_spec`, so that the training parametrisation can be restored from the file.

One detail is finer than a block: kohya's SDXL `block_dims` and `mid_lr_weight` give the three parts of the
middle block (`middle_block_0..2`, kohya slots 10–12) separate values, while the taxonomy has one block `M00`.
When they differ, `slots` holds one setting per kohya slot and takes precedence over `blocks["M00"]`.

The JSON (`to_json`) has `arch`, `algo` and `blocks` (paper group → `{"rank", "alpha", "conv_rank",
"conv_alpha", "lr_weight"}`, rank 0 for skipped groups; where a group's members differ the values are
those of its largest-rank member and `"mixed": true`), plus `lbw` (every block, exact) and `kohya_slots`
(only when SDXL's middle-block parts differ). `from_json` reads `lbw` and `kohya_slots` back, and also the
group-only spec (`arch`, `alpha`, `blocks`, no `format`) that `merge` wrote before version 0.2.

`BlockSpec` is the only reader and writer of `blora_spec`. The plugin writes the spec it trained with (its alphas
are the training alphas; `file_alpha` is the one alpha every module stores, the rest folded into `lora_up`). The
CLI's writing commands describe the file they write with `from_modules`: per block the rank and stored alpha of
its linear and 1×1 layers and of its k×k convolutions (missing alpha = rank), `mixed: true` where the block's
modules of one class differ (rank and alpha are then those of its largest-rank module), `rankless: true` where it
holds modules that have no rank (full `diff`, norm `w_norm`, LoKr of whole factors; their scale is 1). LoHa and
LoKr count by their LyCORIS dim (`hada_w1_b` rows, `lokr_w*_a` columns); `kinds` counts the modules per kind
(`lora`, `lora_conv1x1`, `locon`, `tucker`, `loha`, `lokr`, `full`, `norm`), and `algo` is `locon` when any k×k
convolution is adapted.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from blora_tools.names import Named
from blora_tools.errors import SpecError
from blora_tools.jsonio import dumps, loads_strict
from blora_tools.taxonomy.arch import Arch, is_dit
from blora_tools.taxonomy.blocks import OTHER, Component, Placement, table

FORMAT = "blora-spec/1"
"""The value of the `format` field of the `blora_spec` JSON."""

CONV_KINDS = frozenset({"conv3x3"})
"""Layer kinds that take the conv rank and alpha; linear and 1×1 layers take the plain ones (as kohya)."""


class Algo(Named):
    """The training algorithm: LoRA on attention layers, or LoCon (convolutions too). A spec made from a file's
    modules says `locon` when any k×k convolution is adapted, and lists the module kinds under `kinds`."""

    LORA = "lora"
    LOCON = "locon"


@dataclass(frozen=True)
class BlockSetting:
    """The numbers of one block. Alpha 0 means alpha = rank (kohya's convention).

    `mixed`: the block's modules of one class (plain or conv) have different ranks or alphas; rank and alpha are
    then its largest-rank module's. `rankless`: the block holds modules without a rank (full, norm, LoKr of
    whole factors).
    """

    rank: int = 0
    alpha: float = 1.0
    conv_rank: int = 0
    conv_alpha: float = 1.0
    lr_weight: float = 1.0
    mixed: bool = False
    rankless: bool = False

    @property
    def trained(self) -> bool:
        """Whether any layer of the block gets an adapter."""
        return self.rank > 0 or self.conv_rank > 0 or self.rankless

    def to_dict(self) -> dict:
        doc: dict = {
            "rank": self.rank,
            "alpha": self.alpha,
            "conv_rank": self.conv_rank,
            "conv_alpha": self.conv_alpha,
            "lr_weight": self.lr_weight,
        }
        doc.update({flag: True for flag in ("mixed", "rankless") if getattr(self, flag)})
        return doc

    @classmethod
    def from_dict(cls, data: Mapping, where: str) -> "BlockSetting":
        """Read a setting back from JSON, checking every field."""
        if not isinstance(data, Mapping):
            raise SpecError(f"blora_spec: {where} is not an object")
        try:
            setting = cls(
                rank=int(data.get("rank", 0)),
                alpha=float(data.get("alpha", 1.0)),
                conv_rank=int(data.get("conv_rank", 0)),
                conv_alpha=float(data.get("conv_alpha", 1.0)),
                lr_weight=float(data.get("lr_weight", 1.0)),
                mixed=data.get("mixed", False) is True,
                rankless=data.get("rankless", False) is True,
            )
        except (TypeError, ValueError, OverflowError):
            raise SpecError(f"blora_spec: {where} has a value that is not a number") from None
        numbers = (setting.rank, setting.alpha, setting.conv_rank, setting.conv_alpha, setting.lr_weight)
        if min(numbers) < 0 or not all(math.isfinite(v) for v in numbers):
            raise SpecError(f"blora_spec: {where} has a negative or non-finite value")
        return setting


@dataclass(frozen=True)
class ModuleFacts:
    """What a spec records of one module of a file: where it sits, its kind, rank and alpha."""

    placement: Placement | None
    kind: str
    rank: int | None
    """None for kinds without a rank"""
    alpha: float | None
    """the alpha loaders use (stored, else the rank); None without a rank"""
    conv: bool
    """a k×k convolution (takes the conv rank and alpha)"""

    @classmethod
    def of(cls, module) -> "ModuleFacts":
        """The facts of a `blora_tools.adapter.model.Module` (duck-typed: placement, kind, rank, weight_shape)."""
        shape = module.weight_shape
        conv = len(shape) == 4 and math.prod(shape[2:]) > 1
        return cls(module.placement, str(module.kind), module.rank, module.effective_alpha, conv)


def _setting(facts: list[ModuleFacts], lr_weight: float) -> BlockSetting:
    """One block's setting from its modules (see the module docstring for `mixed` and `rankless`)."""
    plain = [(f.rank, f.alpha) for f in facts if f.rank is not None and not f.conv]
    conv = [(f.rank, f.alpha) for f in facts if f.rank is not None and f.conv]

    def lead(pairs: list[tuple[int, float]]) -> tuple[int, float]:
        if not pairs:
            return 0, 1.0
        top = max(r for r, _ in pairs)
        return Counter(p for p in pairs if p[0] == top).most_common(1)[0][0]

    rank, alpha = lead(plain)
    conv_rank, conv_alpha = lead(conv)
    mixed = len(set(plain)) > 1 or len(set(conv)) > 1
    rankless = any(f.rank is None for f in facts)
    return BlockSetting(rank, alpha, conv_rank, conv_alpha, lr_weight, mixed, rankless)


def _frozen(mapping: Mapping) -> Mapping:
    return mapping if isinstance(mapping, MappingProxyType) else MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class BlockSpec:
    """Per-block ranks, alphas, conv ranks, conv alphas and learning-rate weights of one architecture."""

    arch: Arch
    algo: Algo
    blocks: Mapping[str, BlockSetting]
    slots: Mapping[int, BlockSetting] = field(default_factory=dict)
    network_dim: int = 4
    network_alpha: float = 1.0
    kinds: Mapping[str, int] = field(default_factory=dict)
    """module kind → count, for a spec made from a file's modules (`from_modules`); empty for a training spec"""

    def __post_init__(self) -> None:
        object.__setattr__(self, "arch", Arch(self.arch))
        object.__setattr__(self, "algo", Algo(self.algo))
        object.__setattr__(self, "blocks", _frozen(self.blocks))
        object.__setattr__(self, "slots", _frozen(self.slots))
        object.__setattr__(self, "kinds", _frozen(self.kinds))
        expected = set(table(self.arch).blocks)
        if set(self.blocks) != expected:
            missing = sorted(expected - set(self.blocks))
            extra = sorted(set(self.blocks) - expected)
            raise SpecError(f"a {self.arch.value} spec needs every block; missing {missing}, unknown {extra}")

    @classmethod
    def from_modules(
        cls, arch: Arch | str, modules: Iterable[ModuleFacts], lr_weights: Mapping[str, float] | None = None
    ) -> "BlockSpec":
        """The spec of a file holding exactly `modules` (modules outside every block are not described).

        `lr_weights` keeps the source's learning-rate weights (block → weight) for the blocks still held.
        SDXL's middle block gets per-slot settings when its three parts differ.
        """
        arch = Arch(arch)
        layout = table(arch)
        facts = list(modules)
        lr = lr_weights or {}
        by_block: dict[str, list[ModuleFacts]] = {}
        by_slot: dict[int, list[ModuleFacts]] = {}
        for f in facts:
            if f.placement is None:
                continue
            by_block.setdefault(f.placement.block, []).append(f)
            if f.placement.block == "M00" and f.placement.kohya_index is not None:
                by_slot.setdefault(f.placement.kohya_index, []).append(f)
        blocks = {b: _setting(by_block.get(b, []), lr.get(b, 1.0)) for b in layout.blocks}
        slot_ids = [i for i, name in enumerate(layout.kohya_slots) if name == "M00"]
        slots = {i: _setting(by_slot.get(i, []), lr.get("M00", 1.0)) for i in slot_ids}
        if len(slots) < 2 or len(set(slots.values())) == 1:
            slots = {}
        algo = Algo.LOCON if any(f.conv for f in facts) else Algo.LORA
        kinds = dict(sorted(Counter(f.kind for f in facts).items()))
        ranks = Counter(f.rank for f in facts if f.rank is not None and not f.conv) or Counter(
            f.rank for f in facts if f.rank is not None
        )
        alphas = Counter(f.alpha for f in facts if f.alpha is not None)
        dim = ranks.most_common(1)[0][0] if ranks else 0
        alpha = alphas.most_common(1)[0][0] if alphas else 1.0
        return cls(arch, algo, blocks, slots, dim, alpha, kinds)

    # --- lookups --------------------------------------------------------------------------------

    def setting(self, placement: Placement) -> BlockSetting:
        """The setting of the block a module sits in (a kohya-slot setting where one exists)."""
        if placement.component is Component.UNET and placement.kohya_index in self.slots:
            return self.slots[placement.kohya_index]
        return self.blocks[placement.block]

    def rank_alpha(self, placement: Placement, kind: str) -> tuple[int, float]:
        """The (rank, alpha) a module of `kind` gets in its block; alpha 0 becomes the rank."""
        s = self.setting(placement)
        rank, alpha = (s.conv_rank, s.conv_alpha) if kind in CONV_KINDS else (s.rank, s.alpha)
        return rank, (float(rank) if alpha == 0 else alpha)

    @property
    def include_conv(self) -> bool:
        """Whether any block trains convolutions (LoCon)."""
        return any(s.conv_rank > 0 for s in (*self.blocks.values(), *self.slots.values()))

    @property
    def trained_blocks(self) -> frozenset[str]:
        """Blocks with a non-zero rank or conv rank."""
        trained = {b for b, s in self.blocks.items() if s.trained}
        if any(s.trained for s in self.slots.values()):
            trained.add("M00")
        return frozenset(trained)

    def settings_of(self, block: str) -> tuple[BlockSetting, ...]:
        """Every setting a block uses: one, or SDXL's three middle-block slots."""
        if block == "M00" and self.slots:
            return tuple(self.slots[i] for i in sorted(self.slots))
        return (self.blocks[block],)

    # --- summaries and JSON ------------------------------------------------------------------------

    def group_summary(self) -> dict[str, dict]:
        """Paper group → {"rank", "alpha", "conv_rank", "conv_alpha", "lr_weight"} (+ "mixed" where members differ).

        Text encoders first, then U-Net groups; blocks outside every group (IN00, OTHER) are left out, except
        on Flux.1/SD3, where `base` is OTHER (the embedders and final layer).
        """
        layout = table(self.arch)
        groups: dict[str, tuple[str, ...]] = {c.value: (c.value,) for c in layout.text_encoders}
        groups.update(layout.group_members)
        if is_dit(self.arch):
            groups["base"] = (OTHER,)
        summary: dict[str, dict] = {}
        for group, members in groups.items():
            settings = [s for b in members for s in self.settings_of(b)]
            trained = [s for s in settings if s.trained] or settings
            lead = max(trained, key=lambda s: (s.rank, s.conv_rank))
            conv_lead = max(trained, key=lambda s: s.conv_rank)
            entry = {
                "rank": lead.rank,
                "alpha": lead.alpha,
                "conv_rank": conv_lead.conv_rank,
                "conv_alpha": conv_lead.conv_alpha,
                "lr_weight": lead.lr_weight,
            }
            if len(set(settings)) > 1 or any(s.mixed for s in settings):
                entry["mixed"] = True
            if any(s.rankless for s in settings):
                entry["rankless"] = True
            summary[group] = entry
        return summary

    def to_dict(self) -> dict:
        doc: dict = {
            "format": FORMAT,
            "arch": self.arch.value,
            "algo": self.algo.value,
            "network_dim": self.network_dim,
            "network_alpha": self.network_alpha,
            "blocks": self.group_summary(),
            "lbw": {b: s.to_dict() for b, s in self.blocks.items()},
        }
        if self.slots:
            doc["kohya_slots"] = {str(i): s.to_dict() for i, s in sorted(self.slots.items())}
        if self.kinds:
            doc["kinds"] = dict(self.kinds)
        return doc

    def to_json(self, extra: Mapping | None = None) -> str:
        """The `blora_spec` metadata value; `extra` adds top-level fields (e.g. the file's alpha)."""
        doc = self.to_dict()
        if extra:
            doc.update(extra)
        return dumps(doc, separators=(",", ":"), sort_keys=False)

    @classmethod
    def from_json(cls, text: str | Mapping) -> "BlockSpec":
        """Read a `blora_spec` value (string or parsed JSON); raises SpecError when it is not one."""
        try:
            doc = loads_strict(text) if isinstance(text, str) else text
        except ValueError as err:
            raise SpecError(f"blora_spec is not valid JSON: {' '.join(str(err).split())[:120]}") from None
        if isinstance(doc, Mapping) and "format" not in doc and isinstance(doc.get("blocks"), Mapping):
            return cls._from_group_json(doc)
        if not isinstance(doc, Mapping) or doc.get("format") != FORMAT:
            raise SpecError(f"blora_spec has no 'format': {FORMAT!r} field")
        try:
            arch = Arch(doc.get("arch"))
            algo = Algo(doc.get("algo", "lora"))
            layout = table(arch)
        except ValueError:
            raise SpecError(f"blora_spec: unknown arch {doc.get('arch')!r} or algo {doc.get('algo')!r}") from None
        lbw = doc.get("lbw")
        if not isinstance(lbw, Mapping):
            raise SpecError("blora_spec has no 'lbw' table")
        blocks = {b: BlockSetting.from_dict(lbw.get(b, {}), f"lbw.{b}") for b in layout.blocks}
        slots_doc = doc.get("kohya_slots") or {}
        if not isinstance(slots_doc, Mapping):
            raise SpecError("blora_spec: 'kohya_slots' is not an object")
        try:
            slots = {int(i): BlockSetting.from_dict(s, f"kohya_slots.{i}") for i, s in slots_doc.items()}
        except ValueError:
            raise SpecError("blora_spec: 'kohya_slots' keys must be kohya block indices") from None
        try:
            dim, alpha = int(doc.get("network_dim", 4)), float(doc.get("network_alpha", 1.0))
        except (TypeError, ValueError):
            raise SpecError("blora_spec: network_dim / network_alpha are not numbers") from None
        kinds = doc.get("kinds") or {}
        if not isinstance(kinds, Mapping) or not all(isinstance(n, int) and n >= 0 for n in kinds.values()):
            raise SpecError("blora_spec: 'kinds' is not an object of module counts")
        return cls(arch, algo, blocks, slots, dim, alpha, {str(k): n for k, n in kinds.items()})

    @classmethod
    def _from_group_json(cls, doc: Mapping) -> "BlockSpec":
        """The spec `merge` wrote before 0.2: `arch`, `alpha` and per paper group `rank`, `alpha`, `conv_rank`,
        `conv_alpha` (no `format`, no `lbw`); every member block gets its group's setting."""
        try:
            arch = Arch(doc.get("arch"))
            layout = table(arch)
        except ValueError:
            raise SpecError(f"blora_spec: unknown arch {doc.get('arch')!r}") from None
        groups = doc["blocks"]
        members = {c.value: (c.value,) for c in layout.text_encoders} | dict(layout.group_members)
        blocks = {b: BlockSetting() for b in layout.blocks}
        for group, entry in groups.items():
            if group not in members:
                raise SpecError(f"blora_spec: unknown {arch.value} group {group!r}")
            setting = BlockSetting.from_dict(entry, f"blocks.{group}")
            for block in members[group]:
                blocks[block] = setting
        algo = Algo.LOCON if any(s.conv_rank for s in blocks.values()) else Algo.LORA
        ranks = Counter(s.rank for s in blocks.values() if s.rank)
        try:
            alpha = float(doc.get("alpha", 1.0))
        except (TypeError, ValueError):
            raise SpecError("blora_spec: 'alpha' is not a number") from None
        return cls(arch, algo, blocks, {}, ranks.most_common(1)[0][0] if ranks else 0, alpha)
