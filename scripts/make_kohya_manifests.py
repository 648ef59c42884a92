#!/usr/bin/env python3
"""Write the golden kohya module manifests (tests/data/kohya_manifests/) from a kohya-ss/sd-scripts work tree.

    python scripts/make_kohya_manifests.py --sd-scripts PATH [--out tests/data/kohya_manifests]

For SD1.5, SD2.1 (diffusers-folder and single-file variants) and SDXL, in kohya's default LoRA mode and in LoCon
mode (conv_dim=4), it builds on the meta device the models that train_network.py / sdxl_train_network.py hand to
the network module, calls `networks.lora.create_network` as the trainer does, and writes one JSON file listing
every LoRA module kohya creates (name, kind, factor shapes, rank, alpha, kohya's block index), plus
lbw_blocks.json (U-Net module -> LBW block and paper group).

For Flux.1 dev/schnell and SD3 Medium / SD3.5 Medium / SD3.5 Large it builds the full-size models the Flux and SD3
trainers load (kohya's own model classes and loaders, weights on the meta device) and records what
`networks.lora_flux` / `networks.lora_sd3` create: the default network, `in_dims` / `emb_dims` (the embedder
modules), and the text encoders with `train_t5xxl`. It also records every Linear/Conv2d layer of diffusers'
FluxTransformer2DModel and SD3Transformer2DModel with the published models' configs (diffusers_*.json): the split
layer names diffusers/PEFT files use.

Each file records the sd-scripts commit, the generator command and the package versions.

sd-scripts is imported from PATH, never installed, and none of its code is copied. Run it with an interpreter that
has sd-scripts' requirements (tests/real/harness/requirements.txt); it refuses transformers >= 5, whose flattened
CLIPTextModel gives text-encoder names no real kohya file has (`lora_te_encoder_layers_...`).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import subprocess
import sys
from collections import Counter
from importlib import metadata
from pathlib import Path

FORMAT = "blora-kohya-manifest/1"
LBW_FORMAT = "blora-lbw-blocks/1"
CONV_KWARGS = {"conv_dim": "4", "conv_alpha": "1"}  # as the trainer passes --network_args: strings
MODES = {"lora": {}, "locon": CONV_KWARGS}
RANK, ALPHA = 4, 1.0
PACKAGES = ("torch", "transformers", "diffusers", "accelerate")

# The counts kohya's default LoRA gives the full-size models; a different count means a broken setup.
EXPECTED_LORA_COUNTS = {"sd1": {"te": 72, "unet": 192}, "sdxl": {"te1": 72, "te2": 192, "unet": 722}}

# Text-encoder configs as kohya builds them (sd-scripts library/model_util.py and library/sdxl_model_util.py).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
OPENCLIP_H = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
                  hidden_act="gelu", projection_dim=512)
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     hidden_act="gelu", projection_dim=1280)
CLIP_L_WORDS = "transformers CLIPTextModel, CLIP ViT-L/14 text config"
SD2_TE_WORDS = ("transformers CLIPTextModel, OpenCLIP ViT-H text tower as kohya converts it "
                "(hidden 1024, 23 layers, mlp 4096, 16 heads, 77 positions, vocab 49408)")

# The four model sets: (file stem, arch, variant, U-Net kwargs for kohya's SD U-Net, words for the file).
SD_UNETS = {
    "sd1": ("sd1", None, dict(sample_size=64, attention_head_dim=8, cross_attention_dim=768,
                              use_linear_projection=False, upcast_attention=False), ""),
    "sd2": ("sd2", None, dict(sample_size=96, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                              use_linear_projection=True, upcast_attention=True),
            " -- as built from a diffusers-format SD2.1 folder"),
    # train_network.py loads a single-file SD2 checkpoint without the linear-projection flag: 1x1 conv proj_in/out
    "sd2_ckpt": ("sd2", "ckpt", dict(sample_size=96, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                                     use_linear_projection=False, upcast_attention=True),
                 " -- as train_network.py builds it for a single-file SD2 checkpoint"),
}
STEMS = ("sd1", "sd2", "sd2_ckpt", "sdxl")


def _commit(tree: Path, given: str | None) -> str:
    if given:
        return given
    done = subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True)
    if done.returncode != 0 or not re.fullmatch(r"[0-9a-f]{40}", done.stdout.strip()):
        sys.exit(f"{tree}: not a git work tree; pass --sd-scripts-commit with the commit it was exported from")
    return done.stdout.strip()


def _environment() -> dict:
    return {"python": platform.python_version(), **{p: metadata.version(p) for p in PACKAGES}}


def _kwargs_words(kwargs: dict) -> str:
    return ", ".join(f"{k}={repr(v).replace(' ', '')}" for k, v in kwargs.items())


def _clip(cls, config: dict):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77, **config))


def build_models(stem: str) -> tuple[list, object, dict]:
    """The text encoders and U-Net the trainer hands to create_network, on the meta device, with words for each."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    with torch.device("meta"):
        if stem == "sdxl":
            from library.sdxl_original_unet import SdxlUNet2DConditionModel

            te1 = _clip(CLIPTextModel, CLIP_L)
            te2 = _clip(CLIPTextModelWithProjection, OPENCLIP_BIGG)
            words = {"unet": "kohya library.sdxl_original_unet.SdxlUNet2DConditionModel() (defaults)",
                     "te1": f"{CLIP_L_WORDS} (hidden 768, 12 layers)",
                     "te2": "transformers CLIPTextModelWithProjection, OpenCLIP ViT-bigG "
                            "(hidden 1280, 32 layers, mlp 5120, 20 heads, projection 1280)"}
            return [te1, te2], SdxlUNet2DConditionModel(), words
        from library.original_unet import UNet2DConditionModel

        _, _, unet_kwargs, note = SD_UNETS[stem]
        te = _clip(CLIPTextModel, CLIP_L if stem == "sd1" else OPENCLIP_H)
        words = {"unet": f"kohya library.original_unet.UNet2DConditionModel({_kwargs_words(unet_kwargs)}){note}",
                 "te": (f"{CLIP_L_WORDS} (hidden 768, 12 layers, mlp 3072, 12 heads, 77 positions, vocab 49408)"
                        if stem == "sd1" else SD2_TE_WORDS)}
        return [te], UNet2DConditionModel(**unet_kwargs), words


