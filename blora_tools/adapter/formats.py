"""Tensor keys ↔ (module stem, parameter) for the key dialects people's files use.

Inside the product every module is named by its kohya stem (`lora_unet_down_blocks_0_attentions_0_proj_in`)
and every parameter by its kohya name (`lora_down.weight`, `alpha`, `hada_w1_a`, …). This module is the
boundary: `split_key` reads every dialect below, and keeps each module's original dotted path when the file
has one. It is the only place that knows how a producer spells a key.

A *dialect* names the producer's convention; its *format* names the family a file of that dialect shares
parameters and alpha rule with: `kohya` (kohya parameter names, alpha in an `alpha` tensor, else rank) or
`peft` (factors A/B, alpha in a PEFT config, else rank). Facts per dialect, with sources:

* `kohya` — `lora_unet_…`, `lora_te_…`, `lora_te1_…`, `lora_te2_…` stems (sd-scripts, A1111, kohya_ss; also
  ai-toolkit, which maps SDXL names to LDM in `toolkit/network_mixins.py` `save_weights`, ostris/ai-toolkit
  002279ce, and OneTrainer's default "legacy" save with diffusers-style SDXL names,
  `modules/util/convert/lora/convert_lora_util.py`, Nerogar/OneTrainer ee01e6a6).
* `lycoris` — the LyCORIS wrapper's `lycoris_` prefix before the flattened module path (`lycoris.wrapper`,
  `LycorisNetwork.LORA_PREFIX`; SimpleTuner's LyCORIS output, bghira/SimpleTuner `helpers/training/save_hooks.py`
  d4fe223a).
* `diffusers` — `unet.` / `text_encoder.` / `text_encoder_2.` + dotted path + `lora_A.weight` / `lora_B.weight`
  (+ `lora_magnitude_vector` for DoRA): diffusers' `save_lora_weights` from PEFT layers; alphas in the
  `lora_adapter_metadata` JSON.
* `diffusers-legacy` — the same roots with `….lora.down.weight` / `….lora.up.weight` (U-Net) and
  `….lora_linear_layer.down.weight` / `.up.weight` (text encoders), beside plain `lora_A`/`lora_B` keys for
  layers the conversion does not rename: diffusers' training scripts and SimpleTuner (`convert_state_dict_to_diffusers`
  of a PEFT state dict), and pre-PEFT diffusers.
* `attn-proc` — old diffusers attention processors (`….processor.to_q_lora.down.weight`).
* `peft-saved` — PEFT `save_pretrained`: `base_model.model.` + dotted path + `lora_A`/`lora_B`/`lora_magnitude_vector`,
  with `adapter_config.json` beside `adapter_model.safetensors`.
* `comfyui` — ComfyUI's LoraSave node: `diffusion_model.` + LDM path and `text_encoders.clip_l.transformer.` /
  `clip_g` / `clip_h` + CLIP path, kohya parameter names, no alpha (comfy_extras/nodes_lora_extract.py,
  comfyanonymous/ComfyUI 962638c9; loaded by comfy/lora.py, Comfy-Org/ComfyUI ec93dcac).
* `omi` — OneTrainer's OMI layout: `unet.` + LDM path, `clip_l.` / `clip_g.` + CLIP path, kohya parameter names
  (OneTrainer `modules/util/convert/lora/convert_sdxl_lora.py` 6b44ee32, "omi" prefixes).

Flux.1 and SD3 (docs/architecture.md §2, facts in `taxonomy.dit`): kohya writes `lora_unet_double_blocks_…`,
`lora_unet_joint_blocks_…`, `lora_te1_` (CLIP-L), `lora_te2_` (SD3's CLIP-G) and `lora_te3_` (T5); diffusers,
PEFT and ai-toolkit write `transformer.` + diffusers path (split q/k/v) and `text_encoder.`, `text_encoder_2.`,
`text_encoder_3.`; ComfyUI writes `diffusion_model.` + BFL path and `text_encoders.t5xxl.transformer.`. Two more:
* `xlabs` — XLabs' x-flux LoRA processors: `double_blocks.N.processor.qkv_lora1.down.weight` (img qkv), `proj_lora1`,
  `qkv_lora2`/`proj_lora2` (txt), `single_blocks.N.processor.qkv_lora` (the q, k, v rows of `linear1` only) and
  `proj_lora` (`linear2`); no alpha (XLabs-AI/x-flux `src/flux/modules/layers.py`, `DoubleStreamBlockLoraProcessor`;
  diffusers `_convert_xlabs_flux_lora_to_diffusers`).
* `onetrainer` — OneTrainer's default names for transformers: `lora_transformer_` + the flattened diffusers path
  (ComfyUI `comfy/lora.py` `model_lora_keys_unet` maps them).
A T5 encoder's paths (`encoder.block.…`, `shared`) name component `te3` under whichever root a file uses.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from blora_tools.names import Named
from blora_tools.taxonomy.encoders import is_t5_path
from blora_tools.taxonomy.layouts import DIFFUSERS_ROOTS, LDM_ROOTS, rename_unet

if TYPE_CHECKING:
    from blora_tools.taxonomy.arch import Arch
    from blora_tools.taxonomy.blocks import Component

__all__ = [
    "Format",
    "Dialect",
    "DIFFUSERS_FAMILY",
    "NATIVE_DIALECT",
    "KeyName",
    "split_key",
    "stem_from_path",
    "path_from_stem",
    "unet_naming",
    "ldm_to_diffusers",
    "diffusers_to_ldm",
]


class Format(Named):
    """How a file names its tensors: the layouts the product writes (kohya, peft) and the old attn-proc."""

    KOHYA = "kohya"
    PEFT = "peft"
    ATTN_PROC = "attn-proc"


class Dialect(Named):
    """Which producer's key convention a file follows (see the module docstring)."""

    KOHYA = "kohya"
    LYCORIS = "lycoris"
    DIFFUSERS = "diffusers"
    DIFFUSERS_LEGACY = "diffusers-legacy"
    ATTN_PROC = "attn-proc"
    PEFT = "peft-saved"
    COMFYUI = "comfyui"
    OMI = "omi"
    XLABS = "xlabs"
    ONETRAINER = "onetrainer"

    @property
    def format(self) -> Format:
        """The format family: which parameter names and alpha rule the dialect shares."""
        if self is Dialect.ATTN_PROC:
            return Format.ATTN_PROC
        if self in (Dialect.DIFFUSERS, Dialect.DIFFUSERS_LEGACY, Dialect.PEFT):
            return Format.PEFT
        return Format.KOHYA


