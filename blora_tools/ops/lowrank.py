"""Low-rank algebra without dense ΔW: QR of stacked factors, SVD of the small core, rank choice.

A sum of low-rank terms ΔW = Σ Uᵢ·Dᵢ is the product of the stacked factors U = [U₁ … Uₖ] (out×R) and
D = [D₁; …; Dₖ] (R×fan_in). With U = Qᵤ·Rᵤ and Dᵀ = Q_d·R_d (thin QR), ΔW = Qᵤ·(Rᵤ·R_dᵀ)·Q_dᵀ, so the SVD
of ΔW is the SVD of the R×R core rotated back by the orthonormal Q's: exact, O((out+fan_in)·R²), and no
out×fan_in matrix is ever formed (docs/architecture.md §3, §5). Dense SVD is only for kinds with no factorisation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from blora_tools.errors import BloraError

if TYPE_CHECKING:
    import torch

__all__ = ["RULES", "Decomposition", "decompose_factors", "decompose_dense", "RankRule", "RankPlan", "rank_plan"]

RULES = ("sv_fro", "sv_ratio", "sv_cumulative")
"""Dynamic rank rules (kohya `resize_lora.py` names): Frobenius share kept, largest/smallest kept singular
value ratio, share of the sum of singular values kept."""


@dataclass(frozen=True)
class Decomposition:
    """ΔW = u · diag(s) · v: u (out×k) has orthonormal columns, v (k×fan_in) orthonormal rows, s descending."""

    u: "torch.Tensor"
    s: "torch.Tensor"
    v: "torch.Tensor"

    @property
    def max_rank(self) -> int:
        return int(self.s.shape[0])

    @property
    def energy(self) -> float:
        """‖ΔW‖_F² (sum of squared singular values)."""
        return float((self.s.double() ** 2).sum())

    def retained(self, rank: int) -> float:
        """The share of ‖ΔW‖_F² a rank-`rank` truncation keeps (1.0 for a zero ΔW)."""
        total = self.energy
        if total == 0.0:
            return 1.0
        return float((self.s[:rank].double() ** 2).sum()) / total

    def factors(self, rank: int, gain: float = 1.0) -> tuple["torch.Tensor", "torch.Tensor"]:
        """(up out×rank, down rank×fan_in) with up·down = gain · (rank-`rank` truncation of ΔW).

        The singular values (times `gain` ≥ 0) are split as √ across both factors, so neither factor holds
        the whole magnitude (fp16 range). Columns past `max_rank` are zero.
        """
        import torch

        if gain < 0:
            raise ValueError("gain must be ≥ 0")
        k = min(rank, self.max_rank)
        root = self.s[:k].clamp_min(0).sqrt() * math.sqrt(gain)  # √s·√gain: s·gain alone may overflow float32
        up = self.u[:, :k] * root
        down = root[:, None] * self.v[:k]
        if k < rank:  # pad: a requested rank above what ΔW has (keeps the promised shape)
            up = torch.cat([up, up.new_zeros(up.shape[0], rank - k)], dim=1)
            down = torch.cat([down, down.new_zeros(rank - k, down.shape[1])], dim=0)
        return up, down


def decompose_factors(ups: Sequence["torch.Tensor"], downs: Sequence["torch.Tensor"]) -> Decomposition:
    """SVD of Σ ups[i] @ downs[i] (ups out×rᵢ, downs rᵢ×fan_in) via QR of the stacked factors.

    Householder QR and SVD are backward stable, so float32 (the precision of any stored factor) is enough:
    results agree with a float64 dense SVD to ~1e-6 relative.
    """
    import torch

    up = torch.cat([u.float() for u in ups], dim=1)
    down = torch.cat([d.float() for d in downs], dim=0)
    q_up, r_up = torch.linalg.qr(up)  # out×p, p×R
    q_down, r_down = torch.linalg.qr(down.T)  # fan_in×q, q×R
    core = r_up @ r_down.T  # p×q, p, q ≤ R
    a, s, bt = torch.linalg.svd(core, full_matrices=False)
    return Decomposition(q_up @ a, s, bt @ q_down.T)


def decompose_dense(delta: "torch.Tensor") -> Decomposition:
    """SVD of a dense ΔW (2-D; conv weights flattened over in·kh·kw). Only for LoHa, LoKr and full inputs."""
    import torch

    matrix = delta.float().reshape(delta.shape[0], -1)
    u, s, vt = torch.linalg.svd(matrix, full_matrices=False)
    return Decomposition(u, s, vt)


@dataclass(frozen=True)
class RankRule:
    """A dynamic rank rule such as `sv_fro:0.95`: keep the fewest singular values that satisfy it."""

    method: str
    value: float

    def __post_init__(self) -> None:
        if self.method not in RULES:
            raise BloraError(f"unknown rank rule {self.method!r}; valid: {', '.join(RULES)} (e.g. sv_fro:0.95)")
        if not math.isfinite(self.value):
            raise BloraError(f"rank rule {self.method}: {self.value} is not a finite number")
        if self.method == "sv_ratio" and self.value < 1.0:
            raise BloraError(f"sv_ratio:{self.value:g}: the ratio largest/smallest kept value must be ≥ 1")
        if self.method != "sv_ratio" and not 0.0 < self.value <= 1.0:
            raise BloraError(f"{self.method}:{self.value:g}: the share kept must be in (0, 1]")

    @classmethod
    def from_text(cls, text: str) -> "RankRule":
        """`sv_fro:0.95`, `sv_ratio:20` or `sv_cumulative:0.9` (also with `=`)."""
        method, sep, value = text.strip().replace("=", ":").partition(":")
        if not sep:
            raise BloraError(f"rank rule {text!r}: write METHOD:VALUE, e.g. sv_fro:0.95 ({', '.join(RULES)})")
        try:
            number = float(value)
        except ValueError:
            raise BloraError(f"rank rule {text!r}: {value!r} is not a number") from None
        return cls(method.strip().lower(), number)

    def __str__(self) -> str:
        return f"{self.method}:{self.value:g}"

    def rank(self, s: "torch.Tensor") -> int:
        """The number of singular values (descending `s`) to keep; at least 1."""
        values = [float(x) for x in s.double()]
        if not values or values[0] <= 0.0:
            return 1
        if self.method == "sv_ratio":
            floor = values[0] / self.value
            return max(1, sum(1 for x in values if x >= floor))
        parts = [x * x for x in values] if self.method == "sv_fro" else values
        total = sum(parts)
        target = self.value**2 if self.method == "sv_fro" else self.value
        running = 0.0
        for i, part in enumerate(parts, 1):
            running += part
            if running >= target * total * (1 - 1e-12):
                return i
        return len(values)


@dataclass(frozen=True)
class RankPlan:
    """How many singular values each module keeps.

    `ranks` caps modules per block (a missing block uses `default`; None = no cap, keep every rank the
    module has; 0 = drop the block). `conv` caps k×k convolutions instead, when given. `rule`, when given,
    picks fewer per module (the caps stay upper bounds).
    """

    default: int | None = None
    ranks: Mapping[str, int] = field(default_factory=dict)
    conv: int | None = None
    rule: RankRule | None = None

    def cap(self, block: str | None, conv: bool) -> int | None:
        """The most a module of `block` may keep (None = no cap)."""
        block_cap = self.ranks.get(block, self.default) if block is not None else self.default
        if conv and self.conv is not None:
            return self.conv if block_cap != 0 else 0
        return block_cap

    def fixed(self) -> bool:
        """True when every module's rank follows from the caps alone (no rule looks at singular values)."""
        return self.rule is None

    def choose(self, decomposition: Decomposition, block: str | None, conv: bool) -> int:
        """The rank to keep for one module."""
        cap = self.cap(block, conv)
        limit = decomposition.max_rank if cap is None else min(cap, decomposition.max_rank)
        if self.rule is None:
            return limit
        return min(limit, self.rule.rank(decomposition.s))

    def describe(self) -> dict[str, object]:
        """A JSON-friendly record of the plan (for metadata and summaries)."""
        doc: dict[str, object] = {}
        if self.default is not None:
            doc["rank"] = self.default
        if self.ranks:
            doc["block_ranks"] = dict(sorted(self.ranks.items()))
        if self.conv is not None:
            doc["conv_rank"] = self.conv
        if self.rule is not None:
            doc["dynamic"] = str(self.rule)
        return doc


