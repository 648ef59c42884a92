"""`--network_args` strings → a BlockSpec and training options; every check of them lives here.

sd-scripts hands each `--network_args` value over as a string (and injects `dropout`, None or a float).
Every key is declared once, in `NETWORK_ARGS` (name, value reader, default, help, the kohya module it comes
from); the known-key set, the "unknown key" message and the README table (`python -m kohya_plugin.args
--markdown`) are derived from it. `parse_network_args` runs, before any model is touched, in stages:

1. `read_strings`: drop None values, refuse unknown keys and keys that exclude each other;
2. `parse_values`: each value through its key's reader (`kohya_plugin.values`), naming the key;
   `_check_unwrapped_terms` then refuses a value given only to layers kohya's rule would ignore (SD's `IN00`;
   BASE's embedders or final layer on Flux.1/SD3 without the `in_dims`/`emb_dims` to train them);
3. `_resolve_grid`: per block, in order —
   defaults (U-Net blocks get `network_dim`/`network_alpha`, text encoders `te_dim`/`te_alpha` (default the
   same), convolutions `conv_dim`/`conv_alpha`: no convolutions unless `conv_dim`, `conv_block_*` or
   `algo=locon`); kohya's positional `block_dims`, `block_alphas`, `conv_block_dims`, `conv_block_alphas`
   (25 values on SD1/SD2: IN00..IN11, MID, OUT00..OUT11; 23 on SDXL: emb, IN00..IN08, middle_block 0..2,
   OUT00..OUT08, out); named `block_ranks`, `block_alphas`, `conv_block_ranks`, `conv_block_alphas`
   (`in0=16,out3=8`; later terms win); `preset` or `blocks` (blocks outside the selection get rank 0);
   learning-rate weights (`block_lr`, or kohya's `down_lr_weight`/`mid_lr_weight`/`up_lr_weight`; a weight at
   or below `block_lr_zero_threshold` (default 0) is 0, and a block with weight 0 is not trained, as kohya);
4. `_build_spec`: the BlockSpec, refusing a configuration that trains nothing;
5. `_options`: dropouts, LoRA+ ratios, verbosity.

Each failure is a `SpecError` (a ValueError) naming the argument and the valid choices. Ranks are only
checked to be whole numbers ≥ 0 here; the upper bound needs the model's layer widths and is checked by
`kohya_plugin.planning`, still before the model is touched.
"""

from __future__ import annotations

import math
import shlex
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import NamedTuple

from blora_tools.errors import SpecError
from blora_tools.spec import Algo, BlockSetting, BlockSpec
from blora_tools.taxonomy.arch import Arch, is_dit
from blora_tools.taxonomy.blocks import OTHER, ArchTable, table
from blora_tools.taxonomy.dit import block_leaves
from blora_tools.taxonomy.selectors import resolve_selector
from kohya_plugin import values as readers
from kohya_plugin.layer_rules import TYPE_DIMS, LayerRules
from kohya_plugin.targets import EMBEDDER_ARGS, embedder_leaves, unwrapped_unet_blocks
from kohya_plugin.values import SlotValues, Terms, preset_selector, text_of

_FIELDS = ("rank", "alpha", "conv_rank", "conv_alpha", "lr_weight")
_EXCLUSIVE = (("preset", "blocks"), ("block_dims", "block_ranks"), ("conv_block_dims", "conv_block_ranks"))
_KOHYA_LR = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")


# --- the table of keys -----------------------------------------------------------------------------------------

BLOCKWISE = "blockwise"
KOHYA_LORA = "networks.lora"
KOHYA_FLUX = "networks.lora_flux"
KOHYA_SD3 = "networks.lora_sd3"
KOHYA_DIT = "networks.lora_flux, networks.lora_sd3"
BOTH = "blockwise (named), networks.lora (positional)"

RANKS, LRS, OPTIONS = "ranks", "learning rates", "options"
"""What a key sets: ranks/alphas/blocks (ignored for a network built from a file), lr weights, other options."""


@dataclass(frozen=True)
class ArgKey:
    """One `--network_args` key: how its string is read, its default, its help and where it comes from."""

    name: str
    reader: Callable[[str, object, ArchTable], object]
    value: str
    """The form of the value, for the README."""
    default: str
    help: str
    origin: str
    """`blockwise` (ours) or the kohya module whose meaning the key keeps."""
    sets: str
    """RANKS, LRS or OPTIONS."""
    archs: str = "all"
    """Where the key exists: `all`, `unet` (SD1/SD2/SDXL), `dit` (Flux.1 and SD3), `flux` or `sd3`."""


