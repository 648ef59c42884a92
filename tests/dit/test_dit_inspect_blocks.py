"""`inspect` and `blocks` on Flux.1 and SD3: per-block figures against ΔW from the raw tensors, the compact
block grid, DiT advice instead of the U-Net's, and the block table and its exports (kohya indices, vectors,
diffusers names)."""

from __future__ import annotations

import json
import math

import pytest
from dit_adapters import make_dit_adapter
from raw_deltas import CASES, arch_args, block_of, deltas

from blora_tools.cli import main


def _run(runner, *args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("arch,dialect", CASES)
def test_inspect_json_per_block_norms(runner, tmp_path, arch, dialect):
    src = make_dit_adapter(tmp_path / "in.safetensors", arch, dialect, seed=11)
    result = _run(runner, "inspect", "--json", src, *arch_args(arch, dialect))
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)[0]
    assert report["arch"] == arch and report["dialect"] == dialect
    expected: dict[str, float] = {}
    for prefix, delta in deltas(src).items():
        block = block_of(prefix, arch)
        expected[block] = expected.get(block, 0.0) + float(delta.norm()) ** 2
    per_block = report["per_block"]
    assert len(per_block) == (58 if arch == "flux" else 39)  # BASE and every block of the family
    for block, figures in per_block.items():
        if block in expected:
            assert math.isclose(figures["norm"], math.sqrt(expected[block]), rel_tol=1e-5), block
        else:
            assert figures["modules"] == 0 and figures["norm"] is None
    assert math.isclose(report["norm"], math.sqrt(sum(expected.values())), rel_tol=1e-5)
    assert "attention-only" not in " ".join(report["warnings"])
    assert report["naming"] == {"kohya": ["bfl"], "comfyui": ["bfl"], "xlabs": ["bfl", "part"]}.get(dialect, ["diffusers"])


def test_inspect_trained_parts_of_an_xlabs_file(runner, tmp_path):
    src = make_dit_adapter(tmp_path / "in.safetensors", "flux", "xlabs")
    report = json.loads(_run(runner, "inspect", "--json", "--no-stats", src).stdout)[0]
    assert report["norm"] is None and report["per_block"]["D01"]["modules"] == 4
    assert report["trained"] == {
        "blocks": "D00-D01,S00-S01",
        "untrained": "D02-D18,S02-S37,te1,te3,base",
        "parts": {"double": ["img.attn.proj", "img.attn.qkv", "txt.attn.proj", "txt.attn.qkv"],
                  "single": ["linear1.qkv", "linear2"]},
    }


def test_inspect_table_fits_100_columns_and_names_arch_and_dialect(tmp_path):
    from click.testing import CliRunner

    src = make_dit_adapter(tmp_path / "in.safetensors", "flux", "comfyui")
    for args in ([], ["--fine"], ["--no-stats"]):
        result = CliRunner(env={"COLUMNS": "100"}).invoke(main, ["--no-color", "inspect", str(src), *args])
        assert result.exit_code == 0, result.stderr
        lines = result.stdout.splitlines()
        assert "flux · kohya (comfyui keys)" in lines[1]
        table_lines = [l for l in lines if l[:1] in "┃│┏┡└"]
        assert max(len(l) for l in table_lines) <= 100 and "…" not in result.stdout
        assert len(lines) < 40  # 58 blocks, compact: a grid, or runs of empty blocks as one row
    fine = CliRunner(env={"COLUMNS": "100"}).invoke(main, ["--no-color", "inspect", "--fine", str(src)]).stdout
    assert "D02–D18" in fine and "S02–S37" in fine


def test_inspect_plot_draws_every_dit_block(runner, tmp_path):
    pytest.importorskip("matplotlib")
    src = make_dit_adapter(tmp_path / "in.safetensors", "sd3", "kohya")
    chart = tmp_path / "norms.svg"
    assert _run(runner, "inspect", src, "--plot", chart).exit_code == 0
    text = chart.read_text()
    assert "J37" in text and "BASE" in text


# --- blocks ----------------------------------------------------------------------------------------------


def test_blocks_table_json_lists_flux_blocks_presets_and_vectors(runner):
    doc = json.loads(_run(runner, "blocks", "--arch", "flux", "--json").stdout)
    assert [b["block"] for b in doc["blocks"]] == [f"D{i:02d}" for i in range(19)] + [f"S{i:02d}" for i in range(38)]
    assert doc["blocks"][19]["kohya_index"] == 19
    assert doc["presets"]["splitflux-style"]["selector"] == "S10-S37" and "2511.15258" in doc["presets"]["splitflux-style"]["source"]
    assert set(doc["vectors"]) == {"19", "20", "57", "58", "61"}
    assert {"img", "txt", "q", "mlp", "mod"} <= set(doc["groups"]["double"]["words"])
    assert "train_single_block_indices" in doc["groups"]["single"]["kohya"]


def test_blocks_table_text_for_sd3(runner):
    result = _run(runner, "blocks", "--arch", "sd3")
    assert result.exit_code == 0
    assert "J00–J37 (38)" in result.stdout and "slg-layers = J07-J09" in result.stdout and "39 values" in result.stdout


@pytest.mark.parametrize(
    "arch,spec,expected",
    [
        ("flux", "splitflux-style", "train_double_block_indices=none train_single_block_indices=10-37"),
        ("flux", "D00,D01,D04,D05,D07,single", "train_double_block_indices=0-1,4-5,7 train_single_block_indices=all"),
        ("flux", "S10-S37=0,D03=0", "train_double_block_indices=0-2,4-18 train_single_block_indices=0-9"),
        ("sd3", "J00-J09", "train_block_indices=0-9"),
    ],
)
def test_blocks_as_kohya_indices(runner, arch, spec, expected):
    result = _run(runner, "blocks", "--arch", arch, spec, "--as", "kohya")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == expected


