"""The Flux.1 and SD3 records against diffusers' own models, and the DiT selectors, weights and dialects.

Oracles: diffusers' `FluxTransformer2DModel` / `SD3Transformer2DModel` built at full size on the meta device
(every Linear/Conv2d name and weight shape), and the sub-selector/vector rules restated from
DESIGN §7 with their sources (Inspire-Pack `lora_block_weight.py`, the Forge lora-block-weight fork).
"""

from __future__ import annotations

import pytest
import torch

from blora_tools.adapter.formats import Dialect, path_from_stem, split_key
from blora_tools.errors import SelectorError
from blora_tools.taxonomy.arch import Arch, arch_from_metadata
from blora_tools.taxonomy.blocks import OTHER, place, table
from blora_tools.taxonomy.dit import BFL, DIFFUSERS, FLUX_RECORD, SD3_RECORD, layer_index, parts_of
from blora_tools.taxonomy.selectors import coverage, resolve_selector
from blora_tools.taxonomy.shapes import layer_shapes
from blora_tools.taxonomy.weights import parse_weights


def _meta_linears(model) -> dict[str, tuple[int, ...]]:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


@pytest.fixture(scope="module")
def diffusers_flux():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):  # FLUX.1-dev's transformer config (diffusers 0.42)
        return _meta_linears(FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
            axes_dims_rope=(16, 56, 56),
        ))


@pytest.fixture(scope="module")
def diffusers_sd35_large():
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):  # SD3.5 Large's config, with SD3.5 Medium's attn2 in every block
        return _meta_linears(SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=38, attention_head_dim=64, num_attention_heads=38,
            joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
            pos_embed_max_size=192, dual_attention_layers=tuple(range(38)),
        ))


def test_flux_diffusers_layers_are_exactly_diffusers_own(diffusers_flux):
    ours = {layer.path: layer.shape for layer in FLUX_RECORD.layers() if layer.naming == DIFFUSERS}
    assert ours == diffusers_flux


def test_sd3_diffusers_layers_match_diffusers_except_the_pre_only_last_block(diffusers_sd35_large):
    """The table is depth-independent: every block is a full block; diffusers' last block is pre-only (no context
    output/MLP, a 2·width context modulation), which fits within the table's shapes."""
    ours = {layer.path: layer.shape for layer in SD3_RECORD.layers() if layer.naming == DIFFUSERS}
    last = "transformer_blocks.37."
    assert set(diffusers_sd35_large) <= set(ours)
    assert {p for p in ours if p not in diffusers_sd35_large} == {
        last + "attn.to_add_out", last + "ff_context.net.0.proj", last + "ff_context.net.2"}
    for path, shape in diffusers_sd35_large.items():
        if path != last + "norm1_context.linear":
            assert ours[path] == shape, path
    assert diffusers_sd35_large[last + "norm1_context.linear"] == (2 * 2432, 2432)


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_every_fused_layer_is_exactly_covered_by_its_split_parts(arch):
    """The diffusers parts of each BFL weight tile its rows once, in order (ComfyUI's offsets, dit.md A.6)."""
    arch = Arch(arch)
    for (fused, naming), layers in parts_of(arch).items():
        if naming != DIFFUSERS:
            continue
        whole = layer_index(arch)[fused.replace(".", "_")]
        unit = whole.shape[0] // whole.units
        position = 0
        for layer in layers:
            assert layer.offset == position
            assert layer.shape[0] == layer.units * unit
            position += layer.units
        assert position == whole.units


def test_flux_layer_facts():
    shapes = layer_shapes(Arch.FLUX)
    assert shapes["lora_unet_single_blocks_0_linear1"] == (21504, 3072)  # q|k|v|mlp = 3·3072 + 12288
    assert shapes["lora_unet_single_blocks_0_linear2"] == (3072, 15360)
    assert shapes["lora_unet_double_blocks_18_img_mod_lin"] == (18432, 3072)
    assert shapes["lora_unet_single_transformer_blocks_0_proj_mlp"] == (12288, 3072)
    assert shapes["lora_te3_encoder_block_0_layer_0_SelfAttention_q"] == (4096, 4096)
    assert shapes["lora_te3_encoder_block_23_layer_1_DenseReluDense_wi_1"] == (10240, 4096)
    kohya = [s for s in shapes if s.startswith("lora_unet_") and layer_index(Arch.FLUX)[s[10:]].naming == BFL
             and layer_index(Arch.FLUX)[s[10:]].block is not None]
    assert len(kohya) == 19 * 10 + 38 * 3 == 304  # lora_flux's default network (dit.md A.2)


