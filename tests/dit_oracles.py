"""Oracles for Flux.1 and SD3 adapters: what diffusers and ComfyUI make of a LoRA file (test-side helpers).

Each function names the code it calls or the rules it restates, so a test built on it checks our output against
that consumer, not against ourselves:

* `diffusers_delta`: diffusers' own loader (`FluxPipeline` / `StableDiffusion3Pipeline.load_lora_weights`, then
  `fuse_lora`) on the tiny pipelines of `blora_tools.models`; ΔW = weight after − weight before.
* `diffusers_flux_convert`: diffusers' Flux LoRA conversion (`FluxLoraLoaderMixin.lora_state_dict`) called directly,
  for kohya-dialect files diffusers can only convert at Flux.1's real width (its kohya converter hard-codes 3072
  and 19/38 blocks), with the ΔW each converted PEFT layer stands for, in factored form.
* `peft_lora_file`: a diffusers/PEFT-dialect file made the way diffusers' training scripts make one: PEFT's
  `LoraConfig` on the tiny transformer, `get_peft_model_state_dict`, the pipeline's `save_lora_weights`.
* `comfy_key_map` / `comfy_patches` / `comfy_delta`: ComfyUI's LoRA key mapping and patch arithmetic restated
  (comfy/lora.py `model_lora_keys_unet`, `load_lora`, `calculate_weight`; comfy/utils.py `flux_to_diffusers`,
  `mmdit_to_diffusers`), giving ΔW per BFL / SAI model weight.

All ΔW are float64.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

FAMILIES = ("flux", "sd3")


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, not {family!r}")


def _pipeline_class(family: str):
    import diffusers

    _check_family(family)
    return diffusers.FluxPipeline if family == "flux" else diffusers.StableDiffusion3Pipeline


def tiny_pipeline(family: str, variant: str | None = None, seed: int = 0):
    """The tiny pipeline of `family` from blora_tools.models (Flux variant 'dev'/'schnell', SD3 variant one of
    SD3_TINY_VARIANTS) with the models a LoRA can touch in float64, so that a fused ΔW is exact to ~1e-15."""
    from blora_tools.models import build_flux_pipeline, build_sd3_pipeline

    _check_family(family)
    if family == "flux":
        pipe = build_flux_pipeline(seed, variant=variant or "dev")
    else:
        pipe = build_sd3_pipeline(seed, variant=variant or "sd35_medium")
    for component in pipe._lora_loadable_modules:
        getattr(pipe, component).to(torch.float64)
    return pipe


def _layer_weights(pipe) -> dict[str, torch.Tensor]:
    """Every Linear/Conv2d weight of the models a LoRA can touch, as `<component>.<layer>`."""
    weights = {}
    for component in pipe._lora_loadable_modules:
        for name, layer in getattr(pipe, component).named_modules():
            if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)):
                weights[f"{component}.{name}"] = layer.weight.detach().clone()
    return weights


def diffusers_delta(
    source: str | Path | Mapping[str, torch.Tensor], family: str, *, pipeline=None, variant: str | None = None
) -> dict[str, torch.Tensor]:
    """ΔW per layer (`transformer.<diffusers layer>`, `text_encoder.<layer>`, ...) that diffusers applies for a LoRA.

    Calls diffusers itself: `FluxPipeline.load_lora_weights` / `StableDiffusion3Pipeline.load_lora_weights`
    (diffusers/loaders/lora_pipeline.py: format detection and conversion, PEFT config from the file's alphas or
    `lora_adapter_metadata`), then `fuse_lora(lora_scale=1.0)` and `unload_lora_weights()` on the pipeline's
    `_lora_loadable_modules` (the transformer and the text encoders diffusers loads LoRA into), on `pipeline` or a
    fresh `tiny_pipeline(family, variant)`. Returns weight after − weight before for every layer whose weight
    changed; a layer diffusers ignored is absent. Whatever diffusers refuses (a kohya Flux single block at the tiny
    width: its converter expects 3072-wide parts) raises diffusers' own error. The pipeline is left with the LoRA
    fused in. diffusers 0.42 also drops a kohya Flux file's embedder and final-layer modules (see
    `diffusers_flux_convert`).
    """
    pipe = pipeline if pipeline is not None else tiny_pipeline(family, variant)
    before = _layer_weights(pipe)
    if isinstance(source, Mapping):
        source = {k: v.clone() for k, v in source.items()}
    else:
        source = str(source)
    pipe.load_lora_weights(source)
    pipe.fuse_lora(components=list(pipe._lora_loadable_modules), lora_scale=1.0)
    pipe.unload_lora_weights()
    after = _layer_weights(pipe)
    deltas = {}
    for name, weight in before.items():
        delta = after[name] - weight
        if torch.count_nonzero(delta):
            deltas[name] = delta
    return deltas


@dataclass(frozen=True)
class Factored:
    """ΔW = up @ down (the scale folded into `up`), kept factored: a 21504×3072 ΔW is 0.5 GB dense."""

    up: torch.Tensor
    down: torch.Tensor

    def dense(self) -> torch.Tensor:
        return self.up @ self.down

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """ΔW @ x without forming ΔW."""
        return self.up @ (self.down @ x)


def diffusers_flux_convert(
    state_dict: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, Factored]]:
    """diffusers' own conversion of a Flux LoRA state dict, and the ΔW of each converted layer.

    Calls `diffusers.FluxPipeline.lora_state_dict(state_dict, return_alphas=True)` (FluxLoraLoaderMixin in
    diffusers/loaders/lora_pipeline.py; for kohya keys `_convert_kohya_flux_lora_to_diffusers` in
    loaders/lora_conversion_utils.py, which bakes alpha/rank into the factors and hard-codes Flux.1's 3072-wide
    q/k/v/mlp parts and 19/38 blocks). Returns the converted PEFT state dict and, per converted layer
    (`transformer.<layer>` / `text_encoder.<layer>`), ΔW = lora_B @ lora_A as `Factored` (float64). Usable at the
    real width with rank 1-2 and a few blocks; refuses converted dicts that carry alphas (kohya input never does:
    diffusers returns alphas=None for it). Layers are named as the converter names them: diffusers 0.42 names a
    kohya file's `img_in`/`txt_in`/`time_in`/`vector_in`/`guidance_in`/`final_layer` parts without the
    `transformer.` prefix (so `load_lora_weights` never loads them) and converts `final_layer` without its alpha.
    """
    import diffusers

    converted, alphas = diffusers.FluxPipeline.lora_state_dict(
        {k: v.clone() for k, v in state_dict.items()}, return_alphas=True
    )
    if alphas:
        raise ValueError(f"diffusers kept {len(alphas)} alphas; diffusers_flux_convert covers alpha-free results")
    deltas = {}
    for key, down in converted.items():
        if key.endswith(".lora_A.weight"):
            layer = key[: -len(".lora_A.weight")]
            up = converted[f"{layer}.lora_B.weight"]
            deltas[layer] = Factored(up.double(), down.double())
    return converted, deltas


def peft_lora_file(
    path: str | Path,
    family: str,
    *,
    rank: int = 2,
    alpha: float | None = None,
    targets: list[str] | str | None = None,
    metadata: bool = True,
    variant: str | None = None,
    seed: int = 0,
) -> Path:
    """Write a diffusers/PEFT-dialect LoRA for the tiny `family` transformer, the way diffusers' training scripts do.

    PEFT `LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=targets, init_lora_weights=False)` (both
    factors random, so lora_B is nonzero) is added with `transformer.add_adapter`; `get_peft_model_state_dict`
    gives the layers and `FluxPipeline` / `StableDiffusion3Pipeline.save_lora_weights` writes
    `transformer.<layer>.lora_A.weight` / `.lora_B.weight` (float32). With `metadata` the PEFT config goes into the
    file's `lora_adapter_metadata` (as `_collate_lora_metadata` in diffusers' training scripts); without it a
    loader has no alpha (diffusers then uses alpha = rank). `targets` is PEFT's `target_modules` (a list matches
    name suffixes, a string is a regex the whole name must match) and defaults to every Linear of the transformer
    (the embedders, every block layer, `norm_out.linear`, `proj_out`). Deterministic from `seed`.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from blora_tools.models import build_flux_transformer, build_sd3_transformer

    _check_family(family)
    if family == "flux":
        transformer = build_flux_transformer(seed=seed, variant=variant or "dev")
    else:
        transformer = build_sd3_transformer(seed=seed, variant=variant or "sd35_medium")
    if targets is None:
        targets = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets,
                        init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        transformer.add_adapter(config)
    layers = get_peft_model_state_dict(transformer)
    path = Path(path)
    extra = {"transformer_lora_adapter_metadata": config.to_dict()} if metadata else {}
    _pipeline_class(family).save_lora_weights(path.parent, transformer_lora_layers=layers, weight_name=path.name,
                                              **extra)
    return path


