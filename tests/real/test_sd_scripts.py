"""Opt-in: kohya-ss sd-scripts' own train_network.py with `--network_module kohya_plugin.blockwise`.

Runs ../shared/kohya_real/run.sh (a tiny random model, a few CPU steps, offline) and checks the file the real
trainer writes. Skipped unless SD_SCRIPTS points at an sd-scripts work tree. The harness's scratch folder is
$WORK (or $KOHYA_REAL_WORK); it holds a ~5.8 GB venv that later runs reuse, so point it somewhere persistent.

    SD_SCRIPTS=/path/to/sd-scripts WORK=/path/to/scratch pytest -m real tests/real
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HARNESS_CANDIDATES = [os.environ.get("KOHYA_REAL_HARNESS"), REPO.parent / "shared" / "kohya_real"]

pytestmark = pytest.mark.real


def _harness() -> Path:
    for candidate in HARNESS_CANDIDATES:
        if candidate and Path(candidate, "run.sh").is_file():
            return Path(candidate)
    pytest.skip("the kohya_real harness (../shared/kohya_real/run.sh) is not here")


def _sd_scripts() -> Path:
    tree = os.environ.get("SD_SCRIPTS")
    if not tree or not Path(tree, "train_network.py").is_file():
        pytest.skip("set SD_SCRIPTS to an sd-scripts work tree to run the real trainer")
    return Path(tree)


def _work(tmp_path_factory) -> Path:
    work = os.environ.get("KOHYA_REAL_WORK") or os.environ.get("WORK")
    return Path(work) if work else tmp_path_factory.mktemp("kohya_real")


CASES = {
    "all": ("sd1", "preset=all"),
    "style-conv": ("sd1", "preset=style conv_dim=4"),
    "kohya-block-dims": ("sd1", "block_dims=" + ",".join(str(i % 5) for i in range(25))),
    "sdxl-style-conv": ("sdxl", "preset=style conv_dim=4"),
}


def _run(tmp_path_factory, run_name: str, arch: str, network_args: str, extra: str = "") -> Path:
    """Run the harness once; returns the run folder (net.safetensors, train.log, summary.json)."""
    harness, tree = _harness(), _sd_scripts()
    work = _work(tmp_path_factory)
    env = {
        **os.environ,
        "SD_SCRIPTS": str(tree),
        "WORK": str(work),
        "ARCH": arch,
        "NETWORK_MODULE": "kohya_plugin.blockwise",
        "NETWORK_ARGS": network_args,
        "EXTRA_PYTHONPATH": str(REPO),
        "EXTRA_TRAIN_ARGS": extra,
        "RUN_NAME": run_name,
        "STEPS": "3",
    }
    done = subprocess.run(["bash", str(harness / "run.sh")], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work / "runs" / run_name


def _read(out: Path) -> tuple[dict, list[str], set[float]]:
    from safetensors import safe_open

    with safe_open(str(out / "net.safetensors"), "pt") as f:
        keys = list(f.keys())
        alphas = {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")}
        return f.metadata(), keys, alphas


@pytest.mark.parametrize("case", list(CASES))
def test_real_trainer_runs_the_plugin(case, tmp_path_factory):
    arch, network_args = CASES[case]
    out = _run(tmp_path_factory, f"blockwise-{case}", arch, network_args)
    assert json.loads((out / "summary.json").read_text())  # the harness's checks passed
    meta, keys, alphas = _read(out)
    assert meta["ss_network_module"] == "kohya_plugin.blockwise"
    spec = json.loads(meta["blora_spec"])
    assert spec["arch"] == arch and len(alphas) == 1
    trained = {g for g, e in spec["blocks"].items() if e["rank"] or e["conv_rank"]}
    if "style" in case:
        assert trained == ({"in0", "out2"} if arch == "sdxl" else {"in0", "out3"})
        outer = ("input_blocks_1", "input_blocks_2", "input_blocks_3", "output_blocks_6", "output_blocks_7",
                 "output_blocks_8") if arch == "sdxl" else ("down_blocks_0", "up_blocks_3")
        assert all(k.startswith(tuple(f"lora_unet_{p}_" for p in outer)) for k in keys)


def test_real_trainer_resumes_and_merges(tmp_path_factory):
    """--network_weights with --dim_from_weights (resume), and --base_weights (character merged, style trained)."""
    character = _run(tmp_path_factory, "blockwise-character", "sd1", "preset=all block_ranks=in0=8,out3=2")
    style_args = "preset=style conv_dim=4"
    first = _run(tmp_path_factory, "blockwise-style-first", "sd1", style_args)
    resumed = _run(tmp_path_factory, "blockwise-style-resumed", "sd1", style_args,
                   f"--network_weights {first / 'net.safetensors'} --dim_from_weights")
    log = (resumed / "train.log").read_text(errors="replace")
    assert "All keys matched successfully" in log
    assert sorted(_read(resumed)[1]) == sorted(_read(first)[1])
    merged = _run(tmp_path_factory, "blockwise-style-on-character", "sd1", style_args,
                  f"--base_weights {character / 'net.safetensors'}")
    assert "all weights merged" in (merged / "train.log").read_text(errors="replace")
