"""kohya_plugin.plan: modules and parameters per block from full-size models on the meta device."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest

from blora_tools.errors import SpecError
from blora_tools.jsonio import loads_strict
from blora_tools.models import build_text_encoders, build_unet
from kohya_plugin.blockwise import create_network
from kohya_plugin.plan import plan_network


@pytest.mark.parametrize("arch, name", [("sd1", "sd1_lora"), ("sdxl", "sdxl_lora")])
def test_default_plan_counts_equal_the_manifest(arch, name, load_manifest):
    manifest = load_manifest(name)
    plan = plan_network(arch, "")
    doc = json.loads(plan.to_json())
    assert doc["arch"] == arch and doc["warnings"] == []
    assert doc["total"]["modules"] == manifest["counts"]["total"]
    params = sum(m["rank"] * (m["down_shape"][1] * (m["down_shape"][2] * m["down_shape"][3]
                                                    if len(m["down_shape"]) == 4 else 1) + m["up_shape"][0])
                 for m in manifest["modules"])
    assert doc["total"]["params"] == params
    for group, entry in doc["blocks"].items():
        assert {"modules", "params"} <= set(entry), group


def test_style_plan_sd1():
    plan = plan_network("sd1", "preset=style conv_dim=8")
    doc = plan.to_dict()
    trained = {g for g, e in doc["blocks"].items() if e["modules"]}
    assert trained == {"in0", "out3"}
    assert doc["blocks"]["in0"]["modules"] == 31 and doc["blocks"]["out3"]["modules"] == 48  # kohya LoCon counts
    assert doc["blocks"]["in0"]["conv_rank"] == 8 and doc["blocks"]["mid"]["rank"] == 0
    assert list(doc["blocks"]) == ["te", "in0", "in1", "in2", "in3", "mid", "out0", "out1", "out2", "out3"]


def test_plan_equals_the_network_that_training_builds():
    args = {"block_ranks": "in1=16,out1=2", "conv_dim": "4", "te_dim": "2"}
    plan = plan_network("sd2", args, network_dim=8, network_alpha=4)
    tes, unet = build_text_encoders("sd2", "full", "meta"), build_unet("sd2", "full", "meta")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network = create_network(1.0, 8, 4, None, tes[0], unet, **args)
    assert plan.params == sum(p.numel() for p in network.parameters())
    assert plan.modules == len(network.unet_loras) + len(network.text_encoder_loras)


def test_sdxl_style_plan_needs_conv_dim():
    with pytest.raises(SpecError, match="conv_dim is needed"):
        plan_network("sdxl", "preset=style")
    doc = plan_network("sdxl", "preset=style conv_dim=8").to_dict()
    assert {g for g, e in doc["blocks"].items() if e["modules"]} == {"in0", "out2"}
    assert list(doc["blocks"])[:2] == ["te1", "te2"]


def test_plan_reports_warnings():
    plan = plan_network("sd1", "blocks=in3,out3")
    assert len(plan.warnings) == 1 and "in3" in plan.warnings[0] and "conv_dim" in plan.warnings[0]
    assert plan.to_dict()["warnings"] == list(plan.warnings)
    with pytest.raises(SpecError, match="unknown key"):
        plan_network("sd1", "presett=style")


def test_plan_json_never_holds_nan_or_infinity():
    """A plan holding a non-finite number (here an lr weight of inf, set past the parser) still writes strict
    JSON: the number becomes null (json.dumps alone wrote `Infinity`, which no strict reader accepts)."""
    plan = plan_network("sd1", "")
    blocks = {b: dataclasses.replace(s, lr_weight=math.inf) for b, s in plan.spec.blocks.items()}
    odd = dataclasses.replace(plan, spec=dataclasses.replace(plan.spec, blocks=blocks))
    assert "Infinity" in json.dumps(odd.to_dict())
    doc = loads_strict(odd.to_json())
    assert doc["blocks"]["in0"]["lr_weight"] is None and doc["blocks"]["in0"]["rank"] == 4


@pytest.mark.parametrize("arch, name, variant, args", [
    ("flux", "flux_dev_te", None, "train_t5xxl=true"),
    ("sd3", "sd3_medium_emb_dims", "sd3-medium", "te_dim=0 emb_dims=[4,4,4,4,4,4]"),
])
def test_dit_plan_counts_per_block_equal_the_manifest(arch, name, variant, args, load_manifest):
    """Flux.1/SD3: one row per block; kohya's own modules (golden manifests), counted per block."""
    from blora_tools.taxonomy.blocks import place

    manifest = load_manifest(name)
    doc = plan_network(arch, args, variant=variant).to_dict()
    expected: dict[str, list[int]] = {}
    for m in manifest["modules"]:
        block = place(m["name"], arch).block
        entry = expected.setdefault("BASE" if block == "OTHER" else block, [0, 0])
        entry[0] += 1
        entry[1] += m["rank"] * (math.prod(m["down_shape"][1:]) + m["up_shape"][0])
    got = {b: [e["modules"], e["params"]] for b, e in doc["blocks"].items() if e["modules"]}
    assert got == expected
    assert doc["total"]["modules"] == manifest["counts"]["total"]


