"""Opt-in: blora-tools' Flux.1 and SD3 outputs load in sd-scripts' own networks.lora_flux / lora_sd3.

A file kohya's own module trained on the tiny model (the baseline of test_dit_sd_scripts.py) goes through
prune, reweight, merge and a kohya → diffusers → kohya conversion; sd-scripts' `create_network_from_weights` +
`merge_to` then changes each layer by exactly the ΔW the operation promises, computed here from the *input*
file: kept modules unchanged, dropped ones absent, weighted ones scaled, a concat merge of a file with itself
doubled, a round trip unchanged.

    SD_SCRIPTS=/path/to/sd-scripts KOHYA_PYTHON=/path/to/venv/bin/python KOHYA_REAL_WORK=/path/to/scratch \\
        pytest -m real tests/real/test_dit_outputs_in_sd_scripts.py
"""

from __future__ import annotations

import pytest
import torch
from harness import Kohya
from safetensors.torch import load_file

from blora_tools.cli import main

pytestmark = pytest.mark.real

KOHYA_MODULES = {"flux": "networks.lora_flux", "sd3": "networks.lora_sd3"}
TRAINERS = {"flux": "flux_train_network.py", "sd3": "sd3_train_network.py"}
KEEP = {"flux": ("single", "lora_unet_single_blocks_"), "sd3": ("J00-J01", ("lora_unet_joint_blocks_0_", "lora_unet_joint_blocks_1_"))}
WEIGHTS = {"flux": ("double=0.5,S10-S37=0", lambda n: 0.5 if "double_blocks" in n else (0.0 if _single(n) >= 10 else 1.0)),
           "sd3": ("J00=0.5,J01=2", lambda n: {"0": 0.5, "1": 2.0}.get(n.split("_")[4], 1.0))}


def _single(name: str) -> int:
    return int(name.split("_")[4]) if "single_blocks" in name else -1


@pytest.fixture(scope="module")
def trained(kohya: Kohya):
    files = {}

    def get(arch: str):
        if not (kohya.sd_scripts / TRAINERS[arch]).is_file():
            pytest.skip(f"{kohya.sd_scripts} has no {TRAINERS[arch]}")
        if arch not in files:
            files[arch] = kohya.train(f"{arch}-kohya", arch, KOHYA_MODULES[arch], steps=2).network_file
        return files[arch]

    return get


def _deltas(path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(path))
    out = {}
    for key in tensors:
        if key.endswith(".lora_down.weight"):
            name = key[: -len(".lora_down.weight")]
            down, up = tensors[key].double().flatten(1), tensors[f"{name}.lora_up.weight"].double().flatten(1)
            alpha = float(tensors.get(f"{name}.alpha", torch.tensor(down.shape[0])))
            out[name] = up @ down * (alpha / down.shape[0])
    return out


def _assert_sd_scripts_applies(kohya: Kohya, arch: str, output, expected: dict[str, torch.Tensor]) -> None:
    merged = load_file(str(kohya.merge(arch, KOHYA_MODULES[arch], output)))
    applied = sorted({k.rsplit(".", 1)[0] for k in merged})
    assert applied == sorted(n for n, d in expected.items() if d.abs().max() > 0)
    for name in applied:
        base = merged[f"{name}.base"].double()
        torch.testing.assert_close(merged[f"{name}.merged"].double() - base, expected[name].reshape(base.shape),
                                   rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def _run(runner, *args) -> None:
    result = runner.invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("arch", sorted(KOHYA_MODULES))
def test_pruned_file_loads_in_sd_scripts(arch, kohya, trained, runner, tmp_path):
    source = trained(arch)
    selector, prefix = KEEP[arch]
    out = tmp_path / "pruned.safetensors"
    _run(runner, "prune", source, "--keep", selector, "-o", out)
    expected = {n: d for n, d in _deltas(source).items() if n.startswith(prefix)}
    assert expected
    _assert_sd_scripts_applies(kohya, arch, out, expected)


@pytest.mark.parametrize("arch", sorted(KOHYA_MODULES))
def test_reweighted_file_loads_in_sd_scripts(arch, kohya, trained, runner, tmp_path):
    source = trained(arch)
    weights, weight_of = WEIGHTS[arch]
    out = tmp_path / "reweighted.safetensors"
    _run(runner, "reweight", source, "--weights", weights, "-o", out)
    expected = {n: d * weight_of(n) for n, d in _deltas(source).items()}
    _assert_sd_scripts_applies(kohya, arch, out, expected)


@pytest.mark.parametrize("arch", sorted(KOHYA_MODULES))
def test_concat_merge_with_itself_doubles_in_sd_scripts(arch, kohya, trained, runner, tmp_path):
    source = trained(arch)
    out = tmp_path / "merged.safetensors"
    _run(runner, "merge", source, source, "--method", "concat", "-o", out)
    _assert_sd_scripts_applies(kohya, arch, out, {n: 2 * d for n, d in _deltas(source).items()})


@pytest.mark.parametrize("arch", sorted(KOHYA_MODULES))
def test_diffusers_round_trip_loads_in_sd_scripts(arch, kohya, trained, runner, tmp_path):
    source = trained(arch)
    split, back = tmp_path / "split.safetensors", tmp_path / "back.safetensors"
    _run(runner, "convert", source, "--to", "peft", "-o", split)
    _run(runner, "convert", split, "--to", "kohya", "-o", back)
    _assert_sd_scripts_applies(kohya, arch, back, _deltas(source))
