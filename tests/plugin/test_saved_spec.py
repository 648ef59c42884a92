"""The `blora_spec` a saved file carries states exactly the blocks, ranks and alphas of the modules in it.

The file is read back with the CLI's own file model (`open_adapter`: its own key parser and block placement),
and every module's rank and training alpha are looked up in `BlockSpec.from_json` of the metadata.
"""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import save_file

from blora_tools.adapter.model import open_adapter
from blora_tools.spec import BlockSpec
from fake_trainer import text_encoder_arg, tiny_models
from kohya_plugin.blockwise import create_network, create_network_from_weights
from kohya_plugin.network import BlockwiseNetwork, BlockwiseWarning


def _network(arch: str, dim: int = 4, alpha: float = 2.0, **args) -> tuple[BlockwiseNetwork, list, object]:
    tes, unet = tiny_models(arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BlockwiseWarning)
        network = create_network(1.0, dim, alpha, None, text_encoder_arg(arch, tes), unet, **args)
    with torch.no_grad():
        for i, m in enumerate(network.text_encoder_loras + network.unet_loras):
            m.lora_up.weight.fill_(0.01 * (i % 7 + 1))
    return network, tes, unet


def assert_spec_states_the_file(path, network: BlockwiseNetwork) -> BlockSpec:
    """Every module of the file has the rank and training alpha the spec gives its block (or `module_alphas`),
    the blocks the spec trains are exactly the blocks holding modules, and ΔW is the network's."""
    adapter = open_adapter(path)
    text = adapter.header.metadata["blora_spec"]
    spec = BlockSpec.from_json(text)
    doc = json.loads(text)
    exceptions = doc.get("module_alphas", {})
    trained = {m.lora_name: m for m in network.text_encoder_loras + network.unet_loras}
    assert {m.stem for m in adapter.modules.values()} == set(trained)
    for module in adapter.modules.values():
        down = module.shapes["lora_down.weight"]
        kind = "conv3x3" if len(down) == 4 and tuple(down[2:]) != (1, 1) else "linear"
        rank, alpha = spec.rank_alpha(module.placement, kind)
        mine = trained[module.stem]
        assert module.rank == mine.lora_dim
        assert rank == module.rank or module.stem in exceptions, module.stem
        assert exceptions.get(module.stem, alpha) == mine.alpha_value, module.stem
        assert module.alpha == doc["file_alpha"]
    assert spec.trained_blocks == {m.placement.block for m in adapter.modules.values()}
    return spec


def test_locon_with_mixed_alphas(tmp_path):
    network, _, _ = _network("sd1", 8, 4.0, block_ranks="in0=4,out3=2,mid=16", block_alphas="in0=1,out3=3",
                             te_alpha="16", conv_dim="2", conv_alpha="0.5")
    network.save_weights(tmp_path / "x.safetensors", None, {})
    assert_spec_states_the_file(tmp_path / "x.safetensors", network)


def test_blocks_asked_for_without_layers_are_stated_as_untrained(tmp_path):
    network, _, _ = _network("sd1", blocks="in3,out3")  # in3 has no attention: no module there
    spec_in = network.spec
    assert spec_in.blocks["IN10"].rank == 4
    network.save_weights(tmp_path / "x.safetensors", None, {})
    spec = assert_spec_states_the_file(tmp_path / "x.safetensors", network)
    assert spec.blocks["IN10"].rank == 0 and spec.blocks["OUT10"].rank == 4
    summary = json.loads(open_adapter(tmp_path / "x.safetensors").header.metadata["blora_spec"])["blocks"]
    assert summary["in3"]["rank"] == 0 and summary["out3"]["rank"] == 4


def test_text_encoder_modules_dropped_by_apply_to_are_not_stated(tmp_path):
    network, tes, unet = _network("sd1")
    network.apply_to(tes[0], unet, apply_text_encoder=False)
    network.save_weights(tmp_path / "x.safetensors", None, {})
    spec = assert_spec_states_the_file(tmp_path / "x.safetensors", network)
    assert spec.blocks["te"].rank == 0 and "te" not in spec.trained_blocks
    network.remove_from()


def test_sdxl_middle_block_parts_with_their_own_ranks(tmp_path):
    dims = ["4"] * 23
    dims[10:13] = ["2", "6", "8"]  # middle_block_0 (resnet), _1 (attention), _2 (resnet)
    network, _, _ = _network("sdxl", block_dims=",".join(dims), conv_dim="2", te_dim="0")
    network.save_weights(tmp_path / "x.safetensors", None, {})
    spec = assert_spec_states_the_file(tmp_path / "x.safetensors", network)
    assert {i: s.rank for i, s in spec.slots.items()} == {10: 2, 11: 6, 12: 8}


def test_training_facts_a_file_alone_does_not_hold_are_kept(tmp_path):
    """What makes the plugin's spec differ from `BlockSpec.from_modules` (a file's facts only): SDXL's per-slot
    learning-rate weights (`mid_lr_weight`), and the training rank/alpha of a block whose only layer of a kind is
    missing (a downsampler-only block keeps its linear rank; an untrained block keeps the training alpha)."""
    network, _, _ = _network("sdxl", mid_lr_weight="1,0.5,1", conv_dim="4", conv_alpha="1")
    network.save_weights(tmp_path / "x.safetensors", None, {})
    spec = assert_spec_states_the_file(tmp_path / "x.safetensors", network)
    assert {i: s.lr_weight for i, s in spec.slots.items()} == {10: 1.0, 11: 0.5, 12: 1.0}
    assert (spec.blocks["IN03"].rank, spec.blocks["IN03"].alpha, spec.blocks["IN03"].conv_rank) == (4, 2.0, 4)
    assert (spec.blocks["IN00"].rank, spec.blocks["IN00"].alpha) == (0, 2.0)


def test_a_file_from_another_producer_resaved(tmp_path):
    """A network built from a kohya/LyCORIS file with per-module ranks and alphas (one missing) saves a spec
    that states them: the most common per block, the rest in `module_alphas`."""
    tes, unet = tiny_models("sd1")
    g = torch.Generator().manual_seed(0)
    sd = {}
    for stem, rank, alpha in [
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", 2, 1.0),
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k", 2, 1.0),
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_v", 2, 0.5),
        ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q", 3, None),
    ]:
        sd[f"{stem}.lora_down.weight"] = torch.randn(rank, 32, generator=g)
        sd[f"{stem}.lora_up.weight"] = torch.randn(32, rank, generator=g)
        if alpha is not None:
            sd[f"{stem}.alpha"] = torch.tensor(alpha)
    source = tmp_path / "k.safetensors"
    save_file(sd, source)
    network, _ = create_network_from_weights(1.0, str(source), None, tes[0], unet)
    network.save_weights(tmp_path / "x.safetensors", None, {})
    assert_spec_states_the_file(tmp_path / "x.safetensors", network)
    again, _ = create_network_from_weights(1.0, str(tmp_path / "x.safetensors"), None, tes[0], unet)
    assert [(m.lora_name, m.lora_dim, m.alpha_value) for m in again.unet_loras] == \
        [(m.lora_name, m.lora_dim, m.alpha_value) for m in network.unet_loras]


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_default_network_spec_round_trips(arch, tmp_path):
    network, _, _ = _network(arch)
    network.save_weights(tmp_path / "x.safetensors", torch.float16, {"ss_output_name": "x"})
    assert_spec_states_the_file(tmp_path / "x.safetensors", network)
    metadata = open_adapter(tmp_path / "x.safetensors").header.metadata
    assert metadata["ss_output_name"] == "x" and metadata["ss_network_module"] == "kohya_plugin.blockwise"
