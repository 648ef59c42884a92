"""kohya_plugin.targets against kohya's golden manifests (full-size models on the meta device) and tiny models."""

from __future__ import annotations

from functools import cache

import pytest
from torch import nn

from blora_tools.errors import SpecError
from blora_tools.models import build_text_encoders, build_unet
from blora_tools.taxonomy.arch import Arch
from blora_tools.taxonomy.blocks import OTHER, place, table
from kohya_plugin.targets import Target, detect_unet_arch, find_targets, layer_kind, unwrapped_unet_blocks

MANIFESTS = [
    "sd1_lora",
    "sd1_locon",
    "sd2_lora",
    "sd2_locon",
    "sd2_ckpt_lora",
    "sd2_ckpt_locon",
    "sdxl_lora",
    "sdxl_locon",
]
RANK = 4


@cache
def full_models(arch: str, variant: str | None = None) -> tuple[list[nn.Module], nn.Module]:
    return build_text_encoders(arch, "full", "meta"), build_unet(arch, "full", "meta", variant=variant)


@cache
def tiny_models(arch: str) -> tuple[list[nn.Module], nn.Module]:
    return build_text_encoders(arch), build_unet(arch)


def expected_factor_shapes(kind: str, org_shape: list[int]) -> tuple[list[int], list[int]]:
    out_features, in_features = org_shape[0], org_shape[1]
    if kind == "linear":
        return [RANK, in_features], [out_features, RANK]
    k = org_shape[2]
    return [RANK, in_features, k, k], [out_features, RANK, 1, 1]


@pytest.mark.parametrize("manifest_name", MANIFESTS)
def test_targets_equal_kohya_manifest(manifest_name, load_manifest):
    manifest = load_manifest(manifest_name)
    tes, unet = full_models(manifest["arch"], manifest["variant"])
    arch, targets = find_targets(tes, unet, include_conv=manifest["mode"] == "locon")

    assert arch is Arch(manifest["arch"])
    got = {t.name: t for t in targets}
    assert len(got) == len(targets), "duplicate target names"
    expected = {m["name"]: m for m in manifest["modules"]}
    assert set(got) == set(expected), (sorted(set(expected) - set(got))[:5], sorted(set(got) - set(expected))[:5])
    for name, entry in expected.items():
        target = got[name]
        shape = list(target.layer.weight.shape)
        assert target.kind == entry["kind"], name
        assert shape == entry["org_shape"], name
        down, up = expected_factor_shapes(target.kind, shape)
        assert down == entry["down_shape"] and up == entry["up_shape"], name
        assert target.placement.component.value == entry["component"], name
        index = -1 if target.placement.kohya_index is None else target.placement.kohya_index
        assert index == entry["kohya_block_index"], name


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_unwrapped_unet_blocks_are_those_kohya_gives_no_module(arch, load_manifest):
    """The U-Net blocks with no module in kohya's own LoCon manifest (conv targets too) are exactly
    `unwrapped_unet_blocks`: IN00 (conv_in) and the embeddings/conv_out; the full-size model's targets agree."""
    manifest = load_manifest(f"{arch}_locon")
    kohya = {place(m["name"], Arch(arch)).block for m in manifest["modules"] if m["name"].startswith("lora_unet_")}
    tes, unet = full_models(arch)
    ours = {t.placement.block for t in find_targets(tes, unet, include_conv=True)[1] if t.name.startswith("lora_unet_")}
    blocks = set(table(arch).unet_lbw) | {OTHER}
    assert set(unwrapped_unet_blocks(Arch(arch))) == blocks - kohya == blocks - ours == {"IN00", OTHER}
    assert unwrapped_unet_blocks(Arch(arch))["IN00"] == ("conv_in",)


def test_conv_network_does_not_leak_into_later_networks(load_manifest):
    for arch in ("sd1", "sdxl"):
        tes, unet = full_models(arch)
        _, locon = find_targets(tes, unet, include_conv=True)
        _, lora = find_targets(tes, unet, include_conv=False)
        assert len(locon) == load_manifest(f"{arch}_locon")["counts"]["total"]
        assert len(lora) == load_manifest(f"{arch}_lora")["counts"]["total"]
        assert [t.name for t in find_targets(tes, unet, include_conv=False)[1]] == [t.name for t in lora]


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_tiny_models_reach_every_group(arch):
    tes, unet = tiny_models(arch)
    layout = table(arch)
    got_arch, lora = find_targets(tes, unet, include_conv=False)
    assert got_arch is Arch(arch)
    lora_groups = {t.placement.group for t in lora}
    assert layout.attention_groups <= lora_groups
    assert not (set(layout.unet_groups) - layout.attention_groups) & lora_groups
    assert all(t.kind in ("linear", "conv1x1") for t in lora)

    _, locon = find_targets(tes, unet, include_conv=True)
    assert {t.placement.group for t in locon} == set(layout.unet_groups) | {c.value for c in layout.text_encoders}
    assert {t.kind for t in locon} >= {"linear", "conv1x1", "conv3x3"}
    assert {t.name for t in lora} < {t.name for t in locon}