NETWORK_ARGS: tuple[ArgKey, ...] = (
    ArgKey("preset", readers.preset,
           "`all`/`character`, `style`/`upper`, `middle`, `bottom`; Flux.1/SD3: `all` or a research preset",
           "all blocks",
           "The paper's settings: train all blocks, or one resolution level (`style` = outermost). On Flux.1/SD3 "
           "the research presets of `blora-tools blocks --arch flux`, each with its source (`splitflux-style` = "
           "S10-S37, `splitflux-content`, `stableflow-vital`, Inspire's `dbl-*`/`sgl-*`; SD3 `slg-layers`).",
           BLOCKWISE, RANKS),
    ArgKey("blocks", readers.selector,
           "selector, e.g. `in0,out3`, `IN04-OUT05`; Flux.1/SD3 `double`, `S10-S37`, `D05.img`", "all blocks",
           "The blocks to train; the rest get rank 0. On Flux.1/SD3 a sub-selector trains only the layers holding "
           "the named parts. Excludes `preset`.", BLOCKWISE, RANKS),
    ArgKey("block_ranks", readers.named_ranks,
           "named ranks, e.g. `in0=16,out3=8`; Flux.1/SD3 `double=8,S10-S37=32,D05.img=16`", "`--network_dim`",
           "Rank per block (selector terms; later terms win; 0 = not trained). A sub-selector gives the layers "
           "holding the part that rank; a fused layer (`qkv`, single `linear1`) is one module, so `D05.img.q` "
           "or `S10.linear1.mlp` trains the whole fused layer with the part's rank.", BLOCKWISE, RANKS),
    ArgKey("block_alphas", readers.alphas,
           "named alphas, or kohya's 25/23 positional values", "`--network_alpha`",
           "Alpha per block (0 = the rank).", BOTH, RANKS),
    ArgKey("conv_dim", readers.rank,
           "whole number ≥ 0", "0 (`--network_dim` with `algo=locon`)",
           "Rank of the 3×3 convolutions (LoCon); 0 = no convolutions.", KOHYA_LORA, RANKS),
    ArgKey("conv_alpha", readers.number,
           "number ≥ 0", "1",
           "Alpha of the convolutions.", KOHYA_LORA, RANKS),
    ArgKey("conv_block_ranks", readers.named_ranks,
           "named ranks", "`conv_dim`",
           "Convolution rank per block.", BLOCKWISE, RANKS),
    ArgKey("conv_block_alphas", readers.alphas,
           "named alphas, or kohya's 25/23 positional values", "`conv_alpha`",
           "Convolution alpha per block.", BOTH, RANKS),
    ArgKey("te_dim", readers.rank,
           "whole number ≥ 0", "`--network_dim`",
           "Text-encoder rank; 0 = no text-encoder adapter.", BLOCKWISE, RANKS),
    ArgKey("te_alpha", readers.number,
           "number ≥ 0", "`--network_alpha`",
           "Text-encoder alpha.", BLOCKWISE, RANKS),
    ArgKey("t5_dim", readers.rank,
           "whole number ≥ 0", "`te_dim`",
           "T5-XXL rank (Flux.1/SD3, needs `train_t5xxl`); its alpha is `te_alpha`.", BLOCKWISE, RANKS, "dit"),
    ArgKey("train_t5xxl", readers.boolean,
           "`true`/`false`", "false",
           "Train T5-XXL too (`lora_te3_`); the trainer then refuses `--cache_text_encoder_outputs`.",
           KOHYA_DIT, RANKS, "dit"),
    ArgKey("train_blocks", readers.train_blocks,
           "`all`, `single`, `double`", "`all`",
           "kohya: train only these Flux.1 blocks (with `preset`/`blocks`: both must allow a block).",
           KOHYA_FLUX, RANKS, "flux"),
    ArgKey("train_double_block_indices", readers.block_indices,
           "`all`, `none`, or 0-based indices and ranges, e.g. `0,2,10-18`", "all",
           "kohya: the double blocks to train (D00 = 0).", KOHYA_FLUX, RANKS, "flux"),
    ArgKey("train_single_block_indices", readers.block_indices,
           "like `train_double_block_indices`", "all",
           "kohya: the single blocks to train (S00 = 0).", KOHYA_FLUX, RANKS, "flux"),
    ArgKey("train_block_indices", readers.block_indices,
           "like `train_double_block_indices`", "all",
           "kohya: the joint blocks to train (J00 = 0).", KOHYA_SD3, RANKS, "sd3"),
    *(ArgKey(key, readers.rank, "whole number ≥ 0", "the block's rank",
             f"kohya: rank of the layers whose name contains {' and '.join(f'`{i}`' for i in ids)} (0 = skip); "
             "replaces the block's rank.", KOHYA_FLUX if arch is Arch.FLUX else KOHYA_SD3, RANKS, arch.value)
      for arch, table_ in TYPE_DIMS.items() for key, ids in table_),
    ArgKey("in_dims", readers.in_dims,
           f"5 ranks `[{EMBEDDER_ARGS[Arch.FLUX][1]}]`", "none",
           "kohya: ranks of Flux.1's embedders (`img_in`, `time_in`, `vector_in`, `guidance_in`, `txt_in`); "
           "0 = skip.", KOHYA_FLUX, RANKS, "flux"),
    ArgKey("emb_dims", readers.emb_dims,
           f"6 ranks `[{EMBEDDER_ARGS[Arch.SD3][1]}]`", "none",
           "kohya: ranks of SD3's embedders and final layer (`x_embedder` is a conv); 0 = skip.",
           KOHYA_SD3, RANKS, "sd3"),
    ArgKey("network_reg_dims", readers.regex_ranks,
           "`regex=rank,…`", "none",
           "kohya: rank of the modules whose name matches the regex (first match; alpha `--network_alpha`); "
           "wins over the per-type dims and block indices.", KOHYA_FLUX, RANKS, "dit"),
    ArgKey("split_qkv", readers.boolean,
           "`true`/`false`", "false",
           "Train q, k, v (and single `linear1`'s mlp rows) as separate LoRAs; saved fused, with the right alpha "
           "(kohya #2204 saves them 3–4× too weak).", KOHYA_DIT, OPTIONS, "dit"),
    ArgKey("algo", readers.algo,
           "`lora`, `locon`", "`locon` when a conv rank is given, else `lora`",
           "Attention layers only, or convolutions too.", BLOCKWISE, RANKS),
    ArgKey("block_dims", readers.positional_ranks,
           "25 (SD1/SD2) or 23 (SDXL) comma-separated ranks", "`--network_dim`",
           "kohya's positional rank per block index. Excludes `block_ranks`.", KOHYA_LORA, RANKS, "unet"),
    ArgKey("conv_block_dims", readers.positional_ranks,
           "25 or 23 comma-separated ranks", "`conv_dim`",
           "kohya's positional convolution rank per block index. Excludes `conv_block_ranks`.", KOHYA_LORA, RANKS,
           "unet"),
    ArgKey("block_lr", readers.named_weights,
           "named weights, e.g. `in0=1,mid=0.5`, `double=1,S10-S37=0.5`, or an LBW vector (Flux 58/57/20/19)",
           "1",
           "Learning-rate weight per block (× the U-Net or text-encoder rate; 0 = not trained).", BLOCKWISE, LRS),
    ArgKey("network_reg_lrs", readers.regex_lrs,
           "`regex=lr,…`", "none",
           "kohya: absolute learning rate of the modules whose name matches the regex (first match).",
           KOHYA_FLUX, LRS, "dit"),
    ArgKey("down_lr_weight", readers.side_lr,
           "12 (SDXL 9) weights, or `cosine`/`sine`/`linear`/`reverse_linear`/`zeros`[+number]", "1",
           "kohya's learning-rate weights of the input blocks (short lists are padded with 1).", KOHYA_LORA, LRS,
           "unet"),
    ArgKey("mid_lr_weight", readers.mid_lr,
           "1 (SDXL 3) weights", "1",
           "kohya's learning-rate weight of the middle block.", KOHYA_LORA, LRS, "unet"),
    ArgKey("up_lr_weight", readers.side_lr,
           "like `down_lr_weight`", "1",
           "kohya's learning-rate weights of the output blocks.", KOHYA_LORA, LRS, "unet"),
    ArgKey("block_lr_zero_threshold", readers.number,
           "number ≥ 0", "0",
           "Learning-rate weights at or below it become 0 (the block is not trained).", KOHYA_LORA, LRS),
    ArgKey("dropout", readers.probability,
           "probability 0 ≤ p < 1", "`--network_dropout`",
           "Dropout of the down projection's output.", KOHYA_LORA, OPTIONS),
    ArgKey("rank_dropout", readers.probability,
           "probability 0 ≤ p < 1", "none",
           "Drops whole ranks per sample.", KOHYA_LORA, OPTIONS),
    ArgKey("module_dropout", readers.probability,
           "probability 0 ≤ p < 1", "none",
           "Skips a whole module per step.", KOHYA_LORA, OPTIONS),
    ArgKey("loraplus_lr_ratio", readers.ratio,
           "ratio > 0", "none",
           "LoRA+: up factors learn this many times faster.", KOHYA_LORA, OPTIONS),
    ArgKey("loraplus_unet_lr_ratio", readers.ratio,
           "ratio > 0", "`loraplus_lr_ratio`",
           "LoRA+ ratio of the U-Net.", KOHYA_LORA, OPTIONS),
    ArgKey("loraplus_text_encoder_lr_ratio", readers.ratio,
           "ratio > 0", "`loraplus_lr_ratio`",
           "LoRA+ ratio of the text encoders.", KOHYA_LORA, OPTIONS),
    ArgKey("verbose", readers.boolean,
           "`true`/`false`, `1`/`0`, `yes`/`no`", "false",
           "Log rank, alpha and learning-rate weight per block.", KOHYA_LORA, OPTIONS),
)
"""Every `--network_args` key, once."""

