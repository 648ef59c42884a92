"""Adapter kinds and their algebra: which parameters make each kind, its ΔW, its norm, its scaled factor.

The algebra is written once here, as data plus a few functions, so operations never branch on
parameter names themselves.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Mapping

from blora_tools.names import Named

if TYPE_CHECKING:
    import torch

__all__ = [
    "Kind",
    "kind_of",
    "scaled_params",
    "row_params",
    "lora_factors",
    "rank_exceeds_layer",
    "delta_weight",
    "factored_inner",
    "gram_norm",
    "frobenius_norm",
]


class Kind(Named):
    """What an adapter module is made of."""

    LORA = "lora"  # linear: down (r×in), up (out×r)
    LORA_CONV1X1 = "lora_conv1x1"  # 1×1 conv: down (r×in×1×1), up (out×r×1×1)
    LOCON = "locon"  # k×k conv: down (r×in×k×k), up (out×r×1×1)
    TUCKER = "tucker"  # LoCon with a lora_mid core (r×r×k×k)
    LOHA = "loha"
    LOKR = "lokr"
    FULL = "full"
    NORM = "norm"

    @property
    def is_lora(self) -> bool:
        """Plain up/down factors (what concat merges and the Gram route compresses)."""
        return self in (Kind.LORA, Kind.LORA_CONV1X1, Kind.LOCON, Kind.TUCKER)

    @property
    def has_rank(self) -> bool:
        return self not in (Kind.FULL, Kind.NORM)


_REQUIRED: Mapping[Kind, frozenset[str]] = {
    Kind.LORA: frozenset({"lora_down.weight", "lora_up.weight"}),
    Kind.LORA_CONV1X1: frozenset({"lora_down.weight", "lora_up.weight"}),
    Kind.LOCON: frozenset({"lora_down.weight", "lora_up.weight"}),
    Kind.TUCKER: frozenset({"lora_down.weight", "lora_up.weight", "lora_mid.weight"}),
    Kind.LOHA: frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}),
    Kind.LOKR: frozenset(),  # one of each lokr_w1 / lokr_w1_a+b and lokr_w2 / lokr_w2_a+b; see kind_of
    Kind.FULL: frozenset({"diff"}),
    Kind.NORM: frozenset({"w_norm"}),
}

_OPTIONAL = frozenset({"alpha", "dora_scale", "hada_t1", "hada_t2", "lokr_t2", "diff_b", "b_norm"})


def kind_of(params: frozenset[str], down_ndim: int | None, kernel: tuple[int, ...] | None) -> Kind | str:
    """The kind of a module from its parameter names; an error string when the set is incomplete."""
    if "lora_down.weight" in params or "lora_up.weight" in params:
        missing = {"lora_down.weight", "lora_up.weight"} - params
        if missing:
            return f"has {'lora_up' if 'lora_up.weight' in params else 'lora_down'} but no {missing.pop().split('.')[0]}"
        if "lora_mid.weight" in params:
            return Kind.TUCKER
        if down_ndim == 4:
            return Kind.LORA_CONV1X1 if kernel == (1, 1) else Kind.LOCON
        return Kind.LORA
    if any(p.startswith("hada_") for p in params):
        missing = _REQUIRED[Kind.LOHA] - params
        return Kind.LOHA if not missing else f"LoHa module lacks {', '.join(sorted(missing))}"
    if any(p.startswith("lokr_") for p in params):
        w1 = "lokr_w1" in params or {"lokr_w1_a", "lokr_w1_b"} <= params
        w2 = "lokr_w2" in params or {"lokr_w2_a", "lokr_w2_b"} <= params
        return Kind.LOKR if (w1 and w2) else "LoKr module lacks lokr_w1 or lokr_w2 (or their _a/_b factors)"
    if "diff" in params:
        return Kind.FULL
    if "w_norm" in params:
        return Kind.NORM
    if params <= {"alpha"}:
        return "orphan alpha: no weights for this module"
    return "no weights for this module (only " + ", ".join(sorted(params)) + ")"


def scaled_params(kind: Kind, params: frozenset[str]) -> tuple[str, ...]:
    """The parameters a linear reweight multiplies: exactly one factor of the product (docs/architecture.md §3)."""
    if kind.is_lora:
        return ("lora_up.weight",)
    if kind is Kind.LOHA:
        return ("hada_w1_a",)
    if kind is Kind.LOKR:
        return ("lokr_w1",) if "lokr_w1" in params else ("lokr_w1_a",)
    if kind is Kind.FULL:
        return tuple(p for p in ("diff", "diff_b") if p in params)
    return tuple(p for p in ("w_norm", "b_norm") if p in params)


def row_params(kind: Kind, params: frozenset[str]) -> tuple[tuple[str, int], ...]:
    """(parameter, axis) pairs whose entries along `axis` are ΔW's output rows, for scaling some rows of ΔW by
    multiplying one factor (docs/architecture.md §3): LoRA kinds the up factor's rows; LoHa `hada_w1_a`, since
    ΔW = (W1a·W1b) ⊙ (W2a·W2b) row by row (rows of W1a; its columns with a Tucker core, as LyCORIS's
    `rebuild_tucker` contracts `hada_w1_a` [rank, out]); full/norm the difference and its bias. Empty for LoKr,
    whose Kronecker rows no single factor holds."""
    if kind.is_lora:
        return (("lora_up.weight", 0),)
    if kind is Kind.LOHA:
        return (("hada_w1_a", 1 if "hada_t1" in params else 0),)
    if kind is Kind.LOKR:
        return ()
    if kind is Kind.FULL:
        return tuple((p, 0) for p in ("diff", "diff_b") if p in params)
    return tuple((p, 0) for p in ("w_norm", "b_norm") if p in params)


def _as_matrix(tensor: "torch.Tensor") -> "torch.Tensor":
    """A factor as a 2-D matrix: conv factors flatten over (in, kh, kw)."""
    return tensor.reshape(tensor.shape[0], -1)


def lora_factors(kind: Kind, t: Mapping[str, "torch.Tensor"]) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(up out×r, down r×fan_in) in float32 for a LoRA-family module; Tucker folds its core into down."""
    import torch

    up = _as_matrix(t["lora_up.weight"].float())
    down = t["lora_down.weight"].float()
    if kind is Kind.TUCKER:
        mid = t["lora_mid.weight"].float()  # r×r×kh×kw, down r×in×1×1
        down = torch.einsum("ijhw,jc->ichw", mid, _as_matrix(down))
    return up, _as_matrix(down)