def _kind(layer) -> str:
    import torch

    if isinstance(layer, torch.nn.Linear):
        return "linear"
    return "conv{}x{}".format(*layer.kernel_size)  # 1x1 and 3x3; 2x2 for SD3's patch embedder


def _component(name: str, unet_names: set[str]) -> str:
    return "unet" if name in unet_names else name.split("_")[1]  # lora_te_, lora_te1_, lora_te2_


def module_entries(text_encoders: list, unet, kwargs: dict, unet_targets: tuple[str, ...]) -> list[dict]:
    """One entry per LoRA module that networks.lora.create_network makes, sorted by name."""
    from networks import lora

    # LoRANetwork.__init__ extends its U-Net target list in place when conv_dim is given, so a plain-LoRA network
    # built later in the same process would also target resnets. The trainer builds one network per process:
    # give each construction the pristine list.
    lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE = list(unet_targets)
    is_sdxl = len(text_encoders) == 2
    network = lora.create_network(1.0, RANK, ALPHA, None, text_encoders if is_sdxl else text_encoders[0], unet,
                                  **kwargs)
    entries = []
    for module, component in _modules(network):
        index = lora.get_block_index(module.lora_name, is_sdxl) if component == "unet" else -1
        entries.append({**_entry(module), "kohya_block_index": index, "component": component})
    return sorted(entries, key=lambda e: e["name"])


def _modules(network) -> list[tuple[object, str]]:
    """(LoRA module, component) for every module of a kohya network (lora, lora_flux and lora_sd3 alike)."""
    unet_names = {m.lora_name for m in network.unet_loras}
    return [(m, _component(m.lora_name, unet_names)) for m in network.text_encoder_loras + network.unet_loras]


def _entry(module) -> dict:
    return {
        "name": module.lora_name,
        "kind": _kind(module.lora_down),
        "down_shape": list(module.lora_down.weight.shape),
        "up_shape": list(module.lora_up.weight.shape),
        "org_shape": list(module.org_module.weight.shape),
        "rank": module.lora_dim,
        "alpha": float(module.alpha),
    }


def _counts(entries: list[dict]) -> tuple[dict, dict]:
    components = sorted({e["component"] for e in entries})
    counts = {c: sum(e["component"] == c for e in entries) for c in components}
    by_kind = {c: dict(sorted(Counter(e["kind"] for e in entries if e["component"] == c).items()))
               for c in components}
    return {**counts, "total": len(entries)}, by_kind


