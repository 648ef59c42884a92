"""PEFT / diffusers LoRA files: tensor keys and the `lora_adapter_metadata` JSON that carries the alphas.

A PEFT file names each factor `<component>.<dotted module path>.lora_A.weight` (down) / `lora_B.weight` (up),
with components `unet`, `text_encoder` and `text_encoder_2`. PEFT has no alpha tensor: diffusers (seen in 0.42,
`_fetch_state_dict` → `_create_lora_config`) reads the file's `__metadata__["lora_adapter_metadata"]`, a JSON
object of `LoraConfig` arguments prefixed by component (`"unet.r"`, `"unet.lora_alpha"`, `"unet.rank_pattern"`,
`"text_encoder.alpha_pattern"`, …), splits it per component and calls `LoraConfig(**fields)`. So every
component present needs its complete config, `target_modules` included; a component without one would get
PEFT's defaults (r = 8).

Patterns are matched by PEFT as regular expressions on a module-name suffix (`(.*\\.)?(pattern)$`), so a full
dotted path names exactly one layer. Text-encoder patterns leave out `text_model.`: the suffix then matches a
transformers 4 `CLIPTextModel` (`text_model.encoder.…`) and a transformers 5 one (`encoder.…`) alike. Tensor keys
keep `text_model.`, the form every diffusers version loads (0.42 strips it for a transformers 5 model).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from types import MappingProxyType

from blora_tools.jsonio import dumps
from blora_tools.taxonomy.blocks import Component

__all__ = ["METADATA_KEY", "FACTOR_KEYS", "PeftModule", "peft_root", "peft_key", "adapter_metadata"]

METADATA_KEY = "lora_adapter_metadata"
"""The safetensors metadata key diffusers reads LoRA configs from (diffusers' LORA_ADAPTER_METADATA_KEY)."""

_COMPONENT_NAMES = MappingProxyType(
    {
        Component.UNET: "unet",
        Component.TE: "text_encoder",
        Component.TE1: "text_encoder",
        Component.TE2: "text_encoder_2",
    }
)
"""Our component → the PEFT/diffusers key prefix of a U-Net pipeline."""

_DIT_NAMES = MappingProxyType(
    {
        "flux": {Component.UNET: "transformer", Component.TE1: "text_encoder", Component.TE3: "text_encoder_2"},
        "sd3": {Component.UNET: "transformer", Component.TE1: "text_encoder", Component.TE2: "text_encoder_2",
                Component.TE3: "text_encoder_3"},
    }
)
"""Flux.1 and SD3 pipelines: the denoiser is `transformer`; Flux's T5 is its `text_encoder_2` (diffusers
`FluxPipeline`, `StableDiffusion3Pipeline` component names)."""

FACTOR_KEYS = MappingProxyType({"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"})
"""kohya factor name → PEFT factor name (same tensor shapes: down r×in[×k×k], up out×r[×1×1])."""

_TE_ROOT = "text_model."


@dataclass(frozen=True)
class PeftModule:
    """What the metadata needs of one module: where it is, its rank and its alpha."""

    component: Component
    path: str
    rank: int
    alpha: float
    arch: str = "sd1"


def peft_root(component: Component, arch: str = "sd1") -> str:
    """The diffusers key prefix of a component in a pipeline of `arch` (an `Arch` or its value)."""
    names = _DIT_NAMES.get(str(arch), _COMPONENT_NAMES)
    return names[component]


def peft_key(component: Component, path: str, param: str, arch: str = "sd1") -> str:
    """The PEFT tensor key of a kohya factor (`lora_down.weight` / `lora_up.weight`) of one module."""
    return f"{peft_root(component, arch)}.{path}.{FACTOR_KEYS[param]}"


def _pattern_of(component: Component, path: str) -> str:
    """The name PEFT's `target_modules` / `rank_pattern` / `alpha_pattern` use for a module."""
    if component is not Component.UNET and path.startswith(_TE_ROOT):
        return path[len(_TE_ROOT) :]
    return path


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def adapter_metadata(modules: Iterable[PeftModule]) -> str:
    """The `lora_adapter_metadata` JSON for these modules: per component the most common rank and alpha as
    `r` / `lora_alpha`, every other module's in `rank_pattern` / `alpha_pattern`, and `target_modules`."""
    by_component: dict[str, list[PeftModule]] = {}
    for m in modules:
        by_component.setdefault(peft_root(m.component, m.arch), []).append(m)
    doc: dict[str, object] = {}
    for name, group in sorted(by_component.items()):
        r = Counter(m.rank for m in group).most_common(1)[0][0]
        alpha = Counter(m.alpha for m in group).most_common(1)[0][0]
        fields = {
            "r": r,
            "lora_alpha": _number(alpha),
            "rank_pattern": {_pattern_of(m.component, m.path): m.rank for m in group if m.rank != r},
            "alpha_pattern": {_pattern_of(m.component, m.path): _number(m.alpha) for m in group if m.alpha != alpha},
            "target_modules": sorted(_pattern_of(m.component, m.path) for m in group),
            "lora_dropout": 0.0,
            "bias": "none",
            "use_dora": False,
            "use_rslora": False,
        }
        doc.update({f"{name}.{key}": value for key, value in fields.items()})
    return dumps(doc, indent=2, sort_keys=True)