def rank_exceeds_layer(up: "torch.Tensor", down: "torch.Tensor") -> bool:
    """True when a factorisation's rank (up out×r, down r×fan_in) is above min(out, fan_in).

    Its r×r products would then be larger than the dense out×fan_in ΔW — a file can ask for rank 10⁶ on a 1×1
    layer, a 4 TB Gram matrix — so the dense product, bounded by the layer (checked at open), is the route.
    """
    return up.shape[1] > min(up.shape[0], down.shape[1])


def delta_weight(kind: Kind, t: Mapping[str, "torch.Tensor"], scale: float, shape: tuple[int, ...]) -> "torch.Tensor":
    """Dense ΔW (float32) of one module, shaped like the base weight. Only LoHa/LoKr/full/norm need it in ops."""
    import torch

    if kind.is_lora:
        up, down = lora_factors(kind, t)
        return (scale * (up @ down)).reshape(shape)
    if kind is Kind.LOHA:
        w1 = _hada_half(t, "1")
        w2 = _hada_half(t, "2")
        return (scale * w1 * w2).reshape(shape)
    if kind is Kind.LOKR:
        w1 = _lokr_half(t, "1")
        w2 = _lokr_half(t, "2")
        if w2.dim() == 4 and w1.dim() == 2:
            w1 = w1[:, :, None, None]
        # contiguous: torch.kron fails on the strided result of the Tucker einsum (lokr_t2)
        return (scale * torch.kron(w1.contiguous(), w2.contiguous())).reshape(shape)
    if kind is Kind.FULL:
        return t["diff"].float().reshape(shape)
    return t["w_norm"].float().reshape(shape)


