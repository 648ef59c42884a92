"""Which architecture an adapter or a model is for, decided from evidence only (docs/architecture.md §3).

Evidence, strongest first:

1. Names of another family (other diffusion transformers, `transformer.blocks.*`): the file is refused, naming
   what was seen. So is a file none of whose modules fits a supported family, or whose denoiser modules all
   fit none.
2. Names: the families whose real layers the modules name (most denoiser modules, then most text-encoder
   modules, then most placeable ones) — Flux's double/single blocks, SD3's joint blocks, SDXL's `te1`/`te2`
   and transformer depth 2–10, SD1/SD2's fourth level and outer-level attention, SD2's 23 text-encoder
   layers. diffusers names Flux's double blocks and SD3's joint blocks alike (`transformer_blocks`), so a file
   holding only those (no single blocks, no family-only layer) is ambiguous between them.
3. Shapes: a family whose real layer is smaller than some module's ΔW is out (`shapes.misfit`).
4. Widths (`arch_from_widths`): an exact real cross-attention or text-encoder width names one family.

When more than one family remains the evidence is ambiguous: `--arch` (the `override`) picks among them,
else the file's metadata claim, else the documented rule: LDM U-Net names mean SDXL (kohya writes SDXL so),
Linear transformer projections mean SD2 (as diffusers ships it), and otherwise SD1, the older and more
common family; Flux before SD3. A claim or override the evidence rules out is a warning or an error, never obeyed.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping, Sequence

from blora_tools.errors import BloraError
from blora_tools.taxonomy.arch import KNOWN_ARCHS, Arch, arch_from_metadata, is_dit
from blora_tools.taxonomy.blocks import place
from blora_tools.taxonomy.dit import layer_index
from blora_tools.taxonomy.layouts import DIFFUSERS_ROOTS, LDM_ROOTS, record
from blora_tools.taxonomy.shapes import layer_shape, misfit

_UNSUPPORTED = (
    (re.compile(r"^(?:transformer|diffusion_model)\.(?:blocks|layers)\.\d"),
     "modules of a diffusion transformer other than Flux.1 and SD3 (transformer.blocks.*, diffusion_model.layers.*)"),
)
_NOT_YET = ", which this version does not support yet"

_LDM_NAME = re.compile(r"^lora_unet_(?:input_blocks|output_blocks|middle_block)_\d+_")
_CONTEXT = re.compile(r"^lora_unet_.*_attn2_to_[kv]$")
_TEXT_ATTENTION = re.compile(r"^lora_te1?_(?:text_model_)?encoder_layers_\d+_self_attn_[qkv]_proj$")
_PROJ_IN = re.compile(r"^lora_unet_.*_proj_in$")


def unsupported_family(keys: Iterable[str]) -> str | None:
    """A sentence naming the unsupported model family whose names appear among `keys`, or None."""
    for key in keys:
        for pattern, what in _UNSUPPORTED:
            if pattern.search(key):
                return what + _NOT_YET
    return None


def arch_from_widths(
    candidates: Sequence[Arch],
    *,
    context_width: int | None = None,
    text_width: int | None = None,
    linear_projection: bool = False,
) -> tuple[Arch, bool]:
    """(family, whether a width decided it) among `candidates`, in preference order.

    An exact real width — the cross-attention context (attn2 to_k input), else the first text encoder's —
    that exactly one candidate has decides. Otherwise Linear transformer projections mean SD2 where SD2 is a
    candidate (diffusers ships SD2 so; SD1 never), else the first candidate. Used for adapter files, model
    folders and loaded U-Nets alike.
    """
    for width, of in ((context_width, "context"), (text_width, "text")):
        if width is None:
            continue
        matches = [a for a in candidates if _width(a, of) == width]
        if len(matches) == 1:
            return matches[0], True
    if linear_projection and Arch.SD2 in candidates:
        return Arch.SD2, False
    return candidates[0], False


def _width(arch: Arch, which: str) -> int:
    unet = record(arch)
    return unet.context_width if which == "context" else unet.text_encoders[0].width


def decide_arch(
    modules: Mapping[str, tuple[int, ...]],
    metadata: Mapping[str, str] | None = None,
    *,
    override: Arch | None = None,
    keys: Iterable[str] = (),
    flat: Collection[str] = (),
) -> tuple[Arch, list[str]]:
    """(architecture, warnings) of an adapter from its modules (kohya stem → ΔW shape) and metadata.

    `keys` are the file's other tensor keys (names of unsupported families are looked for there too);
    `override` is the user's `--arch`; `flat` names modules whose ΔW is stored flat (LyCORIS LoHa/LoKr), whose
    2-D shape therefore says nothing about a Linear layer. Raises BloraError when the modules fit no supported family, when
    shapes rule every family out, or when `override` contradicts the evidence.
    """
    family = unsupported_family(list(modules) + list(keys))
    if family:
        raise BloraError(family)
    if not modules:
        raise BloraError("no adapter modules, so no architecture to work on")
    candidates = _by_names(modules)
    fitting = [a for a in candidates if not _misfits(modules, a)]
    if not fitting:
        stem, problem = _misfits(modules, candidates[0])[0]
        raise BloraError(f"module {stem}: {problem}")
    widths = _widths(modules, flat)
    best, exact = arch_from_widths(fitting, **widths)
    decided = [best] if exact else fitting
    claim = arch_from_metadata(metadata or {})
    warnings: list[str] = []
    if override is not None:
        if override not in decided:
            raise BloraError(
                f"--arch {override.value} does not fit this file: its modules are {_names(decided)}"
            )
        chosen = override
    elif len(decided) == 1:
        chosen = decided[0]
    elif claim in decided:
        chosen = claim
    elif Arch.SDXL in decided and any(_LDM_NAME.match(s) for s in modules):
        chosen = Arch.SDXL  # kohya writes SDXL with LDM names, SD1/SD2 with diffusers names
    else:
        chosen = best
    if claim is not None and claim is not chosen and override is None:
        warnings.append(f"metadata says {claim.value} but the tensors are {chosen.value}; using {chosen.value}")
    _check_unet_fits(modules, chosen)
    return chosen, warnings


def _by_names(modules: Mapping[str, tuple[int, ...]]) -> list[Arch]:
    """The families whose real layers the module names fit best (ties kept, in preference order)."""
    scores = {}
    for arch in KNOWN_ARCHS:
        if not _worth_scoring(modules, arch):
            scores[arch] = (0, 0, 0)
            continue
        unet = sum(1 for s in modules if s.startswith("lora_unet_") and layer_shape(s, arch) is not None)
        text = sum(1 for s in modules if s.startswith("lora_te") and layer_shape(s, arch) is not None)
        placed = sum(1 for s in modules if place(s, arch) is not None)
        scores[arch] = (unet, text, placed)
    top = max(scores.values())
    if top[2] == 0:
        shown = ", ".join(sorted(modules)[:3])
        raise BloraError(
            f"no module fits SD1, SD2, SDXL, Flux.1 or SD3 (e.g. {shown}): an adapter for another model, which this "
            "version does not support"
        )
    return [a for a in KNOWN_ARCHS if scores[a] == top]


_UNET_ROOTS = tuple(f"lora_unet_{root}" for root in LDM_ROOTS + DIFFUSERS_ROOTS)


def _worth_scoring(modules: Mapping[str, tuple[int, ...]], arch: Arch) -> bool:
    """False when no module can name a layer of `arch`: a U-Net family needs a U-Net root or a text encoder,
    a diffusion transformer a layer of its table or a text encoder. Saves building the other families' layer
    tables (a tenth of a second for the U-Nets) for files of one family."""
    if any(s.startswith("lora_te") for s in modules):
        return True
    if is_dit(arch):
        index = layer_index(arch)
        return any(s.startswith("lora_unet_") and s[len("lora_unet_") :] in index for s in modules)
    return any(s.startswith(_UNET_ROOTS) for s in modules)


def _misfits(modules: Mapping[str, tuple[int, ...]], arch: Arch) -> list[tuple[str, str]]:
    return [(stem, problem) for stem, shape in modules.items() if (problem := misfit(stem, shape, arch))]


def _widths(modules: Mapping[str, tuple[int, ...]], flat: Collection[str]) -> dict:
    """The width evidence of a file: context and text width (a module's input features), Linear proj_in."""
    context = next((shape[1] for s, shape in modules.items() if _CONTEXT.match(s) and len(shape) >= 2), None)
    text = next((shape[1] for s, shape in modules.items() if _TEXT_ATTENTION.match(s) and len(shape) >= 2), None)
    linear = any(len(shape) == 2 for s, shape in modules.items() if _PROJ_IN.match(s) and s not in flat)
    return {"context_width": context, "text_width": text, "linear_projection": linear}


def _check_unet_fits(modules: Mapping[str, tuple[int, ...]], arch: Arch) -> None:
    """BloraError when the file has U-Net modules and none of them has a place in `arch`."""
    unet = sorted(s for s in modules if s.startswith("lora_unet_"))
    if unet and not any(place(s, arch) is not None for s in unet):
        raise BloraError(
            f"no denoiser module fits {arch.value} (e.g. {', '.join(unet[:3])}): an adapter for another model, "
            "which this version does not support"
        )


def _names(archs: Sequence[Arch]) -> str:
    return " or ".join(a.value for a in archs)
