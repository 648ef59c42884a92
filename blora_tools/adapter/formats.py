"""Tensor keys ↔ (module stem, parameter) for the formats people use.

Inside the product every module is named by its kohya stem (`lora_unet_down_blocks_0_attentions_0_proj_in`)
and every parameter by its kohya name (`lora_down.weight`, `alpha`, `hada_w1_a`, …). This module is the
boundary: it reads kohya/A1111 keys, PEFT/diffusers keys (`unet.….lora_A.weight`) and old diffusers
attention-processor keys (`….processor.to_q_lora.down.weight`), and keeps each module's original dotted
path when the file has one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import TYPE_CHECKING

from blora_tools.taxonomy.layouts import DIFFUSERS_ROOTS, LDM_ROOTS, rename_unet

if TYPE_CHECKING:
    from blora_tools.taxonomy.arch import Arch
    from blora_tools.taxonomy.blocks import Component


class Format(str, Enum):
    """How a file names its tensors."""

    KOHYA = "kohya"
    PEFT = "peft"
    ATTN_PROC = "attn-proc"

    def __str__(self) -> str:
        return self.value


KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")

KOHYA_PARAMS = frozenset(
    {
        "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale",
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
        "diff", "diff_b", "w_norm", "b_norm",
    }
)
"""Every per-module parameter name of the kohya/LyCORIS format."""

_PEFT_PARAMS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight"}
_PEFT_COMPONENTS = {"unet": "unet", "text_encoder": "te", "text_encoder_2": "te2"}
_ATTN_PROC = re.compile(r"^(?:(unet|text_encoder|text_encoder_2)\.)?(.+)\.processor\.(to_[qkv]|to_out)_lora\.(up|down)\.weight$")


@dataclass(frozen=True)
class KeyName:
    """A tensor key split into the module it belongs to and the parameter it holds."""

    stem: str
    param: str
    format: Format
    path: str | None = None
    """The module's dotted path inside its network, when the key carries it (PEFT, attn-proc)."""


def split_key(key: str) -> KeyName | None:
    """Split a tensor key; None for keys that belong to no adapter module (pass-through)."""
    if key.startswith(KOHYA_PREFIXES):
        stem, dot, param = key.partition(".")
        if dot and param in KOHYA_PARAMS:
            return KeyName(stem, param, Format.KOHYA)
        return None
    m = _ATTN_PROC.match(key)
    if m:
        component = _PEFT_COMPONENTS[m.group(1) or "unet"]
        projection = "to_out.0" if m.group(3) == "to_out" else m.group(3)
        path = f"{m.group(2)}.{projection}"
        param = "lora_up.weight" if m.group(4) == "up" else "lora_down.weight"
        return KeyName(stem_from_path(component, path), param, Format.ATTN_PROC, path)
    head, dot, rest = key.partition(".")
    if dot and head in _PEFT_COMPONENTS:
        for suffix, param in _PEFT_PARAMS.items():
            if rest.endswith("." + suffix):
                path = rest[: -len(suffix) - 1]
                return KeyName(stem_from_path(_PEFT_COMPONENTS[head], path), param, Format.PEFT, path)
    return None


def stem_from_path(component: str, path: str) -> str:
    """The kohya stem of a module given its component (`unet`, `te`, `te1`, `te2`) and dotted path.

    Text-encoder stems always take transformers 4's form with `text_model`, whichever form the path has.
    """
    if component != "unet" and not path.startswith("text_model."):
        path = "text_model." + path
    return f"lora_{component}_" + path.replace(".", "_")


# --- kohya stem → dotted module path -----------------------------------------------------------------

_COMPOUND_NAMES = frozenset(
    {
        # diffusers U-Net (SD1/SD2, diffusers-style SDXL)
        "down_blocks", "up_blocks", "mid_block", "transformer_blocks", "to_q", "to_k", "to_v", "to_out",
        "proj_in", "proj_out", "time_emb_proj", "conv_shortcut", "conv_in", "conv_out", "conv_norm_out",
        "time_embedding", "add_embedding", "linear_1", "linear_2",
        # LDM U-Net (SDXL as kohya writes it, SD1 as A1111 once did)
        "input_blocks", "output_blocks", "middle_block", "time_embed", "label_emb", "in_layers", "out_layers",
        "emb_layers", "skip_connection",
        # CLIP text encoders
        "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2",
        "final_layer_norm", "text_projection", "token_embedding", "position_embedding",
    }
)
"""Module names that contain an underscore: kohya's `.` → `_` flattening hides their boundaries."""

