"""Architecture from evidence only: names, real layer shapes, exact widths, then metadata or `--arch` where the
evidence leaves more than one family (issue #12)."""

import pytest

from blora_tools.errors import BloraError
from blora_tools.taxonomy.arch import Arch, arch_from_metadata
from blora_tools.taxonomy.detect import arch_from_widths, decide_arch, unsupported_family


def _modules(manifest, tiny: bool = False):
    """stem → ΔW shape of a manifest's modules; `tiny` makes every width 1 (no width evidence left)."""
    return {m["name"]: tuple(1 for _ in m["org_shape"]) if tiny else tuple(m["org_shape"]) for m in manifest["modules"]}


@pytest.mark.parametrize("name", ["sd1_lora", "sd1_locon", "sd2_lora", "sd2_ckpt_lora", "sd2_ckpt_locon", "sdxl_lora", "sdxl_locon"])
def test_manifests_are_detected(name, load_manifest):
    manifest = load_manifest(name)
    arch, warnings = decide_arch(_modules(manifest))
    assert arch.value == manifest["arch"] and warnings == []


@pytest.mark.parametrize("name", ["sd1_lora", "sd2_lora", "sdxl_lora"])
def test_unet_only_files_without_widths(name, load_manifest):
    """Names alone: SDXL by depth and level layout; SD2 (diffusers) by its Linear proj_in; SD1 by the rule."""
    modules = {s: shape for s, shape in _modules(load_manifest(name), tiny=True).items() if s.startswith("lora_unet_")}
    assert decide_arch(modules)[0].value == load_manifest(name)["arch"]


def test_real_sd2_widths_rule_sd1_out_even_without_a_width_rule(load_manifest):
    """An SD2 text encoder's MLP (4096×1024) is larger than any SD1 layer of that name: SD1 is out by shape."""
    modules = {s: shape for s, shape in _modules(load_manifest("sd2_lora")).items() if s.endswith("_mlp_fc1")}
    modules = {s: shape for s, shape in modules.items() if int(s.split("_layers_")[1].split("_")[0]) < 12}
    assert decide_arch(modules)[0] is Arch.SD2


def test_metadata_disagreement_is_a_warning(load_manifest):
    arch, warnings = decide_arch(_modules(load_manifest("sdxl_lora")), {"ss_base_model_version": "sd_v1"})
    assert arch is Arch.SDXL
    assert len(warnings) == 1 and "sd1" in warnings[0] and "sdxl" in warnings[0]


def test_exact_width_beats_metadata(load_manifest):
    """A real SD1 file (768-wide context) claimed as SD2 stays SD1, with a warning."""
    arch, warnings = decide_arch(_modules(load_manifest("sd1_lora")), {"ss_base_model_version": "sd_v2"})
    assert arch is Arch.SD1 and "metadata says sd2" in warnings[0]