# --- ComfyUI -----------------------------------------------------------------------------------------------
#
# Restated (facts, no code copied) from comfyanonymous/ComfyUI comfy/lora.py @ 41444b5236c6
# (`model_lora_keys_unet`, `load_lora`, `calculate_weight`), comfy/utils.py `flux_to_diffusers` as of ComfyUI
# v0.26.1 and comfy/utils.py `mmdit_to_diffusers` @ 2ba5cc8b867b. Later ComfyUI versions add keys this
# restatement lacks (bare DiffSynth names, `linear1_qkv`); SD3.5's `attn2` has no diffusers mapping there.


@dataclass(frozen=True)
class ComfyTarget:
    """Where ComfyUI puts one LoRA module: a model weight, optionally a row range of it (`narrow(0, start, length)`
    in `calculate_weight`) and optionally `swap_scale_shift` applied to the delta."""

    model_key: str
    rows: tuple[int, int] | None = None
    swap: bool = False


def _flux_model_keys(depth: int, single_depth: int, guidance: bool) -> list[str]:
    """BFL names of the Linear weights of a Flux model (library/flux_models.py; every one is a kohya module in
    tests/data/kohya_manifests/flux_dev_in_dims.json, plus the final layer)."""
    names = ["img_in", "time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer", "txt_in",
             "final_layer.linear", "final_layer.adaLN_modulation.1"]
    if guidance:
        names += ["guidance_in.in_layer", "guidance_in.out_layer"]
    for i in range(depth):
        names += [f"double_blocks.{i}.{s}_{part}" for s in ("img", "txt")
                  for part in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2")]
    for i in range(single_depth):
        names += [f"single_blocks.{i}.{part}" for part in ("linear1", "linear2", "modulation.lin")]
    return [f"diffusion_model.{n}.weight" for n in names]


def _sd3_model_keys(depth: int, attn2: tuple[int, ...]) -> list[str]:
    """SAI names of the Linear/Conv2d weights of an MMDiT (sd-scripts library/sd3_models.py): the last block's
    context stream is pre-only (qkv and modulation, no proj or MLP)."""
    names = ["x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "y_embedder.mlp.0", "y_embedder.mlp.2",
             "context_embedder", "final_layer.linear", "final_layer.adaLN_modulation.1"]
    for i in range(depth):
        parts = [f"x_block.{p}" for p in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")]
        parts += ["context_block.attn.qkv", "context_block.adaLN_modulation.1"]
        if i < depth - 1:
            parts += ["context_block.attn.proj", "context_block.mlp.fc1", "context_block.mlp.fc2"]
        if i in attn2:
            parts += ["x_block.attn2.qkv", "x_block.attn2.proj"]
        names += [f"joint_blocks.{i}.{p}" for p in parts]
    return [f"diffusion_model.{n}.weight" for n in names]


def _rows(model_key: str, hidden: int, parts: dict[str, int]) -> dict[str, ComfyTarget]:
    """diffusers part name -> its row slice of a fused weight, parts in order, each `parts[name]` hiddens tall."""
    targets, start = {}, 0
    for name, height in parts.items():
        targets[name] = ComfyTarget(model_key, (start, height * hidden))
        start += height * hidden
    return targets


def _flux_to_diffusers(hidden: int, depth: int, single_depth: int) -> dict[str, ComfyTarget]:
    """diffusers Linear name (without `.weight`) -> target, as comfy/utils.py `flux_to_diffusers`."""
    out = {}
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}", f"diffusion_model.double_blocks.{i}"
        qkv = {f"{src}.attn.to_{p}": 1 for p in "qkv"}
        out.update(_rows(f"{dst}.img_attn.qkv.weight", hidden, qkv))
        out.update(_rows(f"{dst}.txt_attn.qkv.weight", hidden, {f"{src}.attn.add_{p}_proj": 1 for p in "qkv"}))
        for diffusers, bfl in (("attn.to_out.0", "img_attn.proj"), ("norm1.linear", "img_mod.lin"),
                               ("norm1_context.linear", "txt_mod.lin"), ("attn.to_add_out", "txt_attn.proj"),
                               ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                               ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2"),
                               ("ff.linear_in", "img_mlp.0"), ("ff.linear_out", "img_mlp.2"),
                               ("ff_context.linear_in", "txt_mlp.0"), ("ff_context.linear_out", "txt_mlp.2")):
            out[f"{src}.{diffusers}"] = ComfyTarget(f"{dst}.{bfl}.weight")
    for i in range(single_depth):
        src, dst = f"single_transformer_blocks.{i}", f"diffusion_model.single_blocks.{i}"
        parts = {f"{src}.attn.to_q": 1, f"{src}.attn.to_k": 1, f"{src}.attn.to_v": 1, f"{src}.proj_mlp": 4}
        out.update(_rows(f"{dst}.linear1.weight", hidden, parts))
        for diffusers, bfl in (("norm.linear", "modulation.lin"), ("proj_out", "linear2"),
                               ("attn.to_qkv_mlp_proj", "linear1"), ("attn.to_out", "linear2")):
            out[f"{src}.{diffusers}"] = ComfyTarget(f"{dst}.{bfl}.weight")
    for diffusers, bfl in (("proj_out", "final_layer.linear"), ("x_embedder", "img_in"),
                           ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
                           ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
                           ("context_embedder", "txt_in"),
                           ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
                           ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
                           ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
                           ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer"),
                           ("controlnet_x_embedder", "pos_embed_input")):
        out[diffusers] = ComfyTarget(f"diffusion_model.{bfl}.weight")
    out["norm_out.linear"] = ComfyTarget("diffusion_model.final_layer.adaLN_modulation.1.weight", swap=True)
    return out


def _mmdit_to_diffusers(hidden: int, depth: int) -> dict[str, ComfyTarget]:
    """diffusers Linear/Conv name (without `.weight`) -> target, as comfy/utils.py `mmdit_to_diffusers`. ComfyUI
    computes the q/k/v height as depth·64, which is the hidden width of every MMDiT (hidden = 64·depth); `hidden`
    stands for it so that tiny models with another head count map the same way."""
    out = {}
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}", f"diffusion_model.joint_blocks.{i}"
        out.update(_rows(f"{dst}.x_block.attn.qkv.weight", hidden, {f"{src}.attn.to_{p}": 1 for p in "qkv"}))
        out.update(_rows(f"{dst}.context_block.attn.qkv.weight", hidden,
                         {f"{src}.attn.add_{p}_proj": 1 for p in "qkv"}))
        for sai, diffusers in (("context_block.adaLN_modulation.1", "norm1_context.linear"),
                               ("context_block.attn.proj", "attn.to_add_out"),
                               ("context_block.mlp.fc1", "ff_context.net.0.proj"),
                               ("context_block.mlp.fc2", "ff_context.net.2"),
                               ("x_block.adaLN_modulation.1", "norm1.linear"), ("x_block.attn.proj", "attn.to_out.0"),
                               ("x_block.mlp.fc1", "ff.net.0.proj"), ("x_block.mlp.fc2", "ff.net.2")):
            out[f"{src}.{diffusers}"] = ComfyTarget(f"{dst}.{sai}.weight")
    for sai, diffusers in (("context_embedder", "context_embedder"),
                           ("t_embedder.mlp.0", "time_text_embed.timestep_embedder.linear_1"),
                           ("t_embedder.mlp.2", "time_text_embed.timestep_embedder.linear_2"),
                           ("x_embedder.proj", "pos_embed.proj"),
                           ("y_embedder.mlp.0", "time_text_embed.text_embedder.linear_1"),
                           ("y_embedder.mlp.2", "time_text_embed.text_embedder.linear_2"),
                           ("final_layer.linear", "proj_out")):
        out[diffusers] = ComfyTarget(f"diffusion_model.{sai}.weight")
    out["norm_out.linear"] = ComfyTarget("diffusion_model.final_layer.adaLN_modulation.1.weight", swap=True)
    last = depth - 1  # the pre-only context modulation: its shift/scale halves are swapped too
    out[f"transformer_blocks.{last}.norm1_context.linear"] = ComfyTarget(
        f"diffusion_model.joint_blocks.{last}.context_block.adaLN_modulation.1.weight", swap=True)
    return out