def test_placement_of_both_namings():
    fused = place("lora_unet_double_blocks_3_img_attn_qkv", Arch.FLUX)
    split = place("lora_unet_transformer_blocks_3_attn_to_k", Arch.FLUX)
    assert (fused.block, fused.group, split.block) == ("D03", "double", "D03")
    assert split.layer.fused == "double_blocks.3.img_attn.qkv" and split.layer.offset == 1
    single = place("lora_unet_single_transformer_blocks_2_proj_mlp", Arch.FLUX)
    assert single.block == "S02" and single.kohya_index == 21 and single.layer.offset == 3
    base = place("lora_unet_final_layer_adaLN_modulation_1", Arch.FLUX)
    assert base.block == OTHER and base.lbw == "BASE" and base.layer.swappable
    assert place("lora_unet_joint_blocks_5_context_block_attn_qkv", Arch.SD3).block == "J05"
    assert place("lora_unet_transformer_blocks_5_attn2_to_q", Arch.SD3).block == "J05"
    assert place("lora_te3_encoder_block_0_layer_0_SelfAttention_q", Arch.SD3).block == "te3"
    assert place("lora_unet_double_blocks_19_img_attn_qkv", Arch.FLUX) is None


def test_tables():
    flux, sd3 = table(Arch.FLUX), table(Arch.SD3)
    assert len(flux.lbw_full) == 58 and flux.text_encoders[-1].value == "te3"
    assert flux.group_members["single"][0] == "S00" and len(flux.group_members["single"]) == 38
    assert len(sd3.unet_lbw) == 38 and [c.value for c in sd3.text_encoders] == ["te1", "te2", "te3"]


@pytest.mark.parametrize(
    "key, stem, dialect",
    [
        ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight",
         "lora_unet_single_transformer_blocks_0_attn_to_q", Dialect.DIFFUSERS),
        ("diffusion_model.double_blocks.0.img_attn.qkv.lora_up.weight",
         "lora_unet_double_blocks_0_img_attn_qkv", Dialect.COMFYUI),
        ("double_blocks.4.processor.qkv_lora2.up.weight", "lora_unet_double_blocks_4_txt_attn_qkv", Dialect.XLABS),
        ("single_blocks.3.processor.qkv_lora.down.weight", "lora_unet_single_blocks_3_linear1_qkv", Dialect.XLABS),
        ("single_blocks.3.processor.proj_lora.down.weight", "lora_unet_single_blocks_3_linear2", Dialect.XLABS),
        ("lora_transformer_transformer_blocks_0_ff_net_2.alpha", "lora_unet_transformer_blocks_0_ff_net_2",
         Dialect.ONETRAINER),
        ("text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_B.weight",
         "lora_te3_encoder_block_0_layer_0_SelfAttention_q", Dialect.DIFFUSERS),  # Flux's second encoder is T5
        ("text_encoders.t5xxl.transformer.encoder.block.1.layer.1.DenseReluDense.wo.lora_down.weight",
         "lora_te3_encoder_block_1_layer_1_DenseReluDense_wo", Dialect.COMFYUI),
        ("lora_te3_encoder_block_0_layer_0_SelfAttention_o.alpha", "lora_te3_encoder_block_0_layer_0_SelfAttention_o",
         Dialect.KOHYA),
    ],
)
def test_dit_dialect_keys(key, stem, dialect):
    name = split_key(key)
    assert (name.stem, name.dialect) == (stem, dialect)


def test_path_from_stem_for_dit_and_t5():
    assert path_from_stem("lora_unet_joint_blocks_0_x_block_attn2_qkv", "sd3")[1] == "joint_blocks.0.x_block.attn2.qkv"
    assert path_from_stem("lora_unet_transformer_blocks_1_ff_context_net_0_proj", "flux")[1] == \
        "transformer_blocks.1.ff_context.net.0.proj"
    assert path_from_stem("lora_te3_encoder_block_2_layer_1_DenseReluDense_wi_0", "flux")[1] == \
        "encoder.block.2.layer.1.DenseReluDense.wi_0"


@pytest.mark.parametrize(
    "metadata, expected",
    [({"modelspec.architecture": "flux-1-dev/lora"}, Arch.FLUX),
     ({"modelspec.architecture": "stable-diffusion-3-5-large/lora"}, Arch.SD3),
     ({"ss_base_model_version": "flux1"}, Arch.FLUX),
     ({"ss_base_model_version": "sd3"}, Arch.SD3)],
)
def test_dit_metadata_claims(metadata, expected):
    assert arch_from_metadata(metadata) is expected


# --- selectors ----------------------------------------------------------------------------------------


def test_sub_selectors_choose_row_parts():
    assert resolve_selector("D05.img.q", "flux") == {"D05:img.attn.q"}
    assert resolve_selector("S10.linear1.mlp", "flux") == {"S10:linear1.mlp"}
    assert resolve_selector("S10.attn", "flux") == {"S10:linear1.q", "S10:linear1.k", "S10:linear1.v"}
    assert resolve_selector("J02.x.attn2", "sd3") == {f"J02:x.attn2.{p}" for p in ("q", "k", "v", "proj")}
    assert resolve_selector("J02.x.attn", "sd3") == {f"J02:x.attn.{p}" for p in ("q", "k", "v", "proj")}
    assert resolve_selector("J02.x.q", "sd3") == {"J02:x.attn.q", "J02:x.attn2.q"}
    assert resolve_selector("base.out", "flux") == {"OTHER:out.final"}
    whole = resolve_selector("D05.img,D05.txt", "flux")
    assert whole == {"D05"}  # every part chosen: the block itself
    excluded = resolve_selector("double NOT D05.img", "flux")
    assert "D05" not in excluded and "D04" in excluded and "D05:txt.mod" in excluded and len(excluded) == 18 + 7