def manifest(stem: str, mode: str, commit: str, provenance: dict, unet_targets: tuple[str, ...]) -> dict:
    arch, variant = ("sdxl", None) if stem == "sdxl" else SD_UNETS[stem][:2]
    text_encoders, unet, words = build_models(stem)
    entries = module_entries(text_encoders, unet, MODES[mode], unet_targets)
    counts, by_kind = _counts(entries)
    expected = EXPECTED_LORA_COUNTS.get(stem) if mode == "lora" else None
    if expected and {k: v for k, v in counts.items() if k != "total"} != expected:
        sys.exit(f"{stem} {mode}: kohya made {counts}, expected {expected}; is transformers < 5 installed?")
    return {
        "format": FORMAT, "kohya_repo": "kohya-ss/sd-scripts", "kohya_commit": commit,
        "arch": arch, "variant": variant, "mode": mode,
        "create_network": {"multiplier": 1.0, "network_dim": RANK, "network_alpha": ALPHA, "kwargs": MODES[mode]},
        "models": words, **provenance, "counts": counts, "counts_by_kind": by_kind, "modules": entries,
    }


# ---- Flux.1 and SD3 / SD3.5: networks.lora_flux and networks.lora_sd3 ----

IN_DIMS = {"in_dims": "[4,4,4,4,4]"}  # lora_flux: img_in, time_in, vector_in, guidance_in, txt_in
EMB_DIMS = {"emb_dims": "[4,4,4,4,4,4]"}  # lora_sd3: context, t, x (conv) and y embedders, final adaLN, final linear
TRAIN_T5 = {"train_t5xxl": "True"}

# What sd3_utils.analyze_state_dict_state reads from an SD3 checkpoint: depth (the patch embedder has 64 * depth
# outputs), the positional-embedding side, q/k RMS norms, the x-block `attn2` layers. The positional embedding sets
# no LoRA target; the rest are the published models' (SD3 Medium, SD3.5 Medium with attn2 in 0-12, SD3.5 Large).
SD3_CHECKPOINTS = {"sd3_medium": (24, 192, False, ()), "sd35_medium": (24, 384, True, tuple(range(13))),
                   "sd35_large": (38, 192, True, ())}

# file stem -> (arch, variant, mode, create_network kwargs, the module counts kohya must make). Modes `lora`,
# `in_dims` and `emb_dims` build the DiT network alone (text_encoders=[]: the DiT modules do not depend on them);
# `te` passes the trainer's text encoders with train_t5xxl.
DIT_MANIFESTS = {
    "flux_dev_lora": ("flux", "dev", "lora", {}, {"unet": 304}),
    "flux_dev_in_dims": ("flux", "dev", "in_dims", IN_DIMS, {"unet": 312}),
    "flux_dev_te": ("flux", "dev", "te", TRAIN_T5, {"te1": 72, "te3": 168, "unet": 304}),
    "flux_schnell_in_dims": ("flux", "schnell", "in_dims", IN_DIMS, {"unet": 310}),
    "sd3_medium_lora": ("sd3", "sd3_medium", "lora", {}, {"unet": 237}),
    "sd3_medium_emb_dims": ("sd3", "sd3_medium", "emb_dims", EMB_DIMS, {"unet": 245}),
    "sd3_medium_te": ("sd3", "sd3_medium", "te", TRAIN_T5, {"te1": 72, "te2": 192, "te3": 168, "unet": 237}),
    "sd35_medium_lora": ("sd3", "sd35_medium", "lora", {}, {"unet": 263}),
    "sd35_medium_emb_dims": ("sd3", "sd35_medium", "emb_dims", EMB_DIMS, {"unet": 271}),
    "sd35_large_lora": ("sd3", "sd35_large", "lora", {}, {"unet": 377}),
    "sd35_large_emb_dims": ("sd3", "sd35_large", "emb_dims", EMB_DIMS, {"unet": 385}),
}
T5_WORDS = ("kohya library.flux_utils.load_t5xxl: transformers T5EncoderModel, T5-XXL "
            "(d_model 4096, 24 layers, d_ff 10240, 64 heads, gated-gelu)")


def _meta(*shape):
    import torch

    return torch.empty(*shape, device="meta")


