"""Merge adapters, each with its own ratio and block set: `concat` (exact) or `svd` (re-compressed).

For one module, source i contributes cᵢ·Uᵢ·Dᵢ with cᵢ = ratioᵢ·alphaᵢ/rankᵢ (Tucker cores folded into D).

* `concat` stacks the factors: rank Σ rᵢ, exact. Each term's coefficient goes into its factors, split as
  √|·| across up and down with the sign on up, so fp16 keeps its range.
* `svd` takes the SVD of Σ cᵢUᵢDᵢ through the Gram matrices of the stacked factors (`lowrank`), never a dense
  ΔW, and keeps the ranks a `RankPlan` allows. Sources with no factorisation (LoHa, LoKr, full) are made dense
  for their module and SVD'd there (svd only). Norm modules are summed.

Outputs use one alpha for the whole file (docs/architecture.md §3: diffusers mis-scales files whose alphas differ); each
module's remaining scale rank/alpha is folded into its factors. Work is lazy: a module is computed when the
writer reaches it and forgotten once written, so memory holds one module, not the file.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from blora_tools.adapter.alpha import alpha_storage, zero_alpha_warning
from blora_tools.adapter.formats import Format
from blora_tools.adapter.kinds import Kind, delta_weight, lora_factors, scaled_params
from blora_tools.adapter.layers import NAMINGS, is_conv, layer_shape, modules_by_layer, stem_in_naming, unet_naming_of
from blora_tools.adapter.metadata import SPEC_KEY, updated_metadata
from blora_tools.adapter.model import PEFT_METADATA_KEY, Adapter, Module
from blora_tools.adapter.writer import Entry
from blora_tools.errors import BloraError, NonFiniteError
from blora_tools.compute import Ahead, in_order
from blora_tools.ops.dit_naming import in_naming, layer_namings, naming_of
from blora_tools.ops.lowrank import (
    Maps,
    RankPlan,
    Spectrum,
    decompose_dense,
    decompose_factors,
    spectrum_of_dense,
    spectrum_of_factors,
)
from blora_tools.ops.result import Progress, Result, computed, copied, loader_notes, scalar
from blora_tools.spec import ModuleFacts
from blora_tools.taxonomy.arch import is_dit
from blora_tools.taxonomy.blocks import table
from blora_tools.taxonomy.dit import BFL
from blora_tools.taxonomy.selectors import coverage, describe_blocks

if TYPE_CHECKING:
    import torch

    from blora_tools.taxonomy.arch import Arch

__all__ = ["METHODS", "Source", "merge", "common_arch"]

METHODS = ("concat", "svd")
_BASE_MODEL_KEYS = ("ss_base_model_version", "ss_sd_model_hash")
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass(frozen=True)
class Source:
    """One input of a merge: an adapter, its ratio, and the blocks taken from it (None = every module)."""

    adapter: Adapter
    ratio: float = 1.0
    blocks: frozenset[str] | None = None
    selector: str = "all"


@dataclass
class _Part:
    """One source's term in one output module."""

    adapter: Adapter
    module: Module
    ratio: float

    @property
    def coefficient(self) -> float:
        return self.ratio * self.module.scale


@dataclass
class _Plan:
    """One output module: its terms, how it is computed, and its output rank (None for norm modules)."""

    stem: str
    parts: list[_Part]
    route: str  # "factors", "dense", "sum" or "copy"
    weight_shape: tuple[int, ...]
    block: str | None
    group: str
    conv: bool
    rank: int | None = None
    energy: float | None = None
    retained: float | None = None
    input_ranks: list[int] = field(default_factory=list)
    maps: Maps | None = None
    """The first pass's decomposition less its factors (`_measure`), so the write skips the Gram matrices."""

    @property
    def max_rank(self) -> int:
        out, fan_in = self.weight_shape[0], math.prod(self.weight_shape[1:])
        if self.route == "factors":
            return min(out, fan_in, sum(p.module.rank for p in self.parts))
        return min(out, fan_in)