def test_coverage_of_fused_and_split_modules():
    selection = resolve_selector("D05.img.q,D05.img.v", "flux")
    fused = coverage(place("lora_unet_double_blocks_5_img_attn_qkv", Arch.FLUX), selection)
    assert not fused.whole and [leaf.name for leaf in fused.leaves] == ["img.attn.q", "img.attn.v"]
    assert coverage(place("lora_unet_transformer_blocks_5_attn_to_q", Arch.FLUX), selection).whole
    assert coverage(place("lora_unet_transformer_blocks_5_attn_to_k", Arch.FLUX), selection).none
    assert coverage(place("lora_unet_double_blocks_5_img_mod_lin", Arch.FLUX), selection).none


def test_research_presets_and_groups():
    assert resolve_selector("splitflux-style", "flux") == {f"S{i:02d}" for i in range(10, 38)}
    assert resolve_selector("stableflow-vital", "flux") == {"D00", "D01", "D17", "D18", "S06", "S09", "S34", "S35", "S37"}
    assert resolve_selector("base", "sd3") == {"te1", "te2", "te3", OTHER}
    assert resolve_selector("D17-S01", "flux") == {"D17", "D18", "S00", "S01"}


@pytest.mark.parametrize(
    "text, arch, message",
    [("in0", "flux", "names U-Net blocks"), ("style", "flux", "splitflux-style"), ("D19", "flux", "no block D19"),
     ("D05.foo", "flux", "matches no part of D05"), ("te2", "flux", "unknown block 'te2'"),
     ("D05.img", "sdxl", "parts of blocks exist on Flux.1 and SD3 only"), ("J38", "sd3", "no block J38")],
)
def test_dit_selector_errors(text, arch, message):
    with pytest.raises(SelectorError, match=message):
        resolve_selector(text, arch)


# --- weights ------------------------------------------------------------------------------------------


def test_vectors_resolve_by_absolute_block_index():
    v58 = [0.5] + [float(i) for i in range(57)]
    w = parse_weights(",".join(map(str, v58))).resolve("flux")
    assert (w["te1"], w["te3"], w[OTHER], w["D00"], w["D18"], w["S00"], w["S37"]) == (0.5, 0.5, 0.5, 0, 18, 19, 56)
    w57 = parse_weights(",".join(str(float(i)) for i in range(57))).resolve("flux")
    assert w57["D03"] == 3 and w57["S00"] == 19 and w57["te1"] == 1.0  # the Forge fork: BASE keeps 1
    w19 = parse_weights(",".join(str(float(i)) for i in range(19))).resolve("flux")
    assert (w19["D07"], w19["S14"], w19["S15"], w19["S16"]) == (7, 7, 7, 8)  # FL_i → D_i, S_2i, S_2i+1
    w20 = parse_weights(",".join(["0.5"] + ["0.25"] * 19)).resolve("flux")
    assert w20["D18"] == 0.25 and w20["S00"] == 1.0  # the last value is not repeated onto the singles (Inspire #165)
    w61 = parse_weights(",".join(["2", "3", "4"] + ["1"] * 57 + ["5"])).resolve("flux")
    place_in = place("lora_unet_img_in", Arch.FLUX)
    place_out = place("lora_unet_final_layer_linear", Arch.FLUX)
    assert (w61["te1"], w61["te3"], w61.rows(place_in), w61.rows(place_out)) == (2, 3, ((0, 1, 4.0),), ((0, 1, 5.0),))
    sd3 = parse_weights(",".join(["1"] + ["0"] * 24)).resolve("sd3")
    assert sd3["J23"] == 0 and sd3["te2"] == 1
    with pytest.raises(SelectorError, match="flux takes 19 or 20 or 57 or 58 or 61"):
        parse_weights("1,2,3").resolve("flux")


def test_part_weights_give_row_ranges():
    w = parse_weights("double=0.5,D05.img.q=0,S10.linear1.mlp=2").resolve("flux")
    assert w["D05"] == 0.5 and w["D04"] == 0.5
    assert w.rows(place("lora_unet_double_blocks_5_img_attn_qkv", Arch.FLUX)) == ((0, 1, 0.0), (1, 2, 0.5), (2, 3, 0.5))
    assert w.rows(place("lora_unet_transformer_blocks_5_attn_to_k", Arch.FLUX)) == ((0, 1, 0.5),)
    assert w.rows(place("lora_unet_single_blocks_10_linear1", Arch.FLUX)) == ((0, 1, 1.0), (1, 2, 1.0), (2, 3, 1.0), (3, 7, 2.0))
    folded = parse_weights("D05.img=0.5,D05.txt=0.5").resolve("flux")
    assert folded["D05"] == 0.5 and not folded.parts
