"""The paper's settings as the commands the README gives, each checked to create exactly the paper's blocks.

Training settings go through `blora-tools plan` (the plugin's own resolution on full-size models built on the
meta device); inference settings go through `prune`/`reweight`/`merge` on a full adapter of the tiny model.
"""

import json

import pytest

from blora_tools.cli import main
from blora_tools.taxonomy.blocks import table
from adapters import make_adapter

# The paper's levels on SD1: (input group, output group); out0 is the deepest up block.
LEVELS_SD1 = {"upper": ("in0", "out3"), "middle": ("in1", "out2"), "bottom": ("in2", "out1")}
LEVELS_SDXL = {"upper": ("in0", "out2"), "middle": ("in1", "out1"), "bottom": ("in2", "out0")}


def _plan(runner, arch, args):
    result = runner.invoke(main, ["plan", "--arch", arch, "--network-args", args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    return {group for group, b in doc["blocks"].items() if b["modules"]}, doc


def test_lora_on_all_blocks_trains_every_group_with_attention(runner):
    trained, doc = _plan(runner, "sd1", "preset=character")
    assert trained == set(table("sd1").attention_groups) | {"te"}
    assert doc["total"]["modules"] == 264  # kohya's 192 U-Net + 72 text-encoder modules


@pytest.mark.parametrize("arch, levels", [("sd1", LEVELS_SD1), ("sd2", LEVELS_SD1), ("sdxl", LEVELS_SDXL)])
@pytest.mark.parametrize("level", ["upper", "middle", "bottom"])
def test_blockwise_training_levels_with_locon(runner, arch, levels, level):
    trained, _ = _plan(runner, arch, f"preset={level} conv_dim=4")
    assert trained == set(levels[level])


def test_style_preset_is_upper_and_attention_only_on_sd1(runner):
    trained, doc = _plan(runner, "sd1", "preset=style")
    assert trained == {"in0", "out3"}
    assert doc["blocks"]["in0"]["modules"] == 24 and doc["blocks"]["out3"]["modules"] == 36


def test_style_preset_without_conv_on_sdxl_is_refused(runner):
    result = runner.invoke(main, ["plan", "--arch", "sdxl", "--network-args", "preset=style"])
    assert result.exit_code == 1 and "conv_dim" in result.stderr


@pytest.fixture
def full_adapter(tmp_path):
    return make_adapter(tmp_path / "character.safetensors", "sd1", "locon", blocks="all", per_block=None)


def _groups(runner, path):
    (report,) = json.loads(runner.invoke(main, ["inspect", "--json", "--no-stats", str(path)]).stdout)
    return {g for g, b in report["blocks"].items() if b["modules"]}


@pytest.mark.parametrize("level", ["upper", "middle", "bottom"])
def test_blockwise_inference_by_prune(runner, full_adapter, tmp_path, level):
    out = tmp_path / f"{level}.safetensors"
    result = runner.invoke(main, ["prune", str(full_adapter), "--keep", level, "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert _groups(runner, out) == set(LEVELS_SD1[level])


def test_blockwise_inference_by_reweight(runner, full_adapter, tmp_path):
    out = tmp_path / "style_only.safetensors"
    weights = "unet=0,te=0,in0=1,out3=1"
    result = runner.invoke(main, ["reweight", str(full_adapter), "--weights", weights, "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert _groups(runner, out) == {"in0", "out3"}


@pytest.mark.parametrize("level", ["upper", "middle", "bottom"])
def test_character_plus_style_ablation(runner, tmp_path, level):
    """The ablation: character on all blocks + style restricted to one level, merged in one command."""
    character = make_adapter(tmp_path / "c.safetensors", "sd1", "lora", blocks="in1,mid,out1", seed=1)
    style = make_adapter(tmp_path / "s.safetensors", "sd1", "locon", blocks="all", seed=2)
    out = tmp_path / "merged.safetensors"
    result = runner.invoke(
        main,
        ["merge", str(character), str(style), "--ratios", "1,0.8", "--blocks", "all", "--blocks", level,
         "--method", "concat", "-o", str(out)],
    )
    assert result.exit_code == 0, result.stderr
    assert _groups(runner, out) == {"in1", "mid", "out1"} | set(LEVELS_SD1[level])