def merge(
    sources: Sequence[Source],
    *,
    method: str = "concat",
    plan: RankPlan | None = None,
    alpha: float | None = None,
    dtype: str | None = None,
    clamp_quantile: float | None = None,
    strict: bool = False,
    energy: bool = False,
    operation: str = "merge",
    arguments: dict[str, object] | None = None,
    progress: Progress | None = None,
    names: str | None = None,
    device: "torch.device | str | None" = None,
) -> Result:
    """Merge `sources` into one kohya LoRA file.

    Args:
        method: `concat` (exact, rank Σ rᵢ) or `svd` (re-compressed to `plan`'s ranks; default: lossless).
        alpha: the file's single alpha value; default the largest output rank.
        dtype: output tensor dtype name (`F16`, `BF16`, `F32`); default the first source's.
        clamp_quantile: with `svd`, clamp factor entries at this quantile of their magnitudes (kohya's option).
        strict: different base models are an error instead of a warning.
        energy: compute every module's retained share of ‖ΔW‖² for the summary (an extra pass).
        arguments: what the caller records in `blora_history` besides the method, ratios, blocks per input,
            rank plan, alpha (as stored), dtype, clamp quantile and naming, which are always recorded.
        progress: called with 1 per module of any pass that looks at tensors before writing.
        names: U-Net naming of the output (`ldm` or `diffusers`); default the first input's. A layer named
            differently in different inputs (SDXL LDM and diffusers names) is one module of the output.
            Flux.1/SD3 inputs named differently (split, fused, XLabs parts) are first put in the first input's
            naming (`ops.dit_naming`), so they combine per fused weight; a source's sub-selectors (`D05.img.q`)
            keep only those rows of its up factors.
        device: where the decompositions run (`compute.resolve_device`); default the CPU. Outputs come back to
            the CPU in the output dtype, a module at a time.
    """
    if method not in METHODS:
        raise BloraError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    if not sources:
        raise BloraError("merge needs at least one input")
    if clamp_quantile is not None and (method != "svd" or not 0.0 < clamp_quantile <= 1.0):
        raise BloraError("--clamp-quantile takes a value in (0, 1] and goes with --method svd")
    if names is not None and names not in NAMINGS:
        raise BloraError(f"unknown naming {names!r}; valid: {', '.join(NAMINGS)}")
    plan = plan or RankPlan()
    arch = common_arch([s.adapter for s in sources])
    if is_dit(arch):
        if names is not None:
            raise BloraError("--names applies to SD U-Nets; a Flux.1/SD3 merge takes the first input's naming")
        sources = _one_naming(sources)
    warnings = _source_warnings(sources)
    warnings += _base_model_check(sources, strict)
    plans = _plan_modules(sources, method, plan, warnings, arch, names)
    if method == "svd" and (energy or not plan.fixed()):
        _measure(plans, plan, progress, device)
    plans = [p for p in plans if p.rank != 0]
    if not any(p.block is not None for p in plans):
        raise BloraError("the merge selects no module of any input (check --blocks and --ratios); nothing written")
    out_dtype = dtype or _default_dtype(sources[0].adapter)
    ranked = [p.rank for p in plans if p.rank is not None]
    wanted = float(alpha) if alpha is not None else float(max(ranked, default=1))
    file_alpha, stored_dtype = alpha_storage(wanted, out_dtype, "--alpha" if alpha is not None else "the file alpha")
    warnings += [w for w in (zero_alpha_warning(part.module for p in plans for part in p.parts),) if w]

    entries: list[Entry] = []
    ahead: Ahead[dict[str, "torch.Tensor"]] = Ahead()  # the next modules are computed while one is written
    for p in plans:
        entries += _module_entries(p, method, file_alpha, out_dtype, stored_dtype, clamp_quantile, device, ahead)
    passthrough = _passthrough(sources, warnings)
    entries += passthrough
    warnings += loader_notes(
        [p.parts[0].module for p in plans if p.route in ("sum", "copy")],  # every other module becomes LoRA
        arch,
        stems=[p.stem for p in plans],
        one_alpha=True,
        passthrough=[e.name for e in passthrough],
    )
    if any(p.route == "dense" for p in plans):
        kinds = sorted({str(part.module.kind) for p in plans if p.route == "dense" for part in p.parts})
        warnings.append(
            f"{sum(p.route == 'dense' for p in plans)} module(s) of kind {', '.join(kinds)} have no up/down "
            "factors: made dense and compressed by SVD into LoRA factors"
        )
    inputs = tuple(Path(s.adapter.path) for s in sources)
    recorded = {
        "method": method,
        "ratios": [s.ratio for s in sources],
        "blocks": [s.selector for s in sources],
        "resolved_blocks": [None if s.blocks is None else sorted(s.blocks) for s in sources],
        **({"rank": plan.describe()} if method == "svd" else {}),
        "alpha": file_alpha,
        "dtype": out_dtype,
        **({"clamp_quantile": clamp_quantile} if clamp_quantile is not None else {}),
        **({"names": names} if names is not None else {}),
        **(arguments or {}),
    }
    metadata = _metadata(sources, plans, arch, file_alpha, operation, recorded)
    summary = _summary(sources, plans, arch, method, file_alpha, out_dtype, operation)
    return Result(operation, entries, metadata, inputs, warnings, summary)


