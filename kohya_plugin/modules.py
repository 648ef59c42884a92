"""The LoRA module: one adapted layer (Linear, 1×1 or k×k Conv2d) and its merge into the layer's weight.

The module does not replace the layer. `apply_to` keeps the layer's own `forward` and installs the module's
in its place (kohya's forward swap); the layer is held outside the module tree, so the base model's state dict
is unchanged and the module's holds only `lora_down.weight`, `lora_up.weight` and `alpha`.

    output = layer(x) + multiplier · (alpha / rank) · up(dropout(down(x)))

LoCon: for a k×k conv, `down` is a conv with the layer's kernel, stride, padding and dilation and `up` a 1×1
conv, so ΔW = scale · (U[:, :, 0, 0] @ D.flatten(1)).view(out, in, k, k) (docs/architecture.md §3).

Split parts (`split_qkv` on Flux.1/SD3): a fused layer whose rows are parts (q | k | v, and Flux's single
`linear1` q | k | v | mlp) gets one rank-r LoRA per part, held in the fused form a file stores: `down` stacks the
parts' downs (n·r rows) and `up` is block-diagonal — part i's up in its rows and its own r columns — kept so by
a fixed mask in the forward (the zeros get no gradient and stay exactly 0). With alpha n·α the scale n·α / n·r
is each part's α/r, so ΔW, the saved factors and their alpha are those of a fused LoRA that any loader reads
exactly (kohya's `split_qkv` keeps α and so saves these layers n times too weak, kohya-ss/sd-scripts#2204).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import MappingProxyType

import torch
from torch import nn
from torch.nn import functional as F

from blora_tools.errors import NonFiniteError, SpecError


def _linear_factors(layer: nn.Linear, rank: int) -> tuple[nn.Module, nn.Module]:
    device = layer.weight.device
    down = nn.Linear(layer.in_features, rank, bias=False, device=device)
    up = nn.Linear(rank, layer.out_features, bias=False, device=device)
    return down, up


def _conv_factors(layer: nn.Conv2d, rank: int) -> tuple[nn.Module, nn.Module]:
    if layer.groups != 1:
        raise SpecError(f"grouped convolutions (groups={layer.groups}) cannot take a LoCon adapter")
    device = layer.weight.device
    down = nn.Conv2d(
        layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation,
        bias=False, padding_mode=layer.padding_mode, device=device,
    )
    up = nn.Conv2d(rank, layer.out_channels, 1, bias=False, device=device)
    return down, up


_FACTORIES: Mapping[type, Callable[[nn.Module, int], tuple[nn.Module, nn.Module]]] = MappingProxyType(
    {
        nn.Linear: _linear_factors,
        nn.Conv2d: _conv_factors,
    }
)
"""Layer type → maker of its (down, up) factor layers. A new target type is an entry here."""


def delta_weight(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """Dense ΔW = scale · up · down in float32, shaped like the adapted layer's weight.

    Linear: `[out, in]`; conv: `[out, in, k, k]` (1×1 included), from `down` `[r, in, k, k]`, `up` `[out, r, 1, 1]`.
    """
    rank = down.shape[0]
    matrix = up.float().reshape(up.shape[0], rank) @ down.float().reshape(rank, -1)
    return (scale * matrix).reshape(up.shape[0], *down.shape[1:])


def merge_into(
    layer: nn.Module,
    down: torch.Tensor,
    up: torch.Tensor,
    alpha: float,
    multiplier: float = 1.0,
    device: torch.device | str | None = None,
) -> None:
    """Add multiplier · (alpha / rank) · up · down to `layer.weight` in place, keeping the weight's dtype.

    The sum is computed in float32 on `device` (default: the weight's) and checked before anything is written.
    """
    weight = layer.weight
    where = weight.device if device is None else torch.device(device)
    delta = delta_weight(down.to(where), up.to(where), multiplier * alpha / down.shape[0])
    if tuple(delta.shape) != tuple(weight.shape):
        raise SpecError(f"ΔW of shape {tuple(delta.shape)} does not fit a weight of shape {tuple(weight.shape)}")
    merged = weight.detach().to(where, torch.float32) + delta
    if not torch.isfinite(merged).all():
        raise NonFiniteError("merging gives non-finite weights; the adapter file is broken")
    with torch.no_grad():
        weight.copy_(merged.to(weight.device, weight.dtype))


class LoRAModule(nn.Module):
    """One adapted layer: factors `lora_down`/`lora_up`, `alpha`, dropouts and a multiplier."""

    def __init__(
        self,
        lora_name: str,
        layer: nn.Module,
        lora_down: nn.Module,
        lora_up: nn.Module,
        alpha: float,
        *,
        multiplier: float = 1.0,
        dropout: float | None = None,
        rank_dropout: float | None = None,
        module_dropout: float | None = None,
        row_parts: tuple[int, ...] | None = None,
    ):
        super().__init__()
        self.lora_name = lora_name
        self.lora_down = lora_down
        self.lora_up = lora_up
        self.lora_dim = lora_down.weight.shape[0]
        # The alpha is a buffer so that a state dict carries it (kohya's keys); the Python float is what
        # forward uses, kept in step by _load_from_state_dict, so a cast of the network never rounds it.
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self._alpha = float(alpha)
        self.multiplier = multiplier
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self._is_conv = isinstance(lora_down, nn.Conv2d)
        # The wrapped layer is kept out of the module tree (not a child): its weights never enter our state dict.
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_base_forward", None)
        # kohya's (and the original LoRA's) initialisation: ΔW starts at exactly 0.
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.row_parts = tuple(row_parts) if row_parts else None
        self.register_buffer("up_mask", self._block_mask(), persistent=False)

    def _block_mask(self) -> torch.Tensor | None:
        """The block-diagonal mask of a split module's up factor (None for a plain module)."""
        if self.row_parts is None:
            return None
        parts = len(self.row_parts)
        if self._is_conv or sum(self.row_parts) != self.lora_up.weight.shape[0] or self.lora_dim % parts:
            raise SpecError(f"{self.lora_name}: cannot split rows {self.row_parts} of a rank-{self.lora_dim} module")
        width = self.lora_dim // parts
        mask = torch.zeros(tuple(self.lora_up.weight.shape), device=self.lora_up.weight.device)
        if mask.device.type != "meta":
            start = 0
            for i, rows in enumerate(self.row_parts):
                mask[start : start + rows, i * width : (i + 1) * width] = 1
                start += rows
        return mask

    def fits_parts(self, up: torch.Tensor) -> bool:
        """Whether an up factor is zero outside this module's part blocks (always, for a plain module)."""
        return self.up_mask is None or not bool((up.reshape(self.up_mask.shape) * (1 - self.up_mask.to(up.dtype)))
                                                .ne(0).any())

    @classmethod
    def for_layer(cls, lora_name: str, layer: nn.Module, rank: int, alpha: float, **options) -> "LoRAModule":
        """A module with fresh factors of `rank` for a Linear or Conv2d layer."""
        for layer_type, make in _FACTORIES.items():
            if isinstance(layer, layer_type):
                down, up = make(layer, rank)
                return cls(lora_name, layer, down, up, alpha, **options)
        supported = ", ".join(t.__name__ for t in _FACTORIES)
        raise SpecError(f"{lora_name}: cannot adapt a {type(layer).__name__}; supported layers: {supported}")

    # --- numbers ---------------------------------------------------------------------------------

    @property
    def layer(self) -> nn.Module:
        """The adapted base layer."""
        return self._layer

    @property
    def alpha_value(self) -> float:
        return self._alpha

    @property
    def scale(self) -> float:
        """alpha / rank."""
        return self._alpha / self.lora_dim

    def set_alpha(self, alpha: float) -> None:
        """Change alpha (and so the scale) without touching the factors."""
        self._alpha = float(alpha)
        with torch.no_grad():
            if self.alpha.device.type != "meta":
                self.alpha.fill_(self._alpha)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        loaded = state_dict.get(prefix + "alpha")
        if isinstance(loaded, torch.Tensor) and loaded.device.type != "meta":
            self._alpha = float(loaded)

    # --- forward swap ----------------------------------------------------------------------------

    @property
    def applied(self) -> bool:
        return self._base_forward is not None

    def apply_to(self) -> None:
        """Install this module's forward on the layer (once; a second call does nothing)."""
        if self._base_forward is not None:
            return
        object.__setattr__(self, "_had_own_forward", "forward" in self._layer.__dict__)
        object.__setattr__(self, "_base_forward", self._layer.forward)
        self._layer.forward = self.forward

    def remove(self) -> None:
        """Give the layer back the forward it had before `apply_to`."""
        if self._base_forward is None:
            return
        if self._layer.__dict__.get("forward") != self.forward:
            raise RuntimeError(f"{self.lora_name}: another adapter wrapped this layer later; remove that one first")
        if self._had_own_forward:
            self._layer.forward = self._base_forward
        else:
            del self._layer.forward
        object.__setattr__(self, "_base_forward", None)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self._base_forward(x, *args, **kwargs)
        training = self.training
        if training and self.module_dropout and torch.rand(()) < self.module_dropout:
            return base
        h = self.lora_down(x)
        if training and self.dropout:
            h = F.dropout(h, p=self.dropout)
        scale = self.multiplier * self.scale
        if training and self.rank_dropout:
            # Drop whole ranks per sample; 1/(1-p) keeps the expected output unchanged.
            if self._is_conv:
                shape = (h.shape[0], self.lora_dim) + (1,) * (h.dim() - 2)
            else:
                shape = (h.shape[0],) + (1,) * (h.dim() - 2) + (self.lora_dim,)
            mask = (torch.rand(shape, device=h.device) > self.rank_dropout).to(h.dtype)
            h = h * mask
            scale = scale / (1.0 - self.rank_dropout)
        if self.up_mask is not None:
            return base + F.linear(h, self.lora_up.weight * self.up_mask) * scale
        return base + self.lora_up(h) * scale

    # --- algebra ---------------------------------------------------------------------------------

    def delta_weight(self) -> torch.Tensor:
        """Dense multiplier · scale · up · down, shaped like the layer's weight (for tests and merges)."""
        return delta_weight(self.lora_down.weight, self.lora_up.weight, self.multiplier * self.scale)

    def delta_norm(self) -> torch.Tensor:
        """‖scale · U·D‖_F from the factors' Gram matrices: trace((UᵀU)(DDᵀ)), no dense ΔW."""
        up = self.lora_up.weight.detach().float().reshape(self.lora_up.weight.shape[0], self.lora_dim)
        down = self.lora_down.weight.detach().float().reshape(self.lora_dim, -1)
        squared = ((up.T @ up) * (down @ down.T)).sum().clamp(min=0)
        return squared.sqrt() * self.scale

    def rescale_(self, ratio: float) -> None:
        """Multiply ΔW by `ratio`, split evenly (√ratio) over both factors."""
        root = math.sqrt(ratio)
        with torch.no_grad():
            self.lora_down.weight.mul_(root)
            self.lora_up.weight.mul_(root)

    def merge_to(self, down: torch.Tensor, up: torch.Tensor, alpha: float,
                 device: torch.device | str | None = None) -> None:
        """Merge a file's factors for this module, with the file's alpha, into the layer's weight, times this
        module's multiplier."""
        merge_into(self._layer, down, up, alpha, self.multiplier, device)

    def extra_repr(self) -> str:
        parts = f", parts={list(self.row_parts)}" if self.row_parts else ""
        return f"{self.lora_name}, rank={self.lora_dim}, alpha={self._alpha:g}{parts}"
