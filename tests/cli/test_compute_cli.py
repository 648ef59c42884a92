"""`--threads` and `--device` through the CLI: the thread policy in a real process, devices refused by name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from adapters import make_adapter
from safetensors.torch import load_file

from blora_tools.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(runner, *args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def pair(tmp_path):
    a = make_adapter(tmp_path / "a.safetensors", "sd1", "lora", rank=4, seed=1)
    b = make_adapter(tmp_path / "b.safetensors", "sd1", "lora", rank=4, seed=2)
    return a, b


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["merge", "resize", "compare", "inspect"])
def test_cuda_refused_cleanly_where_there_is_none(runner, pair, tmp_path, command):
    a, b = pair
    out = tmp_path / "out.safetensors"
    args = {
        "merge": ["merge", a, b, "--method", "svd", "--rank", "4", "-o", out],
        "resize": ["resize", a, "--rank", "2", "-o", out],
        "compare": ["compare", a, b],
        "inspect": ["inspect", a],
    }[command]
    result = _run(runner, *args, "--device", "cuda")
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: --device cuda: no CUDA device (this torch sees none); use --device cpu"
    assert not out.exists()


def test_mps_refused_with_its_reason(runner, pair, tmp_path):
    a, b = pair
    result = _run(runner, "merge", a, b, "--method", "svd", "--rank", "4", "-o", tmp_path / "o.safetensors", "--device", "mps")
    assert result.exit_code == 1 and "float64" in result.stderr


def test_inspect_without_stats_ignores_the_device(runner, pair):
    """--no-stats reads no tensor, so even an absent device is no error."""
    result = _run(runner, "inspect", "--no-stats", "--json", pair[0], "--device", "cuda")
    assert result.exit_code == 0, result.stderr


def test_auto_device_gives_the_cpu_figures(runner, pair, tmp_path):
    a, b = pair
    default = json.loads(_run(runner, "compare", a, b, "--json").stdout)
    auto = json.loads(_run(runner, "compare", a, b, "--json", "--device", "auto", "--threads", "1").stdout)
    assert auto["blocks"] == pytest.approx(default["blocks"]) if torch.cuda.is_available() else auto == default
    first = _run(runner, "merge", a, b, "--method", "svd", "--rank", "4", "-o", tmp_path / "1.safetensors", "--json")
    second = _run(runner, "merge", a, b, "--method", "svd", "--rank", "4", "-o", tmp_path / "2.safetensors",
                  "--json", "--device", "auto", "--threads", "1")
    assert first.exit_code == second.exit_code == 0
    one, two = load_file(str(tmp_path / "1.safetensors")), load_file(str(tmp_path / "2.safetensors"))
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-6)


_PROBE = textwrap.dedent(
    """
    import json, os, sys, threading, time
    import importlib.abc

    seen = {}

    class WatchTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "torch" and "env" not in seen:
                seen["env"] = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
            return None

    sys.meta_path.insert(0, WatchTorch())

    import blora_tools.compute as compute
    allowed, busy = int(sys.argv[1]), float(sys.argv[2])
    compute.read_cpu_load = lambda: compute.CpuLoad(allowed, busy)  # the simulated machine

    import blora_tools.ops.merge as merge_op
    decompose = merge_op.decompose_factors

    def probe(*args, **kwargs):
        import torch
        result = decompose(*args, **kwargs)
        seen["torch_threads"] = torch.get_num_threads()
        native = 1 << 30
        for _ in range(3):  # the least of a few readings: a pool thread that is ending still shows in /proc a moment
            native = min(native, len(os.listdir("/proc/self/task")) - threading.active_count())
            time.sleep(0.005)
        seen["native_threads"] = max(seen.get("native_threads", 0), native)
        name = threading.current_thread().name
        seen["module_threads"] = sorted(set(seen.get("module_threads", [])) | {name.rsplit("_", 1)[0]})
        seen["module_workers"] = max(seen.get("module_workers", 0), int(name.rsplit("_", 1)[1]) + 1
                                     if name.startswith("blora-ahead") else 0)
        return result

    merge_op.decompose_factors = probe
    from blora_tools.cli import main
    try:
        main(sys.argv[3:], standalone_mode=False)
    finally:
        print(json.dumps(seen))
    """
)


def _probe(tmp_path, pair, allowed: int, busy: float, *extra: str) -> dict:
    a, b = pair
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}.safetensors"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_"))}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, str(script), str(allowed), str(busy), "merge", str(a), str(b), "--method", "svd",
           "--rank", "4", "-o", str(out), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert out.exists()
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_busy_machine_gets_no_more_threads_than_free_cores(tmp_path, pair):
    """A second process spinning on every core (simulated load): the command starts one torch thread, no OpenMP
    worker threads at all, and torch was imported with a passive wait policy already in place."""
    seen = _probe(tmp_path, pair, 4, 4.0)
    assert seen["env"] == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    assert seen["torch_threads"] == 1
    assert seen["native_threads"] == 0  # only Python's own threads (main, read-ahead, hashing)
    assert seen["module_workers"] <= 1  # one module at a time


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_idle_machine_computes_modules_side_by_side(tmp_path, pair):
    """The same command on a simulated idle 4-CPU machine: modules on several workers, torch on one thread each
    (the simulated reading reaches the policy: with the real machine's reading this could pass by chance)."""
    seen = _probe(tmp_path, pair, 4, 0.0)
    assert seen["env"] == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    assert seen["torch_threads"] == 1
    assert seen["module_workers"] > 1
    assert seen["native_threads"] == 0


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads through /proc")
def test_threads_option_overrides_the_policy(tmp_path, pair):
    """`--threads 2` on per-module work: two modules computed side by side, each on one torch thread."""
    seen = _probe(tmp_path, pair, 4, 4.0, "--threads", "2")
    assert seen["env"] == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    assert seen["torch_threads"] == 1
    assert seen["module_workers"] == 2
    assert seen["native_threads"] == 0
