"""The network's modules against kohya's golden manifests: names, kinds, factor shapes, alphas, blocks.

Full-size models on the meta device; every block at rank 4 (conv 4 for LoCon), alpha 1, as the manifests.
"""

from __future__ import annotations

import warnings
from functools import cache

import pytest
from torch import nn

from blora_tools.models import build_text_encoders, build_unet
from kohya_plugin.blockwise import create_network

CASES = ["sd1_lora", "sd1_locon", "sd2_lora", "sd2_locon", "sd2_ckpt_lora", "sd2_ckpt_locon", "sdxl_lora",
         "sdxl_locon"]


@cache
def full_models(arch: str, variant: str | None):
    return build_text_encoders(arch, "full", "meta"), build_unet(arch, "full", "meta", variant=variant)


def kind_of(module) -> str:
    down = module.lora_down
    if isinstance(down, nn.Linear):
        return "linear"
    return "conv1x1" if tuple(down.kernel_size) == (1, 1) else "conv3x3"


@pytest.mark.parametrize("name", CASES)
def test_network_equals_kohya_manifest(name, load_manifest):
    manifest = load_manifest(name)
    tes, unet = full_models(manifest["arch"], manifest["variant"])
    text_encoder = tes if manifest["arch"] == "sdxl" else tes[0]
    args = {"conv_dim": "4", "conv_alpha": "1"} if manifest["mode"] == "locon" else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        network = create_network(1.0, 4, 1.0, None, text_encoder, unet, **args)
    got = {
        m.lora_name: {
            "kind": kind_of(m),
            "down_shape": list(m.lora_down.weight.shape),
            "up_shape": list(m.lora_up.weight.shape),
            "rank": m.lora_dim,
            "alpha": m.alpha_value,
            "component": network.block_of(m.lora_name).component.value,
            "kohya_block_index": (
                -1 if network.block_of(m.lora_name).kohya_index is None else network.block_of(m.lora_name).kohya_index
            ),
        }
        for m in network.text_encoder_loras + network.unet_loras
    }
    fields = ("kind", "down_shape", "up_shape", "rank", "alpha", "component", "kohya_block_index")
    expected = {e["name"]: {f: e[f] for f in fields} for e in manifest["modules"]}
    assert sorted(got) == sorted(expected)
    wrong = {n: (got[n], expected[n]) for n in expected if got[n] != expected[n]}
    assert not wrong, list(wrong.items())[:3]
    # the state dict holds exactly kohya's keys
    keys = set(network.state_dict())
    assert keys == {f"{n}.{p}" for n in expected for p in ("lora_down.weight", "lora_up.weight", "alpha")}