ARGS_BY_NAME: Mapping[str, ArgKey] = MappingProxyType({a.name: a for a in NETWORK_ARGS})
KNOWN_KEYS: tuple[str, ...] = tuple(sorted(ARGS_BY_NAME))
"""Every `--network_args` key this network module accepts."""
RANK_KEYS: tuple[str, ...] = tuple(a.name for a in NETWORK_ARGS if a.sets == RANKS)
LR_KEYS: tuple[str, ...] = tuple(a.name for a in NETWORK_ARGS if a.sets == LRS)


KEY_MODELS: Mapping[str, str] = MappingProxyType({"all": "all", "unet": "SD1/SD2/SDXL", "dit": "Flux.1, SD3", "flux": "Flux.1",
                                                 "sd3": "SD3"})
"""`ArgKey.archs` → the models column of the README table."""


def network_args_markdown() -> str:
    """The README table of `--network_args` keys, one row per key of `NETWORK_ARGS`."""
    rows = ["| key | value | default | meaning | from | models |", "|---|---|---|---|---|---|"]
    rows += [f"| `{a.name}` | {a.value} | {a.default} | {a.help} | {a.origin} | {KEY_MODELS[a.archs]} |"
             for a in NETWORK_ARGS]
    return "\n".join(rows)


def _key_fits(key: ArgKey, arch: Arch) -> bool:
    if key.archs == "all":
        return True
    if key.archs == "unet":
        return not is_dit(arch)
    if key.archs == "dit":
        return is_dit(arch)
    return key.archs == arch.value


