"""Flux.1 / SD3 modules in one naming: fused BFL layers ↔ split diffusers layers, exactly (docs/architecture.md §3).

A fused BFL weight (`double_blocks.0.img_attn.qkv`, Flux's `single_blocks.0.linear1`) is the row-wise stack of
its diffusers parts (`attn.to_q | to_k | to_v`, `… | proj_mlp`); `taxonomy.dit` says which rows, in *units* of
the layer width (rows per unit = a module's rows / its layer's units: never a hard-coded 3072). The rules
(facts and sources: sd-scripts `networks/convert_flux_lora.py`, diffusers `lora_conversion_utils.py`):

* **fused → split**: every part gets the same down factor and its rows of the up factor; rank and alpha stay.
  A *compact* split instead gives each part only the rank columns its rows use, which is exact only when the up
  factor is proven block-diagonal — every column non-zero in the rows of one part at most (sd-scripts' and
  diffusers' converters test the zeros; mflux split by rank divisibility alone and broke ordinary LoRAs).
* **split → fused**: downs stacked, ups placed block-diagonally (rank Σrᵢ), each part's alpha/rank folded into
  its up and alpha = Σrᵢ (keeping the parts' alpha is kohya-ss/sd-scripts#2204). Parts a file lacks are zero
  rows. XLabs' single-block `qkv_lora` (rows q, k, v of `linear1`) becomes `linear1` with zero MLP rows.
* a 2·width modulation (`final_layer.adaLN_modulation.1` ↔ `norm_out.linear`, SD3's last context modulation)
  has its shift and scale halves swapped between the namings: the up rows are swapped, nothing else.
* LyCORIS kinds: rows of ΔW are rows of `lora_up`, of both `hada_w*_a` (ΔW = (W1a·W1b) ⊙ (W2a·W2b)), of
  `diff`, and of `lokr_w1` only in whole blocks of W2's rows (kron); anything else is refused by name.

`in_naming` presents an adapter with its transformer modules in one naming; tensors of changed modules are
made when read, so convert, merge and compare consume it like the file itself.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import TYPE_CHECKING

from blora_tools.adapter.header import TensorInfo
from blora_tools.adapter.kinds import Kind
from blora_tools.adapter.model import Adapter, Module
from blora_tools.errors import BloraError
from blora_tools.taxonomy.arch import is_dit
from blora_tools.taxonomy.blocks import place
from blora_tools.taxonomy.dit import BFL, DIFFUSERS, DIT_NAMINGS, DiTLayer, parts_of
from blora_tools.taxonomy.selectors import coverage

if TYPE_CHECKING:
    import torch

__all__ = [
    "Segment", "row_params", "select_rows", "stack_rows", "compact_columns", "in_naming", "layer_namings", "naming_of",
]

Segment = tuple[int | None, int]
"""A run of output rows: (first source row, row count), or (None, count) for zero rows."""

_TENSOR_BYTES = MappingProxyType({"F16": 2, "BF16": 2, "F32": 4, "F64": 8})


def row_params(kind: Kind, params: Sequence[str]) -> tuple[str, ...]:
    """The parameters whose rows are the rows of ΔW (for LoKr: whole blocks of them); empty when none are
    (Tucker LoHa/LoKr keep their rows inside a core: refused by the callers)."""
    names = set(params)
    if kind in (Kind.LORA, Kind.LORA_CONV1X1, Kind.LOCON, Kind.TUCKER):
        return ("lora_up.weight",)
    if kind is Kind.LOHA and not names & {"hada_t1", "hada_t2"}:
        return ("hada_w1_a", "hada_w2_a")
    if kind is Kind.FULL:
        return tuple(p for p in ("diff", "diff_b") if p in names)
    if kind is Kind.LOKR and "lokr_t2" not in names:
        return ("lokr_w1",) if "lokr_w1" in names else ("lokr_w1_a",)
    return ()


def _checked_rows(module: Module, where: str) -> tuple[str, ...]:
    params = row_params(module.kind, tuple(module.keys))
    if not params:
        raise BloraError(f"module {module.stem} is a {module.kind} with a Tucker core: its rows cannot be {where}")
    if module.dora:
        raise BloraError(f"module {module.stem} is DoRA: its magnitude vector is not split or stacked by rows")
    return params


def select_rows(
    kind: Kind, tensors: Mapping[str, "torch.Tensor"], rows: int, segments: Sequence[Segment], stem: str
) -> dict[str, "torch.Tensor"]:
    """A module's tensors whose ΔW rows are `segments` of the source ΔW's `rows` rows (slices, zero runs,
    reorderings): only row parameters change, so rank and alpha stay and the result is exact.

    LoKr rows are blocks of W2's rows (ΔW = W1 ⊗ W2): every segment must start and end on such a block.
    """
    import torch

    out = {p: t for p, t in tensors.items()}
    for param in row_params(kind, tuple(tensors)):
        t = tensors[param]
        per = _rows_per_entry(kind, rows, t.shape[0], segments, stem)
        pieces = [
            t.new_zeros((count // per,) + tuple(t.shape[1:])) if start is None else t[start // per : (start + count) // per]
            for start, count in segments
        ]
        out[param] = torch.cat(pieces, dim=0)
    return out


def _rows_per_entry(kind: Kind, rows: int, entries: int, segments: Sequence[Segment], stem: str) -> int:
    """ΔW rows per row of a row parameter (1, or W2's rows for LoKr); BloraError when `segments` cut through
    such a block."""
    per = rows // entries
    if per * entries != rows or any((start is not None and start % per) or count % per for start, count in segments):
        raise BloraError(
            f"module {stem}: a {kind} ΔW is W1 ⊗ W2, and its rows split in blocks of {per}, which the "
            "split does not follow; convert it to LoRA first (resize) or keep its naming"
        )
    return per


def stack_rows(
    parts: Sequence[tuple[Kind, Mapping[str, "torch.Tensor"], float, int, Segment]], rows: int, stem: str
) -> tuple[dict[str, "torch.Tensor"], int | None]:
    """One module whose ΔW rows stack several modules' (kind, tensors, alpha/rank, target row, source segment):
    LoRA and LoHa block-diagonally (each scale folded into its up factor, rank Σ rᵢ, to be written with alpha
    = that rank), full diffs by rows. Returns the tensors and the new rank (None for full). Rows no part
    covers are zero."""
    import torch

    kinds = {k if k is not Kind.LORA_CONV1X1 else Kind.LORA for k, *_ in parts}
    if len(kinds) != 1 or kinds & {Kind.LOKR, Kind.TUCKER, Kind.NORM, Kind.LOCON}:
        what = ", ".join(sorted(str(k) for k in kinds))
        raise BloraError(
            f"module {stem}: its parts are {what}; only LoRA, LoHa or full parts stack into one fused layer exactly"
        )
    kind = kinds.pop()
    if kind is Kind.FULL:
        first = parts[0][1]
        out = {"diff": first["diff"].new_zeros((rows,) + tuple(first["diff"].shape[1:]))}
        if any("diff_b" in t for _, t, *_ in parts):
            out["diff_b"] = first["diff"].new_zeros(rows)
        for _, t, _, at, (start, count) in parts:
            for p in out:
                if p in t:
                    out[p][at : at + count] = t[p][start : start + count]
        return out, None
    pairs = (("lora_up.weight", "lora_down.weight"),) if kind is Kind.LORA else (("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b"))
    out = {}
    for up_name, down_name in pairs:
        downs = [t[down_name].float() for _, t, *_ in parts]
        up = torch.zeros((rows, sum(d.shape[0] for d in downs)) + tuple(parts[0][1][up_name].shape[2:]))
        column = 0
        for (_, t, scale, at, (start, count)), d in zip(parts, downs):
            fold = scale if up_name in ("lora_up.weight", "hada_w1_a") else 1.0
            up[at : at + count, column : column + d.shape[0]] = t[up_name][start : start + count].float() * fold
            column += d.shape[0]
        out[up_name], out[down_name] = up, torch.cat(downs, dim=0)
    return out, out[pairs[0][1]].shape[0]


def compact_columns(up: "torch.Tensor", ranges: Sequence[tuple[int, int]]) -> list[list[int]] | None:
    """Per row range, the rank columns of `up` (out×r, or out×r×1×1) non-zero there, when no column is non-zero in two ranges (the
    up factor is block-diagonal up to a column order: the proof a compact split needs); None otherwise, or
    when no column is non-zero anywhere."""
    nonzero = up.reshape(up.shape[0], up.shape[1]) != 0
    used = [nonzero[a:b].any(dim=0) for a, b in ranges]
    if not used or int(sum(u.int() for u in used).max()) > 1:
        return None
    columns = [u.nonzero().flatten().tolist() for u in used]  # one call per range, not one per column
    return columns if any(columns) else None


# --- an adapter seen in one naming -----------------------------------------------------------------------


def layer_namings(adapter: Adapter) -> frozenset[tuple[str, str]]:
    """(fused BFL path, naming: `bfl`, `diffusers` or `part`) of every transformer module of an adapter."""
    return frozenset((m.placement.layer.fused, m.placement.layer.naming) for m in adapter.modules.values()
                     if m.placement is not None and m.placement.layer is not None)


def naming_of(adapter: Adapter) -> str | None:
    """The naming most of an adapter's transformer modules use (`bfl` or `diffusers`; XLabs parts count as
    BFL); None when it has none."""
    counts = {BFL: 0, DIFFUSERS: 0}
    for m in adapter.modules.values():
        layer = m.placement.layer if m.placement is not None else None
        if layer is not None:
            counts[DIFFUSERS if layer.naming == DIFFUSERS else BFL] += 1
    if not any(counts.values()):
        return None
    return max(counts, key=lambda n: counts[n])


@dataclass
class _Named(Adapter):
    """An adapter whose transformer modules are re-expressed in one naming: changed modules' tensors are made
    when read (one module at a time: the last one is kept while the writer takes its tensors)."""

    makers: dict[str, Callable[[], dict[str, "torch.Tensor"]]] = field(default_factory=dict)
    virtual: dict[str, tuple[str, str]] = field(default_factory=dict)
    _last: tuple[str, dict] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    """merge computes modules ahead on a worker thread while the writer copies others"""

    def tensor(self, key: str) -> "torch.Tensor":
        if key not in self.virtual:
            return super().tensor(key)
        stem, param = self.virtual[key]
        return self._made(stem)[param]

    def tensors(self, module: Module) -> dict[str, "torch.Tensor"]:
        """All tensors of a module; a made module is made once for all of them (threads asking for different
        modules side by side would otherwise remake it for each tensor)."""
        if module.stem not in self.makers:  # a made module's tensors are all made, under its own parameter names
            return super().tensors(module)
        made = self._made(module.stem)
        return {param: made[param] for param in module.keys}

    def _made(self, stem: str) -> dict[str, "torch.Tensor"]:
        with self._lock:
            last = self._last
            if last is None or last[0] != stem:
                last = self._last = (stem, self.makers[stem]())
        return last[1]

    def made(self, key: str) -> bool:
        return key in self.virtual

    def raw(self, key: str) -> bytes:
        if key not in self.virtual:
            return super().raw(key)
        from blora_tools.adapter.tensors import TORCH_DTYPE, encode

        info = self.info(key)
        return encode(self.tensor(key).to(TORCH_DTYPE[info.dtype]).reshape(info.shape))


class _Source:
    """The input adapter, with the last module's tensors kept: the parts of one fused layer are made one after
    another (under the view's lock) and each needs the whole fused module, which is then read once, not once per
    part."""

    def __init__(self, adapter: Adapter) -> None:
        self.adapter = adapter
        self._last: tuple[str, dict[str, "torch.Tensor"]] | None = None

    def tensors(self, module: Module) -> dict[str, "torch.Tensor"]:
        if self._last is None or self._last[0] != module.stem:
            self._last = (module.stem, self.adapter.tensors(module))
        return self._last[1]


@dataclass
class _Out:
    """One output module being planned: its kind, tensor maker, shapes, rank, alpha, dtype and ΔW rows."""

    kind: Kind
    make: Callable[[], dict[str, "torch.Tensor"]]
    shapes: dict[str, tuple[int, ...]]
    rank: int | None
    alpha: float | None
    dtype: str
    rows: int


def in_naming(
    adapter: Adapter, naming: str, *, compact: bool = False, keep: frozenset[str] | None = None
) -> Adapter:
    """`adapter` with every transformer module in `naming` (`bfl` or `diffusers`), ΔW per fused weight
    unchanged; text encoders and unplaced modules as they are.

    `compact` splits a fused module with fewer ranks per part where its up factor is proven block-diagonal.
    `keep` (a resolved selection: blocks and `D05:img.attn.q` atoms) keeps only the chosen modules, with the
    rows of partly chosen layers that are not chosen set to zero (exact, same rank).
    Raises BloraError for rows that do not split by the layer's units and for kinds that cannot be split.
    """
    if naming not in DIT_NAMINGS:
        raise BloraError(f"unknown naming {naming!r}; valid: {', '.join(DIT_NAMINGS)}")
    if not is_dit(adapter.arch):
        raise BloraError(f"{adapter.arch.value} has no fused/split transformer namings", adapter.path)
    groups: dict[str, list[Module]] = {}
    modules: dict[str, Module] = {}
    for module in adapter.modules.values():
        layer = module.placement.layer if module.placement is not None else None
        if layer is None:
            if keep is None or not coverage(module.placement, keep).none:
                modules[module.stem] = module
            continue
        groups.setdefault(layer.fused, []).append(module)
    view = _Named(**{f.name: getattr(adapter, f.name) for f in fields(Adapter)})
    source = _Source(adapter)
    tensors = dict(adapter.header.tensors)
    try:
        for fused, sources in groups.items():
            for target, out in _group(source, fused, sources, naming, compact):
                placement = place(target.stem, adapter.arch)
                if keep is not None:
                    cover = coverage(placement, keep)
                    if cover.none:
                        continue
                    if not cover.whole:
                        out = _masked(source, out, target, cover.leaves, target.stem)
                if isinstance(out, Module):
                    modules[target.stem] = replace(out, stem=target.stem, placement=placement, path=target.path)
                    continue
                keys = {p: f"{target.stem}.{p}" for p in out.shapes}
                for p, key in keys.items():
                    dtype = "F32" if p == "alpha" else out.dtype
                    size = math.prod(out.shapes[p]) * _TENSOR_BYTES[dtype]
                    tensors[key] = TensorInfo(key, dtype, out.shapes[p], 0, size)
                    view.virtual[key] = (target.stem, p)
                view.makers[target.stem] = out.make
                modules[target.stem] = Module(
                    target.stem, out.kind, keys, dict(out.shapes), out.rank, out.alpha, placement, target.path
                )
    except BloraError as err:
        raise BloraError(err.message, adapter.path) from None
    view.header = replace(adapter.header, tensors=MappingProxyType(tensors))
    view.modules = modules
    return view



def _unit(module: Module, layer: DiTLayer) -> int:
    rows = module.weight_shape[0]
    if rows % layer.units:
        raise BloraError(
            f"module {module.stem}: its ΔW has {rows} rows, not a multiple of the {layer.units} parts of "
            f"layer {layer.path}; the file is not a {layer.path} adapter"
        )
    return rows // layer.units


def _group(
    source: _Source, fused: str, sources: list[Module], naming: str, compact: bool
) -> list[tuple[DiTLayer, "Module | _Out"]]:
    """The output modules of one fused weight: (target layer, a source module renamed or a planned module)."""
    arch = source.adapter.arch
    layers = [m.placement.layer for m in sources]
    units = {_unit(m, layer) for m, layer in zip(sources, layers)}
    if len(units) > 1:
        raise BloraError(
            f"modules {', '.join(m.stem for m in sources)} give layer {fused} different widths ({sorted(units)})"
        )
    unit = units.pop()
    if len(sources) == 1 and layers[0].naming == naming:
        return [(layers[0], sources[0])]
    # a layer with one path in both namings (SD3's `context_embedder`) is indexed once
    targets = parts_of(arch).get((fused, naming)) or (replace(layers[0], naming=naming),)
    if compact and len(sources) == 1 and len(targets) > 1 and sources[0].kind in (Kind.LORA, Kind.LORA_CONV1X1):
        planned = _compact(source, sources[0], layers[0], targets, unit)
        if planned is not None:
            return planned
    result: list[tuple[DiTLayer, Module | _Out]] = []
    for target in targets:
        covering = []
        for module, layer in zip(sources, layers):
            start = max(layer.offset, target.offset)
            stop = min(layer.offset + layer.units, target.offset + target.units)
            if start < stop:
                covering.append((module, layer, (start - layer.offset) * unit, (start - target.offset) * unit,
                                 (stop - start) * unit))
        if not covering:
            continue
        covering.sort(key=lambda c: c[3])  # parts in row order: q | k | v stack as q, k, v columns
        rows = target.units * unit
        if len(covering) == 1:
            module, layer, src, at, count = covering[0]
            segments = [(None, at)] if at else []
            segments += _maybe_swapped(module, layer, target, src, count)
            if at + count < rows:
                segments.append((None, rows - at - count))
            if segments == [(0, module.weight_shape[0])]:
                result.append((target, module))
                continue
            result.append((target, _selected(source, module, segments, rows, target.stem)))
        else:
            result.append((target, _stacked(source, covering, rows, target.stem)))
    return result


def _maybe_swapped(module: Module, layer: DiTLayer, target: DiTLayer, src: int, count: int) -> list[Segment]:
    """The source rows as segments, with the shift/scale halves swapped where the namings differ on a 2·width
    modulation."""
    width = math.prod(module.weight_shape[1:])
    if target.swappable and layer.naming != target.naming and count == 2 * width == module.weight_shape[0]:
        return [(src + width, width), (src, width)]
    return [(src, count)]


def _selected(source: _Source, module: Module, segments: list[Segment], rows: int, stem: str) -> _Out:
    _checked_rows(module, "split")
    shapes = dict(module.shapes)
    for param in row_params(module.kind, tuple(module.keys)):
        per = _rows_per_entry(module.kind, module.weight_shape[0], shapes[param][0], segments, module.stem)
        shapes[param] = (rows // per,) + tuple(shapes[param][1:])
    if module.rank is not None:
        shapes["alpha"] = ()

    def make() -> dict[str, "torch.Tensor"]:
        import torch

        tensors = {p: t for p, t in source.tensors(module).items() if p != "alpha"}
        out = select_rows(module.kind, tensors, module.weight_shape[0], segments, module.stem)
        if module.rank is not None:
            out["alpha"] = torch.tensor(module.effective_alpha, dtype=torch.float32)
        return out

    alpha = module.effective_alpha
    return _Out(module.kind, make, shapes, module.rank, alpha, _dtype(source.adapter, module), rows)


def _stacked(source: _Source, covering: list, rows: int, stem: str) -> _Out:
    for module, *_ in covering:
        _checked_rows(module, "stacked")
    first = covering[0][0]

    def make() -> dict[str, "torch.Tensor"]:
        import torch

        parts = [
            (m.kind, {p: t for p, t in source.tensors(m).items() if p != "alpha"}, m.scale, at, (src, count))
            for m, _, src, at, count in covering
        ]
        out, rank = stack_rows(parts, rows, stem)
        if rank is not None:
            out["alpha"] = torch.tensor(float(rank), dtype=torch.float32)
        return out

    kind = Kind.LORA if first.kind is Kind.LORA_CONV1X1 else first.kind
    fan_in = tuple(first.weight_shape[1:])
    if kind is Kind.FULL:
        shapes = {"diff": (rows,) + fan_in}
        if any("diff_b" in m.keys for m, *_ in covering):
            shapes["diff_b"] = (rows,)
        rank = None
    else:
        pairs = (("lora_up.weight", "lora_down.weight"),) if kind.is_lora else (("hada_w1_a", "hada_w1_b"), ("hada_w2_a", "hada_w2_b"))
        shapes = {}
        for up_name, down_name in pairs:
            r = sum(m.shapes[down_name][0] for m, *_ in covering)
            shapes[up_name] = (rows, r)
            shapes[down_name] = (r,) + tuple(first.shapes[down_name][1:])
        rank = shapes[pairs[0][1]][0]
        shapes["alpha"] = ()
    alpha = None if rank is None else float(rank)
    return _Out(kind, make, shapes, rank, alpha, _dtype(source.adapter, first), rows)


def _compact(
    source: _Source, module: Module, layer: DiTLayer, targets: Sequence[DiTLayer], unit: int
) -> list[tuple[DiTLayer, _Out]] | None:
    """The compact split of one fused LoRA module, or None when its up factor is not proven block-diagonal."""
    inside = [t for t in targets if layer.offset <= t.offset and t.offset + t.units <= layer.offset + layer.units]
    if len(inside) != len(targets):
        return None
    ranges = [((t.offset - layer.offset) * unit, (t.offset - layer.offset + t.units) * unit) for t in inside]
    up = source.adapter.tensor(module.keys["lora_up.weight"])
    columns = compact_columns(up, ranges)
    if columns is None:
        return None
    planned = []
    for target, (a, b), cols in zip(inside, ranges, columns):
        if not cols:
            continue

        def make(a=a, b=b, cols=cols) -> dict[str, "torch.Tensor"]:
            import torch

            t = source.tensors(module)
            index = torch.tensor(cols)
            return {
                "lora_up.weight": t["lora_up.weight"][a:b].index_select(1, index),
                "lora_down.weight": t["lora_down.weight"].index_select(0, index),
                "alpha": torch.tensor(module.scale * len(cols), dtype=torch.float32),
            }

        shapes = {
            "lora_up.weight": (b - a, len(cols)) + tuple(module.shapes["lora_up.weight"][2:]),
            "lora_down.weight": (len(cols),) + tuple(module.shapes["lora_down.weight"][1:]),
            "alpha": (),
        }
        alpha = module.scale * len(cols)
        planned.append((target, _Out(module.kind, make, shapes, len(cols), alpha, _dtype(source.adapter, module), b - a)))
    return planned


def _masked(source: _Source, out: "Module | _Out", layer: DiTLayer, leaves, stem: str) -> _Out:
    """A source or planned module with the rows of every leaf of `layer` outside `leaves` set to zero."""
    rows = out.weight_shape[0] if isinstance(out, Module) else out.rows
    unit = rows // layer.units
    chosen = {leaf.name for leaf in leaves}
    segments = [
        ((leaf.start * unit if leaf.name in chosen else None), (leaf.stop - leaf.start) * unit) for leaf in layer.leaves
    ]
    if isinstance(out, Module):
        return _selected(source, out, segments, rows, stem)
    inner = out.make

    def make() -> dict[str, "torch.Tensor"]:
        tensors = inner()
        alpha = tensors.pop("alpha", None)
        masked = select_rows(out.kind, tensors, rows, segments, stem)
        return masked if alpha is None else {**masked, "alpha": alpha}

    return replace(out, make=make)


def _dtype(adapter: Adapter, module: Module) -> str:
    """The float dtype computed tensors of `module` are written in: its row parameter's, else F32."""
    for param in row_params(module.kind, tuple(module.keys)) or tuple(module.keys):
        dtype = adapter.info(module.keys[param]).dtype
        if dtype in _TENSOR_BYTES:
            return dtype
    return "F32"