def comfy_key_map(
    family: str, hidden: int, depth: int, single_depth: int = 0, *, attn2: tuple[int, ...] = (),
    guidance: bool = True,
) -> dict[str, ComfyTarget]:
    """LoRA module name (the key before `.lora_up.weight` etc.) -> ComfyTarget, as comfy/lora.py
    `model_lora_keys_unet` builds it for a Flux (`depth` double + `single_depth` single blocks; `guidance`: dev) or
    SD3 model (`depth` joint blocks, x-block `attn2` in `attn2`) of width `hidden`.

    For every model weight `diffusion_model.X.weight`: `lora_unet_<X with _>`, `lora_prior_unet_<X with _>` and
    `diffusion_model.X`. Then for each diffusers name D of the model's map: SD3 `transformer.D`,
    `base_model.model.D`, `lora_transformer_<D with _>`, `lycoris_<D with _>`; Flux `transformer.D`,
    `lycoris_<D with _>`, `lora_transformer_<D with _>`.
    """
    _check_family(family)
    if family == "flux":
        model_keys, diffusers = _flux_model_keys(depth, single_depth, guidance), _flux_to_diffusers(
            hidden, depth, single_depth)
        prefixes = ("transformer.", "lycoris_", "lora_transformer_")
    else:
        model_keys, diffusers = _sd3_model_keys(depth, attn2), _mmdit_to_diffusers(hidden, depth)
        prefixes = ("transformer.", "base_model.model.", "lora_transformer_", "lycoris_")
    key_map = {}
    for key in model_keys:
        path = key[len("diffusion_model."):-len(".weight")]
        for prefix in ("lora_unet_", "lora_prior_unet_"):
            key_map[prefix + path.replace(".", "_")] = ComfyTarget(key)
        key_map[key[:-len(".weight")]] = ComfyTarget(key)
    for name, target in diffusers.items():
        for prefix in prefixes:
            dotted = prefix.endswith(".")
            key_map[prefix + (name if dotted else name.replace(".", "_"))] = target
    return key_map


