"""Real layer shapes per architecture, and whether an adapter module's ΔW fits the layer it adapts.

The shapes come from the architecture records (`layouts`), keyed by every kohya stem a layer is written
under (the record knows its family's spellings).
A module fits when its ΔW is no larger than the real layer in any dimension — test models are smaller
than real ones — with a Linear layer counting as a 1×1 kernel. A module whose name is no real layer is
held to the architecture's largest layer. This is what keeps a hostile header from making a command
allocate more than the real model ever needs (docs/architecture.md §3).
"""

from __future__ import annotations

import math
from functools import cache
from types import MappingProxyType
from typing import Mapping

from blora_tools.taxonomy.arch import Arch
from blora_tools.taxonomy.layouts import record


@cache
def layer_shapes(arch: Arch | str) -> Mapping[str, tuple[int, ...]]:
    """kohya stem → weight shape of every real layer of `arch` that has a weight (every spelling of its name)."""
    return MappingProxyType(dict(record(arch).layer_shapes()))


def layer_shape(stem: str, arch: Arch | str) -> tuple[int, ...] | None:
    """The weight shape of the real layer a kohya stem names in `arch`; None when it names none."""
    return layer_shapes(arch).get(stem)


def as_matrix_shape(shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    """(out, in, kh, kw) of any weight shape: a vector is (C, 1, 1, 1), a Linear weight has a 1×1 kernel."""
    padded = tuple(shape) + (1,) * (4 - len(shape))
    if len(padded) > 4:
        return (padded[0], padded[1], math.prod(padded[2:-1]), padded[-1])
    return padded  # type: ignore[return-value]


@cache
def largest_layer(arch: Arch | str) -> tuple[tuple[int, int, int, int], int]:
    """(the largest size of each of out, in, kh, kw over every layer, the most elements of one layer)."""
    shapes = [as_matrix_shape(s) for s in layer_shapes(arch).values()]
    bound = tuple(max(s[i] for s in shapes) for i in range(4))
    return bound, max(math.prod(s) for s in shapes)  # type: ignore[return-value]


def fits(shape: tuple[int, ...], real: tuple[int, ...]) -> bool:
    """Whether a ΔW of `shape` is nowhere larger than a layer of shape `real`: every dimension at most the
    layer's, a Linear counting as a 1×1 kernel. A ΔW stored flat (2-D: LyCORIS keeps LoHa/LoKr factors of a
    convolution so) is compared with the layer flattened to (out, in·kh·kw)."""
    if len(shape) <= 2 < len(real):
        real = (real[0], math.prod(real[1:]))
    return all(m <= r for m, r in zip(as_matrix_shape(shape), as_matrix_shape(real)))


def misfit(stem: str, shape: tuple[int, ...], arch: Arch | str) -> str | None:
    """Why a module's ΔW of `shape` cannot belong to `arch` (too large for its layer, or for any layer), or None."""
    arch = Arch(arch)
    real = layer_shape(stem, arch)
    if real is not None:
        if fits(shape, real):
            return None
        return f"its ΔW is {list(shape)} but the {arch.value} layer it adapts is {list(real)}"
    bound, most = largest_layer(arch)
    if fits(shape, bound) and math.prod(shape) <= most:
        return None
    return f"its ΔW is {list(shape)}, larger than any {arch.value} layer (at most {list(bound)}, {most} values)"