def _hada_half(t: Mapping[str, "torch.Tensor"], i: str) -> "torch.Tensor":
    import torch

    a, b = t[f"hada_w{i}_a"].float(), t[f"hada_w{i}_b"].float()
    core = t.get(f"hada_t{i}")
    if core is not None:  # Tucker LoHa: w = einsum(t, a, b) over the rank axes
        return torch.einsum("ijhw,jr,ip->prhw", core.float(), _as_matrix(b), a)
    return a @ _as_matrix(b)


def _lokr_half(t: Mapping[str, "torch.Tensor"], i: str) -> "torch.Tensor":
    import torch

    whole = t.get(f"lokr_w{i}")
    if whole is not None:
        return whole.float()
    a, b = t[f"lokr_w{i}_a"].float(), t[f"lokr_w{i}_b"].float()
    core = t.get("lokr_t2") if i == "2" else None
    if core is not None:
        return torch.einsum("ijhw,jr,ip->prhw", core.float(), _as_matrix(b), a)
    return a @ b if b.dim() == 2 else torch.einsum("ij,jchw->ichw", a, b)


def factored_inner(up_a: "torch.Tensor", down_a: "torch.Tensor", up_b: "torch.Tensor", down_b: "torch.Tensor") -> float:
    """⟨U_a·D_a, U_b·D_b⟩_F (ups out×r, downs r×fan_in), exact in float64, by the cheaper route.

    The Gram route tr((U_aᵀU_b)(D_b·D_aᵀ)) = Σ (U_aᵀU_b) ⊙ (D_a·D_bᵀ) forms r_a×r_b matrices; the dense route
    forms the out×fan_in products. Gram is taken when r_a·r_b < out·fan_in, so neither a huge rank on a tiny
    layer (an r×r matrix) nor a large layer (a dense ΔW) allocates more than the factors themselves.
    NaN/Inf in any factor gives a NaN/Inf result on both routes.
    """
    out, fan_in = up_a.shape[0], down_a.shape[-1]
    same = up_a is up_b and down_a is down_b
    up_a, down_a, up_b, down_b = (t.double() for t in (up_a, down_a, up_b, down_b))
    if up_a.shape[1] * up_b.shape[1] < out * fan_in:
        return float(((up_a.T @ up_b) * (down_a @ down_b.T)).sum())
    dense = up_a @ down_a
    return float((dense * (dense if same else up_b @ down_b)).sum())


def gram_norm(up: "torch.Tensor", down: "torch.Tensor") -> float:
    """‖up·down‖_F without forming more than the factors hold (`factored_inner` with itself)."""
    import math

    return math.sqrt(max(factored_inner(up, down, up, down), 0.0))  # rounding may go below 0; NaN stays NaN


def frobenius_norm(kind: Kind, t: Mapping[str, "torch.Tensor"], scale: float, shape: tuple[int, ...]) -> float:
    """‖ΔW‖_F. LoRA kinds from their factors (`gram_norm`); LoKr as ‖W1‖·‖W2‖; others from the dense ΔW."""
    if kind.is_lora:
        up, down = lora_factors(kind, t)
        return abs(scale) * gram_norm(up, down)
    if kind is Kind.LOKR:
        w1, w2 = _lokr_half(t, "1"), _lokr_half(t, "2")
        return abs(scale) * float(w1.double().norm() * w2.double().norm())
    return float(delta_weight(kind, t, scale, shape).double().norm())