@pytest.mark.parametrize(
    "metadata, expected",
    [
        ({"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}, Arch.SDXL),
        ({"modelspec.architecture": "stable-diffusion-v2-768-v/lora"}, Arch.SD2),
        ({"ss_base_model_version": "sd_v1"}, Arch.SD1),
        ({"ss_v2": "True"}, Arch.SD2),
        ({}, None),
    ],
)
def test_arch_from_metadata(metadata, expected):
    assert arch_from_metadata(metadata) == expected


def test_nothing_known_is_refused_even_when_metadata_claims():
    """Was: UNKNOWN (or the metadata's claim) for a file with no module of a supported family. Modules that fit
    nothing are now refused by name: a claim in the metadata is not evidence about the tensors."""
    with pytest.raises(BloraError, match="no module fits SD1, SD2, SDXL, Flux.1 or SD3.*lora_unet_layers_0_attention_qkv"):
        decide_arch({"lora_unet_layers_0_attention_qkv": (8, 8)}, {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(BloraError, match="no adapter modules"):
        decide_arch({}, {"ss_base_model_version": "sdxl_base_v1-0"})


def test_sdxl_style_only_ldm_file_is_sdxl(load_manifest):
    """Regression: an SDXL LoCon file with only the outer level (no attention, no text encoder) was read as SD1."""
    modules = {
        s: shape for s, shape in _modules(load_manifest("sdxl_locon"), tiny=True).items()
        if s.startswith(("lora_unet_input_blocks_1_", "lora_unet_output_blocks_7_"))
    }
    assert modules
    assert decide_arch(modules)[0] is Arch.SDXL
    assert decide_arch(modules, {"ss_base_model_version": "sdxl_base_v1-0"}) == (Arch.SDXL, [])


def test_tiny_sdxl_with_linear_proj_in_is_not_sd2():
    """Regression: LDM names with Linear proj_in and shallow attention were read as SD2."""
    modules = {"lora_unet_input_blocks_4_1_proj_in": (8, 8), "lora_unet_middle_block_1_proj_out": (8, 8)}
    assert decide_arch(modules)[0] is Arch.SDXL


def test_inconclusive_names_yield_to_metadata_and_override():
    modules = {"lora_unet_mid_block_attentions_0_proj_in": (8, 8, 1, 1)}
    assert decide_arch(modules) == (Arch.SD1, [])  # the documented rule: SD1
    assert decide_arch(modules, {"ss_base_model_version": "sd_v2"}) == (Arch.SD2, [])
    assert decide_arch(modules, {"ss_base_model_version": "sd_v2"}, override=Arch.SDXL) == (Arch.SDXL, [])


def test_override_that_contradicts_the_evidence_is_refused(load_manifest):
    with pytest.raises(BloraError, match="--arch sd1 does not fit this file: its modules are sdxl"):
        decide_arch(_modules(load_manifest("sdxl_lora")), override=Arch.SD1)
    sd1 = _modules(load_manifest("sd1_lora"))  # 768-wide context: exactly SD1
    with pytest.raises(BloraError, match="--arch sd2 does not fit"):
        decide_arch(sd1, override=Arch.SD2)


@pytest.mark.parametrize(
    "stems, expected",
    [
        (["lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_3_linear1"], Arch.FLUX),
        (["lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_unet_single_blocks_0_linear2"], Arch.FLUX),
        (["lora_unet_single_transformer_blocks_0_attn_to_q"], Arch.FLUX),
        (["lora_unet_joint_blocks_0_x_block_attn_qkv"], Arch.SD3),
        (["lora_unet_transformer_blocks_30_attn_to_q"], Arch.SD3),  # past Flux's 19 double blocks
        (["lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te3_encoder_block_0_layer_0_SelfAttention_q"], Arch.FLUX),
        (["lora_te2_text_model_encoder_layers_0_mlp_fc1", "lora_te3_encoder_block_0_layer_0_SelfAttention_q"], Arch.SD3),
    ],
)
def test_dit_families_are_decided_by_name(stems, expected):
    """Was: Flux and SD3 LoRAs refused by name ("does not support yet"); before that, reported as sd1/sdxl."""
    assert decide_arch(dict.fromkeys(stems, (8, 8)))[0] is expected


def test_diffusers_double_blocks_alone_are_ambiguous_between_flux_and_sd3():
    """`transformer_blocks.N` with N < 19 names both Flux's double blocks and SD3's joint blocks: Flux by the
    documented rule, SD3 when the metadata or --arch says so."""
    stems = {"lora_unet_transformer_blocks_0_attn_to_q": (8, 8)}
    assert decide_arch(stems)[0] is Arch.FLUX
    assert decide_arch(stems, override=Arch.SD3)[0] is Arch.SD3
    assert decide_arch(stems, {"modelspec.architecture": "stable-diffusion-3-medium/lora"})[0] is Arch.SD3


def test_unsupported_family_reads_every_key_form():
    assert "diffusion transformer" in unsupported_family(["transformer.blocks.0.attn.to_q.lora_A.weight"])
    assert "diffusion transformer" in unsupported_family(["diffusion_model.layers.0.attention.qkv.lora_A.weight"])
    assert unsupported_family(["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"]) is None
    assert unsupported_family(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"]) is None


def test_unet_modules_that_fit_nothing_are_refused_beside_a_text_encoder():
    modules = {"lora_te_text_model_encoder_layers_0_mlp_fc1": (8, 8), "lora_unet_blocks_0_self_attn_q": (8, 8)}
    with pytest.raises(BloraError, match="no denoiser module fits sd1 .*lora_unet_blocks_0_self_attn_q"):
        decide_arch(modules)


def test_shapes_larger_than_every_family_are_refused():
    with pytest.raises(BloraError, match="module lora_unet_down_blocks_0_resnets_0_conv1: its ΔW is \\[320, 320, 9, 9\\]"):
        decide_arch({"lora_unet_down_blocks_0_resnets_0_conv1": (320, 320, 9, 9)})


@pytest.mark.parametrize(
    "candidates, widths, expected",
    [
        ((Arch.SD1, Arch.SD2), {"context_width": 1024}, (Arch.SD2, True)),
        ((Arch.SD1, Arch.SD2), {"context_width": 768, "linear_projection": True}, (Arch.SD1, True)),
        ((Arch.SD1, Arch.SD2), {"text_width": 1024}, (Arch.SD2, True)),
        ((Arch.SD1, Arch.SD2), {"context_width": 32, "linear_projection": True}, (Arch.SD2, False)),
        ((Arch.SD1, Arch.SD2), {"context_width": 32}, (Arch.SD1, False)),
        ((Arch.SDXL,), {"linear_projection": True}, (Arch.SDXL, False)),
    ],
)
def test_arch_from_widths(candidates, widths, expected):
    assert arch_from_widths(candidates, **widths) == expected


def test_flat_loha_factors_are_no_linear_projection_evidence():
    """A LoHa/LoKr stores a convolution's ΔW flat (2-D): its 2-D proj_in is no sign of SD2's Linear projection."""
    proj = "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert decide_arch({proj: (8, 8)})[0] is Arch.SD2  # a LoRA's 2-D lora_down: Linear, as diffusers ships SD2
    assert decide_arch({proj: (8, 8)}, flat={proj})[0] is Arch.SD1


def test_full_size_flat_conv_factors_fit():
    """A full-size LyCORIS LoHa of a 3×3 conv has a 320×2880 ΔW: the layer flattened, not larger than it."""
    assert decide_arch({"lora_unet_down_blocks_0_resnets_0_conv1": (320, 320 * 9)}, flat={"lora_unet_down_blocks_0_resnets_0_conv1"})[0] is Arch.SD1
