"""Hostile values in arguments, preset files, metadata and file names: one clean line or a normal result,
never a traceback; JSON output always parses as strict JSON (no NaN/Infinity, no lone surrogates)."""

from __future__ import annotations

import json
import os

import pytest
from adapters import make_adapter
from battery import assert_refused, invoke, require, snapshot
from corrupt_files import join_file, split_file

from blora_tools.adapter.metadata import top_tags, training_summary
from blora_tools.errors import SelectorError
from blora_tools.taxonomy.weights import read_preset_file

_SIXTEEN_ONES = ",".join(["1"] * 16)


def strict_json(text: str):
    """Parse as strict JSON: NaN/Infinity and lone surrogate escapes are errors (as in serde_json, browsers' JSON)."""

    def no_constant(name):
        raise ValueError(f"{name} in JSON output")

    doc = json.loads(text, parse_constant=no_constant)
    stack = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            item.encode("utf-8")  # a lone surrogate cannot be encoded
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return doc


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    folder = tmp_path_factory.mktemp("template")
    return make_adapter(folder / "t.safetensors", "sd1", "lora", rank=2, per_block=1).read_bytes()


def _with_metadata(tmp_path, template, name="m.safetensors", **metadata):
    source = tmp_path / "template.safetensors"
    source.write_bytes(template)
    header, data = split_file(source)
    source.unlink()
    header["__metadata__"] = {**header.get("__metadata__", {}), **metadata}
    path = tmp_path / name
    path.write_bytes(join_file(header, data))
    return path


# --- preset files -----------------------------------------------------------------------------------------------


def test_preset_file_with_bom_comments_and_blank_lines(tmp_path):
    path = tmp_path / "presets.txt"
    path.write_bytes("\ufeff# my presets\nMINE:0,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1   # style off\n\n  OTHER : 1,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,1\n".encode())
    presets = read_preset_file(path)
    assert presets == {"MINE": (0.0,) + (1.0,) * 16, "OTHER": (1.0,) + (0.0,) * 15 + (1.0,)}


def test_preset_file_duplicate_name_names_file_and_lines(tmp_path):
    path = tmp_path / "presets.txt"
    path.write_text(f"A:1,{_SIXTEEN_ONES}\n# x\nA:0,{_SIXTEEN_ONES}\n")
    with pytest.raises(SelectorError) as err:
        read_preset_file(path)
    assert str(err.value) == f"{path}: line 3: preset 'A' is already defined on line 1"


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("A:1e999," + _SIXTEEN_ONES, "line 1: LBW vector"),
        ("A:nan," + _SIXTEEN_ONES, "line 1 is not 'NAME:v1,v2,…'"),
        (":1," + _SIXTEEN_ONES, "line 1 is not"),
        ("A 1,1", "line 1 is not"),
        ("x" * 500 + ":a", "..."),
    ],
    ids=["infinite", "nan", "no-name", "no-colon", "long-line"],
)
def test_bad_preset_lines(tmp_path, text, fragment):
    path = tmp_path / "presets.txt"
    path.write_text(text + "\n")
    with pytest.raises(SelectorError) as err:
        read_preset_file(path)
    assert fragment in str(err.value) and str(path) in str(err.value) and len(str(err.value)) < 300


def test_preset_file_not_utf8(tmp_path):
    path = tmp_path / "presets.txt"
    path.write_bytes(b"A:1,\xff\n")
    with pytest.raises(SelectorError, match="not UTF-8"):
        read_preset_file(path)


def test_preset_file_through_reweight(runner, tmp_path, template):
    require("reweight")
    src = tmp_path / "in.safetensors"
    src.write_bytes(template)
    presets = tmp_path / "presets.txt"
    presets.write_bytes(f"\ufeffMINE:1,{_SIXTEEN_ONES} # all on\nMINE:0,{_SIXTEEN_ONES}\n".encode())
    before = snapshot(tmp_path)
    result = invoke(runner, ["reweight", src, "--preset", "MINE", "--preset-file", presets, "-o", tmp_path / "o.safetensors"])
    assert_refused(result, tmp_path, before, str(presets), "line 2", "already defined on line 1")


