"""Adapter files in every SD-family key dialect, each with its producer's own loader as the ΔW oracle.

Where the producer is installed (diffusers, PEFT, LyCORIS) the file is written by its own code and read back
by its own loader; otherwise the key layout is restated from the producer's source (repository, file and
commit named at each builder) and applied by the restated rule. A loader returns the per-layer ΔW it puts
into fresh tiny models: the weight after loading and merging minus the weight before, keyed
`component:module path` in that model's own naming.
"""

from __future__ import annotations

import json
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from adapters import pick
from interop_helpers import TE_TARGETS, UNET_TARGETS, TinyModels
from safetensors.torch import load_file, save_file
from torch import nn

from blora_tools.adapter.formats import ldm_to_diffusers

Deltas = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Produced:
    """One dialect's file and how to load it."""

    dialect: str
    arch: str
    path: Path
    """the file (or PEFT folder) to give the tools"""
    unet_kind: str
    """which tiny U-Net the producer loads into: `diffusers` or `ldm` (SDXL's LDM-named tree)"""
    load: Callable[[Path], Deltas]
    """the producer's loader (or the restated rule): file or folder → per-layer ΔW"""
    trained: Deltas | None = None
    """the ΔW of the network the producer saved, where its loader does not reproduce all of it"""

    @property
    def reference(self) -> Deltas:
        """The ΔW the producer applies: its network's own, else what its loader puts into the model."""
        return self.trained if self.trained is not None else self.load(self.path)


# --- weight differences ---------------------------------------------------------------------------------


def _weights(models: TinyModels) -> dict[str, torch.Tensor]:
    """`component:path` → weight of every layer, PEFT wrappers seen through (`x.base_layer` is `x`)."""
    out = {}
    for component, model in models.components.items():
        for name, module in model.named_modules():
            if ".lora_" in f".{name}" or not isinstance(getattr(module, "weight", None), nn.Parameter):
                continue
            name = name.replace(".base_layer", "")
            out[f"{component}:{name}"] = module.weight.detach().double().clone()
    return out


def weight_deltas(before: TinyModels, after: TinyModels) -> Deltas:
    """Per layer whose weight changed, after − before."""
    old, new = _weights(before), _weights(after)
    return {k: new[k] - old[k] for k in old if not torch.equal(new[k], old[k])}


def our_deltas(adapter, models: TinyModels) -> Deltas:
    """ΔW of every module as the product reads it, keyed by the layer its stem names in `models`."""
    from blora_tools.adapter.kinds import delta_weight

    layers = models.layer_of_stem()
    names = {id(m): f"{c}:{n}" for c, model in models.components.items() for n, m in model.named_modules()}
    out = {}
    for stem, module in adapter.modules.items():
        layer = layers[stem]
        delta = delta_weight(module.kind, adapter.tensors(module), module.scale, module.weight_shape)
        out[names[id(layer)]] = delta.double().reshape(layer.weight.shape)
    return out


def assert_same(got: Deltas, want: Deltas, tol: float = 1e-5) -> None:
    """Same layers, and each ΔW equal to `tol` relative to the largest ΔW entry."""
    assert sorted(got) == sorted(want), (sorted(set(got) ^ set(want)))[:4]
    scale = max(float(w.abs().max()) for w in want.values())
    for key in want:
        err = float((got[key] - want[key]).abs().max())
        assert err <= tol * scale, f"{key}: off by {err:g} (ΔW entries up to {scale:g})"


# --- producers with installed code ---------------------------------------------------------------------


