"""`inspect` and `blocks` through the CLI: figures against dense computations, JSON schema, exit codes."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from blora_tools.cli import main

UNET_ATTN = [
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_up_blocks_3_attentions_1_transformer_blocks_0_attn2_to_k",
    "lora_unet_mid_block_attentions_0_proj_out",
]
TE = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"


@pytest.fixture
def lora_file(tmp_path):
    torch.manual_seed(1)
    tensors, dense = {}, {}
    for i, stem in enumerate(UNET_ATTN + [TE]):
        rank, alpha = 2 + i, 1.0 + i
        down, up = torch.randn(rank, 16), torch.randn(24, rank)
        tensors |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up, f"{stem}.alpha": torch.tensor(alpha)}
        dense[stem] = (alpha / rank) * up @ down
    path = tmp_path / "style [v1].safetensors"
    save_file(tensors, path, metadata={"ss_network_dim": "Dynamic", "ss_tag_frequency": json.dumps({"d": {"blue": 5, "red": 2}})})
    return path, dense


def _invoke(runner, *args):
    return runner.invoke(main, list(map(str, args)), catch_exceptions=False)


def test_inspect_json_norms_equal_dense_norms(runner, lora_file):
    path, dense = lora_file
    result = _invoke(runner, "inspect", "--json", path)
    assert result.exit_code == 0
    (report,) = json.loads(result.stdout)
    assert report["arch"] == "sd1" and report["format"] == "kohya" and report["modules"] == 4
    assert report["kinds"] == {"lora": 4}
    blocks = report["blocks"]
    expect = {"in0": dense[UNET_ATTN[0]], "out3": dense[UNET_ATTN[1]], "mid": dense[UNET_ATTN[2]], "te": dense[TE]}
    total = sum(float(d.norm()) ** 2 for d in expect.values())
    for group, delta in expect.items():
        assert blocks[group]["modules"] == 1
        assert blocks[group]["norm"] == pytest.approx(float(delta.norm()), rel=1e-5)
        assert blocks[group]["share"] == pytest.approx(float(delta.norm()) ** 2 / total, rel=1e-5)
    assert blocks["in1"]["modules"] == 0 and blocks["in1"]["norm"] is None
    assert blocks["out3"]["rank_min"] == blocks["out3"]["rank_max"] == 3
    assert report["training"]["top_tags"] == [["blue", 5], ["red", 2]]
    assert any("different alpha" in w for w in report["warnings"])


def test_inspect_fine_and_no_stats(runner, lora_file):
    path, _ = lora_file
    (report,) = json.loads(_invoke(runner, "inspect", "--json", "--fine", "--no-stats", path).stdout)
    assert report["blocks"]["IN01"]["modules"] == 1 and report["blocks"]["OUT10"]["modules"] == 1
    assert report["blocks"]["BASE"]["modules"] == 1 and report["norm"] is None
    assert all(b["norm"] is None for b in report["blocks"].values())


def test_inspect_table_and_many_files(runner, lora_file, tmp_path):
    path, _ = lora_file
    result = _invoke(runner, "inspect", path)
    assert result.exit_code == 0 and "style [v1].safetensors" in result.stdout and "out3" in result.stdout
    result = _invoke(runner, "inspect", "--json", tmp_path)
    assert [r["path"] for r in json.loads(result.stdout)] == [str(path)]


def test_inspect_reports_nonfinite(runner, tmp_path):
    stem = UNET_ATTN[0]
    down = torch.randn(2, 4)
    down[0, 0] = float("nan")
    save_file({f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": torch.randn(4, 2)}, tmp_path / "n.safetensors")
    (report,) = json.loads(_invoke(runner, "inspect", "--json", tmp_path / "n.safetensors").stdout)
    assert any("NaN" in w for w in report["warnings"])


@pytest.mark.parametrize("content, fragment", [(b"", "shorter than"), (b"\x80\x04junkjunk", "pickle")])
def test_inspect_bad_file_is_one_line_exit_1(runner, tmp_path, content, fragment):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    result = _invoke(runner, "inspect", bad)
    assert result.exit_code == 1
    assert result.stderr.count("\n") == 1 and str(bad) in result.stderr and fragment in result.stderr


def test_inspect_no_stats_never_imports_torch(lora_file):
    path, _ = lora_file
    code = (
        "import sys; from blora_tools.cli import main\n"
        f"try: main(['inspect', '--no-stats', '--json', {str(path)!r}])\n"
        "except SystemExit: pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_blocks_kohya_contract(runner):
    result = _invoke(runner, "blocks", "--arch", "sd1", "in0,out3", "--as", "kohya", "--rank", "16")
    assert result.stdout.strip() == "0,16,16,16" + ",0" * 18 + ",16,16,16"
    xl = _invoke(runner, "blocks", "--arch", "sdxl", "style", "--as", "kohya", "--rank", "8").stdout.strip().split(",")
    assert len(xl) == 23 and xl[2:5] == ["8"] * 3 and xl[19:22] == ["8"] * 3 and xl.count("8") == 6


def test_blocks_lbw_and_diffusers(runner):
    lbw = _invoke(runner, "blocks", "--arch", "sd1", "in0=0.5,te=0", "--as", "lbw").stdout.strip().split(",")
    assert len(lbw) == 26 and lbw[0] == "0" and lbw[2] == "0.5" and lbw[1] == "1"
    assert len(_invoke(runner, "blocks", "--arch", "sdxl", "all", "--as", "lbw").stdout.strip().split(",")) == 20
    d = json.loads(_invoke(runner, "blocks", "--arch", "sd1", "lbw=MIDD", "--as", "diffusers").stdout)
    assert d["unet"]["mid"] == 1 and d["unet"]["down"]["block_0"] == [0, 0]


def test_blocks_table_json(runner):
    doc = json.loads(_invoke(runner, "blocks", "--arch", "sdxl", "--json").stdout)
    rows = {r["block"]: r for r in doc["blocks"]}
    assert rows["M00"]["kohya"] == [10, 11, 12] and rows["OTHER"]["kohya"] == [0, 22]
    assert rows["IN01"]["attention"] is False and rows["IN04"]["attention"] is True
    assert doc["presets"]["upper"] == "in0,out2"


@pytest.mark.parametrize("args", [["blocks", "--arch", "sd1", "in9"], ["blocks", "--arch", "sdxl", "lbw=1,0,1"], ["blocks", "--arch", "sd9"]])
def test_blocks_usage_errors_exit_2(runner, args):
    result = _invoke(runner, *args)
    assert result.exit_code == 2 and "Error" in result.stderr


def test_help_for_every_command(runner):
    from blora_tools.cli import COMMANDS

    for name in COMMANDS:
        result = _invoke(runner, name, "--help")
        assert result.exit_code == 0 and "Usage" in result.stdout and "Example" in result.stdout, name


def test_version(runner):
    result = _invoke(runner, "--version")
    assert result.exit_code == 0 and "blora-tools" in result.stdout


def test_inspect_plot_writes_a_png(runner, lora_file, tmp_path):
    pytest.importorskip("matplotlib")
    path, _ = lora_file
    chart = tmp_path / "norms.png"
    result = _invoke(runner, "inspect", path, "--plot", chart)
    assert result.exit_code == 0 and chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert _invoke(runner, "inspect", path, "--no-stats", "--plot", chart).exit_code == 2
