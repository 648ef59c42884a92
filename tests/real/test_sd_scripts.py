"""Opt-in: the project against a real kohya-ss/sd-scripts work tree (SD_SCRIPTS).

kohya's own train_network.py / sdxl_train_network.py train `--network_module kohya_plugin.blockwise` on a tiny random
model for a few CPU steps, offline (harness/), and these tests check the file the real trainer writes; and
scripts/make_kohya_manifests.py writes the committed golden manifests again. Skipped unless SD_SCRIPTS is set; see
harness/__init__.py for KOHYA_PYTHON and KOHYA_REAL_WORK (the scratch folder: keep it between runs, it holds a
~6 GB venv).

    SD_SCRIPTS=/path/to/sd-scripts KOHYA_REAL_WORK=/path/to/scratch pytest -m real tests/real
"""

from __future__ import annotations

import json
import math

import pytest
from harness import REPO, Kohya, Run

pytestmark = pytest.mark.real

MODULE = "kohya_plugin.blockwise"
STEPS = 3
CASES = {
    "all": ("sd1", ["preset=all"]),
    "style-conv": ("sd1", ["preset=style", "conv_dim=4"]),
    "kohya-block-dims": ("sd1", ["block_dims=" + ",".join(str(i % 5) for i in range(25))]),
    "sdxl-style-conv": ("sdxl", ["preset=style", "conv_dim=4"]),
}


def _read(run: Run) -> tuple[dict, dict]:
    from safetensors.torch import load_file
    from safetensors import safe_open

    with safe_open(str(run.network_file), "pt") as f:
        meta = f.metadata()
    return meta, load_file(str(run.network_file))


def _assert_trained(run: Run) -> tuple[dict, dict]:
    """What any real run must show: kohya's metadata, finite tensors, factors the optimizer moved, a finite loss."""
    meta, tensors = _read(run)
    assert tensors
    assert meta["ss_network_module"] == MODULE and meta["ss_steps"] == str(STEPS)
    assert all(t.float().isfinite().all() for t in tensors.values())
    assert any(t.abs().max() > 0 for k, t in tensors.items() if k.endswith(".lora_up.weight"))
    assert math.isfinite(run.final_loss())
    return meta, tensors


def _train(kohya, name: str, arch: str, network_args: list[str], extra: list[str] = ()) -> Run:
    return kohya.train(f"blockwise-{name}", arch, MODULE, network_args, extra, steps=STEPS)


@pytest.mark.parametrize("case", list(CASES))
def test_real_trainer_runs_the_plugin(case, kohya):
    arch, network_args = CASES[case]
    meta, tensors = _assert_trained(_train(kohya, case, arch, network_args))
    spec = json.loads(meta["blora_spec"])
    alphas = {float(t) for k, t in tensors.items() if k.endswith(".alpha")}
    assert spec["arch"] == arch and len(alphas) == 1
    trained = {g for g, e in spec["blocks"].items() if e["rank"] or e["conv_rank"]}
    if "style" in case:
        assert trained == ({"in0", "out2"} if arch == "sdxl" else {"in0", "out3"})
        outer = ("input_blocks_1", "input_blocks_2", "input_blocks_3", "output_blocks_6", "output_blocks_7",
                 "output_blocks_8") if arch == "sdxl" else ("down_blocks_0", "up_blocks_3")
        assert all(k.startswith(tuple(f"lora_unet_{p}_" for p in outer)) for k in tensors)


def test_real_trainer_resumes_and_merges(kohya):
    """--network_weights with --dim_from_weights (resume), and --base_weights (character merged, style trained)."""
    character = _train(kohya, "character", "sd1", ["preset=all", "block_ranks=in0=8,out3=2"])
    style_args = ["preset=style", "conv_dim=4"]
    first = _train(kohya, "style-first", "sd1", style_args)
    resumed = _train(kohya, "style-resumed", "sd1", style_args,
                     ["--network_weights", str(first.network_file), "--dim_from_weights"])
    assert "All keys matched successfully" in resumed.log
    assert sorted(_assert_trained(resumed)[1]) == sorted(_read(first)[1])
    merged = _train(kohya, "style-on-character", "sd1", style_args, ["--base_weights", str(character.network_file)])
    assert "all weights merged" in merged.log
    _assert_trained(merged)


def test_generator_reproduces_the_committed_manifests(kohya, manifest_dir, tmp_path):
    """Only `environment` (the versions of whoever ran it) may differ. Skipped for another sd-scripts commit."""
    recorded = json.loads((manifest_dir / "sd1_lora.json").read_text())["kohya_commit"]
    if kohya.commit() != recorded:
        pytest.skip(f"SD_SCRIPTS is at {kohya.commit()}, the manifests record {recorded}")
    kohya.run_python([str(REPO / "scripts" / "make_kohya_manifests.py"), "--sd-scripts", str(kohya.sd_scripts),
                      "--out", str(tmp_path)], tmp_path / "generator.log")
    committed = sorted(p.name for p in manifest_dir.glob("*.json"))
    assert sorted(p.name for p in tmp_path.glob("*.json")) == committed
    for name in committed:
        fresh, golden = (json.loads((folder / name).read_text()) for folder in (tmp_path, manifest_dir))
        assert {**fresh, "environment": None} == {**golden, "environment": None}, name