DIFFUSERS_FAMILY = frozenset({Dialect.DIFFUSERS, Dialect.DIFFUSERS_LEGACY, Dialect.ATTN_PROC})
"""Dialects that share the `unet.` / `text_encoder.` roots and appear together in one diffusers-written file
(old diffusers saved attention processors beside `lora_linear_layer` text-encoder keys; the training scripts'
conversion renames only attention projections). Any other two dialects in one file are an error."""

NATIVE_DIALECT = MappingProxyType({Format.KOHYA: Dialect.KOHYA, Format.PEFT: Dialect.DIFFUSERS})
"""The dialect the product writes for each format."""

_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")
_LYCORIS_PREFIX = "lycoris_"
_ONETRAINER_PREFIX = "lora_transformer_"

_KOHYA_PARAMS = frozenset(
    {
        "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale",
        "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
        "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
        "diff", "diff_b", "w_norm", "b_norm",
    }
)
"""Every per-module parameter name of the kohya/LyCORIS format."""

_PEFT_PARAMS = MappingProxyType(
    {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight", "lora_magnitude_vector": "dora_scale"}
)
"""PEFT parameter → kohya parameter. PEFT's DoRA magnitude (shape out, or 1×out×1×1 for convolutions) holds the
values kohya/LyCORIS keep in `dora_scale` (out×1…): both are the per-output-row norm target (PEFT
`lora/dora.py` `get_weight_norm`; LyCORIS `apply_weight_decompose` with `wd_on_out`), so only the shape differs."""
_LEGACY_PARAMS = MappingProxyType(
    {
        "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
        "lora_linear_layer.down.weight": "lora_down.weight", "lora_linear_layer.up.weight": "lora_up.weight",
    }
)
"""Old diffusers factor names (diffusers `utils/state_dict_utils.py`: PEFT_TO_DIFFUSERS, UNET_TO_DIFFUSERS)."""

_DIFFUSERS_ROOTS = MappingProxyType(
    {"unet.": "unet", "transformer.": "unet", "text_encoder.": "te", "text_encoder_2.": "te2", "text_encoder_3.": "te3"}
)
"""diffusers' component roots: the denoiser (U-Net or transformer) and up to three text encoders (a T5 path is
`te3` whatever its root: Flux's `text_encoder_2` is T5)."""
_COMFY_TE_ROOTS = MappingProxyType(
    {"text_encoders.clip_l.transformer.": "te", "text_encoders.clip_h.transformer.": "te",
     "text_encoders.clip_g.transformer.": "te2", "text_encoders.t5xxl.transformer.": "te3"}
)
"""ComfyUI's text-encoder state-dict prefixes: CLIP-L (SD1, SDXL's and Flux's/SD3's first), CLIP-H (SD2), CLIP-G
(SDXL's and SD3's second), T5-XXL (Flux, SD3)."""
_OMI_TE_ROOTS = MappingProxyType({"clip_l.": "te", "clip_g.": "te2"})
_PEFT_ROOT = "base_model.model."
_COMFY_UNET_ROOT = "diffusion_model."
_TE_PATH_ROOTS = ("text_model.", "encoder.", "shared")
"""How a text encoder's module paths begin (CLIP in transformers 4 and 5, T5): a path in a single-model file that
is not a denoiser's."""
_XLABS = re.compile(r"^(double|single)_blocks\.(\d+)\.processor\.(qkv_lora[12]?|proj_lora[12]?)\.(down|up)\.weight$")
_XLABS_LAYERS = MappingProxyType(
    {
        ("double", "qkv_lora1"): "img_attn.qkv", ("double", "proj_lora1"): "img_attn.proj",
        ("double", "qkv_lora2"): "txt_attn.qkv", ("double", "proj_lora2"): "txt_attn.proj",
        ("single", "qkv_lora"): "linear1_qkv", ("single", "proj_lora"): "linear2",
    }
)
"""XLabs processor → the BFL layer it adapts (`linear1_qkv`: the q, k, v rows of `linear1`, as ComfyUI names them)."""
_ATTN_PROC = re.compile(r"^(?:(unet|text_encoder|text_encoder_2)\.)?(.+)\.processor\.(to_[qkv]|to_out)_lora\.(up|down)\.weight$")
_ATTN_PROC_COMPONENTS = MappingProxyType({"unet": "unet", "text_encoder": "te", "text_encoder_2": "te2"})


@dataclass(frozen=True)
class KeyName:
    """A tensor key split into the module it belongs to and the parameter it holds."""

    stem: str
    param: str
    dialect: Dialect
    path: str | None = None
    """The module's dotted path inside its network, when the key carries it (dotted dialects)."""

    @property
    def format(self) -> Format:
        return self.dialect.format


def split_key(key: str) -> KeyName | None:
    """Split a tensor key of any dialect; None for keys that belong to no adapter module (pass-through)."""
    if key.startswith(_KOHYA_PREFIXES):
        stem, dot, param = key.partition(".")
        return KeyName(stem, param, Dialect.KOHYA) if dot and param in _KOHYA_PARAMS else None
    if key.startswith(_LYCORIS_PREFIX):
        return _split_lycoris(key)
    if key.startswith(_ONETRAINER_PREFIX):
        stem, dot, param = key.partition(".")
        if not dot or param not in _KOHYA_PARAMS:
            return None
        return KeyName("lora_unet_" + stem[len(_ONETRAINER_PREFIX) :], param, Dialect.ONETRAINER)
    m = _XLABS.match(key)
    if m:
        layer = _XLABS_LAYERS.get((m.group(1), m.group(3)))
        if layer is None:
            return None
        path = f"{m.group(1)}_blocks.{m.group(2)}.{layer}"
        param = "lora_up.weight" if m.group(4) == "up" else "lora_down.weight"
        return KeyName(stem_from_path("unet", path), param, Dialect.XLABS, path)
    m = _ATTN_PROC.match(key)
    if m:
        component = _ATTN_PROC_COMPONENTS[m.group(1) or "unet"]
        projection = "to_out.0" if m.group(3) == "to_out" else m.group(3)
        path = f"{m.group(2)}.{projection}"
        param = "lora_up.weight" if m.group(4) == "up" else "lora_down.weight"
        return KeyName(stem_from_path(component, path), param, Dialect.ATTN_PROC, path)
    return _split_dotted(key)


def _split_lycoris(key: str) -> KeyName | None:
    """`lycoris_<flattened path>.<param>`: a U-Net path, or a CLIP one (`text_model_…` / `encoder_…`)."""
    stem, dot, param = key.partition(".")
    if not dot or param not in _KOHYA_PARAMS:
        return None
    flat = stem[len(_LYCORIS_PREFIX) :]
    if flat.startswith(("encoder_block_", "shared")):
        return KeyName("lora_te3_" + flat, param, Dialect.LYCORIS)
    if flat.startswith(tuple(root.replace(".", "_") for root in _TE_PATH_ROOTS)):
        te_flat = flat if flat.startswith("text_model_") else "text_model_" + flat
        return KeyName("lora_te_" + te_flat, param, Dialect.LYCORIS)
    return KeyName("lora_unet_" + flat, param, Dialect.LYCORIS)


def _split_dotted(key: str) -> KeyName | None:
    """Keys made of a root, a dotted module path and a parameter name (every other dialect)."""
    found = _split_param(key)
    if found is None:
        return None
    rest, param, family = found
    for root, component in _DIFFUSERS_ROOTS.items():
        if rest.startswith(root):
            path = rest[len(root) :]
            if family == "kohya":
                # OMI writes `unet.` with kohya names; diffusers' own Flux conversion writes `transformer.` so
                dialect = {"unet.": Dialect.OMI, "transformer.": Dialect.DIFFUSERS}.get(root)
            else:
                dialect = Dialect.DIFFUSERS_LEGACY if family == "legacy" else Dialect.DIFFUSERS
            return _key_name(component, path, param, dialect)
    if rest.startswith(_PEFT_ROOT):
        path = rest[len(_PEFT_ROOT) :]
        component = "te" if path.startswith(_TE_PATH_ROOTS) else "unet"
        return _key_name(component, path, param, Dialect.PEFT if family == "peft" else None)
    if rest.startswith(_COMFY_UNET_ROOT):
        return _key_name("unet", rest[len(_COMFY_UNET_ROOT) :], param, Dialect.COMFYUI if family != "legacy" else None)
    for roots, dialect in ((_COMFY_TE_ROOTS, Dialect.COMFYUI), (_OMI_TE_ROOTS, Dialect.OMI)):
        for root, component in roots.items():
            if rest.startswith(root):
                wanted = family != "legacy" if dialect is Dialect.COMFYUI else family == "kohya"
                return _key_name(component, rest[len(root) :], param, dialect if wanted else None)
    return None


def _split_param(key: str) -> tuple[str, str, str] | None:
    """(key without its parameter, kohya parameter, family: `peft`, `legacy` or `kohya`), or None."""
    for suffix, param in _PEFT_PARAMS.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], param, "peft"
    for suffix, param in _LEGACY_PARAMS.items():
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], param, "legacy"
    head, dot, tail = key.rpartition(".")
    if dot and tail in _KOHYA_PARAMS:
        return head, tail, "kohya"
    head2, dot2, tail2 = head.rpartition(".")
    if dot and dot2 and f"{tail2}.{tail}" in _KOHYA_PARAMS:
        return head2, f"{tail2}.{tail}", "kohya"
    return None


