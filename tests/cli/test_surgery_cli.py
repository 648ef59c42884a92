"""`prune`, `reweight`, `merge`, `resize` through the CLI: exit codes, JSON, untouched inputs, nothing half-written."""

from __future__ import annotations

import json

import pytest
from adapters import block_of, dense_deltas, make_adapter, relative_error
from conftest import sha256

from blora_tools.adapter.model import open_adapter
from blora_tools.cli import main

COMMANDS = ("prune", "reweight", "merge", "resize")


def _run(runner, *args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def _only_output(folder, *names):
    """The folder holds exactly these files (no temporary file left beside an output)."""
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)


def _one_error_line(result, mentions: str):
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and mentions in lines[0], result.stderr


@pytest.fixture
def char_file(tmp_path):
    return make_adapter(tmp_path / "char [v1].safetensors", "sd1", "locon", rank=4, metadata={"ss_output_name": "char"})


@pytest.fixture
def style_file(tmp_path):
    return make_adapter(tmp_path / "style.safetensors", "sd1", "lora", blocks="style", rank=8, seed=3)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_has_an_example(runner, command):
    result = _run(runner, command, "--help")
    assert result.exit_code == 0 and "Example" in result.stdout and "-o" in result.stdout


def test_prune_then_inspect_shows_exactly_the_kept_blocks(runner, tmp_path, char_file):
    before = sha256(char_file)
    out = tmp_path / "out.safetensors"
    result = _run(runner, "prune", char_file, "--keep", "in0,out3", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["operation"] == "prune" and doc["output"] == str(out) and set(doc["kept"]) == {"in0", "out3"}
    assert sha256(char_file) == before
    report = json.loads(_run(runner, "inspect", "--json", out).stdout)[0]
    assert {g for g, b in report["blocks"].items() if b["modules"]} == {"in0", "out3"}
    _only_output(tmp_path, char_file.name, "out.safetensors")


def test_prune_dry_run_writes_nothing(runner, tmp_path, char_file):
    result = _run(runner, "prune", char_file, "--drop", "te", "--dry-run")
    assert result.exit_code == 0
    stems = [line.strip() for line in result.stdout.splitlines() if line.strip().startswith("lora_")]
    assert stems and all(block_of(s, "sd1") == "te" for s in stems)
    _only_output(tmp_path, char_file.name)


def test_prune_to_nothing_fails_with_one_line(runner, tmp_path, style_file):
    out = tmp_path / "out.safetensors"
    result = _run(runner, "prune", style_file, "--keep", "mid", "-o", out)
    assert result.exit_code == 1
    _one_error_line(result, style_file.name)
    _only_output(tmp_path, style_file.name)


@pytest.mark.parametrize(
    "args",
    [
        ["--keep", "in0", "--drop", "te"],  # both
        [],  # neither
        ["--keep", "nonsense"],  # bad selector syntax
    ],
    ids=["both", "neither", "bad-selector"],
)
def test_prune_usage_errors_exit_2(runner, tmp_path, char_file, args):
    result = _run(runner, "prune", char_file, *args, "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 2
    _only_output(tmp_path, char_file.name)


def test_selector_unknown_on_this_architecture_exits_1(runner, tmp_path):
    xl = make_adapter(tmp_path / "xl.safetensors", "sdxl", "lora")
    result = _run(runner, "prune", xl, "--keep", "in3", "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 1 and "in3" in result.stderr


def test_output_rules(runner, tmp_path, char_file):
    out = tmp_path / "out.safetensors"
    assert _run(runner, "prune", char_file, "--drop", "te", "-o", out).exit_code == 0
    first = sha256(out)
    again = _run(runner, "reweight", char_file, "--weights", "in0=2", "-o", out)
    assert again.exit_code == 1 and "--force" in again.stderr and sha256(out) == first
    assert _run(runner, "reweight", char_file, "--weights", "in0=2", "-o", out, "--force").exit_code == 0
    onto_input = _run(runner, "prune", char_file, "--drop", "te", "-o", char_file, "--force")
    assert onto_input.exit_code == 1 and "input" in onto_input.stderr
    _only_output(tmp_path, char_file.name, "out.safetensors")


@pytest.mark.parametrize(
    "args, weights",
    [
        (["--weights", "in0=0.5,out3=2,te=0"], {"in0": 0.5, "out3": 2.0, "te": 0.0}),
        (["--lbw", "lbw=1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"], {"in0": 0.0, "in1": 0.0, "in2": 0.0, "mid": 0.0, "out1": 0.0, "OUT06": 0.0}),
        (["--lbw", "OUTS", "--lbw-fill", "1"], {"in0": 0.0, "in1": 0.0, "in2": 0.0, "mid": 0.0, "out1": 0.0, "OUT06": 0.0}),
        (["--preset", "MIDD"], {"in0": 0.0, "IN04": 0.0, "OUT07": 0.0, "OUT08": 0.0, "out3": 0.0}),
    ],
    ids=["weights", "lbw-pasted", "lbw-fill", "preset"],
)
def test_reweight_forms(runner, tmp_path, args, weights):
    source = make_adapter(tmp_path / "in.safetensors", "sd1", "lora")
    out = tmp_path / "out.safetensors"
    result = _run(runner, "reweight", source, *args, "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["operation"] == "reweight"
    from blora_tools.taxonomy.blocks import table

    group = table("sd1").group_of
    before, after = dense_deltas(source), dense_deltas(out)
    for stem, delta in before.items():
        block = block_of(stem, "sd1")
        w = weights.get(block, weights.get(group(block), 1.0))
        if w == 0:
            assert stem not in after
        else:
            assert relative_error(after[stem], w * delta) < 1e-6


def test_reweight_preset_file_and_errors(runner, tmp_path):
    source = make_adapter(tmp_path / "in.safetensors", "sd1", "dora")
    presets = tmp_path / "presets.txt"
    presets.write_text("# mine\nHALF:" + ",".join(["0.5"] * 17) + "\nKEEP:" + ",".join(["1"] * 17) + "\n")
    out = tmp_path / "out.safetensors"
    dora = _run(runner, "reweight", source, "--preset", "HALF", "--preset-file", presets, "-o", out)
    assert dora.exit_code == 1 and "DoRA" in dora.stderr
    assert _run(runner, "reweight", source, "--preset", "KEEP", "--preset-file", presets, "-o", out).exit_code == 0
    unknown = _run(runner, "reweight", source, "--preset", "NOPE", "-o", tmp_path / "x.safetensors")
    assert unknown.exit_code == 1 and "MIDD" in unknown.stderr
    assert _run(runner, "reweight", source, "--weights", "in0=1", "--preset", "ALL", "-o", tmp_path / "x.safetensors").exit_code == 2
    assert _run(runner, "reweight", source, "--lbw", "in0=1", "-o", tmp_path / "x.safetensors").exit_code == 2
    _only_output(tmp_path, "in.safetensors", "presets.txt", "out.safetensors")


def test_merge_character_and_style(runner, tmp_path, char_file, style_file):
    checksums = sha256(char_file), sha256(style_file)
    out = tmp_path / "merged.safetensors"
    result = _run(
        runner, "merge", char_file, style_file, "--ratios", "1,0.8", "--blocks", "all", "--blocks", "in0,out3",
        "--method", "concat", "-o", out, "--json",
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["method"] == "concat" and [i["ratio"] for i in doc["inputs"]] == [1.0, 0.8]
    assert (sha256(char_file), sha256(style_file)) == checksums
    a, b, got = dense_deltas(char_file), dense_deltas(style_file), dense_deltas(out)
    for stem in set(a) | set(b):
        expected = a.get(stem, 0) + 0.8 * b.get(stem, 0)
        assert relative_error(got[stem], expected) < 1e-5
    svd = _run(runner, "merge", char_file, style_file, "--method", "svd", "--rank", "4", "--conv-rank", "2", "-o", tmp_path / "svd.safetensors", "--json")
    assert svd.exit_code == 0 and json.loads(svd.stdout)["method"] == "svd"


@pytest.mark.parametrize(
    "args",
    [
        ["--ratios", "1"],
        ["--ratios", "1,x"],
        ["--blocks", "all"],
        ["--method", "svd"],
        ["--rank", "4"],
        ["--method", "svd", "--rank", "in0=1.5"],
    ],
    ids=["ratios-count", "ratios-number", "blocks-count", "svd-no-rank", "rank-with-concat", "bad-rank"],
)
def test_merge_usage_errors_exit_2(runner, tmp_path, char_file, style_file, args):
    result = _run(runner, "merge", char_file, style_file, *args, "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 2, result.stderr
    _only_output(tmp_path, char_file.name, style_file.name)


def test_merge_refuses_other_architectures_and_strict_base_models(runner, tmp_path, char_file):
    xl = make_adapter(tmp_path / "xl.safetensors", "sdxl", "lora")
    result = _run(runner, "merge", char_file, xl, "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 1 and "different architectures" in result.stderr
    a = make_adapter(tmp_path / "a.safetensors", "sd1", "lora", metadata={"ss_base_model_version": "sd_v1"})
    b = make_adapter(tmp_path / "b.safetensors", "sd1", "lora", metadata={"ss_base_model_version": "sd_v1_5"}, seed=2)
    loose = _run(runner, "merge", a, b, "-o", tmp_path / "ab.safetensors")
    assert loose.exit_code == 0 and "different base models" in loose.stderr
    strict = _run(runner, "merge", a, b, "--strict", "-o", tmp_path / "strict.safetensors")
    assert strict.exit_code == 1 and not (tmp_path / "strict.safetensors").exists()


def test_resize_json_has_the_energy_table(runner, tmp_path, char_file):
    out = tmp_path / "small.safetensors"
    result = _run(runner, "resize", char_file, "--rank", "in0=2,out3=3", "--dynamic", "sv_fro:0.99", "-o", out, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["operation"] == "resize" and 0 < doc["retained"] <= 1
    assert doc["blocks"]["in0"]["rank_out"][1] <= 2 and doc["blocks"]["out3"]["rank_out"][1] <= 3
    assert all(0 < row["retained"] <= 1 for row in doc["blocks"].values())
    table = _run(runner, "resize", char_file, "--rank", "2", "-o", tmp_path / "t.safetensors")
    assert table.exit_code == 0 and "kept" in table.stdout


@pytest.mark.parametrize("args", [[], ["--dynamic", "sv_fro"], ["--rank", "0"], ["--rank", "abc=1"]], ids=["none", "rule", "zero", "term"])
def test_resize_usage_errors_exit_2(runner, tmp_path, char_file, args):
    result = _run(runner, "resize", char_file, *args, "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 2
    _only_output(tmp_path, char_file.name)


def test_pickle_input_is_refused(runner, tmp_path):
    bad = tmp_path / "old.ckpt"
    bad.write_bytes(b"\x80\x04not really")
    for args in (["prune", bad, "--keep", "in0"], ["reweight", bad, "--weights", "in0=1"], ["resize", bad, "--rank", "2"]):
        result = _run(runner, *args, "-o", tmp_path / "o.safetensors")
        assert result.exit_code == 1 and "pickle" in result.stderr
    _only_output(tmp_path, "old.ckpt")


@pytest.mark.parametrize("args", [["prune", "--drop", "te"], ["reweight", "--weights", "in0=0.5"]])
def test_uniform_alpha_option_on_prune_and_reweight(runner, tmp_path, args):
    src = make_adapter(tmp_path / "mixed.safetensors", "sd1", "locon", alpha=lambda l: 4.0 if l.block == "IN01" else 1.0)
    plain = _run(runner, args[0], src, *args[1:], "-o", tmp_path / "plain.safetensors")
    assert plain.exit_code == 0 and "--uniform-alpha" in plain.stderr
    fixed = _run(runner, args[0], src, *args[1:], "--uniform-alpha", "-o", tmp_path / "fixed.safetensors", "--json")
    assert fixed.exit_code == 0 and "different alpha values" not in fixed.stderr
    assert {m.alpha for m in open_adapter(tmp_path / "fixed.safetensors").modules.values()} == {1.0}
    want = dense_deltas(tmp_path / "plain.safetensors")
    got = dense_deltas(tmp_path / "fixed.safetensors")
    assert set(got) == set(want) and max(relative_error(got[s], want[s]) for s in want) < 1e-6


def test_merge_names_option(runner, tmp_path, char_file):
    out = tmp_path / "ldm.safetensors"
    result = _run(runner, "merge", char_file, "--names", "ldm", "-o", out)
    assert result.exit_code == 0 and "LDM names" in result.stderr and "sd-scripts" in result.stderr
    stems = set(open_adapter(out).modules)
    assert any(s.startswith("lora_unet_input_blocks_") for s in stems)
    assert not any(s.startswith("lora_unet_down_blocks_") for s in stems)
