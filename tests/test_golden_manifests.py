"""The golden kohya manifests are in the repository, complete, from one sd-scripts commit, as the generator writes them.

Every manifest test reads tests/data/kohya_manifests/; if a file were missing those tests would error, and this
file says which. The generator (scripts/make_kohya_manifests.py) needs sd-scripts to run; its `-m real` test
regenerates the files and compares (tests/real/test_sd_scripts.py). Here its pure parts are checked
against the committed files: the LBW mapping and the one-record-per-line JSON layout; and the diffusers
manifests against the diffusers installed here.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

SD_MANIFESTS = [f"{arch}_{mode}" for arch in ("sd1", "sd2", "sd2_ckpt", "sdxl") for mode in ("lora", "locon")]
DIT_MANIFESTS = ["flux_dev_lora", "flux_dev_in_dims", "flux_dev_te", "flux_schnell_in_dims",
                 "sd3_medium_lora", "sd3_medium_emb_dims", "sd3_medium_te", "sd35_medium_lora", "sd35_medium_emb_dims",
                 "sd35_large_lora", "sd35_large_emb_dims"]
MANIFESTS = [*SD_MANIFESTS, *DIT_MANIFESTS]
DIFFUSERS = ["diffusers_flux_dev", "diffusers_sd3_medium", "diffusers_sd35_medium", "diffusers_sd35_large"]
FILES = [*MANIFESTS, "lbw_blocks", *DIFFUSERS]


def _generator():
    script = Path(__file__).resolve().parents[1] / "scripts" / "make_kohya_manifests.py"
    spec = importlib.util.spec_from_file_location("make_kohya_manifests", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_folder_holds_every_manifest_and_nothing_else(manifest_dir):
    assert sorted(p.name for p in manifest_dir.iterdir()) == sorted([*(f"{n}.json" for n in FILES), "README.md"])


def test_every_file_records_one_commit_the_generator_and_a_transformers_4_environment(load_manifest):
    kohya = [load_manifest(n) for n in [*MANIFESTS, "lbw_blocks"]]
    assert len({d["kohya_commit"] for d in kohya}) == 1 and re.fullmatch(r"[0-9a-f]{40}", kohya[0]["kohya_commit"])
    docs = [*kohya, *(load_manifest(n) for n in DIFFUSERS)]
    assert {d["generator"] for d in docs} == {"python scripts/make_kohya_manifests.py --sd-scripts SD_SCRIPTS"}
    assert all(d["environment"]["transformers"].startswith("4.") for d in docs)
    assert len({json.dumps(d["environment"]) for d in docs}) == 1


@pytest.mark.parametrize("name", MANIFESTS)
def test_counts_describe_the_module_list(name, load_manifest):
    doc = load_manifest(name)
    modules = doc["modules"]
    assert [m["name"] for m in modules] == sorted({m["name"] for m in modules})
    for component, count in doc["counts"].items():
        assert count == (len(modules) if component == "total" else sum(m["component"] == component for m in modules))
    for component, kinds in doc["counts_by_kind"].items():
        for kind, count in kinds.items():
            assert count == sum(m["component"] == component and m["kind"] == kind for m in modules)


@pytest.mark.parametrize("name", FILES)
def test_files_are_in_the_generators_layout(name, manifest_dir):
    text = (manifest_dir / f"{name}.json").read_text()
    assert _generator().render(json.loads(text)) + "\n" == text


def test_lbw_table_is_the_generators_mapping_of_the_locon_manifests(load_manifest):
    generator = _generator()
    lbw = load_manifest("lbw_blocks")
    for arch, place in (("sd1", generator.sd_lbw), ("sdxl", generator.sdxl_lbw)):
        unet = [m for m in load_manifest(f"{arch}_locon")["modules"] if m["component"] == "unet"]
        expected = {}
        for m in unet:
            block, group, index = place(m["name"])
            assert index == m["kohya_block_index"], m["name"]
            expected[m["name"]] = {"lbw": block, "group": group, "kohya_block_index": index}
        assert lbw[arch] == expected


@pytest.mark.parametrize("name", DIT_MANIFESTS)
def test_dit_manifests_hold_the_counts_the_generator_demands(name, load_manifest):
    """The generator refuses to write a DiT manifest whose counts differ from its table (research/dit.md counts)."""
    arch, variant, mode, kwargs, expected = _generator().DIT_MANIFESTS[name]
    doc = load_manifest(name)
    assert (doc["arch"], doc["variant"], doc["mode"], doc["create_network"]["kwargs"]) == (arch, variant, mode, kwargs)
    assert {k: v for k, v in doc["counts"].items() if k != "total"} == expected


def test_dit_manifests_name_kohyas_layers(load_manifest):
    """Spot checks against sd-scripts' sources: fused Flux qkv/linear1, SD3's pre-only last context block, attn2."""
    flux = {m["name"]: m for m in load_manifest("flux_dev_in_dims")["modules"]}
    assert flux["lora_unet_double_blocks_18_img_attn_qkv"]["org_shape"] == [9216, 3072]
    assert flux["lora_unet_single_blocks_37_linear1"]["org_shape"] == [21504, 3072]
    assert flux["lora_unet_single_blocks_0_linear2"]["down_shape"] == [4, 15360]
    assert flux["lora_unet_guidance_in_in_layer"]["org_shape"] == [3072, 256]
    assert not any("guidance" in m["name"] for m in load_manifest("flux_schnell_in_dims")["modules"])
    sd3 = {m["name"]: m for m in load_manifest("sd35_medium_emb_dims")["modules"]}
    assert sd3["lora_unet_joint_blocks_23_context_block_adaLN_modulation_1"]["org_shape"] == [3072, 1536]
    assert "lora_unet_joint_blocks_23_context_block_attn_proj" not in sd3
    assert sd3["lora_unet_joint_blocks_12_x_block_attn2_qkv"]["org_shape"] == [4608, 1536]
    assert "lora_unet_joint_blocks_13_x_block_attn2_qkv" not in sd3
    assert sd3["lora_unet_joint_blocks_0_x_block_adaLN_modulation_1"]["org_shape"] == [13824, 1536]
    assert sd3["lora_unet_x_embedder_proj"]["kind"] == "conv2x2"


@pytest.mark.parametrize("name", DIFFUSERS)
def test_diffusers_manifests_match_the_installed_diffusers(name, load_manifest):
    """The split layer names were recorded under sd-scripts' diffusers pin; the diffusers here builds the same."""
    generator = _generator()
    fresh = generator.diffusers_manifest(name, {})
    golden = load_manifest(name)
    assert fresh["layers"] == golden["layers"] and fresh["config"] == golden["config"]
