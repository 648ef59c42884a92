"""Architecture detection from names, widths and metadata."""

import pytest

from blora_tools.taxonomy.arch import Arch, arch_from_metadata, detect_arch


def _manifest_inputs(manifest):
    stems = [m["name"] for m in manifest["modules"]]
    widths = {m["name"]: m["down_shape"][1] for m in manifest["modules"]}
    linear_proj_in = any(m["name"].endswith("_proj_in") and len(m["down_shape"]) == 2 for m in manifest["modules"])
    return stems, widths, linear_proj_in


@pytest.mark.parametrize("name", ["sd1_lora", "sd1_locon", "sd2_lora", "sd2_ckpt_lora", "sd2_ckpt_locon", "sdxl_lora", "sdxl_locon"])
def test_manifests_are_detected(name, load_manifest):
    manifest = load_manifest(name)
    stems, widths, linear = _manifest_inputs(manifest)
    arch, warnings = detect_arch(stems, widths, {}, linear)
    assert arch.value == manifest["arch"] and warnings == []


@pytest.mark.parametrize("name", ["sd1_lora", "sd2_lora", "sdxl_lora"])
def test_unet_only_files_without_widths(name, load_manifest):
    """Names alone: SDXL by depth and level layout; SD2 (diffusers) by its Linear proj_in."""
    manifest = load_manifest(name)
    stems, _, linear = _manifest_inputs(manifest)
    unet = [s for s in stems if s.startswith("lora_unet_")]
    assert detect_arch(unet, {}, {}, linear)[0].value == manifest["arch"]


def test_metadata_disagreement_is_a_warning(load_manifest):
    stems, widths, linear = _manifest_inputs(load_manifest("sdxl_lora"))
    arch, warnings = detect_arch(stems, widths, {"ss_base_model_version": "sd_v1"}, linear)
    assert arch is Arch.SDXL
    assert len(warnings) == 1 and "sd1" in warnings[0] and "sdxl" in warnings[0]


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


def test_nothing_known_is_unknown_unless_metadata_says():
    assert detect_arch(["bundle_emb.x"], {}, {})[0] is Arch.UNKNOWN
    assert detect_arch([], {}, {"ss_base_model_version": "sdxl_base_v1-0"})[0] is Arch.SDXL


def test_sdxl_style_only_ldm_file_is_sdxl(load_manifest):
    """Regression: an SDXL LoCon file with only the outer level (no attention, no text encoder) was read as SD1."""
    stems = [m["name"] for m in load_manifest("sdxl_locon")["modules"] if m["name"].startswith(("lora_unet_input_blocks_1_", "lora_unet_output_blocks_7_"))]
    assert stems
    assert detect_arch(stems, {}, {}, False)[0] is Arch.SDXL
    assert detect_arch(stems, {}, {"ss_base_model_version": "sdxl_base_v1-0"}, False) == (Arch.SDXL, [])


def test_tiny_sdxl_with_linear_proj_in_is_not_sd2():
    """Regression: LDM names with Linear proj_in and shallow attention were read as SD2."""
    stems = ["lora_unet_input_blocks_4_1_proj_in", "lora_unet_middle_block_1_proj_out"]
    assert detect_arch(stems, {}, {}, True)[0] is Arch.SDXL


def test_inconclusive_names_yield_to_metadata():
    stems = ["lora_unet_mid_block_attentions_0_proj_in"]
    assert detect_arch(stems, {}, {"ss_base_model_version": "sd_v2"}) == (Arch.SD2, [])