# ComfyUI load_lora: the up/down key pairs it accepts, in the order it tries them
_LORA_PAIRS = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
               (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
               (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"))
# keys of kinds ComfyUI loads but this restatement does not (it raises rather than guess)
_OTHER_KINDS = ("hada_", "lokr_", ".lora_mid.", ".dora_scale", ".diff", ".a1.weight", ".w_norm", ".b_norm",
                ".set_weight", ".reshape_weight")
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "text_encoders.")


@dataclass(frozen=True)
class ComfyPatch:
    """One LoRA patch as ComfyUI applies it: ΔW[rows] += swap?(scale · up @ down), scale = alpha / rank
    (the rank is down's first dimension) when the file has `<module>.alpha`, else 1."""

    module: str
    target: ComfyTarget
    up: torch.Tensor
    down: torch.Tensor
    scale: float

    def delta(self) -> torch.Tensor:
        """The patch's ΔW in the target's row range, shaped like the weight (conv: `[out, in, kh, kw]`)."""
        delta = self.scale * (self.up.double().flatten(1) @ self.down.double().flatten(1))
        delta = delta.reshape(self.up.shape[0], *self.down.shape[1:])
        if self.target.swap:
            shift, scale = delta.chunk(2, dim=0)
            delta = torch.cat([scale, shift], dim=0)
        return delta


def comfy_patches(
    state_dict: Mapping[str, torch.Tensor], family: str, hidden: int, depth: int, single_depth: int = 0, *,
    attn2: tuple[int, ...] = (), guidance: bool = True,
) -> tuple[list[ComfyPatch], list[str]]:
    """The diffusion-model patches ComfyUI makes from a LoRA state dict (comfy/lora.py `load_lora` over
    `comfy_key_map(...)`; `ModelPatcher.add_patches` keeps those whose weight the model has), and the keys that do
    not reach the model: unmatched ones (ComfyUI logs "lora key not loaded"), ones aimed at a weight the model
    lacks, and ones whose patch a later key-map entry with the same target replaced (ComfyUI's patch dict keeps
    the last). Text-encoder keys, which ComfyUI loads into CLIP, are not listed. Raises for LoHa/LoKr/DoRA/diff
    keys, which this restatement does not cover."""
    other = sorted(k for k in state_dict if any(kind in k for kind in _OTHER_KINDS))
    if other:
        raise ValueError(f"comfy_patches restates plain LoRA only; {other[0]} is another kind")
    key_map = comfy_key_map(family, hidden, depth, single_depth, attn2=attn2, guidance=guidance)
    patches: dict[ComfyTarget, ComfyPatch] = {}
    keys_of: dict[str, set[str]] = {}
    for module, target in key_map.items():
        for up_suffix, down_suffix in _LORA_PAIRS:
            if module + up_suffix in state_dict:
                down = state_dict[module + down_suffix]
                alpha = state_dict.get(module + ".alpha")
                scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
                patches[target] = ComfyPatch(module, target, state_dict[module + up_suffix], down, scale)
                keys_of[module] = {module + up_suffix, module + down_suffix, module + ".alpha"}
                break
    weights = set(_flux_model_keys(depth, single_depth, guidance) if family == "flux"
                  else _sd3_model_keys(depth, attn2))
    applied = [patch for patch in patches.values() if patch.target.model_key in weights]
    reached = set().union(*(keys_of[patch.module] for patch in applied))
    not_loaded = sorted(k for k in state_dict if k not in reached and not k.startswith(_TEXT_ENCODER_PREFIXES))
    return applied, not_loaded


@dataclass(frozen=True)
class ComfyDelta:
    """ΔW per model weight (`diffusion_model.<BFL/SAI name>.weight`) and the keys ComfyUI would not load."""

    delta: dict[str, torch.Tensor]
    not_loaded: list[str]


def comfy_delta(
    state_dict: Mapping[str, torch.Tensor], family: str, hidden: int, depth: int, single_depth: int = 0, *,
    attn2: tuple[int, ...] = (), guidance: bool = True,
) -> ComfyDelta:
    """ΔW per model weight that ComfyUI applies for a LoRA at strength 1 (comfy/lora.py `calculate_weight`: each
    patch adds `function(alpha/rank · up @ down)` into `weight.narrow(0, start, length)` when its target has a row
    offset, `swap_scale_shift` for `final_layer.adaLN_modulation.1` ↔ `norm_out.linear` and SD3's last
    `context_block.adaLN_modulation.1`). A fused weight touched only through some of its parts is zero elsewhere;
    its height is the end of its last part. Dense float64: use small widths (or `comfy_patches` at real width)."""
    patches, not_loaded = comfy_patches(state_dict, family, hidden, depth, single_depth, attn2=attn2,
                                        guidance=guidance)
    key_map = comfy_key_map(family, hidden, depth, single_depth, attn2=attn2, guidance=guidance)
    heights: dict[str, int] = {}
    for target in key_map.values():
        if target.rows is not None:
            heights[target.model_key] = max(heights.get(target.model_key, 0), sum(target.rows))
    delta: dict[str, torch.Tensor] = {}
    for patch in patches:
        part = patch.delta()
        key = patch.target.model_key
        if patch.target.rows is None:
            delta[key] = delta.get(key, torch.zeros_like(part)) + part
            continue
        start, length = patch.target.rows
        if part.shape[0] != length:
            raise ValueError(f"{patch.module}: {part.shape[0]} rows for a {length}-row part of {key}")
        whole = delta.setdefault(key, torch.zeros(heights[key], *part.shape[1:], dtype=torch.float64))
        whole[start:start + length] += part
    return ComfyDelta(delta, not_loaded)

