"""Readers of one `--network_args` value: a string (or a Python number) → the parsed value, or a SpecError
naming the key, the value and what would be valid.

Every reader takes `(key, raw value, layout)`, so `kohya_plugin.args.NETWORK_ARGS` can name one per key.
Numbers must be finite; ranks whole and ≥ 0 (their upper bound needs the model: `kohya_plugin.planning`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from blora_tools.errors import SelectorError, SpecError
from blora_tools.spec import Algo
from blora_tools.taxonomy.arch import Arch, is_dit
from blora_tools.taxonomy.blocks import ArchTable
from blora_tools.taxonomy.selectors import RESEARCH_PRESETS, resolve_atoms, resolve_selector
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
"""`preset` values on SD1/SD2/SDXL and the selector each stands for (the paper's settings; `style` = `upper`)."""

DIT_PRESETS: tuple[str, ...] = ("all", "character")
"""`preset` values on Flux.1/SD3 besides the research presets of `taxonomy.selectors.RESEARCH_PRESETS`
(each is its own selector term)."""

LR_WEIGHT_PRESETS = ("cosine", "sine", "linear", "reverse_linear", "zeros")
"""kohya's named `down_lr_weight`/`up_lr_weight` curves (optionally `+number`)."""

_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")
_KOHYA_FORM = MappingProxyType(
    {
        "block_ranks": "block_dims",
        "conv_block_ranks": "conv_block_dims",
        "block_lr": "down_lr_weight/mid_lr_weight/up_lr_weight",
    }
)


def text_of(raw: object) -> str:
    return raw.strip() if isinstance(raw, str) else str(raw)


def fail(key: str, raw: object, problem: str) -> SpecError:
    return SpecError(f"network_args {key}={text_of(raw)!r}: {problem}")


def rank(key: str, raw: object, layout: ArchTable | None = None) -> int:
    try:
        value = int(text_of(raw))
    except ValueError:
        raise fail(key, raw, f"not a whole number; give a rank ≥ 0, e.g. {key}=8") from None
    if value < 0:
        raise fail(key, raw, "a rank cannot be negative; 0 means not trained")
    return value


def number(key: str, raw: object, layout: ArchTable | None = None, *, what: str = "a number ≥ 0",
           upper: float | None = None) -> float:
    try:
        value = float(text_of(raw))
    except ValueError:
        raise fail(key, raw, f"not a number; give {what}") from None
    if not math.isfinite(value) or value < 0 or (upper is not None and value >= upper):
        raise fail(key, raw, f"out of range; give {what}")
    return value


def probability(key: str, raw: object, layout: ArchTable | None = None) -> float:
    return number(key, raw, what="a probability 0 ≤ p < 1", upper=1.0)


def ratio(key: str, raw: object, layout: ArchTable | None = None) -> float:
    value = number(key, raw, what="a ratio > 0, e.g. 16")
    if value == 0:
        raise fail(key, raw, "out of range; give a ratio > 0, e.g. 16")
    return value


def boolean(key: str, raw: object, layout: ArchTable | None = None) -> bool:
    if isinstance(raw, bool):
        return raw
    text = text_of(raw).lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise fail(key, raw, "not a boolean; use true/false, 1/0 or yes/no")


def choice(key: str, raw: object, choices: Iterable[str]) -> str:
    text = text_of(raw).lower()
    choices = tuple(choices)
    if text not in choices:
        raise fail(key, raw, f"unknown value; choose one of {', '.join(choices)}")
    return text


def preset(key: str, raw: object, layout: ArchTable) -> str:
    """A preset name; on Flux.1/SD3 `all`/`character` or a research preset of the family."""
    if is_dit(layout.arch):
        return choice(key, raw, DIT_PRESETS + tuple(RESEARCH_PRESETS.get(layout.arch.value, {})))
    return choice(key, raw, PRESETS)


def preset_selector(name: str, layout: ArchTable) -> str:
    """The selector a preset stands for."""
    return name if is_dit(layout.arch) else PRESETS[name]


def train_blocks(key: str, raw: object, layout: ArchTable) -> str:
    """kohya lora_flux's `train_blocks`: `all`, `single` or `double` (a selector of those blocks)."""
    return choice(key, raw, ("all", "single", "double"))


_INDEX_PREFIX = MappingProxyType({
    "train_double_block_indices": "D",
    "train_single_block_indices": "S",
    "train_block_indices": "J",
})


def block_indices(key: str, raw: object, layout: ArchTable) -> frozenset[str]:
    """kohya's `train_*_block_indices`: `all`, `none` (or empty), or 0-based indices and `a-b` ranges, e.g.
    `0,2,10-18` → the block IDs (`D00`, `D02`, `D10`…`D18`). Indices are checked against the family's blocks
    (Flux 19 double / 38 single, as kohya; SD3 the deepest member's 38)."""
    letter = _INDEX_PREFIX[key]
    blocks = [b for b in layout.unet_lbw if b.startswith(letter)]
    text = text_of(raw)
    if text == "all":
        return frozenset(blocks)
    if text in ("none", ""):
        return frozenset()
    chosen: set[str] = set()
    for part in text.split(","):
        start, dash, stop = (p.strip() for p in part.partition("-"))
        try:
            first, last = int(start), int(stop) if dash else int(start)
        except ValueError:
            raise fail(key, raw, f"{part.strip()!r} is not an index or a range a-b; e.g. {key}=0,2,10-18") from None
        if not 0 <= first <= last < len(blocks):
            raise fail(key, raw, f"{part.strip()!r} is outside 0..{len(blocks) - 1} or runs backwards")
        chosen |= set(blocks[first : last + 1])
    return frozenset(chosen)


def rank_list(key: str, raw: object, layout: ArchTable, length: int) -> tuple[int, ...]:
    """kohya's `in_dims` / `emb_dims`: exactly `length` whole numbers, with or without brackets."""
    text = text_of(raw)
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    parts = text.split(",")
    if len(parts) != length:
        raise fail(key, raw, f"takes {length} comma-separated ranks, not {len(parts)}")
    return tuple(rank(key, p) for p in parts)


def in_dims(key: str, raw: object, layout: ArchTable) -> tuple[int, ...]:
    """Flux `in_dims`: ranks of img_in, time_in, vector_in, guidance_in, txt_in."""
    return rank_list(key, raw, layout, 5)


def emb_dims(key: str, raw: object, layout: ArchTable) -> tuple[int, ...]:
    """SD3 `emb_dims`: ranks of context_embedder, t_embedder, x_embedder, y_embedder, the final modulation and
    the final linear."""
    return rank_list(key, raw, layout, 6)


def _regex_values(key: str, raw: object, whole: bool) -> tuple[tuple[re.Pattern, float], ...]:
    """kohya's `network_reg_dims` / `network_reg_lrs`: `regex=value,…` (regex matched with re.search on the
    module name; the first match wins)."""
    pairs = []
    for pair in text_of(raw).split(","):
        pair = pair.strip()
        if not pair:
            continue
        pattern, sep, value = pair.partition("=")
        if not sep or not pattern.strip():
            raise fail(key, raw, f"{pair!r} is not regex=value, e.g. {key}=double_blocks_[0-9]_=8")
        try:
            compiled = re.compile(pattern.strip())
        except re.error as err:
            raise fail(key, raw, f"{pattern.strip()!r} is not a regular expression ({err})") from None
        pairs.append((compiled, rank(key, value) if whole else number(key, value)))
    return tuple(pairs)


def regex_ranks(key: str, raw: object, layout: ArchTable) -> tuple[tuple[re.Pattern, float], ...]:
    return _regex_values(key, raw, True)


def regex_lrs(key: str, raw: object, layout: ArchTable) -> tuple[tuple[re.Pattern, float], ...]:
    return _regex_values(key, raw, False)


def algo(key: str, raw: object, layout: ArchTable) -> Algo:
    return Algo(choice(key, raw, [a.value for a in Algo]))


def selector(key: str, raw: object, layout: ArchTable) -> frozenset[str]:
    try:
        return resolve_selector(text_of(raw), layout.arch)
    except SelectorError as err:
        raise fail(key, raw, err.message) from None


def positional(key: str, raw: object, layout: ArchTable, *, whole: bool) -> list[float]:
    """A kohya positional list: exactly 25 (SD1/SD2) or 23 (SDXL) comma-separated values."""
    n = len(layout.kohya_slots)
    parts = [p.strip() for p in text_of(raw).split(",")]
    if len(parts) != n:
        order = (
            "emb, IN00..IN08, middle_block 0..2, OUT00..OUT08, out"
            if layout.arch is Arch.SDXL
            else "IN00..IN11, MID, OUT00..OUT11"
        )
        raise fail(key, raw, f"{layout.arch.value} takes {n} comma-separated values ({order}), not {len(parts)}")
    reader = rank if whole else number
    return [reader(key, p) for p in parts]


def positional_ranks(key: str, raw: object, layout: ArchTable) -> list[float]:
    return positional(key, raw, layout, whole=True)


Terms = list[tuple[frozenset[str], float]]
"""Named weights resolved: (blocks, value) in the order given. On Flux.1/SD3 a sub-selector's set holds atoms
`D05:img.attn.q` for the blocks it names only parts of (`taxonomy.selectors.resolve_atoms`)."""


def named(key: str, raw: object, layout: ArchTable, *, whole: bool) -> Terms:
    """Named weights (`in0=16,out3=8`, or an LBW vector) → [(blocks, value)] in order; values checked."""
    text = text_of(raw)
    if "=" not in text and len(text.split(",")) == len(layout.kohya_slots) and key in _KOHYA_FORM:
        raise fail(key, raw, f"{len(layout.kohya_slots)} positional values are kohya's form: use "
                              f"{_KOHYA_FORM[key]}, or name blocks (in0=16,out3=8)")
    try:
        parsed = parse_weights(text)
        if parsed.vector is not None:
            weights = parsed.resolve(layout.arch)
            terms = [(frozenset({b}), v) for b, v in weights.values.items()]
        else:
            terms = [(resolve_atoms(term, layout), v) for term, v in parsed.named]
    except SelectorError as err:
        raise fail(key, raw, err.message) from None
    for _, value in terms:
        if not math.isfinite(value) or value < 0 or (whole and value != int(value)):
            raise fail(key, raw, f"{value:g} is not {'a whole number ≥ 0' if whole else 'a number ≥ 0'}")
    return [(blocks, int(v) if whole else float(v)) for blocks, v in terms]


def is_vector(raw: object) -> bool:
    """Whether a named-weights value is an LBW vector or preset (a value for every block) rather than names."""
    return parse_weights(text_of(raw)).vector is not None


def named_ranks(key: str, raw: object, layout: ArchTable) -> Terms:
    return named(key, raw, layout, whole=True)


def named_weights(key: str, raw: object, layout: ArchTable) -> Terms:
    return named(key, raw, layout, whole=False)


@dataclass(frozen=True)
class SlotValues:
    """A kohya positional list: one value per kohya block index."""

    values: tuple[float, ...]


def alphas(key: str, raw: object, layout: ArchTable) -> SlotValues | Terms:
    """`block_alphas` / `conv_block_alphas`: kohya's positional list when it has 25/23 plain numbers, else named."""
    text = text_of(raw)
    if len(text.split(",")) == len(layout.kohya_slots) and "=" not in text:
        return SlotValues(tuple(positional(key, raw, layout, whole=False)))
    return named(key, raw, layout, whole=False)


def lr_lengths(layout: ArchTable) -> tuple[int, int]:
    """kohya's (down/up, mid) lr-weight list lengths: 12 and 1 on SD1/SD2, 9 and 3 on SDXL."""
    return (9, 3) if layout.arch is Arch.SDXL else (12, 1)


def lr_list(key: str, raw: object, length: int, *, preset_ok: bool) -> list[float]:
    """kohya's down/up (`preset[+base]` or values) or mid lr-weight list; up to `length` values (padded later)."""
    text = text_of(raw)
    if "," not in text and preset_ok:
        name, plus, base_text = text.partition("+")
        if name not in LR_WEIGHT_PRESETS:
            raise fail(
                key, raw,
                f"give {length} comma-separated weights or a preset: {', '.join(LR_WEIGHT_PRESETS)} "
                "(optionally +number, e.g. sine+0.5)",
            )
        base = number(key, base_text) if plus else 0.0
        steps = [i / (length - 1) for i in range(length)]
        curve = {
            "sine": [math.sin(math.pi * s / 2) for s in steps],
            "cosine": [math.sin(math.pi * s / 2) for s in reversed(steps)],
            "linear": steps,
            "reverse_linear": list(reversed(steps)),
            "zeros": [0.0] * length,
        }[name]
        return [w + base for w in curve]
    values = [(number(key, p) if p.strip() else 0.0) for p in text.split(",")]
    if len(values) > length:
        raise fail(key, raw, f"takes at most {length} values, not {len(values)}")
    return values


def side_lr(key: str, raw: object, layout: ArchTable) -> list[float]:
    return lr_list(key, raw, lr_lengths(layout)[0], preset_ok=True)


def mid_lr(key: str, raw: object, layout: ArchTable) -> list[float]:
    return lr_list(key, raw, lr_lengths(layout)[1], preset_ok=False)
