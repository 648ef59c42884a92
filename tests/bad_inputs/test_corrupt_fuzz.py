"""Fuzzing: randomly corrupted adapter files give only the clean errors, never another exception.

`open_adapter` either opens a file or raises AdapterFileError; what opens survives statistics and an operation
(other errors are BloraErrors); `blora-tools inspect` exits 0 or 1 with one `error:` line. A few hundred files in
the default suite, ten thousand with `-m slow`. Each run is seeded, and a failure names the seed and keeps the file.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from adapters import make_adapter
from battery import error_line, invoke, require
from corrupt_files import corrupt

from blora_tools.adapter.model import open_adapter
from blora_tools.errors import AdapterFileError, BloraError
from blora_tools.ops.reweight import reweight
from blora_tools.ops.stats import inspect_adapter
from blora_tools.taxonomy.weights import uniform_weights

_BASES = [
    dict(arch="sd1", kind="lora", dtype=torch.float32),
    dict(arch="sd1", kind="locon", dtype=torch.float16, metadata={"ss_network_dim": "2", "ss_output_name": "x"}),
    dict(arch="sdxl", kind="tucker", dtype=torch.bfloat16),
    dict(arch="sd1", kind="loha", dtype=torch.float32, alpha=None),
    dict(arch="sdxl", kind="lokr", dtype=torch.float16),
    dict(arch="sd1", kind="full", dtype=torch.float32),
    dict(arch="sd1", kind="dora", dtype=torch.float32),
    dict(arch="sd1", kind="lora", dtype=torch.float32, fmt="peft"),
]


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> list[bytes]:
    folder = tmp_path_factory.mktemp("bases")
    return [
        make_adapter(folder / f"base{i}.safetensors", rank=2, per_block=1, seed=i, **spec).read_bytes()
        for i, spec in enumerate(_BASES)
    ]


def _keep(path: Path, seed: int, index: int) -> Path:
    kept = path.with_name(f"failing-seed{seed}-{index}.safetensors")
    shutil.copy(path, kept)
    return kept


def _fuzz_library(bases: list[bytes], folder: Path, seed: int, count: int) -> dict[str, int]:
    rng = random.Random(seed)
    path, out = folder / "fuzz.safetensors", folder / "out.safetensors"
    outcomes = {"refused": 0, "opened": 0}
    for index in range(count):
        path.write_bytes(corrupt(rng.choice(bases), rng))
        try:
            adapter = open_adapter(path)
        except AdapterFileError as err:
            assert err.path == str(path) and "\n" not in str(err), str(err)
            outcomes["refused"] += 1
            continue
        except Exception as err:  # noqa: BLE001 - the point of the test: name the file that broke it
            pytest.fail(f"{type(err).__name__}: {err} (seed {seed}, case {index}, kept as {_keep(path, seed, index)})")
        outcomes["opened"] += 1
        try:
            inspect_adapter(adapter, with_stats=True)
            if index % 4 == 0:  # an operation on a quarter of what opens: reads every tensor, writes a file
                arch = adapter.arch
                weights = uniform_weights(arch, frozenset(), inside=1.0, outside=0.5)
                reweight(adapter, weights).save(out, force=True)
        except BloraError:
            pass
        except Exception as err:  # noqa: BLE001
            pytest.fail(f"{type(err).__name__}: {err} (seed {seed}, case {index}, kept as {_keep(path, seed, index)})")
    return outcomes


def test_corrupt_files_give_only_clean_errors(bases, tmp_path):
    outcomes = _fuzz_library(bases, tmp_path, seed=6, count=400)
    assert outcomes["refused"] > 200 and outcomes["opened"] > 10, outcomes  # the fuzzer reaches both sides


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_corrupt_files_give_only_clean_errors_at_full_size(bases, tmp_path, seed):
    _fuzz_library(bases, tmp_path, seed=1000 + seed, count=2000)  # 5 × 2,000 = 10,000 files


def _fuzz_cli(runner, bases: list[bytes], folder: Path, seed: int, count: int) -> None:
    rng = random.Random(seed)
    path = folder / "fuzz [1].safetensors"
    for index in range(count):
        path.write_bytes(corrupt(rng.choice(bases), rng))
        result = invoke(runner, ["inspect", path])
        assert result.exit_code in (0, 1), (seed, index, result.exit_code, result.stderr)
        if result.exit_code == 1:
            line = error_line(result)
            assert str(path) in line, (seed, index, line)


def test_inspect_of_corrupt_files_exits_0_or_1_cleanly(runner, bases, tmp_path):
    require("inspect")
    _fuzz_cli(runner, bases, tmp_path, seed=7, count=120)


@pytest.mark.slow
def test_inspect_of_corrupt_files_at_full_size(runner, bases, tmp_path):
    require("inspect")
    _fuzz_cli(runner, bases, tmp_path, seed=2000, count=2000)
