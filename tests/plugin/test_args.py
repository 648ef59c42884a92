"""kohya_plugin.args: --network_args strings → BlockSpec, with every bad value rejected by name."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from blora_tools.errors import SpecError
from blora_tools.spec import Algo
from blora_tools.taxonomy.blocks import table
from kohya_plugin.args import (
    KEY_MODELS,
    KNOWN_KEYS,
    NETWORK_ARGS,
    network_args_markdown,
    parse_network_args,
    parse_weights_args,
    read_multiplier,
    split_network_args,
)


def ranks(parsed, field="rank"):
    return {b: getattr(s, field) for b, s in parsed.spec.blocks.items()}


def trained_unet_lbw(parsed):
    return {b for b in parsed.spec.trained_blocks if b.startswith(("IN", "M", "OUT"))}


def test_defaults_match_kohya_networks_lora():
    parsed = parse_network_args({}, "sd1")
    spec = parsed.spec
    assert spec.algo is Algo.LORA and not spec.include_conv
    assert all(s.rank == 4 and s.alpha == 1.0 and s.lr_weight == 1.0 for s in spec.blocks.values())
    assert parsed.options.dropout is None and not parsed.options.verbose
    assert not parsed.explicit_blocks


def test_network_dim_and_alpha_and_te_settings():
    parsed = parse_network_args({"te_dim": "2", "te_alpha": "0.5"}, "sdxl", 16, 8)
    assert parsed.spec.blocks["te1"].rank == 2 and parsed.spec.blocks["te2"].alpha == 0.5
    assert parsed.spec.blocks["IN04"].rank == 16 and parsed.spec.blocks["IN04"].alpha == 8.0
    assert parse_network_args({"te_dim": "0"}, "sd1").spec.blocks["te"].rank == 0


@pytest.mark.parametrize(
    "arch, preset, expected",
    [
        ("sd1", "style", {"IN01", "IN02", "IN03", "OUT09", "OUT10", "OUT11"}),
        ("sd1", "upper", {"IN01", "IN02", "IN03", "OUT09", "OUT10", "OUT11"}),
        ("sd1", "middle", {"IN04", "IN05", "IN06", "OUT06", "OUT07", "OUT08"}),
        ("sd1", "bottom", {"IN07", "IN08", "IN09", "OUT03", "OUT04", "OUT05"}),
        ("sdxl", "style", {"IN01", "IN02", "IN03", "OUT06", "OUT07", "OUT08"}),
        ("sdxl", "bottom", {"IN07", "IN08", "OUT00", "OUT01", "OUT02"}),
    ],
)
def test_presets_train_exactly_the_paper_blocks(arch, preset, expected):
    parsed = parse_network_args({"preset": preset, "conv_dim": "4"}, arch)
    assert trained_unet_lbw(parsed) == expected
    assert parsed.explicit_blocks
    te = {c.value for c in table(arch).text_encoders}
    assert not (parsed.spec.trained_blocks & te), "the paper's style/level presets train no text encoder"


@pytest.mark.parametrize("preset", ["all", "character", "ALL"])
def test_preset_all(preset):
    parsed = parse_network_args({"preset": preset}, "sd1")
    assert parsed.spec.trained_blocks >= {"te", "IN01", "M00", "OUT11"}


def test_blocks_selector_with_not():
    parsed = parse_network_args({"blocks": "unet NOT mid"}, "sd1")
    assert "M00" not in parsed.spec.trained_blocks and "te" not in parsed.spec.trained_blocks
    assert "IN01" in parsed.spec.trained_blocks


def test_named_block_ranks_alphas_and_conv():
    parsed = parse_network_args(
        {
            "block_ranks": "in0=16,out3=8,IN02=2",
            "block_alphas": "in0=8",
            "conv_dim": "4",
            "conv_block_ranks": "mid=0",
            "conv_block_alphas": "out3=2",
        },
        "sd1",
        4,
        1,
    )
    r = ranks(parsed)
    assert r["IN01"] == 16 and r["IN02"] == 2 and r["OUT09"] == 8 and r["M00"] == 4 and r["te"] == 4
    assert parsed.spec.blocks["IN01"].alpha == 8.0 and parsed.spec.blocks["IN04"].alpha == 1.0
    assert parsed.spec.blocks["M00"].conv_rank == 0 and parsed.spec.blocks["IN04"].conv_rank == 4
    assert parsed.spec.blocks["OUT10"].conv_alpha == 2.0
    assert parsed.spec.algo is Algo.LOCON


def test_kohya_positional_block_dims_sd1():
    dims = ",".join(str(i) for i in range(25))
    alphas = ",".join(str(i / 2) for i in range(25))
    parsed = parse_network_args({"block_dims": dims, "block_alphas": alphas, "conv_block_dims": dims}, "sd1")
    r = ranks(parsed)
    assert r["IN00"] == 0 and r["IN05"] == 5 and r["M00"] == 12 and r["OUT00"] == 13 and r["OUT11"] == 24
    assert parsed.spec.blocks["OUT11"].alpha == 12.0
    assert ranks(parsed, "conv_rank")["IN07"] == 7
    assert parsed.spec.blocks["OUT05"].conv_alpha == 1.0, "kohya: conv_block_alphas default to conv_alpha (1.0)"


def test_kohya_positional_sdxl_middle_block_slots():
    dims = [4] * 23
    dims[10], dims[11], dims[12] = 2, 8, 2
    parsed = parse_network_args({"block_dims": ",".join(map(str, dims))}, "sdxl")
    spec = parsed.spec
    assert {i: s.rank for i, s in spec.slots.items()} == {10: 2, 11: 8, 12: 2}
    assert spec.blocks["M00"].rank == 8
    same = parse_network_args({"block_dims": ",".join(["3"] * 23)}, "sdxl").spec
    assert not same.slots and same.blocks["M00"].rank == 3


@pytest.mark.parametrize(
    "name, expected",
    [
        ("sine", [math.sin(math.pi * i / 11 / 2) for i in range(12)]),
        ("cosine", [math.sin(math.pi * i / 11 / 2) for i in reversed(range(12))]),
        ("linear", [i / 11 for i in range(12)]),
        ("reverse_linear", [i / 11 for i in reversed(range(12))]),
        ("zeros+0.5", [0.5] * 12),
        ("linear+1", [1 + i / 11 for i in range(12)]),
    ],
)
def test_kohya_lr_weight_presets(name, expected):
    parsed = parse_network_args({"down_lr_weight": name, "up_lr_weight": "1,1,1,1,1,1,1,1,1,1,1,0.25"}, "sd1")
    lr = {b: s.lr_weight for b, s in parsed.spec.blocks.items()}
    downs = [lr[f"IN{i:02d}"] for i in range(12)]
    expected = [w if w > 0 else 0.0 for w in expected]
    assert downs == pytest.approx(expected)
    assert lr["OUT11"] == 0.25 and lr["M00"] == 1.0 and lr["te"] == 1.0
    assert parsed.lr_given
    # a block with learning-rate weight 0 is not trained (kohya removes it)
    for block in (f"IN{i:02d}" for i in range(12)):
        assert (parsed.spec.blocks[block].rank == 0) == (lr[block] == 0)


def test_kohya_lr_lists_empties_padding_and_threshold():
    parsed = parse_network_args(
        {"down_lr_weight": "1,,0.5", "mid_lr_weight": "0.05", "block_lr_zero_threshold": "0.1"}, "sd1"
    )
    lr = {b: s.lr_weight for b, s in parsed.spec.blocks.items()}
    assert lr["IN00"] == 1.0 and lr["IN01"] == 0.0 and lr["IN02"] == 0.5 and lr["IN11"] == 1.0
    assert lr["M00"] == 0.0 and parsed.spec.blocks["M00"].rank == 0
    assert any("down_lr_weight" in n and "1 (as kohya)" in n for n in parsed.notes)


def test_sdxl_mid_lr_weight_three_values():
    parsed = parse_network_args({"mid_lr_weight": "1,0.5,1"}, "sdxl")
    assert {i: s.lr_weight for i, s in parsed.spec.slots.items()} == {10: 1.0, 11: 0.5, 12: 1.0}


def test_block_lr_named_and_te_zero():
    parsed = parse_network_args({"block_lr": "in0=0.5,te=0"}, "sd1")
    assert parsed.spec.blocks["IN01"].lr_weight == 0.5 and parsed.spec.blocks["OUT11"].lr_weight == 1.0
    assert parsed.spec.blocks["te"].rank == 0, "lr weight 0 means not trained"


@pytest.mark.parametrize("raw, value", [("true", True), ("1", True), ("YES", True), ("false", False), ("0", False),
                                        ("no", False)])
def test_strict_booleans(raw, value):
    assert parse_network_args({"verbose": raw}, "sd1").options.verbose is value


def test_options_and_injected_dropout():
    parsed = parse_network_args(
        {"dropout": None, "rank_dropout": "0.25", "module_dropout": "0.1", "loraplus_lr_ratio": "16"},
        "sd1",
        neuron_dropout=0.1,
    )
    o = parsed.options
    assert (o.dropout, o.rank_dropout, o.module_dropout) == (0.1, 0.25, 0.1)
    assert o.unet_plus_ratio == 16 and o.te_plus_ratio == 16
    o = parse_network_args({"dropout": 0.2, "loraplus_unet_lr_ratio": "4"}, "sd1").options
    assert o.dropout == 0.2 and o.unet_plus_ratio == 4 and o.te_plus_ratio is None


def test_algo_locon_defaults_conv_to_network_dim():
    spec = parse_network_args({"algo": "locon"}, "sd1", 8).spec
    assert spec.include_conv and spec.blocks["IN04"].conv_rank == 8 and spec.blocks["IN04"].conv_alpha == 1.0


@pytest.mark.parametrize(
    "args, fragments",
    [
        ({"presett": "style"}, ["unknown key presett", "known keys on sd1:", "preset"]),
        ({"preset": "styel"}, ["preset='styel'", "all, character, style, upper, middle, bottom"]),
        ({"blocks": "in9"}, ["blocks='in9'", "in9"]),
        ({"block_ranks": "in0=4.5"}, ["block_ranks", "whole number"]),
        ({"block_ranks": "in0=-1"}, ["block_ranks", "≥ 0"]),
        ({"block_ranks": "foo=3"}, ["block_ranks", "foo"]),
        ({"conv_dim": "abc"}, ["conv_dim='abc'", "whole number"]),
        ({"conv_dim": "-2"}, ["conv_dim='-2'", "negative"]),
        ({"conv_dim": "4", "conv_alpha": "x"}, ["conv_alpha='x'", "number"]),
        ({"te_dim": "1.5"}, ["te_dim='1.5'"]),
        ({"te_alpha": "nan"}, ["te_alpha='nan'"]),
        ({"algo": "loha"}, ["algo='loha'", "lora, locon"]),
        ({"dropout": "1.5"}, ["dropout='1.5'", "0 ≤ p < 1"]),
        ({"rank_dropout": "1"}, ["rank_dropout='1'"]),
        ({"module_dropout": "-0.1"}, ["module_dropout"]),
        ({"loraplus_lr_ratio": "0"}, ["loraplus_lr_ratio='0'", "> 0"]),
        ({"verbose": "maybe"}, ["verbose='maybe'", "true/false, 1/0 or yes/no"]),
        ({"block_dims": "4,4,4"}, ["block_dims", "25 comma-separated values", "not 3"]),
        ({"block_dims": ",".join(["4"] * 24) + ",x"}, ["block_dims", "whole number"]),
        ({"conv_block_dims": ",".join(["4"] * 23)}, ["conv_block_dims", "takes 25"]),
        ({"block_ranks": ",".join(["4"] * 25)}, ["block_ranks", "block_dims"]),
        ({"down_lr_weight": "sinus"}, ["down_lr_weight='sinus'", "cosine, sine, linear, reverse_linear, zeros"]),
        ({"down_lr_weight": "0.5"}, ["down_lr_weight='0.5'", "12 comma-separated"]),
        ({"up_lr_weight": ",".join(["1"] * 13)}, ["up_lr_weight", "at most 12"]),
        ({"mid_lr_weight": "1,1"}, ["mid_lr_weight", "at most 1"]),
        ({"block_lr": "in0=x"}, ["block_lr", "not a number"]),
        ({"block_lr_zero_threshold": "low"}, ["block_lr_zero_threshold='low'"]),
        ({"preset": "style", "blocks": "in0"}, ["preset or blocks"]),
        ({"block_dims": ",".join(["4"] * 25), "block_ranks": "in0=2"}, ["block_dims or block_ranks"]),
        ({"block_lr": "in0=1", "down_lr_weight": "sine"}, ["block_lr or kohya's down_lr_weight"]),
        ({"algo": "lora", "conv_dim": "4"}, ["algo=lora", "conv_dim"]),
        ({"algo": "locon", "conv_dim": "0"}, ["algo=locon", "conv_dim=N"]),
        ({"conv_alpha": "4"}, ["conv_alpha", "no convolution is trained", "conv_dim"]),
        ({"preset": "style", "te_dim": "4"}, ["te_dim=4", "preset=style", "text encoder"]),
        ({"preset": "style", "block_ranks": "mid=8"}, ["block_ranks", "M00", "preset=style"]),
        ({"block_lr": "all=0"}, ["trains nothing"]),
        ({"preset": "style", "block_ranks": "in0=0,out3=0"}, ["trains nothing"]),
        ({"down_lr_weight": "zeros", "up_lr_weight": "zeros", "mid_lr_weight": "0", "te_dim": "0"},
         ["trains nothing"]),
    ],
)
def test_bad_values_name_the_argument(args, fragments):
    with pytest.raises(SpecError) as caught:
        parse_network_args(args, "sd1")
    message = str(caught.value)
    for fragment in fragments:
        assert fragment in message, (fragment, message)


def test_all_zero_from_network_dim():
    with pytest.raises(SpecError, match="trains nothing"):
        parse_network_args({}, "sd1", 0)
    spec = parse_network_args({"conv_dim": "4"}, "sd1", 0).spec  # conv only: fine
    assert spec.include_conv and spec.blocks["IN01"].rank == 0


def test_sdxl_positional_length_is_23():
    with pytest.raises(SpecError, match="sdxl takes 23"):
        parse_network_args({"block_dims": ",".join(["4"] * 25)}, "sdxl")


def test_spec_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_network_args({"nonsense": "1"}, "sd1")


def test_known_keys_are_the_documented_ones():
    documented = {
        "preset", "blocks", "block_ranks", "block_alphas", "conv_dim", "conv_alpha", "conv_block_ranks",
        "conv_block_alphas", "block_lr", "te_dim", "te_alpha", "algo", "dropout", "rank_dropout", "module_dropout",
        "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "verbose", "block_dims",
        "conv_block_dims", "down_lr_weight", "mid_lr_weight", "up_lr_weight", "block_lr_zero_threshold",
        # Flux.1 / SD3: ours, and kohya's lora_flux / lora_sd3 (research/dit.md (d))
        "t5_dim", "train_t5xxl", "split_qkv", "train_blocks", "train_double_block_indices",
        "train_single_block_indices", "train_block_indices", "img_attn_dim", "txt_attn_dim", "img_mlp_dim",
        "txt_mlp_dim", "img_mod_dim", "txt_mod_dim", "single_dim", "single_mod_dim", "context_attn_dim",
        "context_mlp_dim", "context_mod_dim", "x_attn_dim", "x_mlp_dim", "x_mod_dim", "in_dims", "emb_dims",
        "network_reg_dims", "network_reg_lrs",
    }
    assert set(KNOWN_KEYS) == documented


def test_split_network_args():
    assert split_network_args("preset=style conv_dim=8 block_ranks='in0=16,out3=8'") == {
        "preset": "style", "conv_dim": "8", "block_ranks": "in0=16,out3=8",
    }
    for bad in ("preset", "=3", "a=1 a=2"):
        with pytest.raises(SpecError):
            split_network_args(bad)


def test_weights_args_ignore_ranks_with_a_note():
    per_block, per_slot, options, given, notes, rules = parse_weights_args(
        {"preset": "style", "block_lr": "in0=0.5", "rank_dropout": "0.1"}, "sd1"
    )
    assert rules is None
    assert per_block["IN01"] == 0.5 and per_block["OUT11"] == 1.0 and not per_slot
    assert options.rank_dropout == 0.1 and given
    assert any("preset ignored" in n for n in notes)


# --- the table of keys -----------------------------------------------------------------------------------------


def test_markdown_table_lists_every_declared_key_once():
    rows = [line for line in network_args_markdown().splitlines() if line.startswith("| `")]
    keys = [row.split("|")[1].strip().strip("`") for row in rows]
    assert sorted(keys) == sorted(KNOWN_KEYS) and len(keys) == len(set(keys))
    for row, arg in zip(rows, NETWORK_ARGS):
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells == [f"`{arg.name}`", arg.value, arg.default, arg.help, arg.origin, KEY_MODELS[arg.archs]]
        assert all(cells), row


def test_markdown_table_from_the_command_line():
    result = subprocess.run([sys.executable, "-m", "kohya_plugin.args", "--markdown"], capture_output=True,
                            text=True, timeout=120, check=True)
    assert result.stdout.strip() == network_args_markdown()
    usage = subprocess.run([sys.executable, "-m", "kohya_plugin.args"], capture_output=True, text=True, timeout=120)
    assert usage.returncode != 0 and "--markdown" in usage.stderr


@pytest.mark.parametrize("arch", ["sd1", "flux", "sd3"])
def test_unknown_key_message_lists_the_declared_keys(arch):
    with pytest.raises(SpecError) as caught:
        parse_network_args({"conv_dims": "4"}, arch)
    listed = str(caught.value).split(f"known keys on {arch}: ")[1].split(", ")
    unet_only = {"block_dims", "conv_block_dims", "down_lr_weight", "mid_lr_weight", "up_lr_weight"}
    if arch == "sd1":
        expected = {a.name for a in NETWORK_ARGS if a.archs in ("all", "unet")}
    else:
        expected = {a.name for a in NETWORK_ARGS if a.archs in ("all", "dit", arch)}
        assert not unet_only & set(listed)
    assert listed == sorted(expected)


def test_every_key_is_read_by_its_own_reader():
    """Each declared reader accepts a good value of its key and names the key in its error for a bad one."""
    good = {"preset": "style", "blocks": "in0", "block_ranks": "in0=8", "block_alphas": "in0=2", "conv_dim": "4",
            "conv_alpha": "2", "conv_block_ranks": "in0=2", "conv_block_alphas": "in0=1", "te_dim": "0",
            "te_alpha": "1", "algo": "locon", "block_dims": ",".join(["4"] * 25),
            "conv_block_dims": ",".join(["2"] * 25), "block_lr": "in0=0.5", "down_lr_weight": "sine",
            "mid_lr_weight": "0.5", "up_lr_weight": "1,1", "block_lr_zero_threshold": "0.1", "dropout": "0.1",
            "rank_dropout": "0.1", "module_dropout": "0.1", "loraplus_lr_ratio": "16",
            "loraplus_unet_lr_ratio": "8", "loraplus_text_encoder_lr_ratio": "4", "verbose": "yes",
            "t5_dim": "4", "train_t5xxl": "True", "split_qkv": "True", "train_blocks": "single",
            "train_double_block_indices": "0,2-4", "train_single_block_indices": "all", "train_block_indices": "none",
            "in_dims": "[4,4,4,4,4]", "emb_dims": "4,4,4,4,4,4", "network_reg_dims": "double_blocks_1_=8",
            "network_reg_lrs": "single=1e-4",
            **{key: "8" for key in ("img_attn_dim", "txt_attn_dim", "img_mlp_dim", "txt_mlp_dim", "img_mod_dim",
                                    "txt_mod_dim", "single_dim", "single_mod_dim", "context_attn_dim",
                                    "context_mlp_dim", "context_mod_dim", "x_attn_dim", "x_mlp_dim", "x_mod_dim")}}
    dit = {"preset": "splitflux-style", "blocks": "D05.img", "block_ranks": "double=8,S10.linear1.mlp=2",
           "block_alphas": "S10-S37=2", "block_lr": "single=0.5", "conv_block_ranks": "D00=2",
           "conv_block_alphas": "D00=1"}
    assert set(good) == set(KNOWN_KEYS)
    for arg in NETWORK_ARGS:
        archs = {"all": ("sd1", "flux"), "unet": ("sd1",), "dit": ("flux", "sd3"), "flux": ("flux",),
                 "sd3": ("sd3",)}[arg.archs]
        for arch in archs:
            value = dit.get(arg.name, good[arg.name]) if arch == "flux" else good[arg.name]
            arg.reader(arg.name, value, table(arch))
            with pytest.raises(SpecError, match=f"network_args {arg.name}="):
                arg.reader(arg.name, "-x,nan", table(arch))


@pytest.mark.parametrize(
    "args",
    [{"te_alpha": "nan"}, {"conv_dim": "4", "conv_alpha": "nan"}, {"block_alphas": "in0=inf"},
     {"block_lr": "in0=inf"}, {"block_lr": "in0=nan"}, {"down_lr_weight": "1,nan"}, {"mid_lr_weight": "inf"},
     {"up_lr_weight": "sine+inf"}, {"block_lr_zero_threshold": "inf"}, {"block_alphas": ",".join(["1"] * 24) + ",inf"}],
)
def test_non_finite_alphas_and_lr_weights_are_refused(args):
    with pytest.raises(SpecError, match=f"network_args {list(args)[-1]}="):
        parse_network_args(args, "sd1")


@pytest.mark.parametrize("multiplier", [float("nan"), float("inf"), "x", None])
def test_read_multiplier_refuses_what_is_not_a_finite_number(multiplier):
    with pytest.raises(SpecError, match="multiplier"):
        read_multiplier(multiplier)
    assert read_multiplier("-0.5") == -0.5  # negative strengths are legitimate (kohya, A1111)


def test_readme_table_is_the_generated_one():
    """The README's table of keys is derived from NETWORK_ARGS: regenerate it when a key changes."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    assert network_args_markdown() in readme
