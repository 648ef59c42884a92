"""Hostile small files must not make a command allocate what the real model never needs (issue #12).

Each file is under 10 MB, yet its header asks for a ΔW of gigabytes to terabytes: a LoHa or LoKr whose factors
multiply out far beyond the layer, a Tucker core with a huge kernel, an oversized full `diff`, a LoRA whose rank
(10⁶) would make an r×r Gram matrix of 4 TB although its layer is 1×1. Every command that reads tensors runs
on every file in one subprocess whose address space is capped at 1.5 GiB above the python+torch baseline
(measured first), so a failure cannot hurt the machine. The outcome must be a clean one-line refusal naming the
layer, or — for the huge rank, whose ΔW is tiny — a bounded success; never a traceback, MemoryError or a kill.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

REPO = Path(__file__).resolve().parents[2]
HEADROOM = 3 << 29  # 1.5 GiB above the baseline
ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # a 320×320 Linear on SD1
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # a 320×320×3×3 conv on SD1
OTHER_ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k"

_BASELINE = """
import torch, blora_tools.cli, blora_tools.adapter.model, blora_tools.ops.merge, blora_tools.ops.compare
print(next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmPeak')) * 1024)
"""

_DRIVER = """
import json, sys, traceback
import torch
torch.set_num_threads(1)
from click.testing import CliRunner
from blora_tools.cli import main
for args in json.loads(sys.argv[1]):
    try:
        result = CliRunner().invoke(main, args)
        problem = None if result.exception is None or isinstance(result.exception, SystemExit) else repr(result.exception)
        report = {"args": args, "code": result.exit_code, "stderr": result.stderr, "exception": problem}
    except BaseException as err:  # MemoryError escaping the runner itself
        report = {"args": args, "code": None, "stderr": traceback.format_exc(), "exception": repr(err)}
    print(json.dumps(report), flush=True)
"""


def _hostile(folder: Path) -> dict[str, Path]:
    """name → file; every file is small on disk and names one SD1 layer."""
    half = torch.float16
    files = {
        # (10⁵×1)(1×2·10⁴) twice: an 8 GB ΔW per Hadamard half for a 320×320 layer
        "loha": {f"{ATTN}.hada_w1_a": torch.ones(100_000, 1, dtype=half), f"{ATTN}.hada_w1_b": torch.ones(1, 20_000, dtype=half),
                 f"{ATTN}.hada_w2_a": torch.ones(100_000, 1, dtype=half), f"{ATTN}.hada_w2_b": torch.ones(1, 20_000, dtype=half)},
        # kron of 1000×1000 and 100×100: a 10⁵×10⁵ ΔW (40 GB)
        "lokr": {f"{ATTN}.lokr_w1": torch.ones(1000, 1000, dtype=half), f"{ATTN}.lokr_w2": torch.ones(100, 100, dtype=half)},
        # a rank-1 Tucker LoCon whose 1000×1000 kernel makes a 320×320×1000×1000 ΔW (400 GB)
        "tucker": {f"{CONV}.lora_down.weight": torch.ones(1, 320, 1, 1, dtype=half),
                   f"{CONV}.lora_mid.weight": torch.ones(1, 1, 1000, 1000, dtype=half),
                   f"{CONV}.lora_up.weight": torch.ones(320, 1, 1, 1, dtype=half)},
        # a LoHa Tucker core with the same kernel
        "loha-tucker": {f"{CONV}.hada_w1_a": torch.ones(1, 320, dtype=half), f"{CONV}.hada_w1_b": torch.ones(1, 320, dtype=half),
                        f"{CONV}.hada_t1": torch.ones(1, 1, 1000, 1000, dtype=half),
                        f"{CONV}.hada_w2_a": torch.ones(1, 320, dtype=half), f"{CONV}.hada_w2_b": torch.ones(1, 320, dtype=half),
                        f"{CONV}.hada_t2": torch.ones(1, 1, 1000, 1000, dtype=half)},
        # a full diff of 4000×1000 for a 320×320 layer
        "diff": {f"{ATTN}.diff": torch.ones(4000, 1000, dtype=half)},
        # rank 10⁶ on a 1×1 ΔW: an r×r Gram matrix would be 4 TB
        "rank": {f"{ATTN}.lora_down.weight": torch.full((1_000_000, 1), 1e-3, dtype=half),
                 f"{ATTN}.lora_up.weight": torch.full((1, 1_000_000), 1e-3, dtype=half),
                 f"{ATTN}.alpha": torch.tensor(1.0)},
    }
    paths = {}
    for name, tensors in files.items():
        path = folder / f"{name}.safetensors"
        save_file(tensors, str(path))
        assert path.stat().st_size < 10 << 20, name
        paths[name] = path
    good = folder / "good.safetensors"  # shares the huge-rank module's layer (ΔW 1×1) and has one ordinary module
    save_file(
        {
            f"{ATTN}.lora_down.weight": torch.ones(2, 1), f"{ATTN}.lora_up.weight": torch.ones(1, 2),
            f"{OTHER_ATTN}.lora_down.weight": torch.randn(4, 320), f"{OTHER_ATTN}.lora_up.weight": torch.randn(320, 4),
        },
        str(good),
    )
    paths["good"] = good
    return paths


def _commands(f: Path, good: Path, out: Path) -> list[list[str]]:
    runs = [
        ["inspect", f],
        ["compare", good, f],
        ["compare", f, f],
        ["resize", f, "--rank", "1", "-o", out / "resize.safetensors"],
        ["merge", good, f, "--method", "svd", "--rank", "2", "-o", out / "svd.safetensors"],
        ["merge", good, f, "--method", "concat", "-o", out / "concat.safetensors"],
        ["prune", f, "--drop", "in1", "-o", out / "prune.safetensors"],
        ["reweight", f, "--weights", "in0=0.5", "-o", out / "reweight.safetensors"],
        ["convert", f, "--to", "peft", "-o", out / "convert.safetensors"],
    ]
    return [[str(a) for a in run] for run in runs]


def _limit(cap: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    return apply


def _run(script: str, *args: str, cap: int | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", MALLOC_ARENA_MAX="2",
               OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300,
        preexec_fn=_limit(cap) if cap else None,
    )


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, list[dict]]:
    """Every command on every hostile file, in one capped subprocess: file name → reports."""
    folder = tmp_path_factory.mktemp("hostile")
    paths = _hostile(folder)
    baseline = _run(_BASELINE)
    assert baseline.returncode == 0, baseline.stderr
    cap = int(baseline.stdout.strip()) + HEADROOM
    runs, owners = [], []
    for name, path in paths.items():
        if name == "good":
            continue
        out = folder / name
        out.mkdir()
        for args in _commands(path, paths["good"], out):
            runs.append(args)
            owners.append(name)
    done = _run(_DRIVER, json.dumps(runs), cap=cap)
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and len(reports) == len(runs), (
        f"the capped process died (rc {done.returncode}) after {len(reports)} of {len(runs)} runs: {done.stderr[-2000:]}"
    )
    grouped: dict[str, list[dict]] = {}
    for name, report in zip(owners, reports):
        grouped.setdefault(name, []).append(report)
    return grouped


@pytest.mark.parametrize(
    "name, layer",
    [
        ("loha", "[320, 320]"),
        ("lokr", "[320, 320]"),
        ("tucker", "[320, 320, 3, 3]"),
        ("loha-tucker", "[320, 320, 3, 3]"),
        ("diff", "[320, 320]"),
    ],
)
def test_oversized_modules_are_refused_before_any_tensor_is_read(outcomes, name, layer):
    for report in outcomes[name]:
        assert report["exception"] is None and "Traceback" not in report["stderr"], report
        lines = [line for line in report["stderr"].splitlines() if line.strip()]
        assert report["code"] == 1 and len(lines) == 1 and lines[0].startswith("error: "), report
        assert f"{name}.safetensors" in lines[0] and f"the sd1 layer it adapts is {layer}" in lines[0], report


def test_a_huge_rank_on_a_tiny_layer_is_computed_within_the_layer_size(outcomes):
    """Rank 10⁶ with a 1×1 ΔW: every command succeeds, by routes bounded by the layer, not by rank²."""
    for report in outcomes["rank"]:
        assert report["exception"] is None and "Traceback" not in report["stderr"], report
        assert report["code"] == 0, report