_SIMPLE_NAMES = frozenset(
    {
        "resnets", "attentions", "downsamplers", "upsamplers", "attn1", "attn2", "ff", "net", "proj", "norm",
        "norm1", "norm2", "norm3", "conv", "conv1", "conv2", "op", "out", "encoder", "layers", "mlp", "fc1",
        "fc2", "embeddings",
    }
)
"""Module names without an underscore; with the digits of list indices, every other part of a path."""

_LONGEST_COMPOUND = max(name.count("_") + 1 for name in _COMPOUND_NAMES)
_COMPONENT_OF_PREFIX = MappingProxyType({"lora_unet_": "unet", "lora_te_": "te", "lora_te1_": "te1", "lora_te2_": "te2"})


def path_from_stem(stem: str, arch: "Arch | str") -> tuple["Component", str]:
    """The component and dotted module path a kohya stem was made from (the inverse of `stem_from_path`).

    kohya joins a module path with `_`, so `to_out_0` could be `to.out.0` or `to_out.0`; the path is
    recovered from the vocabulary of SD/SDXL U-Net and CLIP module names, taking the longest known name
    at each position. Text-encoder paths come back in transformers 4's form (`text_model.encoder.…`).
    Raises BloraError for a name part outside that vocabulary, or a text encoder `arch` does not have.

    Example:
        >>> path_from_stem("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0", "sd1")
        (<Component.UNET: 'unet'>, 'down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0')
    """
    from blora_tools.errors import BloraError
    from blora_tools.taxonomy.arch import Arch
    from blora_tools.taxonomy.blocks import Component, table

    prefix = next((p for p in _COMPONENT_OF_PREFIX if stem.startswith(p)), None)
    if prefix is None:
        raise BloraError(f"module name {stem!r} does not start with {', '.join(_COMPONENT_OF_PREFIX)}")
    component = Component(_COMPONENT_OF_PREFIX[prefix])
    arch = Arch(arch)
    if component is not Component.UNET and arch is not Arch.UNKNOWN:
        allowed = table(arch).text_encoders
        # A PEFT SDXL file holding only `text_encoder` reads as `te`; it is te1 there.
        if component not in allowed and not (component is Component.TE and Component.TE1 in allowed):
            raise BloraError(f"module {stem}: {arch.value} has no text encoder {component.value!r}")
    parts = stem[len(prefix) :].split("_")
    names: list[str] = []
    i = 0
    while i < len(parts):
        for length in range(min(_LONGEST_COMPOUND, len(parts) - i), 0, -1):
            candidate = "_".join(parts[i : i + length])
            if candidate in _COMPOUND_NAMES or (
                length == 1 and (candidate in _SIMPLE_NAMES or candidate.isdigit())
            ):
                names.append(candidate)
                i += length
                break
        else:
            raise BloraError(
                f"cannot turn module name {stem!r} back into a module path: {parts[i]!r} is not part of any "
                "Stable Diffusion U-Net or CLIP module name"
            )
    path = ".".join(names)
    if component is not Component.UNET and not path.startswith("text_model."):
        path = "text_model." + path
    return component, path


# --- SD U-Net: LDM names ↔ diffusers names (the stage table lives in taxonomy.layouts) ---------------------


def unet_naming(path: str) -> str | None:
    """`ldm` or `diffusers` for a dotted U-Net module path, from its first name; None when neither."""
    root = path.split(".", 1)[0]
    if root in LDM_ROOTS:
        return "ldm"
    if root in DIFFUSERS_ROOTS:
        return "diffusers"
    return None


def ldm_to_diffusers(path: str, arch: "Arch | str") -> str:
    """The diffusers `UNet2DConditionModel` path of an LDM U-Net module path (`input_blocks.4.1.…`)."""
    return rename_unet(path, arch, to_diffusers=True)


def diffusers_to_ldm(path: str, arch: "Arch | str") -> str:
    """The LDM U-Net module path (kohya's SDXL names) of a diffusers U-Net module path."""
    return rename_unet(path, arch, to_diffusers=False)
