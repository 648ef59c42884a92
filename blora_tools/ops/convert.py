"""Convert: kohya ↔ PEFT/diffusers, SDXL LDM ↔ diffusers-style names, and one alpha for every module.

Every conversion is lossless: factors are copied byte for byte under their new names (kohya `lora_down` /
`lora_up` and PEFT `lora_A` / `lora_B` have the same shapes), and alphas move between `alpha` tensors and the
PEFT `lora_adapter_metadata` JSON. `uniform_alpha` is the one computing step: every module gets the file's most
common alpha and the rest of its scale is folded into the one factor a reweight scales (`kinds.scaled_params`),
so ΔW is unchanged while diffusers — which mis-scales kohya files with mixed alphas (DESIGN §3) — loads the file
exactly.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from blora_tools.adapter.formats import (
    Format,
    diffusers_to_ldm,
    ldm_to_diffusers,
    path_from_stem,
    stem_from_path,
    unet_naming,
)
from blora_tools.adapter.kinds import Kind, scaled_params
from blora_tools.adapter.metadata import updated_metadata
from blora_tools.adapter.model import Adapter, Module
from blora_tools.adapter.peft import METADATA_KEY, PeftModule, adapter_metadata, peft_key
from blora_tools.adapter.writer import Entry
from blora_tools.errors import BloraError, NonFiniteError
from blora_tools.ops.result import Result, computed, copied
from blora_tools.taxonomy.arch import Arch
from blora_tools.taxonomy.blocks import Component

NAMINGS = ("ldm", "diffusers")
PEFT_KINDS = frozenset({Kind.LORA, Kind.LORA_CONV1X1, Kind.LOCON})
"""Kinds a PEFT LoRA file holds: plain up/down factors on Linear, 1×1 and k×k convolutions."""


@dataclass(frozen=True)
class _Alpha:
    """The alpha a module is written with, and the factor its scaled parameter is multiplied by."""

    value: float
    dtype: str
    ratio: float


def convert(
    adapter: Adapter,
    *,
    to: Format | str,
    uniform_alpha: bool = False,
    names: str | None = None,
) -> Result:
    """Convert `adapter` to format `to` (`kohya` or `peft`).

    `uniform_alpha` gives every module the same alpha (ΔW unchanged); `names` (`ldm` or `diffusers`, kohya
    output only) renames U-Net modules. PEFT → kohya writes SDXL with LDM names (kohya's own) unless told.
    Raises BloraError for kinds the target cannot hold and for a conversion that would change nothing.
    """
    target = Format(to)
    if target is Format.ATTN_PROC:
        raise BloraError("cannot write the old diffusers attention-processor format; use --to peft", adapter.path)
    if names is not None and names not in NAMINGS:
        raise BloraError(f"unknown naming {names!r}; valid: {', '.join(NAMINGS)}")
    arch = adapter.arch
    if arch is Arch.UNKNOWN:
        raise BloraError(
            "cannot tell the architecture (SD1, SD2 or SDXL) from the module names or metadata, so U-Net names "
            "cannot be mapped",
            adapter.path,
        )
    if target is Format.PEFT and names is not None:
        raise BloraError("--names applies to kohya output; PEFT files always use diffusers module names")
    if target is Format.KOHYA and names is None and adapter.format is not Format.KOHYA:
        names = "ldm" if arch is Arch.SDXL else "diffusers"
    if target is adapter.format and not uniform_alpha and names is None:
        raise BloraError(
            f"the file is already {target.value} format; nothing to convert (pass --uniform-alpha or --names)",
            adapter.path,
        )
    warnings = list(adapter.warnings)
    if target is Format.PEFT:
        _check_peft_kinds(adapter)
    alphas = _uniform_alphas(adapter) if uniform_alpha else {}
    if names == "ldm" and arch is not Arch.SDXL:
        warnings.append(
            f"{arch.value} LDM U-Net names (input_blocks_…) are read by A1111 and ComfyUI but not by diffusers; "
            "kohya writes SD1/SD2 with diffusers-style names"
        )

    entries: list[Entry] = []
    peft_modules: list[PeftModule] = []
    written: dict[str, str] = {}
    renamed = rescaled = 0
    for module in adapter.modules.values():
        component, path = _module_path(adapter, module)
        if component is Component.UNET:
            naming = unet_naming(path)
            wanted = "diffusers" if target is Format.PEFT else (names or naming)
            if naming is not None and naming != wanted:
                path = ldm_to_diffusers(path, arch) if wanted == "diffusers" else diffusers_to_ldm(path, arch)
            elif naming is None and target is Format.PEFT:
                raise BloraError(f"module {module.stem}: not a U-Net layer diffusers knows", adapter.path)
        alpha = alphas.get(module.stem)
        if target is Format.KOHYA:
            stem = stem_from_path(_kohya_component(component, arch).value, path)
            renamed += stem != module.stem
            module_entries = _kohya_entries(adapter, module, stem, alpha)
        else:
            module_entries = _peft_entries(adapter, module, component, path, alpha)
            rank = module.rank
            effective = alpha.value if alpha else float(rank if module.alpha is None else module.alpha)
            peft_modules.append(PeftModule(component, path, rank, effective))
            renamed += 1
        rescaled += alpha is not None and alpha.ratio != 1.0
        for e in module_entries:
            if e.name in written:
                raise BloraError(
                    f"modules {written[e.name]} and {module.stem} both become {e.name}; the file names one layer "
                    "twice (LDM and diffusers-style)",
                    adapter.path,
                )
            written[e.name] = module.stem
        entries += module_entries
    if adapter.passthrough:
        if target is Format.KOHYA:
            entries += [copied(adapter, key) for key in adapter.passthrough]
        else:
            warnings.append(
                f"{len(adapter.passthrough)} key(s) that are not LoRA modules have no place in a PEFT file and "
                f"are left out, e.g. {adapter.passthrough[0]}"
            )
    if target is Format.KOHYA:
        warnings += _diffusers_warnings(adapter, uniform_alpha)

    arguments = {"input": Path(adapter.path).name, "to": target.value}
    if uniform_alpha:
        arguments["uniform_alpha"] = True
    if names:
        arguments["names"] = names
    kept_alphas = [alphas[m.stem].value if m.stem in alphas else _effective(m) for m in adapter.modules.values()]
    metadata = updated_metadata(
        adapter.metadata,
        operation="convert",
        arguments=arguments,
        ranks=[m.rank for m in adapter.modules.values()],
        alphas=[a for a in kept_alphas if a is not None],
    )
    metadata.pop(METADATA_KEY, None)
    if target is Format.PEFT:
        metadata[METADATA_KEY] = adapter_metadata(peft_modules)
        metadata.setdefault("format", "pt")
    common = {round(a.value, 9) for a in alphas.values()}
    summary = {
        "operation": "convert",
        "input": str(adapter.path),
        "arch": arch.value,
        "from": adapter.format.value,
        "to": target.value,
        "names": names,
        "uniform_alpha": common.pop() if len(common) == 1 else None,
        "modules": len(adapter.modules),
        "renamed": renamed,
        "rescaled": rescaled,
    }
    return Result("convert", entries, metadata, (Path(adapter.path),), warnings, summary)


def _effective(module: Module) -> float | None:
    if module.rank is None:
        return None
    return float(module.rank if module.alpha is None else module.alpha)


def _diffusers_warnings(adapter: Adapter, uniform_alpha: bool) -> list[str]:
    """What keeps diffusers from loading a kohya output exactly (DESIGN §3); sd-scripts, A1111, ComfyUI and
    LyCORIS load all of it."""
    modules = adapter.modules.values()
    warnings = []
    distinct = {_effective(m) for m in modules if m.kind.is_lora}
    if not uniform_alpha and len(distinct) > 1:
        warnings.append(
            f"modules keep {len(distinct)} different alpha values; diffusers loads such kohya files with some "
            "modules mis-scaled. Add --uniform-alpha to give them one alpha (ΔW unchanged)"
        )
    if any(m.kind not in PEFT_KINDS for m in modules):
        warnings.append(
            "diffusers will not load this file: it holds LoHa, LoKr, Tucker (lora_mid) or full modules "
            "(sd-scripts, A1111, ComfyUI and LyCORIS load it)"
        )
    elif any(m.dora for m in modules):
        warnings.append("diffusers drops the DoRA scales of this file (sd-scripts, A1111, ComfyUI and LyCORIS keep them)")
    if adapter.passthrough:
        warnings.append(
            "diffusers will not read this file as kohya LoRA: it also holds keys that are not LoRA modules "
            f"(e.g. {adapter.passthrough[0]})"
        )
    return warnings


def _check_peft_kinds(adapter: Adapter) -> None:
    """Refuse kinds PEFT LoRA cannot hold, naming how many of each and one module."""
    refused: dict[str, list[str]] = {}
    for m in adapter.modules.values():
        if m.kind not in PEFT_KINDS:
            refused.setdefault(m.kind.value, []).append(m.stem)
        elif m.dora:
            refused.setdefault("dora", []).append(m.stem)
    if refused:
        what = ", ".join(f"{len(stems)} {kind} (e.g. {stems[0]})" for kind, stems in sorted(refused.items()))
        raise BloraError(
            f"a PEFT LoRA file holds only plain LoRA/LoCon factors without DoRA; this file has {what}. "
            "Keep it in kohya format (sd-scripts, A1111, ComfyUI and LyCORIS load it)",
            adapter.path,
        )


def _module_path(adapter: Adapter, module: Module) -> tuple[Component, str]:
    """(component, dotted path) of a module: the file's own path when it has one, else from the stem."""
    component, path = path_from_stem(module.stem, adapter.arch) if module.path is None else (None, module.path)
    if component is None:
        component = Component(module.stem[len("lora_") :].split("_", 1)[0])
        if component is not Component.UNET and not path.startswith("text_model."):
            path = "text_model." + path
    return component, path


def _kohya_component(component: Component, arch: Arch) -> Component:
    """SDXL's first text encoder is `te1` in kohya files (`te` is SD1/SD2's only one)."""
    if arch is Arch.SDXL and component is Component.TE:
        return Component.TE1
    return component


def _uniform_alphas(adapter: Adapter) -> dict[str, _Alpha]:
    """Per module with a rank: the common alpha (the file's most frequent) and its fold ratio."""
    ranked = [m for m in adapter.modules.values() if m.rank is not None and m.kind.has_rank]
    if not ranked:
        raise BloraError("no module has a rank and an alpha; --uniform-alpha has nothing to do", adapter.path)
    counts = Counter(_effective(m) for m in ranked)
    top = max(counts.values())
    value = max(a for a, n in counts.items() if n == top)  # ties: the larger alpha keeps factors smaller
    dtypes = Counter(adapter.info(m.keys["alpha"]).dtype for m in ranked if "alpha" in m.keys)
    dtype = dtypes.most_common(1)[0][0] if dtypes else "F32"
    stored = _stored(value, dtype)
    if stored != value:
        dtype, stored = "F32", _stored(value, "F32")
    result = {}
    for m in ranked:
        old = m.scale
        new = stored / m.rank
        result[m.stem] = _Alpha(stored, dtype, old / new)
    return result


def _stored(value: float, dtype: str) -> float:
    """`value` as it reads back after being stored in `dtype`."""
    import torch

    from blora_tools.adapter.tensors import TORCH_DTYPE

    return float(torch.tensor(value, dtype=TORCH_DTYPE[dtype]).double())


def _alpha_entry(name: str, alpha: _Alpha) -> Entry:
    import torch

    return computed(name, alpha.dtype, (), lambda: torch.tensor(alpha.value, dtype=torch.float64))


def _folded(adapter: Adapter, module: Module, param: str, name: str, ratio: float) -> Entry:
    """The module's `param` multiplied by `ratio` in float32, written in its own dtype (checked finite)."""
    key = module.keys[param]
    info = adapter.info(key)

    def make():
        from blora_tools.adapter.tensors import TORCH_DTYPE

        source = adapter.tensor(key).float()
        value = (source * ratio).to(TORCH_DTYPE[info.dtype])
        # an overflow of the fold; NaN/Inf already in the input is Result.save's to refuse (or allow)
        if not bool((value.float().isfinite() | ~source.isfinite()).all()):
            raise NonFiniteError(
                f"module {module.stem}: folding its scale ×{ratio:g} into {param} overflows {info.dtype}",
                adapter.path,
            )
        return value

    return computed(name, info.dtype, info.shape, make)


def _kohya_entries(adapter: Adapter, module: Module, stem: str, alpha: _Alpha | None) -> list[Entry]:
    changed = alpha is not None and alpha.ratio != 1.0
    folded = set(scaled_params(module.kind, frozenset(module.keys))) if changed else set()
    entries = []
    for param, key in module.keys.items():
        name = f"{stem}.{param}"
        if param == "alpha" and changed:
            continue
        if param in folded:
            entries.append(_folded(adapter, module, param, name, alpha.ratio))
        else:
            entries.append(copied(adapter, key, name))
    if changed or (alpha is not None and "alpha" not in module.keys):
        entries.append(_alpha_entry(f"{stem}.alpha", alpha))
    elif alpha is None and "alpha" not in module.keys and module.rank is not None and module.kind.has_rank:
        # From PEFT (alpha in metadata) or a kohya file without alphas: write it, loaders then agree on the scale.
        value = _effective(module)
        entries.append(_alpha_entry(f"{stem}.alpha", _Alpha(value, "F32", 1.0)))
    return entries


def _peft_entries(
    adapter: Adapter, module: Module, component: Component, path: str, alpha: _Alpha | None
) -> list[Entry]:
    entries = []
    for param in ("lora_down.weight", "lora_up.weight"):
        name = peft_key(component, path, param)
        if alpha is not None and alpha.ratio != 1.0 and param == "lora_up.weight":
            entries.append(_folded(adapter, module, param, name, alpha.ratio))
        else:
            entries.append(copied(adapter, module.keys[param], name))
    return entries