def _key_name(component: str, path: str, param: str, dialect: Dialect | None) -> KeyName | None:
    if dialect is None or not path:
        return None
    return KeyName(stem_from_path(component, path), param, dialect, path)


def stem_from_path(component: str, path: str) -> str:
    """The kohya stem of a module given its component (`unet`, `te`, `te1`, `te2`, `te3`) and dotted path.

    CLIP stems always take transformers 4's form with `text_model`, whichever form the path has; a T5 path
    is always component `te3` (kohya's `lora_te3_`), whatever root the file gave it.
    """
    if component != "unet":
        if is_t5_path(path):
            component = "te3"
        elif not path.startswith("text_model."):
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
        # T5 encoder (Flux's and SD3's `lora_te3_`)
        "layer_norm", "wi_0", "wi_1", "relative_attention_bias",
    }
)
"""Module names that contain an underscore: kohya's `.` → `_` flattening hides their boundaries."""

_SIMPLE_NAMES = frozenset(
    {
        "resnets", "attentions", "downsamplers", "upsamplers", "attn1", "attn2", "ff", "net", "proj", "norm",
        "norm1", "norm2", "norm3", "conv", "conv1", "conv2", "op", "out", "encoder", "layers", "mlp", "fc1",
        "fc2", "embeddings", "block", "layer", "SelfAttention", "DenseReluDense", "q", "k", "v", "o", "wo", "shared",
    }
)
"""Module names without an underscore; with the digits of list indices, every other part of a path."""