def build_flux(variant: str, with_text_encoders: bool) -> tuple[list, object, dict]:
    """Flux as flux_utils.load_flow_model builds it (on the meta device), and its CLIP-L and T5-XXL loaders'
    models (empty state dicts: their weights stay on the meta device)."""
    import torch
    from library import flux_models, flux_utils

    params = flux_models.configs[variant].params
    with torch.device("meta"):
        flux = flux_models.Flux(params)
    words = {"unet": f"kohya library.flux_models.Flux(configs[{variant!r}].params): hidden {params.hidden_size}, "
                     f"{params.depth} double + {params.depth_single_blocks} single blocks, "
                     f"guidance_embed={params.guidance_embed}"}
    if not with_text_encoders:
        return [], flux, words
    clip_l = flux_utils.load_clip_l(None, torch.float32, "cpu", state_dict={})
    t5xxl = flux_utils.load_t5xxl(None, torch.float32, "cpu", state_dict={})
    words.update(te1=f"kohya library.flux_utils.load_clip_l: {CLIP_L_WORDS} (hidden 768, 12 layers)", te3=T5_WORDS)
    return [clip_l, t5xxl], flux, words


def sd3_checkpoint(variant: str) -> dict:
    """The keys of an SD3 checkpoint that sd3_utils.analyze_state_dict_state reads, as meta tensors."""
    depth, side, qk_norm, attn2 = SD3_CHECKPOINTS[variant]
    hidden, prefix = 64 * depth, "model.diffusion_model."
    state = {"x_embedder.proj.weight": _meta(hidden, 16, 2, 2), "pos_embed": _meta(1, side * side, hidden),
             "y_embedder.mlp.0.weight": _meta(hidden, 2048), "context_embedder.weight": _meta(hidden, 4096)}
    if qk_norm:
        state["joint_blocks.0.context_block.attn.ln_k.weight"] = _meta(64)
    state.update({f"joint_blocks.{i}.x_block.attn2.ln_k.weight": _meta(64) for i in attn2})
    return {prefix + key: value for key, value in state.items()}


def build_sd3(variant: str, with_text_encoders: bool) -> tuple[list, object, dict]:
    """MMDiT from sd3_utils.load_mmdit on a checkpoint of meta tensors, and its CLIP-L, CLIP-G and T5-XXL loaders'
    models (their weights stay on the meta device)."""
    from library import sd3_utils

    depth, side, qk_norm, attn2 = SD3_CHECKPOINTS[variant]
    mmdit = sd3_utils.load_mmdit(sd3_checkpoint(variant), None, "cpu")
    words = {"unet": f"kohya library.sd3_utils.load_mmdit on a checkpoint with depth {depth} (hidden {64 * depth}), "
                     f"pos_embed {side}x{side}, qk_norm {'rms' if qk_norm else None}, "
                     f"x-block attn2 in {list(attn2)}: model_type {mmdit.model_type!r}"}
    if not with_text_encoders:
        return [], mmdit, words
    # each loader takes its encoder from the checkpoint when the encoder's marker key is there
    markers = {"text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.weight": _meta(77, 768),
               "text_encoders.clip_g.transformer.text_model.embeddings.position_embedding.weight": _meta(77, 1280),
               "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.k.weight": _meta(4096, 4096)}
    encoders = [load(None, None, "cpu", state_dict=markers)
                for load in (sd3_utils.load_clip_l, sd3_utils.load_clip_g, sd3_utils.load_t5xxl)]
    words.update(te1="kohya library.sd3_utils.load_clip_l: transformers CLIPTextModelWithProjection, CLIP-L "
                     "(hidden 768, 12 layers)",
                 te2="kohya library.sd3_utils.load_clip_g: transformers CLIPTextModelWithProjection, OpenCLIP bigG "
                     "(hidden 1280, 32 layers)",
                 te3=T5_WORDS)
    return encoders, mmdit, words


def dit_manifest(stem: str, commit: str, provenance: dict) -> dict:
    """The modules networks.lora_flux / networks.lora_sd3 create_network makes, as the trainer calls it."""
    from networks import lora_flux, lora_sd3

    arch, variant, mode, kwargs, expected = DIT_MANIFESTS[stem]
    build, module = (build_flux, lora_flux) if arch == "flux" else (build_sd3, lora_sd3)
    text_encoders, dit, words = build(variant, mode == "te")
    network = module.create_network(1.0, RANK, ALPHA, None, text_encoders, dit, **kwargs)
    entries = sorted(({**_entry(m), "component": c} for m, c in _modules(network)), key=lambda e: e["name"])
    counts, by_kind = _counts(entries)
    if {k: v for k, v in counts.items() if k != "total"} != expected:
        sys.exit(f"{stem}: kohya made {counts}, expected {expected}")
    return {
        "format": FORMAT, "kohya_repo": "kohya-ss/sd-scripts", "kohya_commit": commit,
        "arch": arch, "variant": variant, "mode": mode,
        "create_network": {"module": module.__name__, "multiplier": 1.0, "network_dim": RANK,
                           "network_alpha": ALPHA, "kwargs": kwargs},
        "models": words, **provenance, "counts": counts, "counts_by_kind": by_kind, "modules": entries,
    }


