"""Helpers for the interop tests: a loader-side ΔW oracle, tiny diffusers models, files written by diffusers.

* `deltas(path)` — dense ΔW of a file the way its loaders see it. kohya files (and PEFT files with un-prefixed
  metadata) go to `adapters.dense_deltas`; PEFT files written the way diffusers writes them —
  `lora_adapter_metadata` keys prefixed per component (`unet.lora_alpha`, `text_encoder.alpha_pattern`, …) — are
  read here with PEFT's own pattern rule (a pattern names the modules matching `(.*\\.)?(pattern)$`).
* `SDXL_DIFFUSERS_TINY` — a diffusers `UNet2DConditionModel` with the layout of the tiny LDM `SdxlUNet`.
* `TinyModels` — a tiny U-Net and text encoder(s), `outputs()` on fixed inputs, `merge()` of dense ΔW.
* `diffusers_written_lora(path, arch)` — a LoRA file saved by diffusers' own `save_lora_weights` from PEFT layers.
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch
from adapters import dense_deltas, metadata_of
from safetensors.torch import load_file
from torch import nn

from blora_tools.models import SDXL_TINY, build_text_encoders, build_unet

_COMPONENTS = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}

SDXL_DIFFUSERS_TINY = dict(
    sample_size=SDXL_TINY.sample_size,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=tuple(m * SDXL_TINY.model_channels for m in SDXL_TINY.channel_mult),
    layers_per_block=2,
    transformer_layers_per_block=(1, 1, 2),
    cross_attention_dim=SDXL_TINY.context_dim,
    attention_head_dim=(2, 4, 4),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=SDXL_TINY.adm_in_channels,
    norm_num_groups=SDXL_TINY.norm_groups,
)
"""A diffusers SDXL U-Net with the tiny `SdxlUNet`'s layout: levels without / with 1 / with 2 transformer layers,
two resnets down and three up per level, text-time added conditioning (te2 projection 48 + 6 × 8)."""


# --- the ΔW oracle ------------------------------------------------------------------------------------------


def _pattern_value(patterns: dict, name: str, default):
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", name):
            return value
    return default


def deltas(path: str | Path) -> dict[str, torch.Tensor]:
    """Stem → dense ΔW (out × fan_in, float64), alphas as PEFT/diffusers or kohya loaders apply them."""
    raw = metadata_of(path).get("lora_adapter_metadata")
    config = json.loads(raw) if raw else {}
    if not any("." in key for key in config):
        return dense_deltas(path)
    tensors = load_file(str(path))
    factors: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        for suffix in (".lora_A.weight", ".lora_B.weight"):
            if component in _COMPONENTS and rest.endswith(suffix):
                factors.setdefault((component, rest[: -len(suffix)]), {})[suffix[1:7]] = tensor
    sdxl = any(c == "text_encoder_2" for c, _ in factors)
    out = {}
    for (component, module), f in factors.items():
        fields = {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith(component + ".")}
        rank = f["lora_A"].shape[0]
        assert rank == _pattern_value(fields.get("rank_pattern") or {}, module, fields["r"]), module
        alpha = _pattern_value(fields.get("alpha_pattern") or {}, module, fields["lora_alpha"])
        down = f["lora_A"].double().reshape(rank, -1)
        up = f["lora_B"].double().reshape(-1, rank)
        prefix = "lora_te1_" if sdxl and component == "text_encoder" else _COMPONENTS[component]
        if component != "unet" and not module.startswith("text_model."):
            module = "text_model." + module
        out[prefix + module.replace(".", "_")] = (float(alpha) / rank) * (up @ down)
    return out


# --- tiny models --------------------------------------------------------------------------------------------


@cache
def _originals(arch: str, unet_kind: str) -> tuple[nn.Module, tuple[nn.Module, ...]]:
    """Built once per session; tests get deep copies."""
    if unet_kind == "diffusers" and arch == "sdxl":
        from diffusers import UNet2DConditionModel

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**SDXL_DIFFUSERS_TINY)
    else:
        unet = build_unet(arch, "tiny")  # SD1/SD2: diffusers; SDXL: the LDM-named SdxlUNet
    return unet.eval(), tuple(te.eval() for te in build_text_encoders(arch, "tiny"))


@dataclass
class TinyModels:
    """Fresh copies of a tiny U-Net and its text encoder(s)."""

    arch: str
    unet: nn.Module
    encoders: list[nn.Module]

    @classmethod
    def fresh(cls, arch: str, unet_kind: str = "diffusers") -> "TinyModels":
        """`unet_kind`: `diffusers` (UNet2DConditionModel; SDXL with diffusers names) or `ldm` (SDXL SdxlUNet)."""
        unet, encoders = _originals(arch, unet_kind)
        return cls(arch, copy.deepcopy(unet), [copy.deepcopy(te) for te in encoders])

    @property
    def components(self) -> dict[str, nn.Module]:
        names = ("te",) if self.arch != "sdxl" else ("te1", "te2")
        return {"unet": self.unet, **dict(zip(names, self.encoders))}

    def layer_of_stem(self) -> dict[str, nn.Module]:
        """kohya stem → layer, by kohya's own naming rule (module path, `.` → `_`, transformers 4 TE paths).
        An SDXL U-Net answers to both LDM and diffusers-style names."""
        from blora_tools.adapter.formats import diffusers_to_ldm, ldm_to_diffusers

        found = {}
        for component, model in self.components.items():
            for name, module in model.named_modules():
                if not isinstance(getattr(module, "weight", None), nn.Parameter) or not name:
                    continue
                path = name
                if component != "unet" and not path.startswith("text_model."):
                    path = "text_model." + path
                found[f"lora_{component}_" + path.replace(".", "_")] = module
                if component == "unet" and self.arch == "sdxl":
                    other = ldm_to_diffusers if hasattr(self.unet, "input_blocks") else diffusers_to_ldm
                    found["lora_unet_" + other(name, "sdxl").replace(".", "_")] = module
        return found

    @torch.no_grad()
    def merge(self, dense: dict[str, torch.Tensor]) -> "TinyModels":
        """Add each stem's dense ΔW to its layer's weight (the reference every loader is checked against)."""
        layers = self.layer_of_stem()
        for stem, delta in dense.items():
            weight = layers[stem].weight
            weight += delta.reshape(weight.shape).to(weight.dtype)
        return self

    @torch.no_grad()
    def outputs(self) -> dict[str, torch.Tensor]:
        """U-Net noise prediction and every text encoder's last hidden state on fixed inputs."""
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 16, 16, generator=gen)
        ids = torch.randint(0, 998, (1, 8), generator=gen)
        out = {}
        if self.arch == "sdxl":
            context = torch.randn(1, 8, SDXL_TINY.context_dim, generator=gen)
            pooled, sizes = torch.randn(1, 48, generator=gen), torch.randn(1, 6, generator=gen)
            if hasattr(self.unet, "input_blocks"):
                y = torch.cat([pooled, sizes.repeat_interleave(8, dim=1)], dim=1)
                out["unet"] = self.unet(x, torch.tensor([10.0]), context, y)
            else:
                cond = {"text_embeds": pooled, "time_ids": sizes}
                out["unet"] = self.unet(x, 10, context, added_cond_kwargs=cond).sample
        else:
            out["unet"] = self.unet(x, 10, torch.randn(1, 8, 32, generator=gen)).sample
        for name, te in list(self.components.items())[1:]:
            out[name] = te(ids).last_hidden_state
        return out

    def pipeline(self):
        """A diffusers pipeline object around these models (no VAE, tokenizer or scheduler is needed to load)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if self.arch == "sdxl":
            return StableDiffusionXLPipeline(
                vae=None, text_encoder=self.encoders[0], text_encoder_2=self.encoders[1], tokenizer=None,
                tokenizer_2=None, unet=self.unet, scheduler=None,
            )
        return StableDiffusionPipeline(
            vae=None, text_encoder=self.encoders[0], tokenizer=None, unet=self.unet, scheduler=None,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )


def effect_error(got: dict, want: dict, base: dict) -> dict[str, float]:
    """‖got − want‖ / ‖want − base‖ per output: the loader's error relative to the adapter's own effect."""
    errors = {}
    for name in want:
        effect = float((want[name] - base[name]).norm())
        assert effect > 0, f"the adapter does not change {name}"
        errors[name] = float((got[name] - want[name]).norm()) / effect
    return errors


# --- a LoRA written by diffusers itself ---------------------------------------------------------------------

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
TE_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")


def diffusers_written_lora(path: str | Path, arch: str, seed: int = 0) -> Path:
    """Save a random LoRA with diffusers' `save_lora_weights` from PEFT layers on the tiny diffusers models.

    Mixed ranks and alphas (`rank_pattern` / `alpha_pattern`), text encoder(s) included; returns the file.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    path = Path(path)
    models = TinyModels.fresh(arch)
    unet_config = LoraConfig(
        r=4, lora_alpha=2, target_modules=list(UNET_TARGETS), init_lora_weights=False,
        rank_pattern={"proj_in": 2, "attn2.to_k": 3}, alpha_pattern={"proj_out": 5, "down_blocks.1.attentions.0.proj_in": 1},
    )
    te_config = LoraConfig(r=4, lora_alpha=4, target_modules=list(TE_TARGETS), init_lora_weights=False,
                           alpha_pattern={"fc2": 1})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        inject_adapter_in_model(unet_config, models.unet)
        for te in models.encoders:
            inject_adapter_in_model(te_config, te)
    layers = {
        "unet_lora_layers": get_peft_model_state_dict(models.unet),
        "text_encoder_lora_layers": get_peft_model_state_dict(models.encoders[0]),
        "unet_lora_adapter_metadata": unet_config.to_dict(),
        "text_encoder_lora_adapter_metadata": te_config.to_dict(),
    }
    if arch == "sdxl":
        layers["text_encoder_2_lora_layers"] = get_peft_model_state_dict(models.encoders[1])
        layers["text_encoder_2_lora_adapter_metadata"] = te_config.to_dict()
        StableDiffusionXLPipeline.save_lora_weights(path.parent, weight_name=path.name, **layers)
    else:
        StableDiffusionPipeline.save_lora_weights(path.parent, weight_name=path.name, **layers)
    return path
