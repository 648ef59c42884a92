"""Compare two adapters block by block: who trains what, how strongly, and whether they pull together.

Per paper group (per block on Flux.1/SD3, where split and fused files are compared on the fused BFL
weights), with every module's scaled ΔW flattened and the group's modules concatenated (zeros where a
file lacks a module):

* `norm_a`, `norm_b` — ‖ΔW‖_F of each file's part of the group;
* `cosine` — ⟨ΔW_a, ΔW_b⟩ / (‖ΔW_a‖·‖ΔW_b‖); `None` when either file has no module in the group;
* `overlap` — the mean squared cosine of the principal angles between the two column spaces (1 = same
  directions, 0 = orthogonal), averaged over the modules both files have; `None` when they share none.

Nothing dense is formed for LoRA kinds: ⟨U₁D₁, U₂D₂⟩_F = Σ (U₁ᵀU₂) ⊙ (D₁D₂ᵀ), norms from Gram matrices, and
column spaces from `lowrank.decompose_factors` (Gram matrices of the up and down factors and a small eigenproblem: the
column space of ΔW itself, which is that of U when D has full rank). LoHa, LoKr and full modules, which have
no such factors, are made dense (once per module both files have).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from blora_tools.adapter.kinds import delta_weight, factored_inner, frobenius_norm, lora_factors, rank_exceeds_layer
from blora_tools.adapter.layers import modules_by_layer
from blora_tools.adapter.model import Adapter, Module
from blora_tools.compute import in_order, on_device
from blora_tools.errors import BloraError, NonFiniteError
from blora_tools.ops.dit_naming import in_naming
from blora_tools.ops.stats import row_order
from blora_tools.taxonomy.arch import Arch, is_dit
from blora_tools.taxonomy.blocks import table
from blora_tools.taxonomy.dit import BFL

if TYPE_CHECKING:
    import torch

__all__ = ["SCHEMA", "compare"]

SCHEMA = "blora-compare/1"
_STRONG = 0.25
"""A block is strong in a file when its norm is at least this share of the file's strongest block."""
_ALIGNED = 0.3
"""cosine above this: the two adapters push the block the same way (their effects add up)."""
_OPPOSED = -0.3
"""cosine below this: they push it opposite ways (they cancel out)."""
_BASIS_TOLERANCE = 1e-5
"""Singular values below this share of the largest do not count towards a column space."""


@dataclass
class _Group:
    modules_a: int = 0
    modules_b: int = 0
    shared: int = 0
    norm_a_sq: float = 0.0
    norm_b_sq: float = 0.0
    inner: float = 0.0
    overlaps: list[float] = field(default_factory=list)


def compare(
    a: Adapter,
    b: Adapter,
    *,
    style: str | None = None,
    on_module: Callable[[], None] | None = None,
    device: "torch.device | str | None" = None,
) -> dict:
    """The `compare --json` object (schema `blora-compare/1`) for adapters `a` and `b`.

    `style` (`a` or `b`) says which file is the style adapter for the pruning advice; by default the one
    that trains fewer U-Net groups. `device` is where each module's figures are computed (default: the CPU).
    Raises BloraError when the architectures differ.
    """
    if a.arch is not b.arch:
        raise BloraError(
            f"architectures differ: {a.path} is {a.arch.value}, {b.path} is {b.arch.value}; "
            "adapters for different models cannot be compared"
        )
    if style not in (None, "a", "b"):
        raise BloraError(f"style must be 'a' or 'b', not {style!r}")
    arch = a.arch
    warnings = [f"{x.path}: {w}" for x in (a, b) for w in x.warnings]
    dit = is_dit(arch)
    if dit:  # split and fused files meet on the fused BFL weights
        a, b = in_naming(a, BFL), in_naming(b, BFL)
    keyed_a, keyed_b = modules_by_layer(a), modules_by_layer(b)
    groups: dict[str, _Group] = {g: _Group() for g in _rows(arch)}
    dora = []
    keys = sorted(set(keyed_a) | set(keyed_b))

    def figures(key) -> tuple[float | None, float | None, float | None, float | None]:
        """(‖ΔW_a‖, ‖ΔW_b‖, ⟨ΔW_a, ΔW_b⟩, overlap) of one layer; None where a file lacks it or a ΔW is zero."""
        ma, mb = keyed_a.get(key), keyed_b.get(key)
        ta = on_device(a.tensors(ma), device) if ma else None
        tb = on_device(b.tensors(mb), device) if mb else None
        norm_a = _norm(a, ma, ta) if ma else None
        norm_b = _norm(b, mb, tb) if mb else None
        if not (ma and mb):
            return norm_a, norm_b, None, None
        xa, xb = _matrices(ma, ta), _matrices(mb, tb)
        return norm_a, norm_b, _inner(ma, xa, mb, xb), _overlap(ma, xa, mb, xb)

    for key, (norm_a, norm_b, inner, overlap) in zip(keys, in_order(figures, keys)):  # layers side by side
        ma, mb = keyed_a.get(key), keyed_b.get(key)
        group = groups.setdefault(_row_of(ma or mb, dit), _Group())
        if ma:
            group.modules_a += 1
            group.norm_a_sq += norm_a**2
            if ma.dora:
                dora.append(ma.stem)
        if mb:
            group.modules_b += 1
            group.norm_b_sq += norm_b**2
            if mb.dora:
                dora.append(mb.stem)
        if ma and mb:
            group.shared += 1
            group.inner += inner
            if overlap is not None:
                group.overlaps.append(overlap)
        if on_module:
            on_module()
    if dora:
        warnings.append(
            f"{len(dora)} DoRA module(s), e.g. {dora[0]}: compared by their LoRA factors (the magnitude vector, "
            "which rescales the whole weight, is left out)"
        )
    blocks = {name: _figures(g) for name, g in groups.items()}
    for name in ("none", *(table(arch).blocks if dit else ())):
        if name in blocks and not (blocks[name]["modules_a"] or blocks[name]["modules_b"]):
            del blocks[name]
    _flag(blocks)
    return {
        "schema": SCHEMA,
        "a": str(a.path),
        "b": str(b.path),
        "arch": arch.value,
        "blocks": blocks,
        "thresholds": {"strong": _STRONG, "aligned": _ALIGNED, "opposed": _OPPOSED},
        "advice": _advice(blocks, arch, style, a, b),
        "warnings": warnings,
    }