def test_tiny_sdxl_has_deep_transformer_names():
    _, unet = tiny_models("sdxl")
    _, targets = find_targets(None, unet, include_conv=False)
    assert any("_transformer_blocks_1_" in t.name for t in targets)
    assert any(t.name.startswith("lora_unet_middle_block_1_") for t in targets)


@pytest.mark.parametrize("arch,size", [(a, s) for a in ("sd1", "sd2", "sdxl") for s in ("tiny", "full")])
def test_text_encoder_names_are_transformers4_canonical(arch, size):
    tes, unet = tiny_models(arch) if size == "tiny" else full_models(arch)
    _, targets = find_targets(tes, unet, include_conv=False)
    te = [t for t in targets if t.placement.component.value != "unet"]
    layers = tes[0].config.num_hidden_layers + (tes[1].config.num_hidden_layers if len(tes) == 2 else 0)
    assert len(te) == 6 * layers
    prefixes = ("lora_te_",) if arch != "sdxl" else ("lora_te1_", "lora_te2_")
    for t in te:
        prefix = next(p for p in prefixes if t.name.startswith(p))
        assert t.name.startswith(prefix + "text_model_encoder_layers_"), t.name
        assert t.kind == "linear" and t.placement.lbw == "BASE" and t.placement.kohya_index is None


def test_targets_are_the_model_layers_in_order():
    tes, unet = tiny_models("sd1")
    _, targets = find_targets(tes, unet, include_conv=True)
    assert [t.placement.component.value for t in targets[:1]] == ["te"]
    components = [t.placement.component.value for t in targets]
    assert components == sorted(components, key=lambda c: c == "unet")  # text encoder first, then U-Net
    unet_layers = {id(m) for m in unet.modules()}
    te_layers = {id(m) for m in tes[0].modules()}
    for t in targets:
        assert isinstance(t, Target)
        assert id(t.layer) in (unet_layers if t.placement.component.value == "unet" else te_layers)
        assert layer_kind(t.layer) == t.kind
    # U-Net targets follow named_modules order.
    order = {id(m): i for i, m in enumerate(unet.modules())}
    unet_ids = [order[id(t.layer)] for t in targets if t.placement.component.value == "unet"]
    assert unet_ids == sorted(unet_ids)


def test_text_encoder_argument_forms():
    tes, unet = tiny_models("sd1")
    _, as_list = find_targets(tes, unet, include_conv=False)
    _, as_module = find_targets(tes[0], unet, include_conv=False)
    _, without = find_targets(None, unet, include_conv=False)
    assert [t.name for t in as_list] == [t.name for t in as_module]
    assert [t.name for t in without] == [t.name for t in as_list if t.name.startswith("lora_unet_")]
    with pytest.raises(SpecError):
        find_targets([tes[0], tes[0]], unet, include_conv=False)

    xl_tes, xl_unet = tiny_models("sdxl")
    with pytest.raises(SpecError):
        find_targets(xl_tes[0], xl_unet, include_conv=False)
    _, only_te2 = find_targets([None, xl_tes[1]], xl_unet, include_conv=False)
    assert not any(t.name.startswith("lora_te1_") for t in only_te2)
    assert any(t.name.startswith("lora_te2_text_model_") for t in only_te2)


def test_detect_unet_arch():
    assert detect_unet_arch(full_models("sd1")[1]) is Arch.SD1
    assert detect_unet_arch(full_models("sd2")[1]) is Arch.SD2
    assert detect_unet_arch(full_models("sd2", "ckpt")[1]) is Arch.SD2  # conv proj_in, 1024-wide context
    assert detect_unet_arch(full_models("sdxl")[1]) is Arch.SDXL
    for arch in ("sd1", "sd2", "sdxl"):
        assert detect_unet_arch(tiny_models(arch)[1]) is Arch(arch)
    with pytest.raises(SpecError):
        detect_unet_arch(nn.Sequential(nn.Linear(2, 2)))