# --- the parsed result -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainOptions:
    """Per-network training options that are not per block."""

    dropout: float | None = None
    rank_dropout: float | None = None
    module_dropout: float | None = None
    loraplus_lr_ratio: float | None = None
    loraplus_unet_lr_ratio: float | None = None
    loraplus_text_encoder_lr_ratio: float | None = None
    verbose: bool = False
    split_qkv: bool = False
    """Flux.1/SD3: fused q|k|v (and single linear1's mlp) layers trained as one LoRA per part."""

    @property
    def unet_plus_ratio(self) -> float | None:
        return self.loraplus_unet_lr_ratio or self.loraplus_lr_ratio

    @property
    def te_plus_ratio(self) -> float | None:
        return self.loraplus_text_encoder_lr_ratio or self.loraplus_lr_ratio


@dataclass(frozen=True)
class NetworkArgs:
    """The parsed `--network_args`: the spec, the options, and what the parser wants said."""

    spec: BlockSpec
    options: TrainOptions
    explicit_blocks: bool
    """The user chose blocks or per-block ranks (so empty blocks deserve a warning)."""
    lr_given: bool
    """Some learning-rate weight was given."""
    notes: tuple[str, ...] = ()
    """Warnings to show (kohya lists padded, arguments ignored)."""
    chooser: str = "network_args"
    """How the blocks were chosen, for messages (`preset=style`, `blocks=in0,out3`)."""
    rules: LayerRules | None = None
    """Per-layer rules on Flux.1/SD3 (sub-selectors, kohya's lora_flux/lora_sd3 arguments); None on U-Nets."""


class WeightsArgs(NamedTuple):
    """The `--network_args` of a network built from a file: learning-rate weights and options only."""

    lr_block: Mapping[str, float]
    """Learning-rate weight per block."""
    lr_slot: Mapping[int, float]
    """Per SDXL middle-block kohya slot, where the three differ (else empty)."""
    options: TrainOptions
    lr_given: bool
    notes: tuple[str, ...]
    rules: LayerRules | None = None
    """Flux.1/SD3: sub-selector learning-rate weights and `network_reg_lrs`."""


def split_network_args(text: str) -> dict[str, str]:
    """Split `"preset=style conv_dim=8 block_ranks='in0=16,out3=8'"` into a key → value dict (shell quoting)."""
    try:
        words = shlex.split(text)
    except ValueError as err:
        raise SpecError(f"network_args {text!r}: {err}") from None
    result: dict[str, str] = {}
    for word in words:
        key, sep, value = word.partition("=")
        if not sep or not key:
            raise SpecError(f"network_args: {word!r} is not key=value (e.g. preset=style)")
        if key in result:
            raise SpecError(f"network_args: {key} is given twice")
        result[key] = value
    return result


def read_multiplier(value: object) -> float:
    """The trainer's multiplier (ΔW strength) as a finite float; SpecError otherwise (NaN would poison outputs)."""
    try:
        result = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise SpecError(f"multiplier {value!r} is not a number") from None
    if not math.isfinite(result):
        raise SpecError(f"multiplier {value!r} is not finite; give a number such as 1.0")
    return result


# --- stage 1 and 2: strings, then values ----------------------------------------------------------------------


def read_strings(args: Mapping[str, object], arch: Arch) -> dict[str, object]:
    """The given keys (None values dropped), after refusing unknown keys, keys of other architectures and keys
    that exclude each other."""
    kw = {k: v for k, v in args.items() if v is not None}
    unknown = sorted(set(kw) - set(ARGS_BY_NAME))
    if unknown:
        known = [k for k in KNOWN_KEYS if _key_fits(ARGS_BY_NAME[k], arch)]
        raise SpecError(
            f"network_args: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"known keys on {arch.value}: {', '.join(known)}"
        )
    foreign = [k for k in kw if not _key_fits(ARGS_BY_NAME[k], arch)]
    if foreign:
        key = ARGS_BY_NAME[foreign[0]]
        raise SpecError(
            f"network_args: {key.name} is a {KEY_MODELS[key.archs]} argument ({key.origin}) and means nothing on "
            f"{arch.value}; see `python -m kohya_plugin.args --markdown`"
        )
    for a, b in _EXCLUSIVE:
        if a in kw and b in kw:
            raise SpecError(f"network_args: give {a} or {b}, not both")
    kohya_lr = [k for k in _KOHYA_LR if k in kw]
    if kohya_lr and "block_lr" in kw:
        raise SpecError(f"network_args: give block_lr or kohya's {'/'.join(kohya_lr)}, not both")
    return kw


