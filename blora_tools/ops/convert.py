"""Convert: kohya ↔ PEFT/diffusers ↔ ComfyUI, SDXL LDM ↔ diffusers-style names, Flux.1/SD3 fused ↔ split layers,
and one alpha for every module.

Every conversion is lossless: factors are copied byte for byte under their new names (kohya `lora_down` /
`lora_up` and PEFT `lora_A` / `lora_B` have the same shapes), except where a module's scale is folded into its
up factor (`ops.uniform`), which leaves ΔW unchanged:

* PEFT output always has alpha = rank: each module's alpha/rank goes into `lora_B`, and `lora_adapter_metadata`
  says `lora_alpha` = `r`. Loaders that ignore that metadata (ComfyUI among them) assume alpha = rank, so they
  and diffusers apply the same strength.
* `uniform_alpha` (kohya output) gives every module the file's most common alpha, so diffusers — which
  mis-scales kohya files with mixed alphas (docs/architecture.md §3) — loads the file exactly.
* Flux.1 / SD3 layers change naming with the format (`ops.dit_naming`: fused BFL for kohya and ComfyUI, split
  diffusers for PEFT); split parts keep rank and alpha, fused stacks get alpha = their new rank.
* ComfyUI output is its LoraSave layout: `diffusion_model.` + the model's own path (LDM on SD, BFL on DiT),
  `text_encoders.clip_l.transformer.` (clip_g, clip_h, t5xxl), kohya parameter names and alphas.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

from blora_tools.adapter.alpha import zero_alpha_warning
from blora_tools.adapter.formats import (
    Dialect,
    Format,
    diffusers_to_ldm,
    ldm_to_diffusers,
    path_from_stem,
    stem_from_path,
    unet_naming,
)
from blora_tools.adapter.kinds import Kind
from blora_tools.adapter.layers import NAMINGS
from blora_tools.adapter.metadata import updated_metadata
from blora_tools.adapter.model import Adapter, Module
from blora_tools.adapter.peft import METADATA_KEY, PeftModule, adapter_metadata, peft_key
from blora_tools.adapter.writer import Entry
from blora_tools.errors import BloraError
from blora_tools.ops.dit_naming import in_naming, naming_of
from blora_tools.ops.result import Result, copied, loader_notes
from blora_tools.ops.uniform import Alpha, folded, rank_alphas, uniform_alphas
from blora_tools.ops.uniform import module_entries as module_entries_of
from blora_tools.spec import ModuleFacts
from blora_tools.taxonomy.arch import Arch, is_dit
from blora_tools.taxonomy.blocks import Component
from blora_tools.taxonomy.dit import BFL, DIFFUSERS
from blora_tools.taxonomy.encoders import is_t5_path

__all__ = ["PEFT_KINDS", "TARGETS", "convert"]

PEFT_KINDS = frozenset({Kind.LORA, Kind.LORA_CONV1X1, Kind.LOCON})
"""Kinds a PEFT LoRA file holds: plain up/down factors on Linear, 1×1 and k×k convolutions."""


TARGETS = MappingProxyType(
    {"kohya": Dialect.KOHYA, "peft": Dialect.DIFFUSERS, "diffusers": Dialect.DIFFUSERS, "comfyui": Dialect.COMFYUI}
)
"""`--to` names → the dialect written (`peft` and `diffusers` are one: diffusers' PEFT keys)."""

_COMFY_TE_ROOTS = MappingProxyType(
    {Component.TE: "clip_l", Component.TE1: "clip_l", Component.TE2: "clip_g", Component.TE3: "t5xxl"}
)
"""ComfyUI's text-encoder state-dict names (SD2's only encoder is OpenCLIP-H: `clip_h`)."""


def convert(
    adapter: Adapter,
    *,
    to: Format | str,
    uniform_alpha: bool = False,
    names: str | None = None,
    compact: bool = True,
) -> Result:
    """Convert `adapter` to `to`: `kohya`, `peft` (= `diffusers`) or `comfyui`.

    `uniform_alpha` gives every module the same alpha (ΔW unchanged); `names` (`ldm` or `diffusers`, kohya
    output of SD U-Nets only) renames U-Net modules. PEFT → kohya writes SDXL with LDM names (kohya's own)
    unless told. Flux.1/SD3 modules take the target's naming (`ops.dit_naming`): fused BFL layers for kohya
    and ComfyUI, split diffusers layers for PEFT; `compact` splits a fused module with fewer ranks per part
    where that is proven exact. Raises BloraError for kinds the target cannot hold and for a conversion that
    would change nothing.
    """
    text = to.value if isinstance(to, Format) else str(to)
    if text == Format.ATTN_PROC.value:
        raise BloraError("cannot write the old diffusers attention-processor format; use --to peft", adapter.path)
    if text not in TARGETS:
        raise BloraError(f"unknown target format {text!r}; valid: {', '.join(TARGETS)}")
    dialect = TARGETS[text]
    target = dialect.format
    if names is not None and names not in NAMINGS:
        raise BloraError(f"unknown naming {names!r}; valid: {', '.join(NAMINGS)}")
    arch = adapter.arch
    dit = is_dit(arch)
    if names is not None and (target is Format.PEFT or dit or dialect is Dialect.COMFYUI):
        raise BloraError(
            "--names applies to kohya output of SD U-Nets; PEFT files use diffusers names, ComfyUI files LDM "
            "names, and Flux.1/SD3 kohya and ComfyUI files the fused BFL names"
        )
    source = adapter
    naming = None
    if dit:
        naming = DIFFUSERS if target is Format.PEFT else BFL
        unchanged = naming_of(adapter) in (naming, None)
        adapter = in_naming(adapter, naming, compact=compact)
    else:
        unchanged = True
        if dialect is Dialect.KOHYA and names is None and source.dialect is not Dialect.KOHYA:
            names = "ldm" if arch is Arch.SDXL else "diffusers"
    if source.dialect is dialect and unchanged and not uniform_alpha and names is None:
        raise BloraError(
            f"the file is already {text} format; nothing to convert (pass --uniform-alpha or --names)",
            source.path,
        )
    warnings = list(adapter.warnings)
    if target is Format.PEFT:
        _check_peft_kinds(adapter)
        alphas = rank_alphas(adapter)  # loaders that ignore lora_adapter_metadata (ComfyUI) assume alpha = rank
    else:
        alphas = uniform_alphas(adapter) if uniform_alpha else {}
    warnings += [w for w in (zero_alpha_warning(adapter.modules.values()),) if w]

    entries: list[Entry] = []
    peft_modules: list[PeftModule] = []
    written: dict[str, str] = {}
    stems: list[str] = []
    renamed = rescaled = 0
    for module in adapter.modules.values():
        component, path = _module_path(adapter, module)
        if component is Component.UNET and not dit:
            naming_now = unet_naming(path)
            wanted = {Dialect.DIFFUSERS: "diffusers", Dialect.COMFYUI: "ldm"}.get(dialect) or names or naming_now
            if naming_now is not None and naming_now != wanted:
                path = ldm_to_diffusers(path, arch) if wanted == "diffusers" else diffusers_to_ldm(path, arch)
            elif naming_now is None and target is Format.PEFT:
                raise BloraError(f"module {module.stem}: not a U-Net layer diffusers knows", adapter.path)
        alpha = alphas.get(module.stem)
        stem = stem_from_path(_kohya_component(component, arch).value, path)
        if target is Format.PEFT:
            module_entries = _peft_entries(adapter, module, component, path, alpha)
            peft_modules.append(PeftModule(component, path, module.rank, alpha.value, arch.value))
            renamed += 1
        else:
            prefix = stem if dialect is Dialect.KOHYA else _comfy_prefix(component, path, arch)
            renamed += prefix != module.stem
            module_entries = module_entries_of(adapter, module, prefix, alpha, complete_alpha=True)
        stems.append(stem)
        rescaled += alpha is not None and alpha.ratio != 1.0
        for e in module_entries:
            if e.name in written:
                raise BloraError(
                    f"modules {written[e.name]} and {module.stem} both become {e.name}; the file names one layer "
                    "twice (LDM and diffusers-style)",
                    source.path,
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
    if dialect is Dialect.KOHYA:
        warnings += loader_notes(adapter.modules.values(), arch, stems=sorted(set(stems)), one_alpha=uniform_alpha,
                                 passthrough=adapter.passthrough)

    arguments: dict[str, object] = {"to": text}
    if uniform_alpha and target is Format.KOHYA:
        arguments["uniform_alpha"] = next(iter(alphas.values())).value
    if names:
        arguments["names"] = names
    if dit:
        arguments["compact"] = compact
    facts = [
        replace(ModuleFacts.of(m), alpha=alphas[m.stem].value) if m.stem in alphas else ModuleFacts.of(m)
        for m in adapter.modules.values()
    ]
    metadata = updated_metadata(
        adapter.metadata,
        operation="convert",
        inputs=[source.path],
        arguments=arguments,
        arch=arch,
        modules=facts,
    )
    metadata.pop(METADATA_KEY, None)
    if target is Format.PEFT:
        metadata[METADATA_KEY] = adapter_metadata(peft_modules)
        metadata.setdefault("format", "pt")
    common = {round(a.value, 9) for a in alphas.values()}
    summary = {
        "operation": "convert",
        "input": str(source.path),
        "arch": arch.value,
        "from": source.format.value,
        "dialect": source.dialect.value,
        "to": text,
        "names": names or naming,
        "uniform_alpha": common.pop() if uniform_alpha and target is Format.KOHYA and len(common) == 1 else None,
        "alpha_is_rank": target is Format.PEFT,
        "modules": len(adapter.modules),
        "modules_in": len(source.modules),
        "renamed": renamed,
        "rescaled": rescaled,
    }
    return Result("convert", entries, metadata, (Path(source.path),), warnings, summary)


def _comfy_prefix(component: Component, path: str, arch: Arch) -> str:
    """A module's key prefix in ComfyUI's LoraSave layout: `diffusion_model.` + model path, or
    `text_encoders.<clip_l|clip_g|clip_h|t5xxl>.transformer.` + encoder path."""
    if component is Component.UNET:
        return f"diffusion_model.{path}"
    root = "clip_h" if arch is Arch.SD2 and component is Component.TE else _COMFY_TE_ROOTS[component]
    return f"text_encoders.{root}.transformer.{path}"


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
        if component is not Component.UNET and not is_t5_path(path) and not path.startswith("text_model."):
            path = "text_model." + path
    return component, path


def _kohya_component(component: Component, arch: Arch) -> Component:
    """SDXL's first text encoder is `te1` in kohya files (`te` is SD1/SD2's only one)."""
    if arch is Arch.SDXL and component is Component.TE:
        return Component.TE1
    return component


def _peft_entries(
    adapter: Adapter, module: Module, component: Component, path: str, alpha: Alpha | None
) -> list[Entry]:
    entries = []
    for param in ("lora_down.weight", "lora_up.weight"):
        name = peft_key(component, path, param, adapter.arch)
        if alpha is not None and alpha.ratio != 1.0 and param == "lora_up.weight":
            entries.append(folded(adapter, module, param, name, alpha.ratio))
        else:
            entries.append(copied(adapter, module.keys[param], name))
    return entries