# --- planning -----------------------------------------------------------------------------------------


def common_arch(adapters: Sequence[Adapter]) -> "Arch":
    """The architecture all adapters share; an error naming two files when they differ."""
    archs = [(a.arch, a.path) for a in adapters]
    first, first_path = archs[0]
    for arch, path in archs[1:]:
        if arch is not first:
            raise BloraError(
                f"different architectures: {Path(first_path).name} is {first.value}, {Path(path).name} is "
                f"{arch.value}; adapters of different model families cannot be merged"
            )
    return first


def _one_naming(sources: Sequence[Source]) -> list[Source]:
    """Flux.1/SD3 sources in one naming — the first input's, fused BFL for XLabs — when a fused weight is named
    two ways among them (split and fused files, XLabs parts) or a sub-selector chooses rows of a fused layer
    (`ops.dit_naming.in_naming`: exact, partly chosen rows zeroed); else as they are."""
    seen: dict[str, set[str]] = {}
    for s in sources:
        for fused, naming in layer_namings(s.adapter):
            seen.setdefault(fused, set()).add(naming)
    rows = any(":" in block for s in sources for block in (s.blocks or ()))
    if all(len(n) == 1 for n in seen.values()) and not rows:
        return list(sources)
    naming = naming_of(sources[0].adapter) or BFL
    return [replace(s, adapter=in_naming(s.adapter, naming, keep=s.blocks)) for s in sources]


def _source_warnings(sources: Sequence[Source]) -> list[str]:
    if len(sources) == 1:
        return list(sources[0].adapter.warnings)
    return [f"{Path(s.adapter.path).name}: {w}" for s in sources for w in s.adapter.warnings]


def _base_model_check(sources: Sequence[Source], strict: bool) -> list[str]:
    warnings = []
    for key in _BASE_MODEL_KEYS:
        seen = {Path(s.adapter.path).name: s.adapter.metadata[key] for s in sources if s.adapter.metadata.get(key)}
        if len(set(seen.values())) > 1:
            listing = ", ".join(f"{name}: {value}" for name, value in seen.items())
            message = f"inputs were trained on different base models ({key} {listing})"
            if strict:
                raise BloraError(message + "; drop --strict to merge anyway")
            warnings.append(message)
    return warnings


def _plan_modules(
    sources: Sequence[Source], method: str, plan: RankPlan, warnings: list[str], arch: "Arch", names: str | None
) -> list[_Plan]:
    """One plan per base-model layer (`layers.layer_id`: LDM and diffusers names of a layer are one), named in
    `names`, else in the first input's U-Net naming."""
    naming = names or next((n for s in sources if (n := unet_naming_of(s.adapter)) is not None), None)
    parts: dict[str, list[_Part]] = {}
    stems: dict[str, str] = {}
    skipped_unplaced = 0
    for source in sources:
        layer_of = {m.stem: key for key, m in modules_by_layer(source.adapter).items()}
        if not math.isfinite(source.ratio):
            raise BloraError(f"ratio {source.ratio} is not a finite number", source.adapter.path)
        if source.blocks is not None:
            _warn_empty(source, warnings)
        for module in source.adapter.modules.values():
            if source.blocks is not None:
                if module.block is None:
                    skipped_unplaced += 1
                    continue
                if coverage(module.placement, source.blocks).none:  # partly chosen DiT layers: masked rows
                    continue
            if source.ratio == 0.0:
                continue
            if module.dora:
                raise BloraError(
                    f"module {module.stem} is DoRA: its magnitude vector depends on the base weight, so it cannot "
                    "be merged or resized in factored form (prune or reweight by 0/1 work)",
                    source.adapter.path,
                )
            key = layer_of[module.stem]
            stems.setdefault(key, stem_in_naming(module.stem, arch, naming))
            parts.setdefault(key, []).append(_Part(source.adapter, module, source.ratio))
    if skipped_unplaced:
        warnings.append(
            f"{skipped_unplaced} module(s) that fit no block were left out (only inputs taken with --blocks all "
            "contribute them)"
        )
    return [_plan_one(stems[key], module_parts, method, plan, arch) for key, module_parts in parts.items()]


