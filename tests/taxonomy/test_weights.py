"""Weight vectors: named weights, LBW vectors with zero fill, presets, preset files, and exports."""

import pytest

from blora_tools.errors import SelectorError
from blora_tools.taxonomy.blocks import table
from blora_tools.taxonomy.weights import LBW_PRESETS, parse_weights, read_preset_file, to_diffusers, to_kohya, to_lbw


def test_named_weights_leave_other_blocks_at_one_and_later_terms_win():
    w = parse_weights("unet=0,in0=1,out3=0.5,te=0").resolve("sd1")
    assert w["IN01"] == 1 and w["OUT10"] == 0.5 and w["te"] == 0 and w["M00"] == 0
    w = parse_weights("in0=0.5").resolve("sd1")
    assert w["IN01"] == 0.5 and w["M00"] == 1 and w["te"] == 1


def test_short_lbw_vector_zero_fills_unnamed_blocks():
    w = parse_weights("1," + ",".join(["0.5"] * 16)).resolve("sd1")
    assert w["te"] == 1 and w["IN01"] == 0.5 and w["OUT11"] == 0.5
    for unnamed in ("IN00", "IN03", "IN06", "IN09", "IN10", "IN11", "OUT00", "OUT01", "OUT02", "OTHER"):
        assert w[unnamed] == 0.0
    w1 = parse_weights("1," + ",".join(["0.5"] * 16)).resolve("sd1", fill=1.0)
    assert w1["IN03"] == 1.0 and w1["IN01"] == 0.5


def test_full_lbw_vectors_name_every_lbw_block():
    values = [i / 100 for i in range(26)]
    w = parse_weights(",".join(map(str, values))).resolve("sd1")
    assert to_lbw(w) == values
    values = [i / 10 for i in range(20)]
    w = parse_weights(",".join(map(str, values))).resolve("sdxl")
    assert to_lbw(w) == values and w["te1"] == w["te2"] == 0.0


def test_sdxl_short_vector():
    w = parse_weights(",".join(["1"] + ["0"] * 4 + ["2"] + ["0"] * 6)).resolve("sdxl")
    assert w["M00"] == 2 and w["IN04"] == 0 and w["IN01"] == 0


@pytest.mark.parametrize("name", sorted(LBW_PRESETS))
def test_presets_are_seventeen_values_and_pasteable(name):
    assert len(LBW_PRESETS[name]) == 17
    direct = parse_weights(name).resolve("sd1")
    pasted = parse_weights(f"lbw={name}").resolve("sd1")
    assert direct == pasted
    assert to_lbw(direct, short=True) == list(LBW_PRESETS[name])


def test_known_preset_values():
    assert LBW_PRESETS["MIDD"] == (1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0)
    assert LBW_PRESETS["OUTALL"] == (1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1)


def test_preset_file(tmp_path):
    f = tmp_path / "presets.txt"
    f.write_text("# my presets\nMINE:1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1\n\nXL:1,1,1,1,1,1,1,1,1,1,1,0\n")
    presets = read_preset_file(f)
    assert set(presets) == {"MINE", "XL"}
    assert parse_weights("MINE", presets).resolve("sd1")["OUT11"] == 1
    assert parse_weights("XL", presets).resolve("sdxl")["OUT05"] == 0


def test_bad_preset_file_names_file_and_line(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("GOOD:1,1\nBAD LINE\n")
    with pytest.raises(SelectorError) as err:
        read_preset_file(f)
    assert "line 2" in str(err.value) and str(f) in str(err.value)


@pytest.mark.parametrize(
    "text, arch, fragment",
    [
        ("1,0,1", "sd1", "has 3 values; sd1 takes 17 or 26"),
        ("1," * 16 + "1", "sdxl", "sdxl takes 12 or 20"),
        ("in0=abc", "sd1", "not a number"),
        ("in0=nan", "sd1", "not finite"),
        ("bogus=1", "sd1", "unknown block"),
        ("in0:1", "sd1", "block=weight"),
        ("", "sd1", "empty weights"),
    ],
)
def test_weight_errors(text, arch, fragment):
    with pytest.raises(SelectorError) as err:
        parse_weights(text).resolve(arch)
    assert fragment in str(err.value)


def test_kohya_export_positions():
    w = parse_weights("unet=0,te=0,in0=16,out3=16").resolve("sd1")
    assert to_kohya(w) == [0, 16, 16, 16] + [0] * 18 + [16, 16, 16]
    xl = parse_weights("unet=0,mid=2,OUT08=3").resolve("sdxl")
    k = to_kohya(xl)
    assert len(k) == 23 and k[10:13] == [2, 2, 2] and k[21] == 3 and k[0] == k[22] == 0


def test_diffusers_export_only_addresses_attention_blocks():
    w = parse_weights("lbw=MIDD").resolve("sd1")
    d = to_diffusers(w)
    assert d == {
        "unet": {
            "down": {"block_0": [0, 0], "block_1": [0, 1], "block_2": [1, 1]},
            "mid": 1,
            "up": {"block_1": [1, 1, 1], "block_2": [1, 0, 0], "block_3": [0, 0, 0]},
        },
        "text_encoder": 1,
    }
    xl = to_diffusers(parse_weights("in1=0.5,te2=0").resolve("sdxl"))
    assert set(xl["unet"]["down"]) == {"block_1", "block_2"} and xl["unet"]["down"]["block_1"] == [0.5, 0.5]
    assert set(xl["unet"]["up"]) == {"block_0", "block_1"} and xl["text_encoder_2"] == 0
    assert all(len(v) == 2 for v in xl["unet"]["down"].values())
    assert len(table("sdxl").attention_lbw) == 11
