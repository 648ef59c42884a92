"""Bad arguments and bad values: mixed architectures, unknown selector terms, LBW vectors of the wrong length,
NaN/Inf tensors (reported by inspect, refused by writing commands unless --allow-nonfinite)."""

from __future__ import annotations

import json

import pytest
import torch
from adapters import dense_deltas, make_adapter
from battery import WRITERS, assert_refused, invoke, require, snapshot
from corrupt_files import ATTN
from safetensors.torch import load_file, save_file


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("arch")
    return {
        "sd1": make_adapter(folder / "sd1.safetensors", "sd1", "locon", rank=2, per_block=1).read_bytes(),
        "sdxl": make_adapter(folder / "sdxl.safetensors", "sdxl", "lora", rank=2, per_block=1).read_bytes(),
    }


@pytest.fixture
def sd1(tmp_path, files):
    path = tmp_path / "sd1.safetensors"
    path.write_bytes(files["sd1"])
    return path


@pytest.fixture
def xl(tmp_path, files):
    path = tmp_path / "xl.safetensors"
    path.write_bytes(files["sdxl"])
    return path


def _render(folder, *loras, extra=()):
    args = ["render", "--model", folder / "no-model", "--prompt", "a cat", "-o", folder / "grid.png", "--dry-run"]
    for lora in loras:
        args += ["--lora", lora]
    return args + list(extra)


# --- architectures mixed in one run ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command, fragments",
    [
        ("merge", ["sd1.safetensors is sd1", "xl.safetensors is sdxl", "cannot be merged"]),
        ("compare", ["is sd1", "is sdxl", "cannot be compared"]),
        ("render", ["different model families", "sd1, sdxl"]),
    ],
)
def test_mixed_architectures_are_refused(runner, tmp_path, sd1, xl, command, fragments):
    require(command)
    args = {
        "merge": ["merge", sd1, xl, "-o", tmp_path / "out.safetensors"],
        "compare": ["compare", sd1, xl],
        "render": _render(tmp_path, sd1, xl),
    }[command]
    before = snapshot(tmp_path)
    assert_refused(invoke(runner, args), tmp_path, before, *fragments)


def test_inspect_of_mixed_architectures_warns(runner, sd1, xl):
    require("inspect")
    result = invoke(runner, ["inspect", "--no-stats", sd1, xl])
    assert result.exit_code == 0 and "mixed architectures" in result.stderr


# --- unknown selector terms ----------------------------------------------------------------------------------
# Terms outside the vocabulary are usage errors (exit 2, when the option is read); terms that exist but not on
# the file's architecture (in3 on SDXL) are found once the file is open (exit 1).

SELECTOR_CASES = [
    ("prune", lambda f, s, x: ["prune", s, "--keep", "bogus", "-o", f / "o.safetensors"], 2, ["--keep", "bogus"]),
    ("prune", lambda f, s, x: ["prune", x, "--drop", "in3", "-o", f / "o.safetensors"], 1, ["in3", "sdxl"]),
    ("prune", lambda f, s, x: ["prune", s, "--keep", "NOT", "-o", f / "o.safetensors"], 2, ["--keep", "NOT"]),
    ("reweight", lambda f, s, x: ["reweight", s, "--weights", "bogus=1", "-o", f / "o.safetensors"], 2,
     ["--weights", "bogus"]),
    ("reweight", lambda f, s, x: ["reweight", x, "--weights", "out3=0.5", "-o", f / "o.safetensors"], 1,
     ["out3", "sdxl"]),
    ("reweight", lambda f, s, x: ["reweight", s, "--preset", "NOPE", "-o", f / "o.safetensors"], 1,
     ["NOPE", "known:"]),
    ("merge", lambda f, s, x: ["merge", s, s, "--blocks", "all", "--blocks", "bogus", "-o", f / "o.safetensors"], 2,
     ["--blocks", "bogus"]),
    ("merge", lambda f, s, x: ["merge", x, x, "--blocks", "in3", "--blocks", "all", "-o", f / "o.safetensors"], 1,
     ["in3", "sdxl"]),
    ("resize", lambda f, s, x: ["resize", s, "--rank", "bogus=2", "-o", f / "o.safetensors"], 2, ["--rank", "bogus"]),
    ("resize", lambda f, s, x: ["resize", x, "--rank", "in3=2", "-o", f / "o.safetensors"], 1, ["in3", "sdxl"]),
    ("blocks", lambda f, s, x: ["blocks", "--arch", "sd1", "bogus"], 2, ["SPEC", "bogus"]),
    ("blocks", lambda f, s, x: ["blocks", "--arch", "sdxl", "in3", "--as", "kohya"], 2, ["SPEC", "in3", "sdxl"]),
    ("plan", lambda f, s, x: ["plan", "--arch", "sd1", "--network-args", "blocks=bogus"], 1, ["blocks='bogus'"]),
    ("plan", lambda f, s, x: ["plan", "--arch", "sdxl", "--network-args", "preset=style blocks=in3"], 1,
     ["preset or blocks"]),
    ("plan", lambda f, s, x: ["plan", "--arch", "sdxl", "--network-args", "blocks=in3"], 1, ["blocks='in3'", "sdxl"]),
    ("render", lambda f, s, x: _render(f, f"{s}@bogus"), 2, ["--lora", "bogus"]),
    ("render", lambda f, s, x: _render(f, f"{x}@in3"), 1, ["in3", "sdxl"]),
]


