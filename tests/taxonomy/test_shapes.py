"""Real layer shapes from the architecture records, against two independent oracles: the golden kohya manifests
(every module kohya's `networks.lora` creates, with its base weight's shape) and the full-size module trees
(diffusers `UNet2DConditionModel`, the LDM-named SDXL U-Net and transformers CLIP, built on the meta device)."""

from __future__ import annotations

from functools import cache

import pytest
from torch import nn

from blora_tools.models import build_text_encoders, build_unet
from blora_tools.taxonomy.arch import Arch
from blora_tools.taxonomy.layouts import record
from blora_tools.taxonomy.shapes import largest_layer, layer_shape, layer_shapes, misfit

MANIFESTS = ["sd1_lora", "sd1_locon", "sd2_lora", "sd2_locon", "sd2_ckpt_lora", "sd2_ckpt_locon", "sdxl_lora", "sdxl_locon"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_module_has_its_real_shape(name, load_manifest):
    """Exact shapes; the one allowed difference is SD2's projection, which ships as Linear (diffusers) and as a
    1×1 conv (kohya from a single-file checkpoint, the `ckpt` manifests)."""
    manifest = load_manifest(name)
    arch = Arch(manifest["arch"])
    for module in manifest["modules"]:
        expected = tuple(module["org_shape"])
        got = layer_shape(module["name"], arch)
        if manifest["variant"] == "ckpt" and module["name"].endswith(("_proj_in", "_proj_out")):
            assert record(arch).linear_projection and got + (1, 1) == expected, module["name"]
        else:
            assert got == expected, module["name"]


@cache
def _weighted_layers(arch: str) -> dict[str, tuple[int, ...]]:
    """kohya stem → weight shape of every layer with a weight in the full-size meta-device models."""
    found: dict[str, tuple[int, ...]] = {}
    roots = [("unet", build_unet(arch, "full", "meta"))]
    components = [c.value for c in record(arch).block_table().text_encoders]
    roots += list(zip(components, build_text_encoders(arch, "full", "meta")))
    for component, root in roots:
        for path, module in root.named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, nn.Parameter) and path:
                found[f"lora_{component}_" + path.replace(".", "_")] = tuple(weight.shape)
            if isinstance(module, nn.Linear) and path.endswith("text_projection"):
                found[f"lora_{component}_text_projection"] = tuple(weight.shape)
    return found


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_every_layer_of_the_full_size_models(arch):
    """Both ways: every weighted layer of the real module tree is in the table with its shape, and the table
    names no layer the tree lacks (in the tree's own naming: diffusers for SD1/SD2, LDM for SDXL)."""
    tree = dict(_weighted_layers(arch))
    table = layer_shapes(arch)
    assert len(tree) > 400 and any(n.startswith("lora_te") for n in tree)
    conv_in = "lora_unet_input_blocks_0_0" if arch == "sdxl" else "lora_unet_conv_in"
    assert tree[conv_in][1] == 4 and table[conv_in][1] == 9  # the base model reads 4 latent channels, inpainting 9
    tree[conv_in] = table[conv_in]
    assert {name: table.get(name) for name in tree} == tree
    tree_naming = "lora_unet_input_blocks" if arch == "sdxl" else "lora_unet_down_blocks"
    other_naming = "lora_unet_down_blocks" if arch == "sdxl" else "lora_unet_input_blocks"
    mine = {n for n in table if n.startswith(tree_naming)}
    assert mine == {n for n in tree if n.startswith(tree_naming)}
    assert any(n.startswith(other_naming) for n in table)  # the other naming is there too


def test_both_namings_give_the_same_shape():
    assert layer_shape("lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_k", "sdxl") == (640, 2048)
    assert layer_shape("lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn2_to_k", "sdxl") == (640, 2048)
    assert layer_shape("lora_unet_output_blocks_2_2_conv", "sdxl") == (1280, 1280, 3, 3)
    assert layer_shape("lora_unet_input_blocks_1_1_proj_in", "sd1") == (320, 320, 1, 1)  # A1111's SD1 names
    assert layer_shape("lora_te_encoder_layers_22_mlp_fc1", "sd2") == (4096, 1024)  # transformers 5 form
    assert layer_shape("lora_te_text_model_encoder_layers_12_mlp_fc1", "sd1") is None  # CLIP-L has 12 layers
    assert layer_shape("lora_unet_input_blocks_4_1_transformer_blocks_2_attn1_to_q", "sdxl") is None  # depth 2


def test_inpainting_conv_in_fits():
    """An inpainting LoRA's conv_in reads 9 channels (latents, masked-image latents, mask); nothing reads more."""
    assert misfit("lora_unet_conv_in", (320, 9, 3, 3), "sd1") is None
    assert misfit("lora_unet_input_blocks_0_0", (320, 9, 3, 3), "sdxl") is None
    assert "[320, 9, 3, 3]" in misfit("lora_unet_conv_in", (320, 10, 3, 3), "sd2")


def test_misfit_allows_smaller_refuses_larger():
    stem = "lora_unet_down_blocks_0_resnets_0_conv1"  # a 320×320×3×3 conv on SD1
    assert misfit(stem, (320, 320, 3, 3), "sd1") is None
    assert misfit(stem, (32, 32, 3, 3), "sd1") is None  # a tiny test model
    assert misfit(stem, (32, 32, 1, 1), "sd1") is None
    assert "[320, 320, 3, 3]" in misfit(stem, (320, 320, 5, 5), "sd1")
    assert "[320, 320, 3, 3]" in misfit(stem, (321, 320, 3, 3), "sd1")
    assert misfit(stem, (320, 320 * 9), "sd1") is None  # a LyCORIS LoHa/LoKr of the conv, stored flat
    assert "[320, 320, 3, 3]" in misfit(stem, (320, 320 * 9 + 1), "sd1")
    proj = "lora_unet_down_blocks_0_attentions_0_proj_in"  # Linear on SD2, 1×1 conv in a ckpt-built file
    assert misfit(proj, (320, 320), "sd2") is None and misfit(proj, (320, 320, 1, 1), "sd2") is None


def test_unknown_names_are_held_to_the_largest_layer():
    (out, fan_in, kh, kw), most = largest_layer("sdxl")
    assert (out, kh, kw) == (49408, 3, 3)  # the token embedding has the most rows
    assert misfit("lora_unet_not_a_layer", (out, 1), "sdxl") is None
    assert "larger than any sdxl layer" in misfit("lora_unet_not_a_layer", (out + 1, 1), "sdxl")
    assert "larger than any sdxl layer" in misfit("lora_unet_not_a_layer", (out, fan_in), "sdxl")  # too many values
    assert most == 49408 * 1280
