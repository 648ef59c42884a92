"""Alpha rules for written files: the value an alpha reads back as, and alphas no loader agrees on.

A missing alpha means alpha = rank (`Module.effective_alpha`). An alpha the product writes must be the value it
folds with: a tensor stores a rounded alpha (1e-45 in F32 reads back 1.4e-45, 40 % off), so the value is
round-tripped through its dtype first and the factors folded with what was stored. An alpha that does not
survive its dtype (0, a subnormal flushed to 0, an overflow to inf) is refused. A stored alpha of 0 is read
differently by loaders (A1111 and ComfyUI: scale 0, the module does nothing; kohya and LyCORIS: alpha = rank).
The product reads it as A1111 does (`Module.scale` 0: a merge adds nothing for it, `--uniform-alpha` folds 0 into
its factor), never writes one, and says so wherever such a module is read (`zero_alpha_warning`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from blora_tools.errors import BloraError

if TYPE_CHECKING:
    from blora_tools.adapter.model import Module

__all__ = ["alpha_storage", "zero_alpha_warning"]

_ZERO_ALPHA_READINGS = "A1111 and ComfyUI read it as scale 0 (no effect), kohya and LyCORIS as alpha = rank"


def alpha_storage(value: float, dtype: str, what: str = "alpha", path: str | Path | None = None) -> tuple[float, str]:
    """(the value an alpha reads back as, the dtype to store it in) for an alpha meant to be `value`.

    The file's tensor dtype when it holds `value` exactly, else F32 (an F16 file's alpha 0.3 keeps its digits;
    loaders read any float alpha), rounded there: fold with the returned value. BloraError when `value` is not a
    positive number or comes back 0 or inf.
    """
    from blora_tools.adapter.floats import stored_value  # numpy: not for commands that only read headers

    if not math.isfinite(value) or value <= 0:
        raise BloraError(f"{what} {value:g}: an alpha must be a positive finite number", path)
    if stored_value(value, dtype) == value:
        return value, dtype
    back = stored_value(value, "F32")
    if not math.isfinite(back) or back <= 0:
        tried = dtype if dtype == "F32" else f"{dtype} or F32"
        raise BloraError(
            f"{what} {value:g} cannot be stored as {tried} (it becomes {back:g}); choose an alpha within that range",
            path,
        )
    return back, "F32"


def _zero_alpha_modules(modules: Iterable["Module"]) -> list[str]:
    """Stems of modules whose stored alpha is 0 (sorted)."""
    return sorted(m.stem for m in modules if m.alpha == 0 and m.rank is not None)


def zero_alpha_warning(modules: Iterable["Module"]) -> str | None:
    """A warning when modules kept as they are store alpha 0, else None."""
    stems = _zero_alpha_modules(modules)
    if not stems:
        return None
    return (
        f"{len(stems)} module(s) store alpha 0, e.g. {stems[0]}: {_ZERO_ALPHA_READINGS}; "
        "blora-tools reads it as scale 0"
    )
