"""Adapter files in and out of the plugin: reading a kohya file, checking its modules, writing the network's.

Every problem with a file — unreadable, not safetensors, a pickle, a directory or FIFO, foreign module kinds,
half modules, NaN/Inf factors or alphas, factors that fit no layer — is an `AdapterFileError` naming the file
(`source`), raised before anything is loaded, so a network is never half-loaded.

Writing: one alpha value for every module (`single_alpha`: the training alpha most modules share), stored by the
product's alpha rules (`alpha_storage`: exact, in F32 where the factors' dtype cannot hold it; 0 or an overflow
refused), each module's alpha / the stored alpha folded into its up factor, so ΔW is the same for every loader
and diffusers loads the file exactly (docs/architecture.md §3).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from blora_tools.adapter.alpha import alpha_storage
from blora_tools.adapter.formats import Format, split_key
from blora_tools.adapter.model import effective_alpha
from blora_tools.adapter.tensors import DTYPE_NAME, TORCH_DTYPE
from blora_tools.errors import AdapterFileError

FACTOR_KEYS = ("lora_down.weight", "lora_up.weight")
MODULE_KEYS = frozenset(FACTOR_KEYS + ("alpha",))
"""The parameters of a plain LoRA/LoCon module: all this network reads and writes."""

Modules = dict[str, dict[str, torch.Tensor]]
"""kohya stem → {parameter: tensor}."""


def read_metadata(path: str | Path) -> dict[str, str]:
    """A `.safetensors` file's metadata (its header checked); AdapterFileError naming the file otherwise."""
    from blora_tools.adapter.header import read_header

    return dict(read_header(path).metadata)


def read_weights_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a `.safetensors` file; every failure is an AdapterFileError naming the file
    (pickle files are refused with how to convert them; nothing is unpickled)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    metadata = read_metadata(path)
    try:
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:  # e.g. the file changed after its header
        raise AdapterFileError(f"cannot read tensors: {err}".splitlines()[0], path) from None


def module_alpha(stem: str, tensors: Mapping[str, torch.Tensor], source: str) -> float:
    """A module's alpha from the file (0-d or 1-element, finite; missing: the rank, `effective_alpha`);
    AdapterFileError otherwise."""
    alpha = tensors.get("alpha")
    rank = int(tensors["lora_down.weight"].shape[0])
    if alpha is None:
        return effective_alpha(rank, None)
    if alpha.numel() != 1:
        raise AdapterFileError(f"module {stem}: alpha has shape {list(alpha.shape)}, expected a single value", source)
    value = float(alpha.reshape(()))
    if not math.isfinite(value):
        raise AdapterFileError(f"module {stem}: alpha is {value}", source)
    return effective_alpha(rank, value)


def group_modules(weights_sd: Mapping[str, torch.Tensor], source: str = "weights") -> Modules:
    """kohya stem → {parameter: tensor}, every module checked (`check_modules`); keys of no adapter module
    (e.g. `bundle_emb.*`) are left out. Only kohya-named files: a PEFT/diffusers file needs its alphas from
    metadata, so it is refused with the way to convert it."""
    stems: Modules = {}
    for key, value in weights_sd.items():
        name = split_key(key)
        if name is None:
            continue
        if name.format is not Format.KOHYA:
            raise AdapterFileError(
                f"key {key!r} is in {name.format.value} format; this network loads kohya files "
                "(convert it with blora-tools convert)", source
            )
        if not isinstance(value, torch.Tensor):
            raise AdapterFileError(f"key {key!r} is not a tensor", source)
        stems.setdefault(name.stem, {})[name.param] = value
    check_modules(stems, source)
    return stems


def check_modules(stems: Modules, source: str) -> None:
    """Refuse what this network cannot load: no modules, other kinds (LoHa, LoKr, Tucker cores, DoRA, full
    diffs), half modules, factors that are not a rank-r pair, bad alphas, NaN/Inf factors."""
    if not stems:
        raise AdapterFileError("no LoRA modules in it: a full model or another kind of file, not an adapter", source)
    foreign = sorted({p for tensors in stems.values() for p in tensors if p not in MODULE_KEYS})
    if foreign:
        raise AdapterFileError(
            f"holds {', '.join(foreign[:4])} tensors; this network loads plain LoRA/LoCon only "
            "(no LoHa, LoKr, Tucker lora_mid or DoRA)", source
        )
    for stem, tensors in stems.items():
        if not set(FACTOR_KEYS) <= set(tensors):
            raise AdapterFileError(f"module {stem} has only some of lora_down/lora_up", source)
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        if down.dim() not in (2, 4) or up.dim() not in (2, 4) or up.shape[1] != down.shape[0] \
                or tuple(up.shape[2:]) not in ((), (1, 1)) or down.shape[0] == 0:
            raise AdapterFileError(
                f"module {stem}: lora_down {list(down.shape)} and lora_up {list(up.shape)} are not a rank-r pair",
                source,
            )
        if not (down.is_floating_point() and up.is_floating_point()):
            raise AdapterFileError(f"module {stem}: factors of dtype {down.dtype}/{up.dtype}, not floating point",
                                   source)
        module_alpha(stem, tensors, source)
        for key in FACTOR_KEYS:
            if not bool(torch.isfinite(tensors[key]).all()):
                raise AdapterFileError(f"module {stem}: {key} holds NaN or Inf values", source)


def shapes_fit(have: Sequence[int], want: Sequence[int]) -> bool:
    """Equal shapes, or equal but for the 2-D ↔ 1×1-conv difference (SD2's two `proj_in` forms)."""
    have, want = tuple(have), tuple(want)
    if have == want:
        return True
    return have[:2] == want[:2] and all(d == 1 for d in have[2:] + want[2:])


def fit(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor | None:
    """`tensor` reshaped to `shape` where `shapes_fit`, else None."""
    return tensor.reshape(tuple(shape)) if shapes_fit(tensor.shape, shape) else None


def single_alpha(alphas: Iterable[float], preferred: float) -> float:
    """The one alpha a saved file uses: the alpha most modules share; ties go to `preferred`, then the smaller."""
    counts = Counter(alphas)
    if not counts:
        return preferred
    top = max(counts.values())
    tied = sorted(a for a, n in counts.items() if n == top)
    return preferred if preferred in tied else tied[0]


def module_tensors(
    name: str, down: torch.Tensor, up: torch.Tensor, alpha: float, file_alpha: float, dtype: torch.dtype | None,
    path: str | Path | None = None,
) -> dict[str, torch.Tensor]:
    """One module's tensors as saved: `file_alpha` stored as `alpha_storage` says (exact: F32 where the factors'
    dtype cannot hold it), the module's alpha / the stored alpha folded into `up`. BloraError naming `path`,
    before anything is written, when `file_alpha` is 0 or does not survive the stored dtype."""
    out_dtype = dtype or up.dtype
    value, stored_dtype = alpha_storage(file_alpha, DTYPE_NAME[out_dtype], "the saved alpha", path)
    ratio = alpha / value
    up = up.detach()
    up = (up.double() * ratio) if ratio != 1.0 else up
    return {
        f"{name}.lora_down.weight": down.detach().to("cpu", out_dtype).clone(),
        f"{name}.lora_up.weight": up.to("cpu", out_dtype).clone(),
        f"{name}.alpha": torch.tensor(value, dtype=TORCH_DTYPE[stored_dtype]),
    }