def _rows(arch: Arch) -> list[str]:
    """The report's rows: paper groups on U-Nets; on Flux.1/SD3 every block (D05, S10, J03; BASE layers are
    `OTHER`), the text encoders first."""
    return list(table(arch).blocks) if is_dit(arch) else row_order(arch, fine=False)


def _row_of(module: Module, dit: bool) -> str:
    return (module.block or "none") if dit else module.group


def _norm(adapter: Adapter, module: Module, tensors: dict) -> float:
    """‖ΔW‖_F of one module; an error when it is NaN/Inf or its square overflows (an extreme alpha)."""
    norm = frobenius_norm(module.kind, tensors, module.scale, module.weight_shape)
    if not math.isfinite(norm * norm):
        if all(bool(t.isfinite().all()) for t in tensors.values()):
            raise NonFiniteError(
                f"module {module.stem}: ‖ΔW‖ = {norm:g} (alpha/rank = {module.scale:g}) is too large to compare",
                adapter.path,
            )
        raise NonFiniteError(f"module {module.stem} holds NaN or Inf values; nothing to compare", adapter.path)
    return norm


def _matrices(module: Module, tensors: dict) -> tuple[str, tuple["torch.Tensor", ...]]:
    """(`factors`, (scaled up out×r, down r×fan_in)) for LoRA kinds of rank ≤ min(out, fan_in), else (`dense`,
    (ΔW as out×fan_in,))."""
    if module.kind.is_lora:
        up, down = lora_factors(module.kind, tensors)
        if not rank_exceeds_layer(up, down):  # else r×r products would outgrow the layer: go dense
            return "factors", (up.double() * module.scale, down.double())
        return "dense", ((up.double() * module.scale) @ down.double(),)
    dense = delta_weight(module.kind, tensors, module.scale, module.weight_shape)
    return "dense", (dense.double().reshape(dense.shape[0], -1),)


def _inner(ma: Module, xa: tuple, mb: Module, xb: tuple) -> float:
    """⟨ΔW_a, ΔW_b⟩_F of two modules adapting the same layer, from factors where both have them."""
    (kind_a, a), (kind_b, b) = xa, xb
    shape_a, shape_b = (a[0].shape[0], a[-1].shape[-1]), (b[0].shape[0], b[-1].shape[-1])
    if shape_a != shape_b:
        raise BloraError(
            f"module {ma.stem} adapts a {shape_a[0]}×{shape_a[1]} weight in one file and {mb.stem} a "
            f"{shape_b[0]}×{shape_b[1]} weight in the other; the adapters are not for the same model"
        )
    if kind_a == "factors" and kind_b == "factors":
        return factored_inner(*a, *b)
    if kind_a == "dense" and kind_b == "dense":
        return float((a[0] * b[0]).sum())
    (u, d), dense = (a, b[0]) if kind_a == "factors" else (b, a[0])
    return float(((u.T @ dense) * d).sum())  # ⟨UD, M⟩ = Σ (UᵀM) ⊙ D