@pytest.mark.parametrize(
    "command, make_args, code, fragments", SELECTOR_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(SELECTOR_CASES)]
)
def test_unknown_selector_terms(runner, tmp_path, sd1, xl, command, make_args, code, fragments):
    require(command)
    before = snapshot(tmp_path)
    result = invoke(runner, make_args(tmp_path, sd1, xl))
    line = assert_refused(result, tmp_path, before, *fragments, code=code)
    assert "valid" in line or "known" in line or "preset or blocks" in line, "the message lists what is valid"


@pytest.mark.parametrize("arch, value, fragments", [
    # Flux.1: BASE's embedders take a rank only through in_dims
    ("flux", "block_ranks=BASE=8", ["block_ranks gives BASE rank 8", "in_dims=[img,time,vector,guidance,txt]",
                                    "in_dims=[8,8,8,8,8]"]),
    # SD1: IN00 is conv_in, which kohya's networks.lora never wraps
    ("sd1", "block_ranks=IN00=8", ["block_ranks gives IN00 rank 8", "wraps no layer there (conv_in)", "drop it"]),
])
def test_plan_refuses_a_rank_kohya_would_ignore(runner, tmp_path, arch, value, fragments):
    """A rank for layers kohya's rule leaves unwrapped is refused by plan in one line saying what to do."""
    require("plan")
    before = snapshot(tmp_path)
    result = invoke(runner, ["plan", "--arch", arch, "--network-args", value])
    assert_refused(result, tmp_path, before, *fragments)


# --- LBW vectors of the wrong length -------------------------------------------------------------------------


def _ones(n: int) -> str:
    return ",".join(["1"] * n)


LBW_CASES = [
    ("reweight", lambda f, s, x: ["reweight", s, "--lbw", "1,0,1", "-o", f / "o.safetensors"], 1, ["3 values", "17 or 26"]),
    ("reweight", lambda f, s, x: ["reweight", s, "--lbw", "lbw=" + _ones(20), "-o", f / "o.safetensors"], 1,
     ["20 values", "sd1"]),
    ("reweight", lambda f, s, x: ["reweight", x, "--lbw", _ones(17), "-o", f / "o.safetensors"], 1,
     ["17 values", "12 or 20"]),
    ("reweight", lambda f, s, x: ["reweight", s, "--weights", _ones(16), "-o", f / "o.safetensors"], 1, ["16 values"]),
    ("blocks", lambda f, s, x: ["blocks", "--arch", "sd1", "1,0,1", "--as", "kohya"], 2, ["3 values", "17 or 26"]),
    ("blocks", lambda f, s, x: ["blocks", "--arch", "sdxl", _ones(26), "--as", "lbw"], 2, ["26 values", "12 or 20"]),
    ("plan", lambda f, s, x: ["plan", "--arch", "sd1", "--network-args", "block_dims=" + _ones(3)], 1,
     ["block_dims", "25 comma-separated values", "not 3"]),
    ("plan", lambda f, s, x: ["plan", "--arch", "sdxl", "--network-args", "block_dims=" + _ones(25)], 1,
     ["block_dims", "23"]),
    ("plan", lambda f, s, x: ["plan", "--arch", "sd1", "--network-args", "block_lr=" + _ones(5)], 1, ["block_lr"]),
]