def test_dit_plan_refuses_what_training_refuses():
    with pytest.raises(SpecError, match="x_attn_dim is a SD3 argument"):
        plan_network("flux", "x_attn_dim=4")
    doc = plan_network("flux", "block_ranks=double=8,S10.linear1.mlp=2 split_qkv=true", network_dim=4).to_dict()
    assert doc["blocks"]["D00"]["modules"] == 10 and doc["blocks"]["S00"]["modules"] == 3
    s10 = doc["blocks"]["S10"]["params"]
    linear1 = 4 * 2 * 3072 + 2 * 21504  # 4 parts of rank 2: each a [2, 3072] down and its rows' [rows, 2] up
    assert s10 == linear1 + 4 * (15360 + 3072) + 4 * (3072 + 9216)


@pytest.mark.parametrize("arch, args", [("flux", {"block_ranks": "BASE=8"}), ("sd3", {"block_ranks": "base.out=8"}),
                                        ("flux", {"blocks": "base.in"})])
def test_plan_refuses_a_base_value_with_trainings_message(arch, args):
    """A value kohya's rule would ignore (BASE's embedders without in_dims/emb_dims) is refused by plan with the
    very line training raises; wide selections that merely include BASE stay quiet."""
    from dit_models import build

    tes, model = build(arch)
    with pytest.raises(SpecError) as trained:
        create_network(1.0, 4, 1.0, None, tes, model, **args)
    with pytest.raises(SpecError) as planned:
        plan_network(arch, args)
    assert str(planned.value) == str(trained.value) and "BASE's layers only through" in str(planned.value)
    quiet = plan_network(arch, "preset=all")
    assert quiet.warnings == () and quiet.blocks["BASE"].modules == 0
    assert (quiet.modules, quiet.params) == (plan_network(arch, "").modules, plan_network(arch, "").params)


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_sd_plan_refuses_a_value_for_in00_with_trainings_message(arch):
    """IN00 (conv_in) holds no layer kohya's networks.lora wraps: plan refuses `block_ranks=IN00=8` with the very
    line training raises, and plans `IN00=0`, a wider range or a preset as the default network, with no word on IN00
    (explicit selections keep their usual note on blocks without attention layers)."""
    tes, unet = build_text_encoders(arch), build_unet(arch)
    with pytest.raises(SpecError) as trained:
        create_network(1.0, 4, 1.0, None, tes if arch == "sdxl" else tes[0], unet, block_ranks="IN00=8")
    with pytest.raises(SpecError) as planned:
        plan_network(arch, "block_ranks=IN00=8")
    assert str(planned.value) == str(trained.value)
    assert "wraps no layer there (conv_in)" in str(planned.value)
    default = plan_network(arch, "")
    for args in ("block_ranks=IN00=0", "block_ranks=IN00-IN02=4", "preset=character", "blocks=all"):
        quiet = plan_network(arch, args)
        assert (quiet.modules, quiet.params) == (default.modules, default.params), args
        assert not any("IN00" in w or "conv_in" in w for w in quiet.warnings), args