# ---- diffusers' own transformers: the split (diffusers/PEFT) layer names ----

DIFFUSERS_FORMAT = "blora-diffusers-manifest/1"
# The published models' transformer configs (model repos' transformer/config.json).
SD3_DIFFUSERS = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64,
                     joint_attention_dim=4096, pooled_projection_dim=2048)
DIFFUSERS_MODELS = {  # file stem -> (arch, variant, diffusers class, config); schnell = dev without guidance_embedder
    "diffusers_flux_dev": ("flux", "dev", "FluxTransformer2DModel", dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=[16, 56, 56])),
    "diffusers_sd3_medium": ("sd3", "sd3_medium", "SD3Transformer2DModel", dict(
        SD3_DIFFUSERS, num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192)),
    "diffusers_sd35_medium": ("sd3", "sd35_medium", "SD3Transformer2DModel", dict(
        SD3_DIFFUSERS, num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
        qk_norm="rms_norm", dual_attention_layers=list(range(13)))),
    "diffusers_sd35_large": ("sd3", "sd35_large", "SD3Transformer2DModel", dict(
        SD3_DIFFUSERS, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192,
        qk_norm="rms_norm")),
}


def diffusers_layers(model) -> list[dict]:
    """Every Linear and Conv2d of a diffusers model, sorted by name (the registration order changes between diffusers
    releases): name, kind, weight shape, whether it has a bias."""
    import torch

    layers = [{"name": name, "kind": _kind(layer), "shape": list(layer.weight.shape), "bias": layer.bias is not None}
              for name, layer in model.named_modules() if isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d))]
    return sorted(layers, key=lambda e: e["name"])


def diffusers_manifest(stem: str, provenance: dict) -> dict:
    """diffusers' transformer of one published model, built on the meta device, as a list of its layers."""
    import diffusers
    import torch

    arch, variant, cls_name, config = DIFFUSERS_MODELS[stem]
    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**config)
    layers = diffusers_layers(model)
    return {"format": DIFFUSERS_FORMAT, "arch": arch, "variant": variant, "class": f"diffusers.{cls_name}",
            "config": config, **provenance, "counts_by_kind": dict(sorted(Counter(e["kind"] for e in layers).items())),
            "layers": layers}


# ---- LBW blocks: the LBW extension's block IDs and the B-LoRA paper groups, from the module names ----

SD_BLOCK = re.compile(r"lora_unet_(down|up)_blocks_(\d+)_(attentions|resnets|downsamplers|upsamplers)_(\d+)")


def sd_lbw(name: str) -> tuple[str, str, int]:
    """SD1/SD2 module -> (LBW block, paper group, the kohya index it must equal: 25 slots, LBW slot - 1)."""
    if name.startswith("lora_unet_mid_block_"):
        return "M00", "mid", 12
    match = SD_BLOCK.match(name)
    direction, i, part, j = match[1], int(match[2]), match[3], int(match[4])
    if direction == "down":
        n = 3 + 3 * i if part == "downsamplers" else 1 + 3 * i + j
        return f"IN{n:02d}", f"in{(n - 1) // 3}", n
    n = 3 * i + 2 if part == "upsamplers" else 3 * i + j
    return f"OUT{n:02d}", f"out{n // 3}", 13 + n


def sdxl_lbw(name: str) -> tuple[str, str, int]:
    """SDXL module -> (LBW block, paper group, the kohya index it must equal: 23 slots)."""
    part, n = re.match(r"lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_", name).groups()
    n = int(n)
    if part == "middle_block":
        return "M00", "mid", 10 + n
    if part == "input_blocks":
        return f"IN{n:02d}", f"in{(n - 1) // 3}", 1 + n
    return f"OUT{n:02d}", f"out{n // 3}", 13 + n