def test_blocks_as_kohya_refuses_parts(runner):
    result = _run(runner, "blocks", "--arch", "flux", "D05.img.q", "--as", "kohya")
    assert result.exit_code != 0 and "D05" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "spec,length,expected",
    [
        ("S10-S37=0", 58, [1.0] * 30 + [0.0] * 28),
        ("S10-S37=0", 57, [1.0] * 29 + [0.0] * 28),
        ("double=0.5", 20, [1.0] + [0.5] * 19),
        ("D03=0,S06-S07=0", 19, [1.0, 1.0, 1.0, 0.0] + [1.0] * 15),
        ("te1=0,base.out=0.5", 61, [0.0, 1.0, 1.0] + [1.0] * 57 + [0.5]),
    ],
)
def test_blocks_as_flux_vectors(runner, spec, length, expected):
    result = _run(runner, "blocks", "--arch", "flux", spec, "--as", "lbw", "--length", length, "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout) == expected


@pytest.mark.parametrize(
    "spec,length,mentions",
    [("S10=0", 19, "S10"), ("S10=0", 20, "S10"), ("BASE=0", 57, "BASE"), ("D05.img.q=0", 58, "D05"), ("S10=0", 17, "17")],
)
def test_blocks_vector_that_cannot_hold_the_weights_is_refused(runner, spec, length, mentions):
    result = _run(runner, "blocks", "--arch", "flux", spec, "--as", "lbw", "--length", length)
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1 and mentions in lines[0], result.stderr


def test_blocks_sd3_vectors(runner):
    full = json.loads(_run(runner, "blocks", "--arch", "sd3", "J01=0", "--as", "lbw", "--json").stdout)
    assert full == [1.0, 1.0, 0.0] + [1.0] * 36
    medium = json.loads(_run(runner, "blocks", "--arch", "sd3", "J01=0", "--as", "lbw", "--length", 25, "--json").stdout)
    assert medium == full[:25]


def test_blocks_as_diffusers_names(runner):
    doc = json.loads(_run(runner, "blocks", "--arch", "flux", "S10=0,D05.img.q=0.5", "--as", "diffusers").stdout)
    assert doc["transformer.single_transformer_blocks.10"] == 0.0
    assert doc["transformer.transformer_blocks.5.attn.to_q"] == 0.5 and doc["transformer.transformer_blocks.5.attn.to_k"] == 1.0
    assert "transformer.transformer_blocks.5" not in doc and doc["transformer.transformer_blocks.4"] == 1.0
    assert doc["text_encoder_2"] == 1.0 and "text_encoder_3" not in doc  # Flux's T5 is the pipeline's text_encoder_2
    sd3 = json.loads(_run(runner, "blocks", "--arch", "sd3", "te3=0", "--as", "diffusers").stdout)
    assert sd3["text_encoder_3"] == 0.0 and sd3["transformer.transformer_blocks.37"] == 1.0


def test_exported_vector_reweights_like_the_named_weights(runner, tmp_path):
    """blocks --as lbw, pasted into reweight --lbw, gives the file the named weights give it."""
    src = make_dit_adapter(tmp_path / "in.safetensors", "flux", "kohya", seed=12)
    spec = "S00=0.25,D01=0.5,BASE=2"
    vector = _run(runner, "blocks", "--arch", "flux", spec, "--as", "lbw").stdout.strip()
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert _run(runner, "reweight", src, "--weights", spec, "-o", a).exit_code == 0
    assert _run(runner, "reweight", src, "--lbw", vector, "-o", b).exit_code == 0
    da, db = deltas(a), deltas(b)
    assert set(da) == set(db) and all(da[k].equal(db[k]) for k in da)


@pytest.mark.parametrize("args", [("--as", "lbw-short"), ("--length", "58")])
def test_blocks_usage_errors(runner, args):
    spec_args = ["S10=0"] if args[0] == "--as" else []
    arch = "flux" if args[0] == "--as" else "sd1"
    result = _run(runner, "blocks", "--arch", arch, *spec_args, *args)
    assert result.exit_code == 2 and "Traceback" not in result.stderr


def test_plan_on_dit_per_block_and_refusals(runner):
    import json

    result = _run(runner, "plan", "--arch", "flux", "--network-args", "block_ranks=double=8,S10-S37=32", "--json")
    assert result.exit_code == 0, result.stderr
    blocks = json.loads(result.stdout)["blocks"]
    assert blocks["D00"]["modules"] == 10 and blocks["D00"]["rank"] == 8 and blocks["S37"]["rank"] == 32
    bad = _run(runner, "plan", "--arch", "flux", "--network-args", "x_attn_dim=4")
    assert bad.exit_code == 1 and "x_attn_dim is a SD3 argument" in bad.stderr and "Traceback" not in bad.stderr
    wrong = _run(runner, "plan", "--arch", "flux", "--variant", "sd3-medium")
    assert wrong.exit_code == 2 and "--variant" in wrong.stderr


def test_inspect_no_stats_and_blocks_never_import_torch(tmp_path):
    import subprocess
    import sys

    src = make_dit_adapter(tmp_path / "in.safetensors", "flux", "diffusers")
    code = (
        "import sys; from blora_tools.cli import main\n"
        f"for args in (['inspect', '--no-stats', {str(src)!r}], ['blocks', '--arch', 'flux', 'S10-S37', '--as', 'kohya']):\n"
        "    try: main(args)\n"
        "    except SystemExit as e: assert not e.code, e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
