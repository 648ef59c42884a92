"""The plugin driven by the fake trainer (train_network.py's call order) on tiny models, on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fake_trainer import TrainerArgs, loss_of, predict, synthetic_batch, text_encoder_arg, tiny_models, train
from kohya_plugin.blockwise import create_network_from_weights

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CHARACTER_ARGS = [
    "preset=all",
    "block_ranks=in0=4,out3=2,mid=8",
    "block_alphas=in0=1,out3=8",
    "te_alpha=2",
    "conv_dim=2",
    "conv_alpha=0.5",
    "block_lr=mid=0.5",
    "rank_dropout=0.1",
]



def snapshot(*models):
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in models]


def unchanged(a, b) -> bool:
    return all(all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def character(tmp_path_factory):
    """A 30-step character run (all blocks, mixed ranks and alphas, LoCon, block lr) saved to a file."""
    tes, unet = tiny_models("sd1")
    batch = synthetic_batch("sd1")
    before = snapshot(unet, *tes)
    path = tmp_path_factory.mktemp("character") / "character.safetensors"
    args = TrainerArgs(network_dim=8, network_alpha=4, network_args=CHARACTER_ARGS, output=str(path),
                       scale_weight_norms=5.0)
    result = train("sd1", tes, unet, batch, args)
    result.network.eval()
    with torch.no_grad():
        output = predict("sd1", tes, unet, batch)
    return {"tes": tes, "unet": unet, "batch": batch, "before": before, "result": result, "path": path,
            "args": args, "output": output}


def test_loss_falls_and_only_adapters_learn(character):
    result, tes, unet = character["result"], character["tes"], character["unet"]
    assert len(result.losses) == 30
    assert result.losses[-1] < 0.7 * result.losses[0], result.losses
    assert unchanged(character["before"], snapshot(unet, *tes)), "base weights are unchanged"
    assert all(len(log) == 3 for log in result.max_norm_logs)
    network = result.network
    network.train()
    loss_of("sd1", tes, unet, character["batch"]).backward()
    for model in (unet, *tes):
        assert all(p.grad is None for p in model.parameters()), "no gradient reaches the base model"
    assert all(p.grad is not None for p in network.parameters()), "every adapter factor gets a gradient"
    network.zero_grad(set_to_none=True)
    network.eval()
    groups = dict(zip(result.descriptions, (g["lr"] for g in result.param_groups)))
    assert groups["unet mid"] == pytest.approx(5e-3) and groups["textencoder"] == pytest.approx(1e-2)


def test_saved_file_is_kohya_format_with_one_alpha(character):
    sd = load_file(str(character["path"]))
    with safe_open(str(character["path"]), "pt") as f:
        meta = f.metadata()
    assert {float(v) for k, v in sd.items() if k.endswith(".alpha")} == {4.0}
    assert all(k.startswith(("lora_te_", "lora_unet_")) for k in sd)
    assert meta["ss_network_module"] == "kohya_plugin.blockwise" and meta["ss_steps"] == "30"
    spec = json.loads(meta["blora_spec"])
    assert spec["blocks"]["out3"]["alpha"] == 8.0 and spec["blocks"]["mid"]["lr_weight"] == 0.5


def test_file_reloads_to_identical_outputs(character):
    tes, unet = tiny_models("sd1")
    network, _ = create_network_from_weights(1.0, str(character["path"]), None, tes[0], unet)
    network.apply_to(tes[0], unet)
    network.load_weights(str(character["path"]))
    network.eval()
    with torch.no_grad():
        assert torch.allclose(predict("sd1", tes, unet, character["batch"]), character["output"], atol=1e-6)


def test_dim_from_weights_and_resume_restore_the_training_parametrisation(character):
    trained = {m.lora_name: m for m in character["result"].network.text_encoder_loras
               + character["result"].network.unet_loras}
    path = str(character["path"])
    for mode in ("dim_from_weights", "resume"):
        tes, unet = tiny_models("sd1")
        args = TrainerArgs(
            network_dim=8, network_alpha=4, network_args=CHARACTER_ARGS, network_weights=path,
            dim_from_weights=mode == "dim_from_weights", max_train_steps=0,
        )
        result = train("sd1", tes, unet, character["batch"], args)
        restored = {m.lora_name: m for m in result.network.text_encoder_loras + result.network.unet_loras}
        assert restored.keys() == trained.keys(), mode
        assert not result.load_info.missing_keys and not result.load_info.unexpected_keys
        for name, m in restored.items():
            t = trained[name]
            assert (m.lora_dim, m.alpha_value) == (t.lora_dim, t.alpha_value), (mode, name)
            assert torch.equal(m.lora_down.weight, t.lora_down.weight), (mode, name)
            assert torch.allclose(m.lora_up.weight, t.lora_up.weight, rtol=1e-6, atol=0), (mode, name)
        assert result.descriptions == character["result"].descriptions
        result.network.eval()
        with torch.no_grad():
            assert torch.allclose(predict("sd1", tes, unet, character["batch"]), character["output"], atol=1e-6)


def test_base_weights_merge_then_style(character):
    """--base_weights: the character file is merged into the model, then a style adapter trains on top."""
    tes, unet = tiny_models("sd1")
    batch = character["batch"]
    args = TrainerArgs(base_weights=[str(character["path"])], network_args=["preset=style", "conv_dim=2"],
                       max_train_steps=0)
    result = train("sd1", tes, unet, batch, args)
    result.network.eval()
    with torch.no_grad():
        merged = predict("sd1", tes, unet, batch)  # style ΔW is still 0
    assert torch.allclose(merged, character["output"], atol=1e-5)
    groups = {result.network.block_of(m.lora_name).group for m in result.network.unet_loras}
    assert groups == {"in0", "out3"} and not result.network.text_encoder_loras


def test_style_preset_trains_only_the_outermost_level():
    tes, unet = tiny_models("sd1")
    batch = synthetic_batch("sd1")
    before = snapshot(unet, *tes)
    args = TrainerArgs(network_args=["preset=style"], max_train_steps=30, gradient_checkpointing=True)
    result = train("sd1", tes, unet, batch, args)
    network = result.network
    lbw = {network.block_of(m.lora_name).lbw for m in network.unet_loras}
    assert lbw == {"IN01", "IN02", "OUT09", "OUT10", "OUT11"}  # IN03 (downsampler) has no attention layer
    assert not network.text_encoder_loras
    assert result.losses[-1] < result.losses[0]
    assert unchanged(before, snapshot(unet, *tes))


def test_tiny_sdxl_trains():
    tes, unet = tiny_models("sdxl")
    batch = synthetic_batch("sdxl")
    before = snapshot(unet, *tes)
    result = train("sdxl", tes, unet, batch,
                   TrainerArgs(network_args=["preset=all", "conv_dim=2", "loraplus_lr_ratio=2"], max_train_steps=30))
    network = result.network
    assert {network.block_of(m.lora_name).component.value for m in network.text_encoder_loras} == {"te1", "te2"}
    assert {network.block_of(m.lora_name).group for m in network.unet_loras} >= {"in0", "mid", "out2"}
    assert result.losses[-1] < 0.8 * result.losses[0], result.losses
    assert unchanged(before, snapshot(unet, *tes))
    assert text_encoder_arg("sdxl", tes) is tes
