"""prune and reweight by parts of fused layers, checked per fused BFL/SAI model weight with ComfyUI's own key
mapping and patch arithmetic restated (`dit_oracles.comfy_delta`): one expectation, stated on the model's
weights, holds for every dialect ComfyUI loads (kohya, diffusers, ComfyUI, OneTrainer names)."""

from __future__ import annotations

import pytest
import torch
from dit_adapters import TINY, make_dit_adapter
from dit_oracles import comfy_delta
from raw_deltas import WIDTH, arch_args, rows_mask
from safetensors.torch import load_file

from blora_tools.cli import main

SHAPES = {
    "flux": dict(hidden=TINY["flux"].width, depth=TINY["flux"].double, single_depth=TINY["flux"].single),
    "sd3": dict(hidden=TINY["sd3"].width, depth=TINY["sd3"].depth, attn2=(0,)),  # attn2 in J00 (dit_adapters.TINY)
}
LOADED = [("flux", d) for d in ("kohya", "diffusers", "comfyui", "onetrainer")] + [("sd3", d) for d in ("kohya", "comfyui")]
"""Dialects whose every key ComfyUI loads (it skips XLabs' processors and diffusers' SD3 attn2)."""


def _model_deltas(path, arch: str) -> dict[str, torch.Tensor]:
    result = comfy_delta(load_file(str(path)), arch, **SHAPES[arch])
    assert result.not_loaded == []
    return result.delta


def _assert_rows(actual: dict, before: dict, parts: dict) -> None:
    """Every model weight's ΔW is the input's times its row factors (`parts`, searched in the model key); a weight
    the output no longer reaches, or reaches with fewer rows, must be zero there."""
    for key in before.keys() | actual.keys():
        mask = rows_mask(key, before[key].shape[0], parts)
        expected = before[key] * mask.view(-1, *(1,) * (before[key].dim() - 1))
        got = actual.get(key, torch.zeros(0, *expected.shape[1:], dtype=torch.float64))
        assert not expected[got.shape[0]:].any(), key
        assert torch.allclose(got, expected[: got.shape[0]], rtol=1e-6, atol=1e-9), key


def _run(runner, *args):
    return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)


def _cases(arch: str) -> dict[str, tuple[str, dict]]:
    w = WIDTH[arch]
    if arch == "flux":
        return {
            "prune": ("D00.img.q,S01.linear1.mlp", {
                r"double_blocks\.0\.img_attn\.qkv\.": (0, w, 1, 0),
                r"single_blocks\.1\.linear1\.": (3 * w, 7 * w, 1, 0),
                r".": (0, -1, 0, 0),
            }),
            "reweight": ("D00.img.q=0.5,S01.linear1.mlp=0,S00=0.25", {
                r"double_blocks\.0\.img_attn\.qkv\.": (0, w, 0.5, 1),
                r"single_blocks\.1\.linear1\.": (3 * w, 7 * w, 0, 1),
                r"single_blocks\.0\.": (0, -1, 0.25, 0.25),
                r".": (0, -1, 1, 1),
            }),
        }
    return {
        "prune": ("J00.x.v,J01.ctx", {
            r"joint_blocks\.0\.x_block\.attn2?\.qkv\.": (2 * w, 3 * w, 1, 0),
            r"joint_blocks\.1\.context_block\.": (0, -1, 1, 1),
            r".": (0, -1, 0, 0),
        }),
        "reweight": ("J00.x.q=0.5,J01.ctx=0,J02=0.25", {
            r"joint_blocks\.0\.x_block\.attn2?\.qkv\.": (0, w, 0.5, 1),
            r"joint_blocks\.1\.context_block\.": (0, -1, 0, 0),
            r"joint_blocks\.2\.": (0, -1, 0.25, 0.25),
            r".": (0, -1, 1, 1),
        }),
    }


@pytest.mark.parametrize("command", ["prune", "reweight"])
@pytest.mark.parametrize("arch,dialect", LOADED)
def test_parts_per_fused_model_weight(runner, tmp_path, arch, dialect, command):
    src = make_dit_adapter(tmp_path / "in.safetensors", arch, dialect, seed=21)
    out = tmp_path / "out.safetensors"
    spec, parts = _cases(arch)[command]
    option = "--keep" if command == "prune" else "--weights"
    result = _run(runner, command, src, option, spec, "-o", out, *arch_args(arch, dialect))
    assert result.exit_code == 0, result.stderr
    _assert_rows(_model_deltas(out, arch), _model_deltas(src, arch), parts)