def _basis(x: tuple) -> "torch.Tensor | None":
    """An orthonormal basis (out×k) of the column space of a module's ΔW; None for a zero ΔW."""
    from blora_tools.ops.lowrank import decompose_dense, decompose_factors

    kind, m = x
    decomposition = decompose_factors([m[0]], [m[1]]) if kind == "factors" else decompose_dense(m[0])
    s = decomposition.s
    if s.numel() == 0 or not float(s[0]) > 0.0 or not math.isfinite(float(s[0])):
        return None
    keep = int((s > _BASIS_TOLERANCE * s[0]).sum())
    return decomposition.u_columns(keep).double()


def _overlap(ma: Module, xa: tuple, mb: Module, xb: tuple) -> float | None:
    """Mean of cos² of the principal angles between two modules' column spaces (None if a ΔW is zero)."""
    import torch

    qa, qb = _basis(xa), _basis(xb)
    if qa is None or qb is None:
        return None
    cosines = torch.linalg.svdvals(qa.T @ qb).clamp(0.0, 1.0)
    return float((cosines**2).mean())


def _figures(g: _Group) -> dict:
    norm_a, norm_b = math.sqrt(g.norm_a_sq), math.sqrt(g.norm_b_sq)
    cosine = None
    if g.modules_a and g.modules_b and norm_a > 0 and norm_b > 0:
        cosine = max(-1.0, min(1.0, g.inner / (norm_a * norm_b)))
    trained = "both" if g.modules_a and g.modules_b else "a" if g.modules_a else "b" if g.modules_b else None
    return {
        "trained_by": trained,
        "modules_a": g.modules_a,
        "modules_b": g.modules_b,
        "shared": g.shared,
        "norm_a": norm_a,
        "norm_b": norm_b,
        "cosine": cosine,
        "overlap": sum(g.overlaps) / len(g.overlaps) if g.overlaps else None,
    }


def _flag(blocks: dict[str, dict]) -> None:
    """Add `strong_a`, `strong_b` and `status` (aligned / opposed / shared / a only / b only / None)."""
    top_a = max((b["norm_a"] for b in blocks.values()), default=0.0)
    top_b = max((b["norm_b"] for b in blocks.values()), default=0.0)
    for b in blocks.values():
        b["strong_a"] = top_a > 0 and b["norm_a"] >= _STRONG * top_a
        b["strong_b"] = top_b > 0 and b["norm_b"] >= _STRONG * top_b
        status = {"a": "a only", "b": "b only", None: None}.get(b["trained_by"], "shared")
        if b["trained_by"] == "both" and b["cosine"] is not None and b["strong_a"] and b["strong_b"]:
            if b["cosine"] > _ALIGNED:
                status = "aligned"
            elif b["cosine"] < _OPPOSED:
                status = "opposed"
        b["status"] = status


def _advice(blocks: dict[str, dict], arch: Arch, style: str | None, a: Adapter, b: Adapter) -> dict:
    """Which blocks to prune from the style adapter before merging it with the character adapter."""
    unet = set(table(arch).unet_lbw if is_dit(arch) else table(arch).unet_groups)
    spread = {
        side: sum(1 for name, f in blocks.items() if name in unet and f[f"modules_{side}"]) for side in ("a", "b")
    }
    chosen = style or ("a" if spread["a"] < spread["b"] else "b")
    conflicts = [name for name, f in blocks.items() if f["status"] in ("aligned", "opposed")]
    prune = [name for name in conflicts if blocks[name][f"modules_{chosen}"]]
    path = str((a if chosen == "a" else b).path)
    if prune:
        reason = (
            f"both adapters are strong in {', '.join(prune)} and their changes there are "
            + ("aligned (they add up)" if all(blocks[n]["status"] == "aligned" for n in prune) else
               "opposed (they cancel)" if all(blocks[n]["status"] == "opposed" for n in prune) else
               "aligned or opposed (they add up or cancel)")
            + "; prune these blocks from the style adapter before merging"
        )
    else:
        reason = "no block where both adapters are strong and aligned or opposed: they can be merged as they are"
    return {
        "style": chosen,
        "style_file": path,
        "style_assumed": style is None,
        "prune": prune,
        "reason": reason,
    }
