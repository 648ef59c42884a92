"""`--network_args` strings → a BlockSpec and training options; every check lives here.

sd-scripts hands each `--network_args` value over as a string (and injects `dropout`, None or a float).
`parse_network_args` reads them all, before any model is touched, and raises `SpecError` naming the argument
and the valid choices for an unknown key, a bad value, a contradiction or a configuration that trains nothing.

Resolution order, per block (DESIGN.md §4):
1. defaults: U-Net blocks get `network_dim`/`network_alpha`, text encoders `te_dim`/`te_alpha` (default the same),
   convolutions `conv_dim`/`conv_alpha` (no convolutions unless `conv_dim`, `conv_block_*` or `algo=locon`);
2. kohya's positional `block_dims`, `block_alphas`, `conv_block_dims`, `conv_block_alphas` (25 values on
   SD1/SD2: IN00..IN11, MID, OUT00..OUT11; 23 on SDXL: emb, IN00..IN08, middle_block 0..2, OUT00..OUT08, out);
3. named `block_ranks`, `block_alphas`, `conv_block_ranks`, `conv_block_alphas` (`in0=16,out3=8`; later terms win);
4. `preset` or `blocks`: blocks outside the selection get rank 0;
5. learning-rate weights (`block_lr`, or kohya's `down_lr_weight`/`mid_lr_weight`/`up_lr_weight`); a weight
   at or below `block_lr_zero_threshold` (default 0) is 0, and a block with weight 0 is not trained (as kohya).
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from blora_tools.errors import SelectorError, SpecError
from blora_tools.spec import Algo, BlockSetting, BlockSpec
from blora_tools.taxonomy.arch import Arch
from blora_tools.taxonomy.blocks import ArchTable, table
from blora_tools.taxonomy.selectors import resolve_selector, resolve_term
from blora_tools.taxonomy.weights import parse_weights

PRESETS: Mapping[str, str] = MappingProxyType(
    {
        "all": "all",
        "character": "all",
        "style": "upper",
        "upper": "upper",
        "middle": "middle",
        "bottom": "bottom",
    }
)
"""`preset` values and the selector each stands for (the paper's settings; `style` = `upper`)."""

LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
"""kohya's named `down_lr_weight`/`up_lr_weight` curves (optionally `+number`)."""

RANK_KEYS = (
    "preset", "blocks", "block_ranks", "block_alphas", "conv_dim", "conv_alpha", "conv_block_ranks",
    "conv_block_alphas", "te_dim", "te_alpha", "algo", "block_dims", "conv_block_dims",
)
LR_KEYS = ("block_lr", "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold")
OPTION_KEYS = (
    "dropout", "rank_dropout", "module_dropout", "loraplus_lr_ratio", "loraplus_unet_lr_ratio",
    "loraplus_text_encoder_lr_ratio", "verbose",
)
KNOWN_KEYS = tuple(sorted(RANK_KEYS + LR_KEYS + OPTION_KEYS))
"""Every `--network_args` key this network module accepts."""

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_FIELDS = ("rank", "alpha", "conv_rank", "conv_alpha", "lr_weight")
_KOHYA_FORM = MappingProxyType(
    {
        "block_ranks": "block_dims",
        "conv_block_ranks": "conv_block_dims",
        "block_lr": "down_lr_weight/mid_lr_weight/up_lr_weight",
    }
)
_MID_SLOTS = (10, 11, 12)  # SDXL middle_block_0..2 in kohya's 23-slot order


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


# --- value readers ---------------------------------------------------------------------------------


def _text(key: str, raw: object) -> str:
    return raw.strip() if isinstance(raw, str) else str(raw)


def _fail(key: str, raw: object, problem: str) -> SpecError:
    return SpecError(f"network_args {key}={_text(key, raw)!r}: {problem}")


def _int(key: str, raw: object) -> int:
    text = _text(key, raw)
    try:
        value = int(text)
    except ValueError:
        raise _fail(key, raw, f"not a whole number; give a rank ≥ 0, e.g. {key}=8") from None
    if value < 0:
        raise _fail(key, raw, "a rank cannot be negative; 0 means not trained")
    return value


def _float(key: str, raw: object, *, what: str = "a number ≥ 0", upper: float | None = None) -> float:
    text = _text(key, raw)
    try:
        value = float(text)
    except ValueError:
        raise _fail(key, raw, f"not a number; give {what}") from None
    if not math.isfinite(value) or value < 0 or (upper is not None and value >= upper):
        raise _fail(key, raw, f"out of range; give {what}")
    return value


def _probability(key: str, raw: object) -> float:
    return _float(key, raw, what="a probability 0 ≤ p < 1", upper=1.0)


def _ratio(key: str, raw: object) -> float:
    value = _float(key, raw, what="a ratio > 0, e.g. 16")
    if value == 0:
        raise _fail(key, raw, "out of range; give a ratio > 0, e.g. 16")
    return value


def _bool(key: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    text = _text(key, raw).lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise _fail(key, raw, "not a boolean; use true/false, 1/0 or yes/no")


def _choice(key: str, raw: object, choices: Iterable[str]) -> str:
    text = _text(key, raw).lower()
    choices = tuple(choices)
    if text not in choices:
        raise _fail(key, raw, f"unknown value; choose one of {', '.join(choices)}")
    return text


def _positional(key: str, raw: object, layout: ArchTable, *, whole: bool) -> list[float]:
    """A kohya positional list: exactly 25 (SD1/SD2) or 23 (SDXL) comma-separated values."""
    n = len(layout.kohya_slots)
    parts = [p.strip() for p in _text(key, raw).split(",")]
    if len(parts) != n:
        order = (
            "emb, IN00..IN08, middle_block 0..2, OUT00..OUT08, out"
            if layout.arch is Arch.SDXL
            else "IN00..IN11, MID, OUT00..OUT11"
        )
        raise _fail(key, raw, f"{layout.arch.value} takes {n} comma-separated values ({order}), not {len(parts)}")
    reader = _int if whole else _float
    return [reader(key, p) for p in parts]


# --- the per-unit grid -----------------------------------------------------------------------------

_Unit = tuple[str, "int | None"]


class _Grid:
    """Values per unit while resolving. A unit is a block, except SDXL's middle block: its three kohya slots."""

    def __init__(self, layout: ArchTable, defaults: Mapping[str, Mapping[str, float]]):
        self.layout = layout
        self.units: list[_Unit] = []
        for block in layout.blocks:
            if block == "M00" and layout.arch is Arch.SDXL:
                self.units += [("M00", s) for s in _MID_SLOTS]
            else:
                self.units.append((block, None))
        te_names = {c.value for c in layout.text_encoders}
        self.values = {u: dict(defaults["te" if u[0] in te_names else "unet"]) for u in self.units}

    def units_of(self, blocks: Iterable[str]) -> list[_Unit]:
        blocks = set(blocks)
        return [u for u in self.units if u[0] in blocks]

    def unit_of_slot(self, slot: int) -> _Unit:
        block = self.layout.kohya_slots[slot]
        return ("M00", slot) if (block == "M00" and self.layout.arch is Arch.SDXL) else (block, None)

    def set(self, name: str, blocks: Iterable[str], value: float) -> None:
        for unit in self.units_of(blocks):
            self.values[unit][name] = value

    def set_slots(self, name: str, values: list[float]) -> None:
        for slot, value in enumerate(values):
            if self.layout.arch is Arch.SDXL and slot == 0:
                continue  # slots 0 (embeddings) and 22 (out) are both `OTHER`; kohya targets neither
            self.values[self.unit_of_slot(slot)][name] = value

    def to_spec(self, algo: Algo, dim: int, alpha: float) -> BlockSpec:
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
        return BlockSpec(self.layout.arch, algo, blocks, slots, dim, alpha)


# --- parsing ---------------------------------------------------------------------------------------


def _present(args: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in args.items() if v is not None}


def _check_keys(kw: Mapping[str, object]) -> None:
    unknown = sorted(set(kw) - set(KNOWN_KEYS))
    if unknown:
        raise SpecError(
            f"network_args: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; "
            f"known keys: {', '.join(KNOWN_KEYS)}"
        )
    for a, b in (("preset", "blocks"), ("block_dims", "block_ranks"), ("conv_block_dims", "conv_block_ranks")):
        if a in kw and b in kw:
            raise SpecError(f"network_args: give {a} or {b}, not both")
    kohya_lr = [k for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight") if k in kw]
    if kohya_lr and "block_lr" in kw:
        raise SpecError(f"network_args: give block_lr or kohya's {'/'.join(kohya_lr)}, not both")


def _named(key: str, raw: object, layout: ArchTable, *, whole: bool) -> list[tuple[frozenset[str], float]]:
    """Named weights (`in0=16,out3=8`, or an LBW vector) → [(blocks, value)] in order; values checked."""
    text = _text(key, raw)
    if "=" not in text and len(text.split(",")) == len(layout.kohya_slots) and key in _KOHYA_FORM:
        raise _fail(key, raw, f"{len(layout.kohya_slots)} positional values are kohya's form: use "
                              f"{_KOHYA_FORM[key]}, or name blocks (in0=16,out3=8)")
    try:
        parsed = parse_weights(text)
        if parsed.vector is not None:
            weights = parsed.resolve(layout.arch)
            terms = [(frozenset({b}), v) for b, v in weights.values.items()]
        else:
            terms = [(resolve_term(term, layout), v) for term, v in parsed.named]
    except SelectorError as err:
        raise _fail(key, raw, err.message) from None
    for _, value in terms:
        if value < 0 or (whole and value != int(value)):
            raise _fail(key, raw, f"{value:g} is not {'a whole number ≥ 0' if whole else 'a number ≥ 0'}")
    return [(blocks, int(v) if whole else float(v)) for blocks, v in terms]


def _alpha_arg(key: str, raw: object, layout: ArchTable) -> tuple[list[float] | None, list | None]:
    """`block_alphas` / `conv_block_alphas`: kohya's positional list when it has 25/23 plain numbers, else named."""
    text = _text(key, raw)
    parts = text.split(",")
    if len(parts) == len(layout.kohya_slots) and "=" not in text:
        return _positional(key, raw, layout, whole=False), None
    return None, _named(key, raw, layout, whole=False)


def _kohya_lr_list(key: str, raw: object, length: int, notes: list[str], *, preset_ok: bool) -> list[float]:
    """kohya's down/up (`preset[+base]` or values) or mid lr-weight list, padded with 1 when short."""
    text = _text(key, raw)
    if "," not in text and preset_ok:
        name, plus, base_text = text.partition("+")
        if name not in LR_WEIGHT_PRESETS:
            raise _fail(
                key, raw,
                f"give {length} comma-separated weights or a preset: {', '.join(LR_WEIGHT_PRESETS)} "
                "(optionally +number, e.g. sine+0.5)",
            )
        base = _float(key, base_text) if plus else 0.0
        steps = [i / (length - 1) for i in range(length)]
        curve = {
            "sine": [math.sin(math.pi * s / 2) for s in steps],
            "cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)],
            "linear": steps,
            "reverse_linear": list(reversed(steps)),
            "zeros": [0.0] * length,
        }[name]
        return [w + base for w in curve]
    values = [(_float(key, p) if p.strip() else 0.0) for p in text.split(",")]
    if len(values) > length:
        raise _fail(key, raw, f"takes at most {length} values, not {len(values)}")
    if len(values) < length:
        notes.append(f"{key}: {len(values)} of {length} values given; the rest are 1 (as kohya)")
        values += [1.0] * (length - len(values))
    return values


def _lr_weights(kw: Mapping[str, object], grid: _Grid, notes: list[str]) -> bool:
    """Apply learning-rate weights to the grid; True when any was given."""
    layout = grid.layout
    given = False
    if "block_lr" in kw:
        given = True
        for blocks, value in _named("block_lr", kw["block_lr"], layout, whole=False):
            grid.set("lr_weight", blocks, value)
    kohya = {k: kw[k] for k in ("down_lr_weight", "mid_lr_weight", "up_lr_weight") if k in kw}
    if kohya:
        given = True
        xl = layout.arch is Arch.SDXL
        side, mid = (9, 3) if xl else (12, 1)
        down = _kohya_lr_list("down_lr_weight", kohya["down_lr_weight"], side, notes, preset_ok=True) \
            if "down_lr_weight" in kohya else [1.0] * side
        middle = _kohya_lr_list("mid_lr_weight", kohya["mid_lr_weight"], mid, notes, preset_ok=False) \
            if "mid_lr_weight" in kohya else [1.0] * mid
        up = _kohya_lr_list("up_lr_weight", kohya["up_lr_weight"], side, notes, preset_ok=True) \
            if "up_lr_weight" in kohya else [1.0] * side
        slots = ([1.0] + down + middle + up + [1.0]) if xl else (down + middle + up)
        grid.set_slots("lr_weight", slots)
    threshold = _float("block_lr_zero_threshold", kw["block_lr_zero_threshold"]) \
        if "block_lr_zero_threshold" in kw else 0.0
    for values in grid.values.values():
        if values["lr_weight"] <= threshold:
            values["lr_weight"] = 0.0
    return given


def _options(kw: Mapping[str, object], neuron_dropout: float | None) -> TrainOptions:
    dropout = kw.get("dropout", neuron_dropout)
    return TrainOptions(
        dropout=None if dropout is None else _probability("dropout", dropout),
        rank_dropout=_probability("rank_dropout", kw["rank_dropout"]) if "rank_dropout" in kw else None,
        module_dropout=_probability("module_dropout", kw["module_dropout"]) if "module_dropout" in kw else None,
        loraplus_lr_ratio=_ratio("loraplus_lr_ratio", kw["loraplus_lr_ratio"])
        if "loraplus_lr_ratio" in kw else None,
        loraplus_unet_lr_ratio=_ratio("loraplus_unet_lr_ratio", kw["loraplus_unet_lr_ratio"])
        if "loraplus_unet_lr_ratio" in kw else None,
        loraplus_text_encoder_lr_ratio=_ratio("loraplus_text_encoder_lr_ratio", kw["loraplus_text_encoder_lr_ratio"])
        if "loraplus_text_encoder_lr_ratio" in kw else None,
        verbose=_bool("verbose", kw["verbose"]) if "verbose" in kw else False,
    )


def _base_numbers(network_dim: object, network_alpha: object) -> tuple[int, float]:
    dim = 4 if network_dim is None else _int("network_dim", network_dim)
    alpha = 1.0 if network_alpha is None else _float("network_alpha", network_alpha)
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
    kw = _present(args)
    _check_keys(kw)
    layout = table(arch)
    dim, alpha = _base_numbers(network_dim, network_alpha)
    notes: list[str] = []
    options = _options(kw, neuron_dropout)

    algo = Algo(_choice("algo", kw["algo"], [a.value for a in Algo])) if "algo" in kw else None
    conv_args = [k for k in ("conv_dim", "conv_block_dims", "conv_block_ranks") if k in kw]
    if algo is Algo.LORA and conv_args:
        raise SpecError(
            f"network_args: algo=lora trains no convolutions but {', '.join(conv_args)} is given; "
            "use algo=locon or drop it"
        )
    conv_dim = _int("conv_dim", kw["conv_dim"]) if "conv_dim" in kw else (dim if algo is Algo.LOCON else 0)
    conv_alpha = _float("conv_alpha", kw["conv_alpha"]) if "conv_alpha" in kw else 1.0
    te_dim = _int("te_dim", kw["te_dim"]) if "te_dim" in kw else dim
    te_alpha = _float("te_alpha", kw["te_alpha"]) if "te_alpha" in kw else alpha
    defaults = {
        "unet": {"rank": dim, "alpha": alpha, "conv_rank": conv_dim, "conv_alpha": conv_alpha, "lr_weight": 1.0},
        "te": {"rank": te_dim, "alpha": te_alpha, "conv_rank": 0, "conv_alpha": conv_alpha, "lr_weight": 1.0},
    }
    grid = _Grid(layout, defaults)

    # kohya positional forms
    if "block_dims" in kw:
        grid.set_slots("rank", _positional("block_dims", kw["block_dims"], layout, whole=True))
    if "conv_block_dims" in kw:
        grid.set_slots("conv_rank", _positional("conv_block_dims", kw["conv_block_dims"], layout, whole=True))
    named_ranks: list[tuple[str, frozenset[str], float]] = []
    for key, name in (("block_alphas", "alpha"), ("conv_block_alphas", "conv_alpha")):
        if key in kw:
            positional, named = _alpha_arg(key, kw[key], layout)
            if positional is not None:
                grid.set_slots(name, positional)
            for blocks, value in named or ():
                grid.set(name, blocks, value)
    for key, name in (("block_ranks", "rank"), ("conv_block_ranks", "conv_rank")):
        if key in kw:
            for blocks, value in _named(key, kw[key], layout, whole=True):
                grid.set(name, blocks, value)
                named_ranks.append((key, blocks, value))

    # selection
    selected: frozenset[str] | None = None
    chooser = "network_args"
    if "preset" in kw:
        preset = _choice("preset", kw["preset"], PRESETS)
        selected = resolve_selector(PRESETS[preset], layout.arch)
        chooser = f"preset={preset}"
    elif "blocks" in kw:
        try:
            selected = resolve_selector(_text("blocks", kw["blocks"]), layout.arch)
        except SelectorError as err:
            raise _fail("blocks", kw["blocks"], err.message) from None
        chooser = f"blocks={_text('blocks', kw['blocks'])}"
    if selected is not None:
        te_names = {c.value for c in layout.text_encoders}
        if "te_dim" in kw and te_dim > 0 and not (te_names & selected):
            raise SpecError(
                f"network_args: te_dim={te_dim} but {chooser} trains no text encoder; "
                "add te to blocks= or drop te_dim"
            )
        for key, blocks, value in named_ranks:
            outside = sorted(blocks - selected)
            if value > 0 and outside and not (blocks & selected):
                raise SpecError(
                    f"network_args: {key} gives {', '.join(outside)} rank {value} but {chooser} does not train "
                    f"{'it' if len(outside) == 1 else 'them'}; add it to blocks= or drop it from {key}"
                )
        unselected = [b for b in layout.blocks if b not in selected]
        grid.set("rank", unselected, 0)
        grid.set("conv_rank", unselected, 0)

    lr_given = _lr_weights(kw, grid, notes)
    for values in grid.values.values():
        if values["lr_weight"] == 0:
            values["rank"] = 0
            values["conv_rank"] = 0

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
    conv_alphas = [k for k in ("conv_alpha", "conv_block_alphas") if k in kw]
    if conv_alphas and not spec.include_conv:
        raise SpecError(
            f"network_args: {', '.join(conv_alphas)} given but no convolution is trained; add conv_dim=N or drop it"
        )
    explicit = any(k in kw for k in ("preset", "blocks", "block_ranks", "block_dims", "conv_block_ranks",
                                     "conv_block_dims"))
    return NetworkArgs(spec, options, explicit, lr_given, tuple(notes), chooser)


def parse_weights_args(
    args: Mapping[str, object], arch: Arch | str, neuron_dropout: float | None = None
) -> tuple[dict[str, float], dict[int, float], TrainOptions, bool, tuple[str, ...]]:
    """For a network built from a file: learning-rate weights and options only; rank keys are noted as ignored.

    Returns (lr weight per block, lr weight per SDXL middle-block slot where they differ, options,
    whether lr weights were given, notes).
    """
    kw = _present(args)
    _check_keys(kw)
    layout = table(arch)
    notes: list[str] = []
    ignored = sorted(k for k in kw if k in RANK_KEYS)
    if ignored:
        notes.append(
            f"network_args {', '.join(ignored)} ignored: ranks and alphas come from the weights file"
        )
    defaults = {"rank": 0, "alpha": 1.0, "conv_rank": 0, "conv_alpha": 1.0, "lr_weight": 1.0}
    grid = _Grid(layout, {"unet": defaults, "te": defaults})
    lr_given = _lr_weights(kw, grid, notes)
    per_block: dict[str, float] = {}
    per_slot: dict[int, float] = {}
    for (block, slot), values in grid.values.items():
        if slot is None:
            per_block[block] = values["lr_weight"]
        else:
            per_slot[slot] = values["lr_weight"]
    if len(set(per_slot.values())) <= 1:
        per_block["M00"] = next(iter(per_slot.values()), per_block.get("M00", 1.0))
        per_slot = {}
    else:
        per_block["M00"] = max(per_slot.values())
    return per_block, per_slot, _options(kw, neuron_dropout), lr_given, tuple(notes)


def _describe(kw: Mapping[str, object]) -> str:
    shown = [f"{k}={_text(k, v)}" for k, v in kw.items() if k in RANK_KEYS + LR_KEYS]
    return " ".join(shown) if shown else "no network_args"