_LONGEST_COMPOUND = max(name.count("_") + 1 for name in _COMPOUND_NAMES)
_COMPONENT_OF_PREFIX = MappingProxyType(
    {"lora_unet_": "unet", "lora_te_": "te", "lora_te1_": "te1", "lora_te2_": "te2", "lora_te3_": "te3"}
)


def path_from_stem(stem: str, arch: "Arch | str") -> tuple["Component", str]:
    """The component and dotted module path a kohya stem was made from (the inverse of `stem_from_path`).

    kohya joins a module path with `_`, so `to_out_0` could be `to.out.0` or `to_out.0`; the path is
    recovered from the vocabulary of SD/SDXL U-Net, CLIP and T5 module names, taking the longest known name
    at each position; a diffusion transformer's paths come from its layer table (`taxonomy.dit`).
    CLIP paths come back in transformers 4's form (`text_model.encoder.…`).
    Raises BloraError for a name part outside that vocabulary, or a text encoder `arch` does not have.

    Example:
        >>> path_from_stem("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0", "sd1")
        (<Component.UNET: 'unet'>, 'down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0')
    """
    from blora_tools.errors import BloraError
    from blora_tools.taxonomy.arch import Arch, is_dit
    from blora_tools.taxonomy.blocks import Component, table
    from blora_tools.taxonomy.dit import layer_index

    prefix = next((p for p in _COMPONENT_OF_PREFIX if stem.startswith(p)), None)
    if prefix is None:
        raise BloraError(f"module name {stem!r} does not start with {', '.join(_COMPONENT_OF_PREFIX)}")
    component = Component(_COMPONENT_OF_PREFIX[prefix])
    arch = Arch(arch)
    if component is Component.UNET and is_dit(arch):
        layer = layer_index(arch).get(stem[len(prefix) :])
        if layer is None:
            raise BloraError(f"module {stem} is no {arch.value} layer")
        return component, layer.path
    if component is not Component.UNET:
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
                "Stable Diffusion U-Net, CLIP or T5 module name"
            )
    path = ".".join(names)
    if component is not Component.UNET and not is_t5_path(path) and not path.startswith("text_model."):
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