def parse_values(kw: Mapping[str, object], layout: ArchTable) -> dict[str, object]:
    """Every given value through its key's reader, in table order (so the first bad key is reported)."""
    return {a.name: a.reader(a.name, kw[a.name], layout) for a in NETWORK_ARGS if a.name in kw}


# --- stage 3: the per-unit grid --------------------------------------------------------------------------------

_Unit = tuple[str, "int | None"]


class _Grid:
    """Values per unit while resolving. A unit is a block, except SDXL's middle block: its three kohya slots."""

    def __init__(self, layout: ArchTable, defaults: Mapping[str, Mapping[str, float]]):
        self.layout = layout
        self.units: list[_Unit] = []
        for block in layout.blocks:
            if block == "M00" and layout.arch is Arch.SDXL:
                self.units += [("M00", s) for s in layout.mid_slots]
            else:
                self.units.append((block, None))
        te_names = {c.value for c in layout.text_encoders}

        def kind(block: str) -> str:
            if block == "te3" and "t5" in defaults:
                return "t5"
            return "te" if block in te_names else "unet"

        self.values = {u: dict(defaults[kind(u[0])]) for u in self.units}

    def units_of(self, blocks: Iterable[str]) -> list[_Unit]:
        blocks = set(blocks)
        return [u for u in self.units if u[0] in blocks]

    def unit_of_slot(self, slot: int) -> _Unit:
        block = self.layout.kohya_slots[slot]
        return ("M00", slot) if (block == "M00" and self.layout.arch is Arch.SDXL) else (block, None)

    def set(self, name: str, blocks: Iterable[str], value: float) -> None:
        for unit in self.units_of(blocks):
            self.values[unit][name] = value

    def set_terms(self, name: str, terms: Terms) -> None:
        for blocks, value in terms:
            self.set(name, blocks, value)

    def set_slots(self, name: str, values: list[float]) -> None:
        for slot, value in enumerate(values):
            if self.layout.arch is Arch.SDXL and slot == 0:
                continue  # slots 0 (embeddings) and 22 (out) are both `OTHER`; kohya targets neither
            self.values[self.unit_of_slot(slot)][name] = value

    def to_spec(self, spec_algo: Algo, dim: int, alpha: float) -> BlockSpec:
        blocks: dict[str, BlockSetting] = {}
        slots: dict[int, BlockSetting] = {}
        for unit in self.units:
            block, slot = unit
            setting = BlockSetting(**{k: self.values[unit][k] for k in _FIELDS})
            if slot is None:
                blocks[block] = setting
            else:
                slots[slot] = setting
        if slots:
            distinct = set(slots.values())
            if len(distinct) == 1:
                blocks["M00"] = distinct.pop()
                slots = {}
            else:
                blocks["M00"] = max(slots.values(), key=lambda s: (s.rank, s.conv_rank))
        return BlockSpec(self.layout.arch, spec_algo, blocks, slots, dim, alpha)


def _defaults(values: Mapping[str, object], dim: int, alpha: float) -> dict[str, dict[str, float]]:
    """Stage 3a: the starting numbers of U-Net and text-encoder blocks."""
    algo = values.get("algo")
    conv_args = [k for k in ("conv_dim", "conv_block_dims", "conv_block_ranks") if k in values]
    if algo is Algo.LORA and conv_args:
        raise SpecError(
            f"network_args: algo=lora trains no convolutions but {', '.join(conv_args)} is given; "
            "use algo=locon or drop it"
        )
    conv_dim = values.get("conv_dim", dim if algo is Algo.LOCON else 0)
    conv_alpha = values.get("conv_alpha", 1.0)
    te_dim = values.get("te_dim", dim)
    te_alpha = values.get("te_alpha", alpha)
    result = {
        "unet": {"rank": dim, "alpha": alpha, "conv_rank": conv_dim, "conv_alpha": conv_alpha, "lr_weight": 1.0},
        "te": {"rank": te_dim, "alpha": te_alpha, "conv_rank": 0, "conv_alpha": conv_alpha, "lr_weight": 1.0},
    }
    if "t5_dim" in values and not values.get("train_t5xxl", False):
        raise SpecError("network_args: t5_dim needs train_t5xxl=true (T5-XXL is trained only then, as in kohya)")
    if "train_t5xxl" in values or "t5_dim" in values:
        t5_dim = values.get("t5_dim", te_dim) if values.get("train_t5xxl") else 0
        result["t5"] = {**result["te"], "rank": t5_dim}
    return result


def _apply_ranks(values: Mapping[str, object], grid: _Grid) -> None:
    """Stage 3b: kohya's positional lists, then named ranks and alphas (later terms win)."""
    for key, name in (("block_dims", "rank"), ("conv_block_dims", "conv_rank")):
        if key in values:
            grid.set_slots(name, values[key])
    for key, name in (("block_alphas", "alpha"), ("conv_block_alphas", "conv_alpha")):
        given = values.get(key)
        if isinstance(given, SlotValues):
            grid.set_slots(name, list(given.values))
        elif given is not None:
            grid.set_terms(name, given)
    for key, name in (("block_ranks", "rank"), ("conv_block_ranks", "conv_rank")):
        if key in values:
            grid.set_terms(name, values[key])