def lbw_blocks(locon: dict[str, dict], commit: str, provenance: dict) -> dict:
    """U-Net module -> LBW block for sd1 and sdxl, from their LoCon manifests (a superset of the LoRA ones)."""
    doc = {"format": LBW_FORMAT, "kohya_commit": commit,
           "doc": "U-Net module name (from <arch>_locon.json) -> LBW block ID and paper group. SD1: "
                  "BASE/IN00..IN11/M00/OUT00..OUT11, groups in0..in3/mid/out0..out3. SDXL: IN00..IN08/M00/"
                  "OUT00..OUT08, groups in0..in2/mid/out0..out2. kohya_block_index is "
                  "networks.lora.get_block_index() (SD1: 25 slots, = LBW slot - 1; SDXL: 23 slots, 1+N for "
                  "input_blocks_N, 10..12 for middle_block_0..2, 13+N for output_blocks_N).",
           **provenance}
    for arch, place in (("sd1", sd_lbw), ("sdxl", sdxl_lbw)):
        table = {}
        for entry in locon[arch]["modules"]:
            if entry["component"] != "unet":
                continue
            block, group, index = place(entry["name"])
            if index != entry["kohya_block_index"]:
                sys.exit(f"{entry['name']}: LBW {block} says kohya index {index}, "
                         f"kohya says {entry['kohya_block_index']}")
            table[entry["name"]] = {"lbw": block, "group": group, "kohya_block_index": index}
        doc[arch] = table
    return doc


# ---- writing: dicts indented, every flat record (a module entry, a count table) on one line ----

def _flat(value) -> bool:
    members = value.values() if isinstance(value, dict) else value
    return all(not isinstance(m, (dict, list)) or (isinstance(m, list) and _flat(m)) for m in members)


def render(value, indent: int = 0) -> str:
    """JSON text that diffs one module per line; json.loads(render(x)) == x."""
    if isinstance(value, (dict, list)) and value and not _flat(value):
        pad = " " * (indent + 1)
        if isinstance(value, dict):
            items = [f"{pad}{json.dumps(k)}: {render(v, indent + 1)}" for k, v in value.items()]
            return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
        return "[\n" + ",\n".join(pad + render(v, indent + 1) for v in value) + "\n" + " " * indent + "]"
    return json.dumps(value)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd-scripts", required=True, type=Path, help="a kohya-ss/sd-scripts work tree")
    parser.add_argument("--sd-scripts-commit", help="the commit of a tree exported without .git")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "tests/data/kohya_manifests")
    args = parser.parse_args(argv)
    tree = args.sd_scripts.resolve()
    if not all((tree / "networks" / f"{name}.py").is_file() for name in ("lora", "lora_flux", "lora_sd3")):
        sys.exit(f"{tree}: no networks/lora.py, lora_flux.py and lora_sd3.py; not an sd-scripts work tree")
    if int(metadata.version("transformers").split(".")[0]) >= 5:
        sys.exit("transformers >= 5 renames CLIPTextModel's modules; run with sd-scripts' pin (transformers 4.x)")
    sys.path.insert(0, str(tree))  # as `python train_network.py` run from the tree; networks/ is a namespace package
    from networks import lora

    logging.disable(logging.INFO)  # kohya logs every network it builds

    unet_targets = tuple(lora.LoRANetwork.UNET_TARGET_REPLACE_MODULE)  # before any network extends it
    commit = _commit(tree, args.sd_scripts_commit)
    command = "python scripts/make_kohya_manifests.py --sd-scripts SD_SCRIPTS"
    provenance = {"generator": command, "environment": _environment()}
    args.out.mkdir(parents=True, exist_ok=True)
    locon = {}
    for stem in STEMS:
        for mode in MODES:
            doc = manifest(stem, mode, commit, provenance, unet_targets)
            (args.out / f"{stem}_{mode}.json").write_text(render(doc) + "\n")
            if mode == "locon" and stem in ("sd1", "sdxl"):
                locon[stem] = doc
            print(f"{stem}_{mode}.json: {doc['counts']}")
    (args.out / "lbw_blocks.json").write_text(render(lbw_blocks(locon, commit, provenance)) + "\n")
    for stem in DIT_MANIFESTS:
        doc = dit_manifest(stem, commit, provenance)
        (args.out / f"{stem}.json").write_text(render(doc) + "\n")
        print(f"{stem}.json: {doc['counts']}")
    for stem in DIFFUSERS_MODELS:
        doc = diffusers_manifest(stem, provenance)
        (args.out / f"{stem}.json").write_text(render(doc) + "\n")
        print(f"{stem}.json: {doc['counts_by_kind']}")
    print(f"wrote {args.out} from sd-scripts {commit}")


if __name__ == "__main__":
    main()