@pytest.mark.parametrize(
    "command, make_args, code, fragments", LBW_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(LBW_CASES)]
)
def test_lbw_vector_of_the_wrong_length(runner, tmp_path, sd1, xl, command, make_args, code, fragments):
    require(command)
    before = snapshot(tmp_path)
    assert_refused(invoke(runner, make_args(tmp_path, sd1, xl)), tmp_path, before, *fragments, code=code)


# --- NaN and Inf ---------------------------------------------------------------------------------------------------

_NONFINITE = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def _poisoned(path, value: float, dtype=torch.float32, kind: str = "locon", where: str = "lora_down.weight"):
    """An adapter with one non-finite entry in the first SD1 attention module (IN01)."""
    source = make_adapter(path.with_name("clean-" + path.name), "sd1", kind, rank=2, per_block=1, dtype=dtype)
    tensors = load_file(source)
    source.unlink()
    key = f"{ATTN}.{where}"
    tensors[key].view(-1)[3] = value
    save_file(tensors, path)
    return path


def _nan_args(command: str, bad, other, out, allow: bool) -> list:
    args = {
        "prune": ["prune", bad, "--drop", "te", "-o", out],
        "reweight": ["reweight", bad, "--weights", "in0=0.5", "-o", out],
        "merge": ["merge", other, bad, "-o", out],
        "resize": ["resize", bad, "--rank", "1", "-o", out],
        "convert": ["convert", bad, "--to", "peft", "-o", out],
    }[command]
    return args + (["--allow-nonfinite"] if allow else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("value", list(_NONFINITE), ids=list(_NONFINITE))
def test_inspect_reports_nonfinite_and_stays_valid_json(runner, tmp_path, value, dtype):
    require("inspect")
    bad = _poisoned(tmp_path / "bad.safetensors", _NONFINITE[value], dtype)
    result = invoke(runner, ["inspect", "--json", bad])
    assert result.exit_code == 0
    report = json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))[0]
    assert any("NaN or Inf" in w and ATTN in w for w in report["warnings"])
    assert report["blocks"]["in0"]["norm"] is None and report["norm"] is not None
    table = invoke(runner, ["inspect", bad])  # the table too (a NaN share once broke its bar)
    assert table.exit_code == 0 and "NaN or Inf" in table.stderr


@pytest.mark.parametrize("command", WRITERS)
@pytest.mark.parametrize("value", list(_NONFINITE), ids=list(_NONFINITE))
def test_writers_refuse_nonfinite_naming_the_module(runner, tmp_path, sd1, value, command):
    require(command)
    bad = _poisoned(tmp_path / "bad.safetensors", _NONFINITE[value])
    before = snapshot(tmp_path)
    result = invoke(runner, _nan_args(command, bad, sd1, tmp_path / "out.safetensors", allow=False))
    line = assert_refused(result, tmp_path, before, str(bad), ATTN, "NaN or Inf")
    if command != "resize":
        assert "--allow-nonfinite" in line


@pytest.mark.parametrize("command", WRITERS)
def test_allow_nonfinite_writes_them(runner, tmp_path, sd1, command):
    """With the flag, what needs no decomposition is written as it is; an SVD (resize) still cannot take NaN."""
    require(command)
    bad = _poisoned(tmp_path / "bad.safetensors", float("nan"))
    out = tmp_path / "out.safetensors"
    before = snapshot(tmp_path)
    result = invoke(runner, _nan_args(command, bad, sd1, out, allow=True))
    if command == "resize":
        assert_refused(result, tmp_path, before, str(bad), ATTN, "cannot be decomposed")
        return
    assert result.exit_code == 0, result.stderr
    assert any(torch.isnan(t).any() for t in load_file(out).values())


def test_svd_merge_refuses_nonfinite_even_when_allowed(runner, tmp_path, sd1):
    require("merge")
    bad = _poisoned(tmp_path / "bad.safetensors", float("inf"))
    before = snapshot(tmp_path)
    result = invoke(runner, ["merge", sd1, bad, "--method", "svd", "--rank", "2", "-o", tmp_path / "o.safetensors",
                             "--allow-nonfinite"])
    assert_refused(result, tmp_path, before, str(bad), ATTN, "cannot be decomposed")


