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