# --- arguments --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rank", ["²", "١٢", "1" * 5000, "0", "65537", "-5", "1e3", "in0=1e300", "in0=2.5", "in0=-1"])
@pytest.mark.parametrize("command", ["resize", "merge"])
def test_bad_ranks_are_usage_errors(runner, tmp_path, template, command, rank):
    require(command)
    src = tmp_path / "in.safetensors"
    src.write_bytes(template)
    args = {"resize": ["resize", src, "--rank", rank, "-o", tmp_path / "o.safetensors"],
            "merge": ["merge", src, src, "--method", "svd", "--rank", rank, "-o", tmp_path / "o.safetensors"]}[command]
    before = snapshot(tmp_path)
    result = invoke(runner, args)
    line = assert_refused(result, tmp_path, before, "--rank", code=2)
    assert len(line) < 300  # a 5,000-digit value is cut in the message


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", "1e999", "x"])
@pytest.mark.parametrize("command", ["reweight", "blocks"])
def test_lbw_fill_must_be_finite(runner, tmp_path, template, command, value):
    require(command)
    src = tmp_path / "in.safetensors"
    src.write_bytes(template)
    args = {"reweight": ["reweight", src, "--lbw", "1,0,1,1,1,1,1,1,1,1,1,1", "--lbw-fill", value, "-o", tmp_path / "o.safetensors"],
            "blocks": ["blocks", "--arch", "sd1", "1,0,1,1,1,1,1,1,1,1,1,1", "--lbw-fill", value]}[command]
    before = snapshot(tmp_path)
    result = invoke(runner, args)
    assert_refused(result, tmp_path, before, "--lbw-fill", code=2)


@pytest.mark.parametrize(
    "args, option",
    [
        (["blocks", "--arch", "sd1", "in0", "--rank", "-5"], "--rank"),
        (["blocks", "--arch", "sd1", "in0", "--rank", "0"], "--rank"),
        (["blocks", "--arch", "sd1", "in0", "--rank", "9" * 5000], "--rank"),
        (["plan", "--arch", "sd1", "--network-dim", "-1"], "--network-dim"),
        (["plan", "--arch", "sd1", "--network-alpha", "nan"], "--network-alpha"),
        (["demo", "--seed", "9" * 40], "--seed"),
        (["demo", "--seed", "-1"], "--seed"),
    ],
    ids=["blocks-negative-rank", "blocks-zero-rank", "blocks-huge-rank", "plan-dim", "plan-alpha", "demo-seed-huge",
         "demo-seed-negative"],
)
def test_out_of_range_numbers_are_usage_errors(runner, tmp_path, args, option):
    require(args[0])
    result = invoke(runner, args)
    assert_refused(result, tmp_path, {}, option, code=2)


@pytest.mark.parametrize("value", ["nan", "inf"])
def test_alpha_must_be_finite(runner, tmp_path, template, value):
    require("resize")
    src = tmp_path / "in.safetensors"
    src.write_bytes(template)
    before = snapshot(tmp_path)
    result = invoke(runner, ["resize", src, "--rank", "1", "--alpha", value, "-o", tmp_path / "o.safetensors"])
    assert_refused(result, tmp_path, before, "--alpha", code=2)


@pytest.mark.parametrize("lbw", ["1e999," + _SIXTEEN_ONES, "-1e999,1,1,1,1,1,1,1,1,1,1,1"])
def test_infinite_lbw_vector_is_refused(runner, tmp_path, template, lbw):
    require("reweight")
    src = tmp_path / "in.safetensors"
    src.write_bytes(template)
    before = snapshot(tmp_path)
    result = invoke(runner, ["reweight", src, "--lbw", lbw, "-o", tmp_path / "o.safetensors"])
    assert_refused(result, tmp_path, before, "not finite", code=2)


# --- hostile metadata values --------------------------------------------------------------------------------------


_DEEP = "[" * 100_000 + "]" * 100_000
_HOSTILE_METADATA = {
    "deep-tags": {"ss_tag_frequency": '{"a":' * 50_000 + "1" + "}" * 50_000},
    "deep-history": {"blora_history": _DEEP},
    "deep-spec": {"blora_spec": '{"blocks":' + _DEEP + "}"},
    "infinity-count": {"ss_tag_frequency": '{"set": {"cat": Infinity, "dog": 3, "fox": NaN, "owl": -2, "elk": 1.5, "bee": 2.0}}'},
    "huge-count": {"ss_tag_frequency": '{"set": {"cat": 1e308, "dog": 3}}'},
    "history-not-list": {"blora_history": '{"a": 1}'},
    "peft-deep": {"lora_adapter_metadata": _DEEP},
    "peft-pattern-list": {"lora_adapter_metadata": '{"r": 2, "lora_alpha": 2, "alpha_pattern": [1, 2]}'},
}