@pytest.mark.parametrize("kind, where", [("loha", "hada_w2_b"), ("lokr", "lokr_w2_b"), ("tucker", "lora_up.weight")])
def test_nonfinite_in_other_kinds(runner, tmp_path, kind, where):
    require("reweight")
    bad = _poisoned(tmp_path / "bad.safetensors", float("nan"), kind=kind, where=where)
    before = snapshot(tmp_path)
    result = invoke(runner, ["reweight", bad, "--weights", "in0=0.5", "-o", tmp_path / "o.safetensors"])
    assert_refused(result, tmp_path, before, str(bad), ATTN, "NaN or Inf")
    assert invoke(runner, ["resize", bad, "--rank", "1", "-o", tmp_path / "o.safetensors"]).exit_code == 1
    assert snapshot(tmp_path) == before


def test_nonfinite_passthrough_key_is_refused(runner, tmp_path):
    require("prune")
    extra = {"bundle_emb.sks.string_to_param.*": torch.tensor([[1.0, float("nan")]])}
    bad = make_adapter(tmp_path / "bad.safetensors", "sd1", "lora", rank=2, per_block=1, extra=extra)
    before = snapshot(tmp_path)
    result = invoke(runner, ["prune", bad, "--drop", "te", "-o", tmp_path / "o.safetensors"])
    assert_refused(result, tmp_path, before, str(bad), "bundle_emb.sks", "NaN or Inf")


def test_overflow_is_refused_naming_the_output(runner, tmp_path):
    """A finite fp16 input scaled past 65504 becomes Inf: the error names the module and the output."""
    require("reweight")
    source = make_adapter(tmp_path / "half.safetensors", "sd1", "lora", rank=2, per_block=1, dtype=torch.float16)
    out = tmp_path / "o.safetensors"
    before = snapshot(tmp_path)
    result = invoke(runner, ["reweight", source, "--weights", "in0=1e9", "-o", out])
    assert_refused(result, tmp_path, before, str(out), "lora_up.weight", "overflow")


def test_clean_files_pass_the_check(runner, tmp_path, sd1):
    require("merge")
    out = tmp_path / "o.safetensors"
    assert invoke(runner, ["merge", sd1, sd1, "--ratios", "1,-1", "-o", out]).exit_code == 0
    assert all(float(d.abs().max()) < 1e-6 for d in dense_deltas(out).values())


def test_compare_refuses_nonfinite_naming_file_and_module(runner, tmp_path, sd1):
    require("compare")
    bad = _poisoned(tmp_path / "bad.safetensors", float("nan"))
    before = snapshot(tmp_path)
    assert_refused(invoke(runner, ["compare", sd1, bad]), tmp_path, before, str(bad), ATTN, "NaN or Inf")


def test_render_dry_run_of_a_nonfinite_adapter_does_not_crash(runner, tmp_path):
    """A dry run reads no tensor data; the file opens and the plan is shown (the real run is render's to refuse)."""
    require("render")
    bad = _poisoned(tmp_path / "bad.safetensors", float("nan"))
    result = invoke(runner, _render(tmp_path, bad))
    assert result.exit_code == 0, result.stderr
    assert not (tmp_path / "grid.png").exists()


def test_convert_folding_a_nonfinite_input_is_not_called_an_overflow(runner, tmp_path):
    """--uniform-alpha folds each module's scale into a factor: NaN already in the input is the input's fault
    (and --allow-nonfinite lets it through); only a finite value that overflows is an overflow."""
    require("convert")
    source = make_adapter(tmp_path / "mixed.safetensors", "sd1", "lora", rank=2, per_block=1,
                          alpha=lambda layer: 1.0 if "attn1" in layer.name else 2.0)
    tensors = load_file(source)
    tensors[f"{ATTN}.lora_up.weight"].view(-1)[0] = float("nan")
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad)
    out = tmp_path / "o.safetensors"
    before = snapshot(tmp_path)
    args = ["convert", bad, "--to", "kohya", "--uniform-alpha", "-o", out]
    line = assert_refused(invoke(runner, args), tmp_path, before, str(bad), ATTN, "NaN or Inf")
    assert "overflow" not in line
    result = invoke(runner, args + ["--allow-nonfinite"])
    assert result.exit_code == 0, result.stderr
    assert torch.isnan(load_file(out)[f"{ATTN}.lora_up.weight"]).any()
