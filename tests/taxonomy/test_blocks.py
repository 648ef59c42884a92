"""The taxonomy reproduces kohya's golden manifests exactly, for every module of every manifest."""

import pytest

from blora_tools.taxonomy import Arch, place, table
from blora_tools.taxonomy.blocks import OTHER

MANIFESTS = ["sd1_lora", "sd1_locon", "sd2_lora", "sd2_locon", "sd2_ckpt_lora", "sd2_ckpt_locon", "sdxl_lora", "sdxl_locon"]


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_module_is_placed_as_kohya_places_it(name, load_manifest):
    manifest = load_manifest(name)
    lbw = load_manifest("lbw_blocks")["sdxl" if manifest["arch"] == "sdxl" else "sd1"]
    arch = Arch(manifest["arch"])
    for module in manifest["modules"]:
        p = place(module["name"], arch)
        assert p is not None, module["name"]
        assert p.component.value == module["component"]
        assert (-1 if p.kohya_index is None else p.kohya_index) == module["kohya_block_index"], module["name"]
        if module["component"] == "unet":
            assert (p.lbw, p.group) == (lbw[module["name"]]["lbw"], lbw[module["name"]]["group"]), module["name"]
            assert p.block == p.lbw
        else:
            assert (p.lbw, p.group, p.block) == ("BASE", module["component"], module["component"])


@pytest.mark.parametrize(
    "arch, n_full, n_short, slots, groups",
    [
        (Arch.SD1, 26, 17, 25, ("in0", "in1", "in2", "in3", "mid", "out0", "out1", "out2", "out3")),
        (Arch.SD2, 26, 17, 25, ("in0", "in1", "in2", "in3", "mid", "out0", "out1", "out2", "out3")),
        (Arch.SDXL, 20, 12, 23, ("in0", "in1", "in2", "mid", "out0", "out1", "out2")),
    ],
)
def test_table_sizes(arch, n_full, n_short, slots, groups):
    t = table(arch)
    assert (len(t.lbw_full), len(t.lbw_short), len(t.kohya_slots), t.unet_groups) == (n_full, n_short, slots, groups)


def test_mid_slots_are_derived_from_the_kohya_slot_layout(load_manifest):
    """SD1/SD2 number the middle block once (12); SDXL numbers its three LDM parts (10, 11, 12), as kohya does."""
    assert table(Arch.SD1).mid_slots == (12,) and table(Arch.SD2).mid_slots == (12,)
    assert table(Arch.SDXL).mid_slots == (10, 11, 12)
    seen = {m["kohya_block_index"] for m in load_manifest("sdxl_locon")["modules"] if m["name"].startswith("lora_unet_middle_block_")}
    assert seen == set(table(Arch.SDXL).mid_slots)


def test_attention_groups_match_the_manifests(load_manifest):
    for arch, name in ((Arch.SD1, "sd1_lora"), (Arch.SDXL, "sdxl_lora")):
        groups = {place(m["name"], arch).group for m in load_manifest(name)["modules"] if m["component"] == "unet"}
        assert groups == set(table(arch).attention_groups)


@pytest.mark.parametrize(
    "stem, arch, expected",
    [
        # A1111's LDM names for SD1
        ("lora_unet_input_blocks_1_1_proj_in", Arch.SD1, ("IN01", "in0", 1)),
        ("lora_unet_output_blocks_11_1_transformer_blocks_0_attn2_to_k", Arch.SD1, ("OUT11", "out3", 24)),
        ("lora_unet_middle_block_1_proj_out", Arch.SD1, ("M00", "mid", 12)),
        # diffusers-style SDXL names
        ("lora_unet_down_blocks_1_attentions_0_proj_in", Arch.SDXL, ("IN04", "in1", 5)),
        ("lora_unet_down_blocks_0_downsamplers_0_conv", Arch.SDXL, ("IN03", "in0", 4)),
        ("lora_unet_mid_block_attentions_0_proj_in", Arch.SDXL, ("M00", "mid", 11)),
        ("lora_unet_mid_block_resnets_1_conv1", Arch.SDXL, ("M00", "mid", 12)),
        ("lora_unet_up_blocks_2_upsamplers_0_conv", Arch.SD1, ("OUT08", "out2", 21)),
        ("lora_unet_up_blocks_2_resnets_2_conv1", Arch.SDXL, ("OUT08", "out2", 21)),
        ("lora_unet_conv_in", Arch.SD1, ("IN00", "none", 0)),
        ("lora_unet_input_blocks_0_0", Arch.SDXL, ("IN00", "none", 1)),
        # transformers 5 text-encoder names (no text_model level)
        ("lora_te_encoder_layers_3_mlp_fc1", Arch.SD1, ("BASE", "te", None)),
    ],
)
def test_names_in_other_conventions(stem, arch, expected):
    p = place(stem, arch)
    assert (p.lbw, p.group, p.kohya_index) == expected


def test_modules_outside_lbw_blocks_go_to_other():
    for stem, arch, index in (
        ("lora_unet_time_embedding_linear_1", Arch.SD1, None),
        ("lora_unet_time_embed_0", Arch.SDXL, 0),
        ("lora_unet_label_emb_0_0", Arch.SDXL, 0),
        ("lora_unet_out_2", Arch.SDXL, 22),
    ):
        p = place(stem, arch)
        assert (p.block, p.lbw, p.group, p.kohya_index) == (OTHER, None, "none", index)


@pytest.mark.parametrize(
    "stem, arch",
    [
        ("lora_unet_input_blocks_10_0_in_layers_2", Arch.SDXL),  # SDXL has IN00..IN08 only
        ("lora_te1_text_model_encoder_layers_0_mlp_fc1", Arch.SD1),  # no te1 on SD1
        ("lora_te_text_model_encoder_layers_0_mlp_fc1", Arch.SDXL),
        ("lora_unet_something_else", Arch.SD1),
        ("not_a_lora_key", Arch.SD1),
    ],
)
def test_unplaceable_names_give_none(stem, arch):
    assert place(stem, arch) is None