@pytest.mark.parametrize("case", sorted(_HOSTILE_METADATA))
@pytest.mark.parametrize("command", ["inspect", "inspect-json", "prune", "convert"])
def test_hostile_metadata_values_are_read_without_a_traceback(runner, tmp_path, template, case, command):
    require(command.split("-")[0])
    path = _with_metadata(tmp_path, template, **_HOSTILE_METADATA[case])
    out = tmp_path / "o.safetensors"
    args = {
        "inspect": ["inspect", path],
        "inspect-json": ["inspect", "--json", path],
        "prune": ["prune", path, "--drop", "te", "-o", out, "--json"],
        "convert": ["convert", path, "--to", "kohya", "--uniform-alpha", "-o", out],
    }[command]
    result = invoke(runner, args)
    assert result.exit_code == 0, result.stderr
    assert "Traceback" not in result.stderr
    if "--json" in args:
        strict_json(result.stdout)
    if out.exists():
        from safetensors import safe_open

        with safe_open(str(out), framework="numpy") as f:
            history = json.loads(f.metadata()["blora_history"])  # a fresh, valid history
        assert isinstance(history, list) and history[-1]["operation"]


def test_top_tags_keep_only_whole_finite_counts():
    meta = {"ss_tag_frequency": '{"a": {"cat": Infinity, "dog": 3, "fox": NaN, "owl": -2, "elk": 1.5, "bee": 2.0}, "b": {"dog": 1}}'}
    assert top_tags(meta, 10) == []  # Infinity/NaN are not JSON: the value is not read at all
    meta = {"ss_tag_frequency": '{"a": {"cat": 1e400}}'}
    assert top_tags(meta, 10) == []
    meta = {"ss_tag_frequency": '{"a": {"dog": 3, "owl": -2, "elk": 1.5, "bee": 2.0, "t": true}, "b": {"dog": 1}}'}
    assert top_tags(meta, 10) == [("dog", 4), ("bee", 2)]
    assert training_summary({"ss_tag_frequency": "[" * 5000}) == {}


def test_inspect_json_of_a_file_with_nan_values_is_strict_json(runner, tmp_path, template):
    require("inspect")
    import torch
    from safetensors.torch import load_file, save_file

    src = tmp_path / "in.safetensors"
    src.write_bytes(template)
    tensors = load_file(src)
    name = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, src)
    result = invoke(runner, ["inspect", "--json", src])
    assert result.exit_code == 0, result.stderr
    strict_json(result.stdout)
    assert torch.isnan(load_file(src)[name]).any()


# --- names that are not Unicode -------------------------------------------------------------------------------------


@pytest.mark.skipif(os.name != "posix" or os.uname().sysname == "Darwin", reason="needs byte file names")
@pytest.mark.parametrize("args", [[], ["--json"], ["--no-stats"]])
def test_file_name_with_undecodable_bytes(runner, tmp_path, template, args):
    require("inspect")
    raw = os.fsencode(tmp_path) + b"/caf\xe9.safetensors"
    with open(raw, "wb") as f:
        f.write(template)
    name = os.fsdecode(raw)  # holds a lone surrogate, as Python spells undecodable bytes
    result = invoke(runner, ["inspect", *args, name])
    assert result.exit_code == 0, result.stderr
    if "--json" in args:
        doc = strict_json(result.stdout)
        assert doc[0]["path"].endswith("caf\\udce9.safetensors")
    else:
        assert "caf\\udce9.safetensors" in result.stdout


@pytest.mark.skipif(os.name != "posix" or os.uname().sysname == "Darwin", reason="needs byte file names")
def test_error_naming_an_undecodable_file_name(runner, tmp_path):
    require("inspect")
    raw = os.fsencode(tmp_path) + b"/bad\xff.safetensors"
    with open(raw, "wb") as f:
        f.write(b"not a safetensors file at all")
    result = invoke(runner, ["inspect", os.fsdecode(raw)])
    line = assert_refused(result, tmp_path, snapshot(tmp_path), code=1)
    assert "bad\\udcff.safetensors" in line


@pytest.mark.parametrize(
    "header",
    [
        '{"\\ud800x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        '{"__metadata__":{"a":"\\udfff"},"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}',
        '{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":' + "[" * 5000 + "]" * 5000 + "}}",
        '{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":' + "[" * 200_000 + "]" * 200_000 + "}}",
    ],
    ids=["surrogate-name", "surrogate-metadata", "nested-5000", "nested-200000"],
)
@pytest.mark.parametrize("command", ["inspect", "inspect-json", "prune"])
def test_hostile_headers_are_one_line(runner, tmp_path, header, command):
    require("inspect")
    raw = header.encode()
    path = tmp_path / "h.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + b"\0" * 4)
    args = {"inspect": ["inspect", path], "inspect-json": ["inspect", "--json", path],
            "prune": ["prune", path, "--drop", "te", "-o", tmp_path / "o.safetensors"]}[command]
    before = snapshot(tmp_path)
    result = invoke(runner, args)
    assert_refused(result, tmp_path, before, str(path), "header is not valid JSON")