def _randomize_up(model: nn.Module, seed: int) -> None:
    """Trained-looking factors: PEFT/LyCORIS start the up factor at zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_up" in name or "lora_A" in name or "lora_down" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def diffusers_legacy(workdir: Path, arch: str, metadata: bool) -> Produced:
    """diffusers' training scripts and SimpleTuner: `convert_state_dict_to_diffusers(get_peft_model_state_dict(…))`
    into `save_lora_weights` (attention projections become `.lora.down` / `.lora_linear_layer.down`, other layers
    keep `lora_A`), with or without the configs in `lora_adapter_metadata` (SimpleTuner passes none)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    path = workdir / f"diffusers-legacy-{arch}-{'meta' if metadata else 'plain'}.safetensors"
    models = TinyModels.fresh(arch)
    extra = dict(rank_pattern={"proj_in": 2}, alpha_pattern={"proj_out": 5, "attn2.to_k": 1}) if metadata else {}
    unet_config = LoraConfig(r=4, lora_alpha=6 if metadata else 4, target_modules=list(UNET_TARGETS), **extra)
    te_config = LoraConfig(r=4, lora_alpha=2 if metadata else 4, target_modules=list(TE_TARGETS))
    inject_adapter_in_model(unet_config, models.unet)
    for te in models.encoders:
        inject_adapter_in_model(te_config, te)
    for i, model in enumerate([models.unet, *models.encoders]):
        _randomize_up(model, i)
    layers = {
        "unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(models.unet)),
        "text_encoder_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(models.encoders[0])),
    }
    if metadata:
        layers["unet_lora_adapter_metadata"] = unet_config.to_dict()
        layers["text_encoder_lora_adapter_metadata"] = te_config.to_dict()
    pipeline = StableDiffusionPipeline
    if arch == "sdxl":
        pipeline = StableDiffusionXLPipeline
        layers["text_encoder_2_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(models.encoders[1]))
        if metadata:
            layers["text_encoder_2_lora_adapter_metadata"] = te_config.to_dict()
    pipeline.save_lora_weights(path.parent, weight_name=path.name, **layers)
    trained = peft_deltas(models)
    return Produced("diffusers-legacy", arch, path, "diffusers", lambda p: load_diffusers(p, arch), trained)


def peft_deltas(models: TinyModels) -> Deltas:
    """ΔW of every PEFT LoRA layer injected into `models`, by PEFT's own `get_delta_weight`."""
    out = {}
    with torch.no_grad():
        for component, model in models.components.items():
            for name, module in model.named_modules():
                if hasattr(module, "get_delta_weight") and "default" in getattr(module, "lora_A", {}):
                    out[f"{component}:{name}"] = module.get_delta_weight("default").double()
    return out


def load_diffusers(path: Path, arch: str) -> Deltas:
    """diffusers' own loader: `load_lora_weights` then `fuse_lora`."""
    models = TinyModels.fresh(arch, "diffusers")
    pipe = models.pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe.load_lora_weights(str(path), adapter_name="tested")
        pipe.fuse_lora(components=["unet", "text_encoder", "text_encoder_2"] if arch == "sdxl" else ["unet", "text_encoder"])
    return weight_deltas(TinyModels.fresh(arch, "diffusers"), models)


def peft_saved(workdir: Path, *, dora: bool = False, rslora: bool = False, component: str = "unet") -> Produced:
    """PEFT `get_peft_model(…).save_pretrained(folder)`: `base_model.model.` keys, `adapter_config.json` beside."""
    from peft import LoraConfig, get_peft_model

    name = f"peft-{component}{'-dora' if dora else ''}{'-rslora' if rslora else ''}"
    folder = workdir / name
    models = TinyModels.fresh("sd1")
    if component == "unet":
        model = models.unet
        config = LoraConfig(
            r=4, lora_alpha=6, target_modules=["to_q", "to_v", "proj_in", "conv1", "ff.net.2"], use_dora=dora,
            use_rslora=rslora, rank_pattern={"down_blocks.0.attentions.0.proj_in": 2},
            alpha_pattern={r"up_blocks\.\d\.attentions\.0\.proj_in": 3, "conv1": 5},
        )
    else:
        model = models.encoders[0]
        config = LoraConfig(r=4, lora_alpha=2, target_modules=list(TE_TARGETS), alpha_pattern={"fc2": 7})
    peft_model = get_peft_model(model, config)
    _randomize_up(peft_model, 3)
    if dora:
        gen = torch.Generator().manual_seed(4)
        with torch.no_grad():
            for pname, p in peft_model.named_parameters():
                if "lora_magnitude_vector" in pname:
                    p.mul_(1 + 0.3 * torch.rand(p.shape, generator=gen))
    peft_model.save_pretrained(str(folder))
    return Produced("peft-saved", "sd1", folder, "diffusers", lambda p: load_peft(p, component))


def load_peft(folder: Path, component: str) -> Deltas:
    """PEFT's own loader: `PeftModel.from_pretrained` then `merge_and_unload`."""
    from peft import PeftModel

    models = TinyModels.fresh("sd1")
    index = 0 if component == "unet" else 1
    model = [models.unet, *models.encoders][index]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    if component == "unet":
        models.unet = merged
    else:
        models.encoders[0] = merged
    return weight_deltas(TinyModels.fresh("sd1"), models)


def lycoris_wrapped(workdir: Path, arch: str) -> Produced:
    """LyCORIS's own wrapper (`lycoris.create_lycoris` … `save_weights`): `lycoris_` keys, as SimpleTuner saves
    LyCORIS training (bghira/SimpleTuner `helpers/training/save_hooks.py` `_save_lycoris`, d4fe223a)."""
    from lycoris import LycorisNetwork, create_lycoris

    path = workdir / f"lycoris-{arch}.safetensors"
    models = TinyModels.fresh(arch)
    default = LycorisNetwork.TARGET_REPLACE_MODULE  # a class attribute: restored for the other tests
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        LycorisNetwork.apply_preset({"target_module": ["Attention", "ResnetBlock2D"]})
        try:
            network = create_lycoris(models.unet, 1.0, linear_dim=4, linear_alpha=2, conv_dim=2, conv_alpha=1, algo="lora")
        finally:
            LycorisNetwork.apply_preset({"target_module": default})
    network.apply_to()
    _randomize_up(network, 5)
    network.save_weights(str(path), torch.float32, {"lycoris_config": "{}"})
    return Produced("lycoris", arch, path, "diffusers", lambda p: load_lycoris_wrapped(p, arch))


def load_lycoris_wrapped(path: Path, arch: str) -> Deltas:
    """LyCORIS's own loader: `create_lycoris_from_weights` on the U-Net, then `merge_to`."""
    from lycoris import create_lycoris_from_weights

    models = TinyModels.fresh(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network, _ = create_lycoris_from_weights(1.0, str(path), models.unet)
        network.merge_to()
    return weight_deltas(TinyModels.fresh(arch), models)


# --- producers restated from their source --------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """A restated key layout: how a (component, model path) is spelt, and the reverse."""

    name: str
    unet_kind: str
    roots: dict[str, str]
    """component → key root (the text before the module path)"""
    flatten: bool = False
    """module path with `_` for `.` (kohya-style stems)"""
    te_text_model: bool = True
    """text-encoder paths carry transformers 4's `text_model.`"""


COMFYUI = Rule(
    "comfyui", "ldm",
    {"unet": "diffusion_model.", "te1": "text_encoders.clip_l.transformer.", "te2": "text_encoders.clip_g.transformer."},
)
"""ComfyUI's LoraSave: `diffusion_model.` + the U-Net state-dict path, `text_encoders.` + the CLIP state-dict path
(`clip_l.transformer.text_model.…`), `lora_up.weight` / `lora_down.weight`, no alpha (ComfyUI then applies scale 1).
Source: comfyanonymous/ComfyUI comfy_extras/nodes_lora_extract.py (962638c9dcb002e232e4e797d4eaae30cce06646),
`calc_lora_model(…, "diffusion_model.", "diffusion_model.", …)` and `(…, "", "text_encoders.", …)`; loaded by
comfy/lora.py `model_lora_keys_unet` / `model_lora_keys_clip` (Comfy-Org/ComfyUI ec93dcacb96b922f7cb1417b3ba22bccb082df32)."""

OMI = Rule("omi", "ldm", {"unet": "unet.", "te1": "clip_l.", "te2": "clip_g."})
"""OneTrainer's OMI LoRA layout for SDXL: `unet.` + LDM path, `clip_l.` / `clip_g.` + CLIP path (with `text_model.`),
kohya parameter names and `alpha`. Source: Nerogar/OneTrainer modules/util/convert/lora/convert_sdxl_lora.py
(6b44ee3298f3f926ce1ee3e0de6d316af85fe57e: key sets `unet`/`lora_unet`, `clip_l`/`lora_te1`, `clip_g`/`lora_te2`,
LDM ↔ diffusers block table) and convert_lora_util.py (ee01e6a63d296fd3c876c68fc94607cc11de5cea: omi keys are the
omi prefix + the rest of the internal key); saved by modelSaver/mixin/LoRASaverMixin.py (4822e8e5)."""

ONETRAINER_LEGACY = Rule("onetrainer-legacy", "diffusers", {"unet": "lora_unet_", "te1": "lora_te1_", "te2": "lora_te2_"}, flatten=True)
"""OneTrainer's default SDXL save ("legacy_diffusers"): kohya prefixes on *diffusers-style* U-Net paths with `_`
(`lora_unet_down_blocks_1_attentions_0_…`), `alpha` kept. Source: convert_lora_util.py `__get_legacy_diffusers`
(ee01e6a6) and LoRASaverMixin `_save` (4822e8e5). (ai-toolkit's SDXL files are kohya's LDM names: ostris/ai-toolkit
toolkit/network_mixins.py `save_weights` maps each key through keymaps/stable_diffusion_locon_sdxl.json, 002279ce.)"""


def _key_of(rule: Rule, component: str, path: str, te: bool) -> str:
    if te and rule.te_text_model and not path.startswith("text_model."):
        path = "text_model." + path
    return rule.roots[component] + (path.replace(".", "_") if rule.flatten else path)


def restated(workdir: Path, rule: Rule, *, with_alpha: bool) -> Produced:
    """An SDXL file in `rule`'s layout: one layer of each kind per LBW block (LoCon), fp16 like ComfyUI saves."""
    gen = torch.Generator().manual_seed(11)
    tensors: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(pick("sdxl", True, "all", per_block=1)):
        te = layer.component != "unet"
        path = layer.path if te or rule.unet_kind == "ldm" else ldm_to_diffusers(layer.path, "sdxl")
        key = _key_of(rule, layer.component, path, te)
        rank = 2 + i % 3
        out, fan_in = layer.shape[0], layer.shape[1]
        kernel = layer.shape[2:]
        tensors[f"{key}.lora_down.weight"] = (torch.randn((rank, fan_in, *kernel), generator=gen) * 0.3).half()
        tensors[f"{key}.lora_up.weight"] = (torch.randn((out, rank, *[1] * len(kernel)), generator=gen) * 0.3).half()
        if with_alpha and i % 2:
            tensors[f"{key}.alpha"] = torch.tensor(float(1 + i % 4)).half()
    path = workdir / f"{rule.name}-sdxl.safetensors"
    save_file(tensors, str(path))
    return Produced(rule.name, "sdxl", path, rule.unet_kind, lambda p: load_restated(p, rule))


def load_restated(path: Path, rule: Rule) -> Deltas:
    """The restated loader: every module's up @ down × (alpha / rank, or 1 without alpha) onto the layer its key
    names, found with `get_submodule` in the tiny model of the rule's naming."""
    models = TinyModels.fresh("sdxl", rule.unet_kind)
    by_key = {}
    for component, model in models.components.items():
        for name, module in model.named_modules():
            if isinstance(getattr(module, "weight", None), nn.Parameter):
                by_key[_key_of(rule, component, name, component != "unet")] = module
    tensors = load_file(str(path))
    with torch.no_grad():
        for key, down in tensors.items():
            if not key.endswith(".lora_down.weight"):
                continue
            stem = key[: -len(".lora_down.weight")]
            up = tensors[f"{stem}.lora_up.weight"].double()
            rank = down.shape[0]
            scale = float(tensors[f"{stem}.alpha"]) / rank if f"{stem}.alpha" in tensors else 1.0
            layer = by_key[stem]
            delta = scale * (up.reshape(up.shape[0], rank) @ down.double().reshape(rank, -1))
            layer.weight += delta.reshape(layer.weight.shape).to(layer.weight.dtype)
    return weight_deltas(TinyModels.fresh("sdxl", rule.unet_kind), models)


def as_peft_folder(output: Path, source: Path, folder: Path) -> Path:
    """A PEFT folder for a written file: the file as `adapter_model.safetensors` beside the input's config."""
    folder.mkdir(exist_ok=True)
    shutil.copy(output, folder / "adapter_model.safetensors")
    shutil.copy(source / "adapter_config.json", folder / "adapter_config.json")
    return folder


def config_of(folder: Path) -> dict:
    return json.loads((folder / "adapter_config.json").read_text())