def _selection(values: Mapping[str, object], kw: Mapping[str, object],
               layout: ArchTable) -> tuple[frozenset[str] | None, str]:
    """Stage 3c: the blocks `preset` or `blocks` selects (None: no selection) and how to name the choice."""
    if "preset" in values:
        preset = values["preset"]
        return resolve_selector(preset_selector(preset, layout), layout.arch), f"preset={preset}"
    if "blocks" in values:
        return values["blocks"], f"blocks={text_of(kw['blocks'])}"
    return None, "network_args"


def _restrict(values: Mapping[str, object], grid: _Grid, selected: frozenset[str], chooser: str) -> None:
    """Stage 3d: rank 0 outside the selection; refuse ranks given for blocks the selection leaves out."""
    layout = grid.layout
    te_names = {c.value for c in layout.text_encoders}
    te_dim = values.get("te_dim", 0)
    selected = _blocks_of(selected)
    if te_dim > 0 and not (te_names & selected):
        raise SpecError(
            f"network_args: te_dim={te_dim} but {chooser} trains no text encoder; add te to blocks= or drop te_dim"
        )
    for key in ("block_ranks", "conv_block_ranks"):
        for chosen, value in values.get(key, ()):
            blocks = _blocks_of(chosen)
            outside = sorted(blocks - selected)
            if value > 0 and outside and not (blocks & selected):
                raise SpecError(
                    f"network_args: {key} gives {', '.join(outside)} rank {value} but {chooser} does not train "
                    f"{'it' if len(outside) == 1 else 'them'}; add it to blocks= or drop it from {key}"
                )
    unselected = [b for b in layout.blocks if b not in selected]
    grid.set("rank", unselected, 0)
    grid.set("conv_rank", unselected, 0)


def _blocks_of(chosen: frozenset[str]) -> frozenset[str]:
    """The blocks of a selection that may hold atoms `D05:img.attn.q` (the block of a chosen part)."""
    return frozenset(item.partition(":")[0] for item in chosen)


def _apply_lr_weights(values: Mapping[str, object], grid: _Grid, notes: list[str]) -> bool:
    """Stage 3e: learning-rate weights into the grid (kohya lists padded with 1, with a note); True when given."""
    if "block_lr" in values:
        grid.set_terms("lr_weight", values["block_lr"])
    if any(k in values for k in _KOHYA_LR):
        side, mid = readers.lr_lengths(grid.layout)
        lists = []
        for key, length in zip(_KOHYA_LR, (side, mid, side)):
            given = list(values.get(key, ()))
            if key in values and len(given) < length:
                notes.append(f"{key}: {len(given)} of {length} values given; the rest are 1 (as kohya)")
            lists.append(given + [1.0] * (length - len(given)))
        slots = lists[0] + lists[1] + lists[2]
        grid.set_slots("lr_weight", [1.0, *slots, 1.0] if grid.layout.arch is Arch.SDXL else slots)
    threshold = values.get("block_lr_zero_threshold", 0.0)
    for unit_values in grid.values.values():
        if unit_values["lr_weight"] <= threshold:
            unit_values["lr_weight"] = 0.0
    return any(k in values for k in ("block_lr", *_KOHYA_LR))


def _resolve_grid(values: Mapping[str, object], kw: Mapping[str, object], layout: ArchTable, dim: int,
                  alpha: float, notes: list[str]) -> tuple[_Grid, str, bool]:
    """Stage 3: every block's numbers. Returns (grid, chooser, whether lr weights were given)."""
    grid = _Grid(layout, _defaults(values, dim, alpha))
    _apply_ranks(values, grid)
    selected, chooser = _selection(values, kw, layout)
    if selected is not None:
        _restrict(values, grid, selected, chooser)
    lr_given = _apply_lr_weights(values, grid, notes)
    for unit_values in grid.values.values():
        if unit_values["lr_weight"] == 0:
            unit_values["rank"] = 0
            unit_values["conv_rank"] = 0
    return grid, chooser, lr_given


# --- stage 4 and 5: the spec and the options -------------------------------------------------------------------


def _build_spec(values: Mapping[str, object], kw: Mapping[str, object], grid: _Grid, dim: int,
                alpha: float) -> BlockSpec:
    """Stage 4: the BlockSpec; refuses a configuration that trains nothing or asks for convolutions it lacks."""
    layout = grid.layout
    algo = values.get("algo")
    spec_algo = algo or (Algo.LOCON if any(v["conv_rank"] > 0 for v in grid.values.values()) else Algo.LORA)
    spec = grid.to_spec(spec_algo, dim, alpha)
    # IN00 and OTHER (conv_in, embeddings, conv_out) are outside every paper group and never targeted.
    if not any(layout.group_of(b) != "none" for b in spec.trained_blocks):
        raise SpecError(
            "network_args: this configuration trains nothing (every block has rank 0 or learning-rate weight 0); "
            f"check network_dim, preset/blocks, block_ranks/block_dims and the lr weights ({_describe(kw)})"
        )
    if algo is Algo.LOCON and not spec.include_conv:
        raise SpecError("network_args: algo=locon but no block has a conv rank > 0; set conv_dim=N")
    conv_alphas = [k for k in ("conv_alpha", "conv_block_alphas") if k in values]
    if conv_alphas and not spec.include_conv:
        raise SpecError(
            f"network_args: {', '.join(conv_alphas)} given but no convolution is trained; add conv_dim=N or drop it"
        )
    return spec


