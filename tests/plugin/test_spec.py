"""blora_tools.spec: BlockSpec lookups and the `blora_spec` JSON contract."""

from __future__ import annotations

import json

import pytest

from blora_tools.errors import SpecError
from blora_tools.spec import FORMAT, BlockSetting, BlockSpec
from blora_tools.taxonomy.blocks import place, table
from kohya_plugin.args import parse_network_args

CONTRACT_FIELDS = {"rank", "alpha", "conv_rank", "conv_alpha", "lr_weight"}


def test_json_contract_for_style_preset():
    spec = parse_network_args({"preset": "style", "conv_dim": "8", "conv_alpha": "4"}, "sd1", 16, 8).spec
    doc = json.loads(spec.to_json({"file_alpha": 8.0}))
    assert doc["format"] == FORMAT and doc["arch"] == "sd1" and doc["algo"] == "locon"
    assert doc["file_alpha"] == 8.0
    assert list(doc["blocks"]) == ["te", "in0", "in1", "in2", "in3", "mid", "out0", "out1", "out2", "out3"]
    for group, entry in doc["blocks"].items():
        assert CONTRACT_FIELDS <= set(entry)
        trained = group in ("in0", "out3")
        assert (entry["rank"], entry["conv_rank"]) == ((16, 8) if trained else (0, 0)), group
    assert doc["blocks"]["in0"]["alpha"] == 8.0 and doc["blocks"]["in0"]["conv_alpha"] == 4.0
    assert set(doc["lbw"]) == set(table("sd1").blocks)


def test_round_trip_with_slots_and_mixed_groups():
    dims = ["4"] * 23
    dims[10:13] = ["2", "8", "0"]
    spec = parse_network_args({"block_dims": ",".join(dims), "block_lr": "out1=0.5"}, "sdxl").spec
    back = BlockSpec.from_json(spec.to_json())
    assert back == spec
    summary = json.loads(spec.to_json())["blocks"]
    assert summary["mid"]["rank"] == 8 and summary["mid"]["mixed"] is True
    assert summary["out1"]["lr_weight"] == 0.5 and "mixed" not in summary["out1"]


def test_rank_alpha_lookup_by_kind_and_alpha_zero_means_rank():
    spec = parse_network_args({"conv_dim": "6", "block_alphas": "in1=0"}, "sd1", 8, 2).spec
    attn = place("lora_unet_down_blocks_1_attentions_0_proj_in", "sd1")
    conv = place("lora_unet_down_blocks_1_resnets_0_conv1", "sd1")
    assert spec.rank_alpha(attn, "conv1x1") == (8, 8.0)
    assert spec.rank_alpha(conv, "conv3x3") == (6, 1.0)
    assert spec.rank_alpha(conv, "linear") == (8, 8.0)


def test_slot_lookup_for_sdxl_middle_block():
    dims = ["4"] * 23
    dims[10:13] = ["2", "8", "0"]
    spec = parse_network_args({"block_dims": ",".join(dims)}, "sdxl").spec
    assert spec.rank_alpha(place("lora_unet_middle_block_1_proj_in", "sdxl"), "linear")[0] == 8
    assert spec.rank_alpha(place("lora_unet_middle_block_0_emb_layers_1", "sdxl"), "linear")[0] == 2
    assert spec.rank_alpha(place("lora_unet_middle_block_2_emb_layers_1", "sdxl"), "linear")[0] == 0


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        json.dumps({"arch": "sd1"}),
        json.dumps({"format": FORMAT, "arch": "sd9", "lbw": {}}),
        json.dumps({"format": FORMAT, "arch": "sd1"}),
        json.dumps({"format": FORMAT, "arch": "sd1", "lbw": {"IN01": {"rank": "x"}}}),
        json.dumps({"format": FORMAT, "arch": "sd1", "lbw": {"IN01": {"rank": -1}}}),
    ],
)
def test_from_json_rejects_what_it_cannot_read(text):
    with pytest.raises(SpecError):
        BlockSpec.from_json(text)


def test_spec_needs_every_block():
    with pytest.raises(SpecError, match="missing"):
        BlockSpec("sd1", "lora", {"te": BlockSetting(4)})
