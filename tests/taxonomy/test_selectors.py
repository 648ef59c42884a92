"""Selector grammar: groups, LBW IDs, ranges, NOT/!, presets, and every error path."""

import pytest

from blora_tools.errors import SelectorError
from blora_tools.taxonomy.blocks import OTHER, table
from blora_tools.taxonomy.selectors import describe_blocks, parse_selector, resolve_selector

SD1_UPPER = {"IN01", "IN02", "IN03", "OUT09", "OUT10", "OUT11"}
SDXL_UPPER = {"IN01", "IN02", "IN03", "OUT06", "OUT07", "OUT08"}


@pytest.mark.parametrize(
    "text, arch, expected",
    [
        ("in0,out3", "sd1", SD1_UPPER),
        ("in0 out3", "sd1", SD1_UPPER),
        ("style", "sd1", SD1_UPPER),
        ("upper", "sd2", SD1_UPPER),
        ("style", "sdxl", SDXL_UPPER),
        ("middle", "sd1", {"IN04", "IN05", "IN06", "OUT06", "OUT07", "OUT08"}),
        ("middle", "sdxl", {"IN04", "IN05", "IN06", "OUT03", "OUT04", "OUT05"}),
        ("bottom", "sd1", {"IN07", "IN08", "IN09", "OUT03", "OUT04", "OUT05"}),
        ("bottom", "sdxl", {"IN07", "IN08", "OUT00", "OUT01", "OUT02"}),
        ("IN05", "sd1", {"IN05"}),
        ("in05", "sd1", {"IN05"}),
        ("MID", "sd1", {"M00"}),
        ("mid", "sdxl", {"M00"}),
        ("te", "sd1", {"te"}),
        ("te", "sdxl", {"te1", "te2"}),
        ("te2", "sdxl", {"te2"}),
        ("BASE", "sdxl", {"te1", "te2"}),
        ("IN10-M00", "sd1", {"IN10", "IN11", "M00"}),
        ("BASE-IN01", "sd1", {"te", "IN00", "IN01"}),
        ("in3", "sd1", {"IN10", "IN11"}),
        ("in2", "sdxl", {"IN07", "IN08"}),
    ],
)
def test_resolves(text, arch, expected):
    assert resolve_selector(text, arch) == frozenset(expected)


def test_all_and_character_are_every_block():
    for arch in ("sd1", "sdxl"):
        assert resolve_selector("all", arch) == resolve_selector("character", arch) == frozenset(table(arch).blocks)


def test_unet_is_everything_but_text_encoders():
    assert resolve_selector("unet", "sdxl") == frozenset(table("sdxl").blocks) - {"te1", "te2"}
    assert OTHER in resolve_selector("unet", "sd1")


def test_not_and_bang():
    everything = frozenset(table("sd1").blocks)
    assert resolve_selector("NOT te", "sd1") == everything - {"te"}
    assert resolve_selector("!te", "sd1") == everything - {"te"}
    assert resolve_selector("unet !out0", "sd1") == resolve_selector("unet", "sd1") - {"OUT00", "OUT01", "OUT02"}
    assert resolve_selector("all NOT in0,out3", "sd1") == everything - SD1_UPPER


@pytest.mark.parametrize(
    "text, arch, fragment",
    [
        ("in4", "sd1", "no block group 'in4' on sd1"),
        ("foo", "sd1", "valid"),
        ("in3", "sdxl", "no block group 'in3' on sdxl"),
        ("IN10", "sdxl", "no LBW block IN10 on sdxl"),
        ("te1", "sd1", "unknown block 'te1'"),
        ("OUT05-IN01", "sd1", "backwards"),
        ("IN01-XX", "sd1", "'XX' is not an LBW ID"),
        ("", "sd1", "empty selector"),
        ("NOT", "sd1", "no block after it"),
        ("!", "sd1", "must be followed"),
    ],
)
def test_errors_name_the_term_and_list_valid_names(text, arch, fragment):
    with pytest.raises(SelectorError) as err:
        resolve_selector(text, arch)
    assert fragment in str(err.value)


@pytest.mark.parametrize("text", ["NOT NOT in0", "!!in0", "NOT !in0", "NOT te NOT in0", "in1 NOT te, !!out3"])
def test_a_doubled_negation_is_an_error_in_every_spelling(text):
    """Issue #12: `NOT NOT in0` silently meant `NOT in0` while `!!in0` was an error. One rule now: negation is
    written once and never toggles, so both spellings (and their mix) are refused alike."""
    with pytest.raises(SelectorError, match="negates twice"):
        parse_selector(text)


def test_single_negations_in_both_spellings_agree():
    everything = set(table("sd1").blocks)
    assert resolve_selector("NOT in0", "sd1") == resolve_selector("!in0", "sd1") == everything - {"IN01", "IN02", "IN03"}
    assert resolve_selector("te NOT in0 out3", "sd1") == {"te"}  # NOT covers every term after it
    assert resolve_selector("te, !in0, out3", "sd1") == {"te"} | {"OUT09", "OUT10", "OUT11"}  # ! covers one


def test_unknown_terms_fail_at_parse_time_before_any_arch_is_known():
    with pytest.raises(SelectorError, match="in0..in3"):
        parse_selector("in0,bogus")


def test_describe_uses_group_names():
    assert describe_blocks(resolve_selector("style", "sd1"), "sd1") == "in0,out3"
    assert describe_blocks(resolve_selector("IN04,IN05", "sd1"), "sd1") == "IN04,IN05"
