"""kohya stem → module path (`path_from_stem`) and SDXL LDM ↔ diffusers U-Net names, against real module trees.

Oracles: the golden kohya manifests, the module trees of the full-size (meta device) and tiny models, and
diffusers' own `UNet2DConditionModel` built with the SDXL configuration.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from torch import nn

from blora_tools.adapter.formats import (
    diffusers_to_ldm,
    ldm_to_diffusers,
    path_from_stem,
    stem_from_path,
    unet_naming,
)
from blora_tools.errors import BloraError
from blora_tools.models import build_text_encoders, build_unet
from blora_tools.taxonomy.blocks import place
from blora_tools.taxonomy.layouts import record
from kohya_plugin.targets import find_targets
from interop_helpers import SDXL_DIFFUSERS_TINY

MANIFESTS = ["sd1_lora", "sd1_locon", "sd2_lora", "sd2_locon", "sd2_ckpt_lora", "sd2_ckpt_locon", "sdxl_lora", "sdxl_locon"]

SDXL_DIFFUSERS_FULL = dict(
    sample_size=128,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
"""diffusers' SDXL base U-Net configuration (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json)."""



@cache
def diffusers_unet(size: str) -> nn.Module:
    from diffusers import UNet2DConditionModel

    config = SDXL_DIFFUSERS_FULL if size == "full" else SDXL_DIFFUSERS_TINY
    with torch.device("meta"):
        return UNet2DConditionModel(**config)


@cache
def models(arch: str, size: str, variant: str | None = None):
    device = "meta" if size == "full" else "cpu"
    return build_text_encoders(arch, size, device), build_unet(arch, size, device, variant=variant)


def _weighted(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every module with its own weight parameter → the weight's shape."""
    return {
        name: tuple(m.weight.shape)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "weight", None), nn.Parameter) and name
    }


def _lookup(modules: dict[str, nn.Module], path: str) -> nn.Module:
    """A module by path; text-encoder paths carry transformers 4's `text_model.` whatever transformers has."""
    if path not in modules and path.startswith("text_model."):
        path = path[len("text_model.") :]  # transformers 5's CLIPTextModel has no text_model level
    return modules[path]


@pytest.mark.parametrize("name", MANIFESTS)
def test_path_from_stem_inverts_every_golden_name(name, load_manifest):
    manifest = load_manifest(name)
    for module in manifest["modules"]:
        component, path = path_from_stem(module["name"], manifest["arch"])
        assert component.value == module["component"]
        assert stem_from_path(component.value, path) == module["name"]


@pytest.mark.parametrize(
    "arch, size, variant",
    [("sd1", "full", None), ("sd2", "full", None), ("sd2", "full", "ckpt"), ("sdxl", "full", None),
     ("sd1", "tiny", None), ("sdxl", "tiny", None)],
)
def test_path_from_stem_finds_the_wrapped_layer(arch, size, variant):
    encoders, unet = models(arch, size, variant)
    _, targets = find_targets(encoders, unet, include_conv=True)
    first, last, net = (dict(m.named_modules()) for m in (encoders[0], encoders[-1], unet))
    networks = {"unet": net, "te": first, "te1": first, "te2": last}
    for target in targets:
        component, path = path_from_stem(target.name, arch)
        assert _lookup(networks[component.value], path) is target.layer, target.name


@pytest.mark.parametrize(
    "stem, path",
    [
        ("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_out_0",
         "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0"),
        ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj",
         "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj"),
        ("lora_unet_mid_block_resnets_1_time_emb_proj", "mid_block.resnets.1.time_emb_proj"),
        ("lora_unet_up_blocks_0_resnets_2_conv_shortcut", "up_blocks.0.resnets.2.conv_shortcut"),
        ("lora_unet_time_embedding_linear_1", "time_embedding.linear_1"),
        ("lora_unet_add_embedding_linear_2", "add_embedding.linear_2"),
        ("lora_unet_conv_norm_out", "conv_norm_out"),
        ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
        ("lora_unet_input_blocks_3_0_op", "input_blocks.3.0.op"),
        ("lora_unet_output_blocks_2_2_conv", "output_blocks.2.2.conv"),
        ("lora_unet_middle_block_0_in_layers_2", "middle_block.0.in_layers.2"),
        ("lora_unet_output_blocks_8_0_emb_layers_1", "output_blocks.8.0.emb_layers.1"),
        ("lora_unet_input_blocks_7_0_out_layers_3", "input_blocks.7.0.out_layers.3"),
        ("lora_unet_output_blocks_0_0_skip_connection", "output_blocks.0.0.skip_connection"),
        ("lora_unet_label_emb_0_0", "label_emb.0.0"),
        ("lora_unet_time_embed_2", "time_embed.2"),
        ("lora_unet_out_2", "out.2"),
        ("lora_te1_text_model_encoder_layers_11_self_attn_out_proj", "text_model.encoder.layers.11.self_attn.out_proj"),
        ("lora_te2_text_model_encoder_layers_31_mlp_fc2", "text_model.encoder.layers.31.mlp.fc2"),
        ("lora_te1_encoder_layers_0_mlp_fc1", "text_model.encoder.layers.0.mlp.fc1"),  # transformers 5 form in
    ],
)
def test_path_from_stem_examples(stem, path):
    assert path_from_stem(stem, "sdxl")[1] == path