def _options(values: Mapping[str, object], neuron_dropout: float | None) -> TrainOptions:
    """Stage 5: options that are not per block; the `dropout` key wins over the trainer's `--network_dropout`."""
    dropout = values.get("dropout")
    if dropout is None and neuron_dropout is not None:
        dropout = readers.probability("dropout", neuron_dropout)
    return TrainOptions(
        dropout=dropout,
        rank_dropout=values.get("rank_dropout"),
        module_dropout=values.get("module_dropout"),
        loraplus_lr_ratio=values.get("loraplus_lr_ratio"),
        loraplus_unet_lr_ratio=values.get("loraplus_unet_lr_ratio"),
        loraplus_text_encoder_lr_ratio=values.get("loraplus_text_encoder_lr_ratio"),
        verbose=values.get("verbose", False),
        split_qkv=values.get("split_qkv", False),
    )


def _base_numbers(network_dim: object, network_alpha: object) -> tuple[int, float]:
    dim = 4 if network_dim is None else readers.rank("network_dim", network_dim)
    alpha = 1.0 if network_alpha is None else readers.number("network_alpha", network_alpha)
    return dim, alpha


def parse_network_args(
    args: Mapping[str, object],
    arch: Arch | str,
    network_dim: object = None,
    network_alpha: object = None,
    neuron_dropout: float | None = None,
) -> NetworkArgs:
    """Resolve `--network_args` (strings; None values are ignored) into a BlockSpec and options.

    `network_dim` (None → 4) and `network_alpha` (None → 1.0) are the trainer's `--network_dim` and
    `--network_alpha`; `neuron_dropout` its `--network_dropout` (a `dropout` key wins over it).
    """
    layout = table(arch)
    kw = read_strings(args, layout.arch)
    dim, alpha = _base_numbers(network_dim, network_alpha)
    values = parse_values(kw, layout)
    options = _options(values, neuron_dropout)
    notes: list[str] = []
    _check_unwrapped_terms(values, kw, layout, dim)
    grid, chooser, lr_given = _resolve_grid(values, kw, layout, dim, alpha, notes)
    spec = _build_spec(values, kw, grid, dim, alpha)
    explicit = any(k in kw for k in ("preset", "blocks", "block_ranks", "block_dims", "conv_block_ranks",
                                     "conv_block_dims"))
    rules = _layer_rules(values, layout, _selection(values, kw, layout)[0], alpha) if is_dit(layout.arch) else None
    return NetworkArgs(spec, options, explicit, lr_given, tuple(notes), chooser, rules)


def _check_unwrapped_terms(values: Mapping[str, object], kw: Mapping[str, object], layout: ArchTable,
                           dim: int) -> None:
    """Stage 2b: refuse a term that names only layers kohya's rule leaves unwrapped (alone or with text encoders),
    where its value would be dropped in silence; it is refused before any model is touched, as `t5_dim` without
    `train_t5xxl` is. On SD1/SD2/SDXL those are the U-Net blocks where `networks.lora` wraps nothing, even with
    conv targets (`IN00`: `conv_in`; `targets.unwrapped_unet_blocks`). On Flux.1/SD3 they are BASE's
    transformer layers (the embedders and final layer), which get a module only through `in_dims`/`emb_dims`,
    always with alpha `--network_alpha`, and Flux.1's final layer never (`layer_rules`). A value of 0, LBW
    vectors, and selections that also name blocks kohya wraps (`all`, presets, `BASE,D05`, `IN00-IN02`), pass."""
    asked: list[tuple[str, frozenset[str], int, bool]] = []
    for name, what in (("block_ranks", "rank"), ("block_alphas", "alpha"), ("block_lr", "learning-rate weight")):
        terms = _lr_terms(values) if name == "block_lr" else values.get(name, ())
        if name in kw and not isinstance(terms, SlotValues) and not readers.is_vector(kw[name]):
            asked += [(f"{name} gives {{}} {what} {value:g}", chosen,
                       int(value) if name == "block_ranks" else dim, name == "block_alphas")
                      for chosen, value in terms if value > 0]
    if "blocks" in values:
        asked.append((f"blocks={text_of(kw['blocks'])} selects {{}}", values["blocks"], dim, False))
    dit = is_dit(layout.arch)
    unwrapped = {OTHER: ()} if dit else unwrapped_unet_blocks(layout.arch)
    te_names = {c.value for c in layout.text_encoders}
    for said, chosen, rank, is_alpha in asked:
        idle = frozenset(item for item in chosen if item.partition(":")[0] in unwrapped)
        if not idle or not chosen <= idle | te_names:
            continue
        if dit:
            problem = _base_problem(values, layout.arch, idle, rank, is_alpha)
            shown = "BASE" if OTHER in idle else ",".join(f"base.{i.partition(':')[2]}" for i in sorted(idle))
        else:
            layers = ", ".join(layer for block in sorted(idle) for layer in unwrapped[block])
            problem = f"kohya's networks.lora wraps no layer there ({layers}); drop it"
            shown = ",".join(sorted(idle))
        if problem:
            raise SpecError(f"network_args: {said.format(shown)}, but {problem}")


