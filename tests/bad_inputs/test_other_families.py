"""Adapters for families this version does not support are refused by every command, naming what was seen;
ambiguous files take `--arch` (issue #12).

Before: a Flux.1 or SD3 LoRA was reported as `sd1`/`sdxl` with exit 0 (the last fallback of the old detector was
"nothing that tells the widths apart: SD1") and pruned or merged as if it were one. Flux.1 and SD3 are supported
now (issue #13); other diffusion transformers are still refused.
"""

from __future__ import annotations

import json

import pytest
import torch
from battery import READERS, assert_refused, invoke, reading_args, require, snapshot
from safetensors.torch import save_file

from adapters import make_adapter


def _lora(stems: list[str], down_key: str = "lora_down.weight", up_key: str = "lora_up.weight") -> dict:
    tensors = {}
    for stem in stems:
        tensors[f"{stem}.{down_key}"] = torch.randn(2, 16)
        tensors[f"{stem}.{up_key}"] = torch.randn(16, 2)
    return tensors


FAMILIES = {
    # a Wan-style video DiT under diffusers' root: its key form names a diffusion transformer we do not support
    "other-dit": (_lora(["transformer.blocks.0.self_attn.q"], "lora_A.weight", "lora_B.weight"),
                  "diffusion transformer other than Flux.1 and SD3"),
    # the same under kohya's prefix: nothing names its family, so the unplaceable names are shown
    "unknown-dit": (_lora(["lora_unet_blocks_0_self_attn_q", "lora_unet_blocks_0_cross_attn_k"]),
                    "no module fits SD1, SD2, SDXL, Flux.1 or SD3"),
}


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory) -> bytes:
    folder = tmp_path_factory.mktemp("good")
    return make_adapter(folder / "good.safetensors", "sd1", "lora", rank=2, per_block=1).read_bytes()


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("command", READERS)
def test_other_families_are_refused_by_every_command(runner, tmp_path, good_bytes, family, command):
    require(command)
    tensors, seen = FAMILIES[family]
    folder = tmp_path / "in"
    folder.mkdir()
    good = folder / "good.safetensors"
    good.write_bytes(good_bytes)
    path = folder / f"{family}.safetensors"
    save_file(tensors, str(path))
    before = snapshot(tmp_path)
    result = invoke(runner, reading_args(command, path, good, tmp_path / "out.safetensors"))
    assert_refused(result, tmp_path, before, str(path), seen)


def _ambiguous(path):
    """U-Net modules SD1, SD2 and SDXL (diffusers names) all have, at tiny widths: nothing tells them apart."""
    save_file(_lora(["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q",
                     "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_v"]), str(path))
    return path


@pytest.mark.parametrize("arch", ["sd1", "sd2", "sdxl"])
def test_arch_option_decides_where_the_evidence_is_ambiguous(runner, tmp_path, arch):
    path = _ambiguous(tmp_path / "a.safetensors")
    result = invoke(runner, ["inspect", path, "--json", "--arch", arch])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)[0]["arch"] == arch
    default = invoke(runner, ["inspect", path, "--json"])
    assert json.loads(default.stdout)[0]["arch"] == "sd1"  # the documented rule


def test_arch_option_that_contradicts_the_file_is_refused(runner, tmp_path):
    path = tmp_path / "in" / "sdxl.safetensors"
    path.parent.mkdir()
    make_adapter(path, "sdxl", "lora", rank=2, per_block=1)
    before = snapshot(tmp_path)
    result = invoke(runner, ["prune", path, "--drop", "te1", "--arch", "sd1", "-o", tmp_path / "out.safetensors"])
    assert_refused(result, tmp_path, before, str(path), "--arch sd1 does not fit this file: its modules are sdxl")


def test_arch_option_reaches_the_blocks(runner, tmp_path):
    """A 12-value LBW vector is SDXL's short form: refused on the default SD1 reading, taken with --arch sdxl."""
    path = _ambiguous(tmp_path / "a.safetensors")
    vector = "1,1,1,1,1,1,1,1,1,1,1,0.5"
    refused = invoke(runner, ["reweight", path, "--lbw", vector, "-o", tmp_path / "sd1.safetensors"])
    assert refused.exit_code == 1 and "sd1 takes 17 or 26" in refused.stderr
    result = invoke(runner, ["reweight", path, "--lbw", vector, "--arch", "sdxl", "-o", tmp_path / "sdxl.safetensors", "--json"])
    assert result.exit_code == 0, result.stderr