def _warn_empty(source: Source, warnings: list[str]) -> None:
    present = {m.block for m in source.adapter.modules.values()}
    arch = source.adapter.arch
    empty = frozenset(b for b in table(arch).blocks if b in source.blocks and b not in present)
    if empty:
        warnings.append(
            f"{Path(source.adapter.path).name}: {describe_blocks(empty, arch)} hold(s) no modules "
            "(an attention-only file has none in blocks without attention)"
        )


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(out, fan_in): a 1×1 conv and a linear layer, or a LoCon and a flattened LoHa conv, are the same matrix."""
    return shape[0], math.prod(shape[1:])


def _plan_one(stem: str, parts: list[_Part], method: str, plan: RankPlan, arch: "Arch") -> _Plan:
    """How one layer is computed. Its output shape is the base layer's (`layers.layer_shape`): a conv layer
    gets conv-shaped factors even when every input holds flattened LoHa/LoKr factors for it."""
    kinds = {p.module.kind for p in parts}
    shapes = [layer_shape(p.module, arch) for p in parts]
    shape_from = max(range(len(parts)), key=lambda i: len(shapes[i]))  # the first 4-D shape, if any
    weight_shape = shapes[shape_from]
    for p in parts:
        if _matrix_shape(p.module.weight_shape) != _matrix_shape(weight_shape):
            raise BloraError(
                f"module {stem} has weight shape {list(p.module.weight_shape)} in {Path(p.adapter.path).name} "
                f"but {list(weight_shape)} in {Path(parts[shape_from].adapter.path).name}"
            )
    if Kind.NORM in kinds:
        if kinds != {Kind.NORM}:
            raise BloraError(f"module {stem} is a norm module in one input and not in another")
        route = "copy" if len(parts) == 1 and parts[0].ratio == 1.0 else "sum"
    elif all(k.is_lora for k in kinds):
        route = "factors"
    else:
        if method == "concat":
            names = ", ".join(sorted(str(k) for k in kinds if not k.is_lora))
            raise BloraError(
                f"module {stem} is {names}, which has no up/down factors to concatenate; use --method svd "
                "(it makes such modules dense and compresses them)",
                next(p for p in parts if not p.module.kind.is_lora).adapter.path,  # the file holding it
            )
        route = "dense"
    first = parts[0].module
    result = _Plan(
        stem,
        parts,
        route,
        weight_shape,
        first.block,
        first.group,
        conv=is_conv(weight_shape),
        input_ranks=[p.module.rank for p in parts if p.module.rank is not None],
    )
    if route in ("sum", "copy"):
        return result
    if method == "concat":
        result.rank = sum(p.module.rank for p in parts)
    else:
        cap = plan.cap(result.block, result.conv)
        result.rank = result.max_rank if cap is None else min(cap, result.max_rank)
    return result


_MAPS_BUDGET = 256 << 20
"""Bytes of first-pass maps (`_Plan.maps`) kept for the write; past it, modules are decomposed again."""


def _measure(plans: list[_Plan], plan: RankPlan, progress: Progress | None, device) -> None:
    """Decompose each module once (modules side by side on the thread policy's workers) to choose its rank
    (dynamic rules) and record the energy it keeps; keep the small maps of the kept ranks for the write, while
    they fit `_MAPS_BUDGET` (then only singular values are taken: cheaper, and the write decomposes again)."""
    kept = 0

    def measured(p: _Plan) -> tuple[Spectrum, int, Maps | None] | None:
        if p.route not in ("factors", "dense") or p.rank == 0:
            return None
        keep_maps = kept < _MAPS_BUDGET and p.route == "factors"
        spectrum = _decompose(p, device, values_only=not keep_maps)
        rank = plan.choose(spectrum, p.block, p.conv)
        maps = spectrum.kept(rank) if keep_maps and rank else None  # a full Decomposition when keep_maps
        return Spectrum(spectrum.s), rank, maps  # the singular values, not the factors a decomposition holds

    for p, found in zip(plans, in_order(measured, plans)):
        if found is not None:
            spectrum, p.rank, p.maps = found
            p.energy = spectrum.energy
            p.retained = spectrum.retained(p.rank) if p.rank else 0.0
            kept += p.maps.nbytes if p.maps is not None else 0
        if progress is not None:
            progress(1)


def _default_dtype(adapter: Adapter) -> str:
    counts: Counter = Counter()
    for module in adapter.modules.values():
        for param in scaled_params(module.kind, frozenset(module.keys)):
            counts[adapter.info(module.keys[param]).dtype] += 1
    for name, _ in counts.most_common():
        if name in _FLOAT_DTYPES:
            return name
    return "F16"


# --- computing ----------------------------------------------------------------------------------------


def _terms(p: _Part) -> tuple["torch.Tensor", "torch.Tensor"]:
    return lora_factors(p.module.kind, p.adapter.tensors(p.module))


def _scaled_terms(p: _Plan) -> tuple[list["torch.Tensor"], list["torch.Tensor"]]:
    """The module's (ups × ratio·scale, downs) over its inputs: the factors the Gram route decomposes."""
    terms = [(part, *_terms(part)) for part in p.parts]
    return [up * part.coefficient for part, up, _ in terms], [down for *_, down in terms]


def _decompose(p: _Plan, device, values_only: bool = False) -> Spectrum:
    """The module's Decomposition, or with `values_only` its singular values alone (cheaper: for the rank
    choice and the energy kept)."""
    if p.route == "factors":
        ups, downs = _scaled_terms(p)
        route = spectrum_of_factors if values_only else decompose_factors
        try:
            return route(ups, downs, device)
        except NonFiniteError:  # find the module and file to name (the Gram route sees NaN/Inf in one pass)
            for part, (up, down) in zip(p.parts, (_terms(part) for part in p.parts)):
                _require_finite(part, up, down)
                _representable(part, up * part.coefficient)
            path = p.parts[0].adapter.path
            raise NonFiniteError(f"module {p.stem}: its ΔW overflows; nothing written", path) from None
    return (spectrum_of_dense if values_only else decompose_dense)(_dense(p).to(device))


def _dense(p: _Plan) -> "torch.Tensor":
    total = None
    for part in p.parts:
        m = part.module
        tensors = part.adapter.tensors(m)
        _require_finite(part, *tensors.values())
        delta = delta_weight(m.kind, tensors, m.scale, m.weight_shape).reshape(p.weight_shape[0], -1)
        term = _representable(part, delta * part.ratio)
        total = term if total is None else _representable(part, total + term)
    return total


def _representable(part: _Part, scaled: "torch.Tensor") -> "torch.Tensor":
    """`scaled` (finite factors times the module's ratio × alpha/rank), or an error when that overflows float32."""
    if not bool(scaled.isfinite().all()):
        raise NonFiniteError(
            f"module {part.module.stem}: its scale (ratio × alpha/rank = {part.coefficient:g}) makes ΔW overflow "
            "float32; nothing written",
            part.adapter.path,
        )
    return scaled


def _require_finite(part: _Part, *tensors: "torch.Tensor") -> None:
    """An SVD cannot take NaN/Inf (not even with --allow-nonfinite): refuse, naming the module and its file."""
    if not all(bool(t.isfinite().all()) for t in tensors):
        raise NonFiniteError(
            f"module {part.module.stem} holds NaN or Inf values, which cannot be decomposed; repair or prune it first",
            part.adapter.path,
        )


def _concat(p: _Plan, file_alpha: float) -> tuple["torch.Tensor", "torch.Tensor"]:
    import torch

    ups, downs = [], []
    gain = p.rank / file_alpha
    for part in p.parts:
        up, down = _terms(part)
        k = part.coefficient * gain
        root = math.sqrt(abs(k))
        ups.append(up * (math.copysign(root, k)))
        downs.append(down * root)
    return torch.cat(ups, dim=1), torch.cat(downs, dim=0)


def _compressed(p: _Plan, file_alpha: float, clamp_quantile: float | None, device) -> tuple["torch.Tensor", "torch.Tensor"]:
    decomposition = p.maps.on(*_scaled_terms(p), device) if p.maps is not None else _decompose(p, device)
    p.maps = None  # written once; the memory goes back
    up, down = decomposition.factors(p.rank, gain=p.rank / file_alpha)
    if clamp_quantile is not None:
        up, down = _clamp(up, down, clamp_quantile)
    return up, down


def _clamp(up: "torch.Tensor", down: "torch.Tensor", quantile: float) -> tuple["torch.Tensor", "torch.Tensor"]:
    import torch

    magnitudes = torch.cat([up.reshape(-1), down.reshape(-1)]).abs()
    k = min(magnitudes.numel(), max(1, math.ceil(quantile * magnitudes.numel())))
    limit = float(magnitudes.kthvalue(k).values)
    return up.clamp(-limit, limit), down.clamp(-limit, limit)


def _summed(p: _Plan) -> dict[str, "torch.Tensor"]:
    out: dict[str, "torch.Tensor"] = {}
    for part in p.parts:
        for param, tensor in part.adapter.tensors(part.module).items():
            if param == "alpha":
                continue
            term = tensor.float() * part.ratio
            out[param] = term if param not in out else out[param] + term
    return out


class _Lazy:
    """One module's outputs, computed when the writer first asks and forgotten once all are written."""

    def __init__(self, stem: str, make: Callable[[], dict[str, "torch.Tensor"]], path: Path):
        self._stem, self._make, self._path = stem, make, path
        self._tensors: dict[str, "torch.Tensor"] | None = None

    def take(self, name: str) -> "torch.Tensor":
        if self._tensors is None or name not in self._tensors:
            self._tensors = self._make()  # NaN/Inf is refused as it is written (Result.save), naming the input
        tensor = self._tensors.pop(name)
        if not self._tensors:
            self._tensors = None
        return tensor


def _module_entries(
    p: _Plan, method: str, file_alpha: float, dtype: str, alpha_dtype: str, clamp_quantile: float | None, device,
    ahead: Ahead,
) -> list[Entry]:
    path = Path(p.parts[0].adapter.path)
    if p.route == "copy" or _untouched(p, method, file_alpha, dtype):
        part = p.parts[0]
        return [copied(part.adapter, key, f"{p.stem}.{param}") for param, key in part.module.keys.items()]
    if p.route == "sum":
        lazy = _Lazy(p.stem, ahead.add(p.stem + ".", lambda: _summed(p)), path)
        params = sorted({param for part in p.parts for param in part.module.keys if param != "alpha"})
        shapes = {param: part.module.shapes[param] for part in p.parts for param in part.module.keys}
        return [computed(f"{p.stem}.{param}", dtype, shapes[param], lambda n=param: lazy.take(n)) for param in params]

    def make() -> dict[str, "torch.Tensor"]:
        from blora_tools.adapter.tensors import TORCH_DTYPE

        if method == "concat":
            up, down = _concat(p, file_alpha)
        else:
            up, down = _compressed(p, file_alpha, clamp_quantile, device)
        out = TORCH_DTYPE[dtype]  # cast here, on the worker, not by the writer's thread
        return {"up": up.to(device="cpu", dtype=out), "down": down.to(device="cpu", dtype=out)}

    lazy = _Lazy(p.stem, ahead.add(p.stem + ".", make), path)  # key order: the writer's (by tensor name)
    rank = p.rank
    kernel = p.weight_shape[2:]
    up_shape = (p.weight_shape[0], rank) + ((1, 1) if len(p.weight_shape) == 4 else ())
    down_shape = (rank, p.weight_shape[1]) + tuple(kernel)
    return [
        computed(f"{p.stem}.lora_up.weight", dtype, up_shape, lambda: lazy.take("up")),
        computed(f"{p.stem}.lora_down.weight", dtype, down_shape, lambda: lazy.take("down")),
        scalar(f"{p.stem}.alpha", alpha_dtype, file_alpha),
    ]


def _untouched(p: _Plan, method: str, file_alpha: float, dtype: str) -> bool:
    """A module concat would rewrite to the values it has (one kohya input, ratio 1, alpha = the file's):
    copied as bytes instead."""
    if method != "concat" or len(p.parts) != 1:
        return False
    part = p.parts[0]
    m = part.module
    return (
        part.ratio == 1.0
        and part.adapter.format is Format.KOHYA
        and m.kind in (Kind.LORA, Kind.LORA_CONV1X1, Kind.LOCON)
        and m.alpha == file_alpha
        and all(part.adapter.info(key).dtype == dtype for param, key in m.keys.items() if param != "alpha")
    )


def _passthrough(sources: Sequence[Source], warnings: list[str]) -> list[Entry]:
    entries: dict[str, Entry] = {}
    clashes = 0
    for source in sources:
        for key in source.adapter.passthrough:
            if key in entries:
                clashes += 1
                continue
            entries[key] = copied(source.adapter, key)
    if clashes:
        warnings.append(f"{clashes} non-adapter key(s) appear in several inputs: the first input's copy is kept")
    return list(entries.values())


# --- metadata and summary -----------------------------------------------------------------------------


def _metadata(
    sources: Sequence[Source], plans: list[_Plan], arch, file_alpha: float, operation: str, arguments: dict
) -> dict[str, str]:
    """The first input's metadata (less its PEFT config and spec), stating the merged modules."""
    source_meta = {k: v for k, v in sources[0].adapter.metadata.items() if k not in (PEFT_METADATA_KEY, SPEC_KEY)}
    return updated_metadata(
        source_meta,
        operation=operation,
        inputs=[s.adapter.path for s in sources],
        arguments=arguments,
        arch=arch,
        modules=[_facts(p, file_alpha) for p in plans],
    )


def _facts(p: _Plan, file_alpha: float) -> ModuleFacts:
    """What an output module is: LoRA factors of the plan's rank with the file alpha, or a summed norm module."""
    placement = p.parts[0].module.placement
    if p.rank is None:
        return ModuleFacts(placement, str(Kind.NORM), None, None, False)
    kind = Kind.LOCON if p.conv else Kind.LORA_CONV1X1 if len(p.weight_shape) == 4 else Kind.LORA
    return ModuleFacts(placement, str(kind), p.rank, file_alpha, p.conv)


def _summary(
    sources: Sequence[Source], plans: list[_Plan], arch, method: str, file_alpha: float, dtype: str, operation: str
) -> dict:
    layout = table(arch)
    order = [*layout.groups, "none"]
    groups: dict[str, dict] = {}
    for p in plans:
        g = groups.setdefault(
            p.group,
            {"modules": 0, "rank_in": [], "rank_out": [], "energy": 0.0, "kept": 0.0, "measured": False},
        )
        g["modules"] += 1
        g["rank_in"] += p.input_ranks
        if p.rank is not None:
            g["rank_out"].append(p.rank)
        if p.energy is not None:
            g["measured"] = True
            g["energy"] += p.energy
            g["kept"] += p.energy * p.retained
    blocks = {}
    for name in sorted(groups, key=lambda n: order.index(n) if n in order else len(order)):
        g = groups[name]
        row = {
            "modules": g["modules"],
            "rank_in": _span(g["rank_in"]),
            "rank_out": _span(g["rank_out"]),
        }
        if g["measured"]:
            row["retained"] = 1.0 if g["energy"] == 0 else g["kept"] / g["energy"]
        blocks[name] = row
    summary: dict = {
        "operation": operation,
        "inputs": [
            {"path": str(s.adapter.path), "ratio": s.ratio, "blocks": s.selector} for s in sources
        ],
        "arch": arch.value,
        "method": method,
        "alpha": file_alpha,
        "dtype": dtype,
        "modules": len(plans),
        "blocks": blocks,
    }
    measured = [p for p in plans if p.energy is not None]
    if measured:
        total = sum(p.energy for p in measured)
        summary["retained"] = 1.0 if total == 0 else sum(p.energy * p.retained for p in measured) / total
    return summary


def _span(values: list[int]) -> list[int] | None:
    return [min(values), max(values)] if values else None