def _base_problem(values: Mapping[str, object], arch: Arch, base: frozenset[str], rank: int,
                  is_alpha: bool) -> str | None:
    """Why kohya's rule ignores a value given to these BASE items (`OTHER`, atoms `OTHER:in.img`), or None."""
    key, slots = EMBEDDER_ARGS[arch]
    reachable = embedder_leaves(arch)
    named = reachable if OTHER in base else frozenset(i.partition(":")[2] for i in base) & reachable
    if not named:
        return f"kohya trains no such layer on {arch.value} ({key}=[{slots}] does not reach it); drop it"
    if any(values.get(key, ())):
        return f"{key} trains them with alpha --network_alpha (as kohya); drop it" if is_alpha else None
    never = sorted({leaf.name for leaf in block_leaves(arch, None)} - reachable)
    example = ",".join([str(rank)] * len(slots.split(",")))
    return (f"kohya trains BASE's layers only through {key}=[{slots}]"
            f"{''.join(f' and base.{leaf} never' for leaf in never)}; add e.g. {key}=[{example}] or drop it")


def _lr_terms(values: Mapping[str, object]) -> tuple[tuple[frozenset[str], float], ...]:
    """`block_lr` terms with weights at or below `block_lr_zero_threshold` made 0 (as the grid does)."""
    threshold = values.get("block_lr_zero_threshold", 0.0)
    return tuple((chosen, 0.0 if value <= threshold else value) for chosen, value in values.get("block_lr", ()))


def _layer_rules(values: Mapping[str, object], layout: ArchTable, selection: frozenset[str] | None,
                 alpha: float) -> LayerRules:
    """Stage 6 (Flux.1/SD3): the per-layer rules (`kohya_plugin.layer_rules`)."""
    alphas = values.get("block_alphas", ())
    terms = {"rank": tuple(values.get("block_ranks", ())),
             "alpha": tuple(alphas) if not isinstance(alphas, SlotValues) else (),
             "lr_weight": _lr_terms(values)}
    allowed: frozenset[str] | None = None
    train_blocks = values.get("train_blocks", "all")
    if train_blocks != "all":
        allowed = frozenset(layout.group_members[train_blocks])
    for key in ("train_double_block_indices", "train_single_block_indices", "train_block_indices"):
        if key in values:
            letter = readers.block_indices(key, "all", layout)
            others = frozenset(layout.unet_lbw) - letter
            chosen = values[key] | others
            allowed = chosen if allowed is None else allowed & chosen
    type_dims = tuple((ids, values[key]) for key, ids in TYPE_DIMS.get(layout.arch, ()) if key in values)
    return LayerRules(
        terms=terms,
        selection=selection,
        kohya_blocks=allowed,
        type_dims=type_dims,
        embedder_dims=values.get("in_dims") or values.get("emb_dims") or (),
        reg_dims=values.get("network_reg_dims", ()),
        reg_lrs=values.get("network_reg_lrs", ()),
        t5=values.get("train_t5xxl", False),
        network_alpha=alpha,
    )


def parse_weights_args(args: Mapping[str, object], arch: Arch | str,
                       neuron_dropout: float | None = None) -> WeightsArgs:
    """For a network built from a file: learning-rate weights and options only; rank keys are noted as ignored."""
    layout = table(arch)
    kw = read_strings(args, layout.arch)
    notes: list[str] = []
    ignored = sorted(k for k in kw if k in RANK_KEYS)
    if ignored:
        notes.append(f"network_args {', '.join(ignored)} ignored: ranks and alphas come from the weights file")
    values = parse_values({k: v for k, v in kw.items() if k not in RANK_KEYS}, layout)
    defaults = {"rank": 0, "alpha": 1.0, "conv_rank": 0, "conv_alpha": 1.0, "lr_weight": 1.0}
    grid = _Grid(layout, {"unet": defaults, "te": defaults})
    lr_given = _apply_lr_weights(values, grid, notes)
    per_block: dict[str, float] = {}
    per_slot: dict[int, float] = {}
    for (block, slot), unit_values in grid.values.items():
        if slot is None:
            per_block[block] = unit_values["lr_weight"]
        else:
            per_slot[slot] = unit_values["lr_weight"]
    if len(set(per_slot.values())) <= 1:
        per_block["M00"] = next(iter(per_slot.values()), per_block.get("M00", 1.0))
        per_slot = {}
    else:
        per_block["M00"] = max(per_slot.values())
    rules = None
    if is_dit(layout.arch):
        rules = LayerRules(terms={"lr_weight": _lr_terms(values)}, reg_lrs=values.get("network_reg_lrs", ()))
    return WeightsArgs(per_block, per_slot, _options(values, neuron_dropout), lr_given, tuple(notes), rules)


def _describe(kw: Mapping[str, object]) -> str:
    shown = [f"{k}={text_of(v)}" for k, v in kw.items() if k in RANK_KEYS + LR_KEYS]
    return " ".join(shown) if shown else "no network_args"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m kohya_plugin.args --markdown   (prints the README table of --network_args keys)")
    print(network_args_markdown())