def rank_plan(
    text: str | None, arch, *, conv: int | None = None, rule: RankRule | None = None
) -> RankPlan:
    """A RankPlan from `--rank` text: `16` (every module) or `in0=8,out3=16` (per block; others unchanged).

    Terms are selectors, later terms override earlier ones; values are whole numbers ≥ 0 (0 drops the block).
    """
    from blora_tools.errors import SelectorError
    from blora_tools.taxonomy.selectors import resolve_selector
    from blora_tools.taxonomy.weights import parse_weights

    if conv is not None and conv < 1:
        raise BloraError(f"--conv-rank {conv}: a rank must be at least 1")
    if text is None or not text.strip():
        return RankPlan(None, {}, conv, rule)
    body = text.strip()
    if body.isdigit():
        value = int(body)
        if value < 1:
            raise BloraError(f"--rank {body}: a rank must be at least 1 (use prune to drop blocks)")
        return RankPlan(value, {}, conv, rule)
    spec = parse_weights(body)
    if spec.vector is not None:
        raise SelectorError(f"--rank {text!r}: give one number or block=rank pairs such as in0=8,out3=16")
    ranks: dict[str, int] = {}
    for term, value in spec.named:
        if value < 0 or not float(value).is_integer():
            raise SelectorError(f"--rank {text!r}: {term}={value:g} is not a whole number ≥ 0")
        for block in resolve_selector(term, arch):
            ranks[block] = int(value)
    return RankPlan(None, ranks, conv, rule)