def test_path_from_stem_refuses_what_it_cannot_know():
    with pytest.raises(BloraError, match="'banana' is not part"):
        path_from_stem("lora_unet_down_blocks_0_banana_proj", "sd1")
    with pytest.raises(BloraError, match="has no text encoder 'te2'"):
        path_from_stem("lora_te2_text_model_encoder_layers_0_mlp_fc1", "sd1")
    with pytest.raises(BloraError, match="does not start with"):
        path_from_stem("unet_down_blocks_0", "sd1")


@pytest.mark.parametrize("size", ["full", "tiny"])
def test_sdxl_ldm_names_are_diffusers_sdxl_layers(size):
    """Every weighted module of our LDM-named SDXL U-Net maps to the diffusers SDXL module of the same shape,
    one to one and onto, and back."""
    ldm = _weighted(build_unet("sdxl", size, "meta"))
    diffusers = _weighted(diffusers_unet(size))
    mapped = {ldm_to_diffusers(name, "sdxl"): shape for name, shape in ldm.items()}
    assert len(mapped) == len(ldm)
    assert mapped == diffusers
    assert {diffusers_to_ldm(name, "sdxl") for name in diffusers} == set(ldm)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_both_namings_place_a_layer_in_the_same_block(arch):
    """The taxonomy reads LDM and diffusers names independently; the table must agree with it."""
    unet = diffusers_unet("tiny") if arch == "sdxl" else build_unet(arch, "tiny", "meta")
    for name in _weighted(unet):
        ldm = diffusers_to_ldm(name, arch)
        assert unet_naming(ldm) == "ldm" and ldm_to_diffusers(ldm, arch) == name
        a = place(stem_from_path("unet", name), arch)
        b = place(stem_from_path("unet", ldm), arch)
        assert a is not None and b is not None, name
        assert (a.block, a.group) == (b.block, b.group), (name, ldm)


def test_name_table_shape():
    sdxl = record("sdxl").stage_rows()
    pairs = {ldm: diffusers for ldm, diffusers, _ in sdxl}
    assert pairs["input_blocks.3.0.op"] == "down_blocks.0.downsamplers.0.conv"
    assert pairs["input_blocks.6.0.op"] == "down_blocks.1.downsamplers.0.conv"
    assert pairs["output_blocks.2.2.conv"] == "up_blocks.0.upsamplers.0.conv"
    assert pairs["output_blocks.5.2.conv"] == "up_blocks.1.upsamplers.0.conv"
    assert pairs["middle_block.1"] == "mid_block.attentions.0"
    assert pairs["output_blocks.8.0"] == "up_blocks.2.resnets.2"
    assert "output_blocks.8.1" not in pairs  # SDXL's outermost level has no attention
    sd1 = {ldm: diffusers for ldm, diffusers, _ in record("sd1").stage_rows()}
    assert sd1["output_blocks.2.1.conv"] == "up_blocks.0.upsamplers.0.conv"  # no attention there
    assert sd1["input_blocks.11.0"] == "down_blocks.3.resnets.1"
    with pytest.raises(BloraError, match="not a layer of a residual block"):
        ldm_to_diffusers("input_blocks.1.0.in_layers.1", "sdxl")
    with pytest.raises(BloraError, match="no diffusers counterpart"):
        ldm_to_diffusers("input_blocks.1.1.proj_in", "sdxl")  # SDXL's level 0 has no attention
