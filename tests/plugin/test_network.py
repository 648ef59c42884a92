"""BlockwiseNetwork and LoRAModule on tiny models: forward swap, algebra, optimizer groups, files, merges."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F

from blora_tools.errors import AdapterFileError, OutputError, SpecError
from fake_trainer import predict, synthetic_batch, text_encoder_arg, tiny_models
from kohya_plugin.blockwise import create_network, create_network_from_weights
from kohya_plugin.modules import LoRAModule
from kohya_plugin.network import BlockwiseNetwork, BlockwiseWarning



def quiet_network(*args, **kwargs) -> BlockwiseNetwork:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BlockwiseWarning)
        return create_network(*args, **kwargs)


def randomize(network: BlockwiseNetwork, seed: int = 0, std: float = 0.05) -> None:
    """Give every up factor random values (fresh networks have ΔW = 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in network.text_encoder_loras + network.unet_loras:
            module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=g) * std)


def dense_delta(down: torch.Tensor, up: torch.Tensor, scale: float) -> torch.Tensor:
    """Test oracle: ΔW written out per layer kind, independent of the plugin's own delta_weight."""
    down, up = down.double(), up.double()
    if down.dim() == 2:
        return scale * up @ down
    return scale * torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)


def model_state(*models) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in models]


def same_state(a, b) -> bool:
    return all(sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa) for sa, sb in zip(a, b))


# --- modules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer",
    [nn.Linear(6, 5), nn.Conv2d(6, 5, 1), nn.Conv2d(6, 5, 3, stride=2, padding=1)],
    ids=["linear", "conv1x1", "conv3x3-stride2"],
)
def test_module_forward_is_base_plus_scaled_up_down(layer):
    torch.manual_seed(0)
    x = torch.randn(2, 6) if isinstance(layer, nn.Linear) else torch.randn(2, 6, 7, 7)
    base = layer(x)
    module = LoRAModule.for_layer("lora_unet_x", layer, 3, 1.5, multiplier=0.7)
    if isinstance(layer, nn.Conv2d):
        down = module.lora_down
        assert (down.kernel_size, down.stride, down.padding) == (layer.kernel_size, layer.stride, layer.padding)
        assert module.lora_up.kernel_size == (1, 1)
    assert torch.count_nonzero(module.lora_up.weight) == 0, "kohya init: up starts at zero"
    nn.init.normal_(module.lora_up.weight)
    module.apply_to()
    module.apply_to()  # idempotent
    module.eval()
    got = layer(x)
    d, u = module.lora_down.weight, module.lora_up.weight
    if isinstance(layer, nn.Linear):
        lora = F.linear(F.linear(x, d), u)
        merged = F.linear(x, layer.weight + dense_delta(d, u, 0.7 * 0.5).float(), layer.bias)
    else:
        lora = F.conv2d(F.conv2d(x, d, None, layer.stride, layer.padding), u)
        merged = F.conv2d(x, layer.weight + dense_delta(d, u, 0.7 * 0.5).float(), layer.bias, layer.stride,
                          layer.padding)
    assert torch.allclose(got, base + 0.7 * 0.5 * lora, atol=1e-5)
    assert torch.allclose(got, merged, atol=1e-5)
    assert torch.allclose(module.delta_weight(), dense_delta(d, u, 0.35).float(), atol=1e-6)
    assert module.delta_norm().item() == pytest.approx(dense_delta(d, u, 0.5).norm().item(), rel=1e-5)
    module.remove()
    assert "forward" not in layer.__dict__ and torch.equal(layer(x), base)


def test_rank_dropout_rescales_and_module_dropout_skips():
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    x = torch.randn(4, 3, 8)
    module = LoRAModule.for_layer("m", layer, 4, 4.0, rank_dropout=0.5)
    nn.init.normal_(module.lora_up.weight)
    module.apply_to()
    module.train()
    torch.manual_seed(7)
    got = layer(x)
    torch.manual_seed(7)
    mask = (torch.rand(4, 1, 4) > 0.5).float()
    h = module.lora_down(x) * mask
    expected = F.linear(x, layer.weight, layer.bias) + module.lora_up(h) * (1.0 / (1 - 0.5))
    assert torch.allclose(got, expected, atol=1e-6)
    module.eval()
    assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias) + module.lora_up(module.lora_down(x)),
                          atol=1e-6)

    module.rank_dropout = None
    module.module_dropout = 0.5
    module.train()
    base = F.linear(x, layer.weight, layer.bias)
    full = base + module.lora_up(module.lora_down(x))
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        out = layer(x)
        seen.add("base" if torch.allclose(out, base) else "full" if torch.allclose(out, full, atol=1e-6) else "?")
    assert seen == {"base", "full"}


def test_neuron_dropout_only_in_training():
    layer = nn.Linear(8, 8)
    module = LoRAModule.for_layer("m", layer, 4, 4.0, dropout=0.5)
    nn.init.normal_(module.lora_up.weight)
    module.apply_to()
    x = torch.randn(2, 8)
    module.eval()
    assert torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias) + module.lora_up(module.lora_down(x)),
                          atol=1e-6)
    module.train()
    torch.manual_seed(0)
    assert not torch.allclose(layer(x), F.linear(x, layer.weight, layer.bias) + module.lora_up(module.lora_down(x)))


# --- network: apply, multiplier, isolation ------------------------------------------------------------


def test_apply_to_swaps_forwards_without_touching_the_model():
    tes, unet = tiny_models("sd1")
    batch = synthetic_batch("sd1")
    before = model_state(unet, *tes)
    with torch.no_grad():
        base = predict("sd1", tes, unet, batch)
    network = quiet_network(1.0, 4, 1.0, None, tes[0], unet)
    network.apply_to(tes[0], unet)
    network.apply_to(tes[0], unet, True, True)  # second call: no double wrapping
    assert same_state(before, model_state(unet, *tes)), "the base models' state dicts are unchanged"
    assert all(k.endswith(("lora_down.weight", "lora_up.weight", "alpha")) for k in network.state_dict())
    assert not any(isinstance(m, LoRAModule) for m in unet.modules()), "no adapter is a child of the U-Net"
    with torch.no_grad():
        assert torch.equal(predict("sd1", tes, unet, batch), base), "ΔW starts at 0"
    randomize(network)
    network.eval()
    with torch.no_grad():
        assert (predict("sd1", tes, unet, batch) - base).abs().max() > 1e-3
        layer = network.unet_loras[0].layer
        x = torch.randn(3, layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels)
        x = x if isinstance(layer, nn.Linear) else x[:, :, None, None]
        plain = network.unet_loras[0]._base_forward(x)
        once = layer(x) - plain
        network.set_multiplier(2.0)
        assert torch.allclose(layer(x) - plain, 2 * once, atol=1e-6), "the multiplier scales ΔW linearly"
    network.remove_from()
    with torch.no_grad():
        assert torch.equal(predict("sd1", tes, unet, batch), base)


def test_apply_to_flags_drop_parts():
    tes, unet = tiny_models("sd1")
    network = quiet_network(1.0, 4, 1.0, None, tes[0], unet)
    network.apply_to(tes[0], unet, False, True)
    assert not network.text_encoder_loras and network.unet_loras
    assert not any(k.startswith("lora_te") for k in network.state_dict())
    assert all("forward" not in m.__dict__ for m in tes[0].modules())


def test_two_networks_in_one_process_do_not_influence_each_other():
    tes_a, unet_a = tiny_models("sd1")
    tes_b, unet_b = tiny_models("sd1")
    batch = synthetic_batch("sd1")
    locon = quiet_network(1.0, 4, 1.0, None, tes_a[0], unet_a, conv_dim="4")
    lora = quiet_network(1.0, 4, 1.0, None, tes_b[0], unet_b)
    assert len(locon.unet_loras) > 192 and len(lora.unet_loras) == 192, "kohya's class-list leak would give 228"
    lora.apply_to(tes_b[0], unet_b)
    randomize(lora, seed=1)
    lora.eval()
    with torch.no_grad():
        out_b = predict("sd1", tes_b, unet_b, batch)
    locon.apply_to(tes_a[0], unet_a)
    randomize(locon, seed=2)
    with torch.no_grad():
        assert torch.equal(predict("sd1", tes_b, unet_b, batch), out_b)


@pytest.mark.parametrize(
    "args",
    [
        {"preset": "styel"},
        {"blocks": "in0,nowhere"},
        {"conv_dim": "x"},
        {"unknown_key": "1"},
        {"block_dims": "4,4"},
        {"verbose": "perhaps"},
        {"block_lr": "all=0"},
    ],
)
def test_invalid_args_are_rejected_before_the_model_is_touched(args):
    tes, unet = tiny_models("sd1")
    before = model_state(unet, *tes)
    with pytest.raises(SpecError):
        create_network(1.0, 4, 1.0, None, tes[0], unet, **args)
    assert same_state(before, model_state(unet, *tes))
    assert not any("forward" in m.__dict__ for model in (unet, *tes) for m in model.modules())


@pytest.mark.parametrize(("arch", "args", "message"), [
    # conv_in (IN00) sits in no module class kohya's networks.lora wraps, even with conv_dim (docs §4)
    ("sd1", {"block_ranks": "IN00=8"},
     "network_args: block_ranks gives IN00 rank 8, but kohya's networks.lora wraps no layer there (conv_in); drop it"),
    ("sd2", {"blocks": "IN00", "conv_dim": "4"}, "blocks=IN00 selects IN00, but kohya's networks.lora wraps no layer"),
    ("sdxl", {"block_lr": "IN00=0.5"}, "block_lr gives IN00 learning-rate weight 0.5, but kohya's networks.lora"),
    ("sdxl", {"block_alphas": "IN00=2", "conv_dim": "4"}, "block_alphas gives IN00 alpha 2, but kohya's"),
    ("sd1", {"block_ranks": "IN00-IN00=8,out3=4"}, "block_ranks gives IN00 rank 8, but"),
])
def test_values_for_a_block_kohya_never_wraps_are_refused_before_the_model_is_touched(arch, args, message):
    tes, unet = tiny_models(arch)
    before = model_state(unet, *tes)
    with pytest.raises(SpecError) as caught:
        create_network(1.0, 4, 1.0, None, text_encoder_arg(arch, tes), unet, **args)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    assert same_state(before, model_state(unet, *tes))
    assert not any("forward" in m.__dict__ for model in (unet, *tes) for m in model.modules())


def test_zero_values_wide_selections_and_sd_base_are_accepted_as_before():
    """IN00 given 0, and selections that include IN00 among wrapped blocks (presets, `all`, ranges, LBW vectors),
    build exactly the default network; `BASE` on SD1 is the text encoder (LBW), which kohya trains: rank 8 there."""
    tes, unet = tiny_models("sd1")

    def ranks(**kwargs) -> dict[str, tuple[int, float]]:
        network = quiet_network(1.0, 4, 1.0, None, tes[0], unet, **kwargs)
        return {m.lora_name: (m.lora_dim, m.alpha_value) for m in network.unet_loras + network.text_encoder_loras}

    default = ranks()
    for kwargs in ({"block_ranks": "IN00=0"}, {"block_alphas": "IN00=0"}, {"block_lr": "IN00=0"}, {"preset": "all"},
                   {"preset": "character"}, {"blocks": "all"}, {"block_ranks": "IN00-OUT11=4"},
                   {"block_lr": ",".join(["1"] * 26)}, {"block_ranks": "unet=4,IN00=0"}):
        assert ranks(**kwargs) == default, kwargs
    assert ranks(block_ranks="BASE=8") == {n: (8 if n.startswith("lora_te_") else r, a)
                                          for n, (r, a) in default.items()}
    assert set(ranks(preset="style")) < set(default)


def test_style_on_sdxl_needs_conv_dim():
    tes, unet = tiny_models("sdxl")
    before = model_state(unet, *tes)
    with pytest.raises(SpecError, match="conv_dim is needed") as caught:
        create_network(1.0, 4, 1.0, None, tes, unet, preset="style")
    assert "preset=style" in str(caught.value) and "in0, out2" in str(caught.value)
    assert same_state(before, model_state(unet, *tes))
    network = quiet_network(1.0, 4, 1.0, None, tes, unet, preset="style", conv_dim="4")
    groups = {network.block_of(m.lora_name).group for m in network.unet_loras}
    assert groups == {"in0", "out2"} and not network.text_encoder_loras


def test_empty_blocks_warn_with_the_fix():
    tes, unet = tiny_models("sd1")
    with pytest.warns(BlockwiseWarning, match=r"in3 \(IN10/IN11\).*conv_dim"):
        network = create_network(1.0, 4, 1.0, None, tes[0], unet, blocks="in3,out3")
    assert {network.block_of(m.lora_name).group for m in network.unet_loras} == {"out3"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", BlockwiseWarning)
        create_network(1.0, 4, 1.0, None, tes[0], unet)  # kohya's default: no warning
        create_network(1.0, 4, 1.0, None, tes[0], unet, preset="style")


# --- optimizer groups and max norm ----------------------------------------------------------------------


def all_params(groups) -> list[int]:
    return sorted(id(p) for g in groups for p in g["params"])


def test_prepare_optimizer_params_forms():
    tes, unet = tiny_models("sd1")
    network = quiet_network(1.0, 4, 1.0, None, tes[0], unet)
    groups, descriptions = network.prepare_optimizer_params(1e-4, 2e-4, 1e-3)
    assert descriptions == ["textencoder", "unet"]
    assert [g["lr"] for g in groups] == [1e-4, 2e-4]
    assert all_params(groups) == sorted(id(p) for p in network.parameters())
    groups, _ = network.prepare_optimizer_params(None, None, 1e-3)
    assert [g["lr"] for g in groups] == [1e-3, 1e-3]
    groups, _ = network.prepare_optimizer_params(None, None)  # the trainer's 2-argument fallback
    assert all("lr" not in g for g in groups)
    groups, descriptions = network.prepare_optimizer_params(0, 1e-4, 1e-3)
    assert descriptions == ["unet"], "a rate of 0 leaves the part out, as kohya"
    with pytest.raises(SpecError, match="every learning rate"):
        network.prepare_optimizer_params(0, 0, 1e-3)


def test_block_learning_rates_and_loraplus():
    tes, unet = tiny_models("sd1")
    network = quiet_network(
        1.0, 4, 1.0, None, tes[0], unet, block_lr="in0=0.5,out3=2,te=0.25", loraplus_unet_lr_ratio="4"
    )
    groups, descriptions = network.prepare_optimizer_params(1e-3, 1e-3, 1e-3)
    lrs = dict(zip(descriptions, (g["lr"] for g in groups)))
    assert lrs["textencoder"] == pytest.approx(2.5e-4)
    assert lrs["unet in0"] == pytest.approx(5e-4) and lrs["unet in0 plus"] == pytest.approx(2e-3)
    assert lrs["unet out3"] == pytest.approx(2e-3) and lrs["unet out3 plus"] == pytest.approx(8e-3)
    assert "unet in1,in2,mid,out1,out2" in lrs
    assert all_params(groups) == sorted(id(p) for p in network.parameters())
    for group, description in zip(groups, descriptions):
        ups = {id(m.lora_up.weight) for m in network.unet_loras}
        assert all((id(p) in ups) == description.endswith("plus") for p in group["params"])
    with pytest.raises(SpecError, match="need a learning rate"):
        network.prepare_optimizer_params(None, None)


def test_sdxl_text_encoder_rate_list():
    tes, unet = tiny_models("sdxl")
    network = quiet_network(1.0, 4, 1.0, None, tes, unet)
    groups, descriptions = network.prepare_optimizer_params([1e-4, 2e-4], 1e-3, 1e-3)
    assert [g["lr"] for g in groups] == [1e-4, 2e-4, 1e-3]
    assert descriptions == ["textencoder te1", "textencoder te2", "unet"]


def test_max_norm_regularization_matches_dense_norms():
    tes, unet = tiny_models("sd1")
    network = quiet_network(1.0, 4, 1.0, None, tes[0], unet, conv_dim="2")
    randomize(network, std=1.0)
    modules = network.text_encoder_loras + network.unet_loras
    norms = [dense_delta(m.lora_down.weight, m.lora_up.weight, m.scale).norm().item() for m in modules]
    limit = sorted(norms)[len(norms) // 2]
    keys_scaled, mean_norm, max_norm = network.apply_max_norm_regularization(limit, "cpu")
    after = [dense_delta(m.lora_down.weight, m.lora_up.weight, m.scale).norm().item() for m in modules]
    assert keys_scaled == sum(n > limit for n in norms)
    assert max(after) == pytest.approx(limit, rel=1e-4) and max_norm == pytest.approx(limit, rel=1e-4)
    assert mean_norm == pytest.approx(sum(after) / len(after), rel=1e-4)
    for n_before, n_after in zip(norms, after):
        assert n_after == pytest.approx(min(n_before, limit), rel=1e-4)


# --- files -------------------------------------------------------------------------------------------


def trained_network(tes, unet, **args) -> BlockwiseNetwork:
    network = quiet_network(1.0, 8, 4.0, None, tes[0], unet, **args)
    randomize(network)
    with torch.no_grad():
        for m in network.text_encoder_loras + network.unet_loras:
            m.lora_down.weight.mul_(1.3)
    return network


MIXED = {"block_ranks": "in0=4,out3=2,mid=16", "block_alphas": "in0=1,out3=3", "te_alpha": "16",
         "conv_dim": "2", "conv_alpha": "0.5"}


def test_save_weights_one_alpha_folded_scale_metadata(tmp_path):
    tes, unet = tiny_models("sd1")
    network = trained_network(tes, unet, **MIXED)
    metadata = {"ss_network_module": "kohya_plugin.blockwise", "ss_output_name": "x", "ss_network_alpha": "4.0"}
    given = dict(metadata)
    path = tmp_path / "x.safetensors"
    network.save_weights(str(path), torch.float32, metadata)
    assert metadata == given, "the caller's metadata dict is not changed"
    sd = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    alphas = {float(v) for k, v in sd.items() if k.endswith(".alpha")}
    assert alphas == {4.0}, "one alpha for the whole file: the most common training alpha"
    modules = {m.lora_name: m for m in network.text_encoder_loras + network.unet_loras}
    assert set(sd) == {f"{n}.{p}" for n in modules for p in ("lora_down.weight", "lora_up.weight", "alpha")}
    for name, m in modules.items():
        file_delta = dense_delta(sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"],
                                 4.0 / m.lora_dim)
        mine = dense_delta(m.lora_down.weight, m.lora_up.weight, m.scale)
        assert torch.allclose(file_delta, mine, rtol=1e-5, atol=1e-7), name
    assert meta["ss_network_module"] == "kohya_plugin.blockwise" and meta["ss_output_name"] == "x"
    assert len(meta["sshs_model_hash"]) == 64 and len(meta["sshs_legacy_hash"]) == 8
    spec = json.loads(meta["blora_spec"])
    assert spec["arch"] == "sd1" and spec["file_alpha"] == 4.0 and "module_alphas" not in spec
    assert spec["blocks"]["in0"] == {"rank": 4, "alpha": 1.0, "conv_rank": 2, "conv_alpha": 0.5, "lr_weight": 1.0}
    assert spec["blocks"]["mid"]["rank"] == 16 and spec["blocks"]["te"]["alpha"] == 16.0

    half = tmp_path / "half.safetensors"
    network.save_weights(half, torch.float16, None)
    assert {v.dtype for v in load_file(str(half)).values()} == {torch.float16}
    with pytest.raises(OutputError, match="safetensors"):
        network.save_weights(tmp_path / "x.ckpt", None, {})


def test_fp16_file_keeps_an_exact_alpha(tmp_path):
    """network_alpha 0.3 is not an F16 number (F16 reads it as 0.30005): the file stores it in F32 and the F16
    factors with the stored value give the network's ΔW (before: F16 alpha 0.30005, ΔW 1.6e-4 off)."""
    tes, unet = tiny_models("sd1")
    network = quiet_network(1.0, 4, 0.3, None, tes[0], unet)
    randomize(network)
    with torch.no_grad():  # F16 numbers, so that the file's factors hold exactly the network's
        for m in network.text_encoder_loras + network.unet_loras:
            for w in (m.lora_down.weight, m.lora_up.weight):
                w.copy_(w.half().float())
    path = tmp_path / "half.safetensors"
    network.save_weights(path, torch.float16, None)
    sd = load_file(str(path))
    assert float(torch.tensor(0.3, dtype=torch.float16)) != 0.3
    for m in network.text_encoder_loras + network.unet_loras:
        alpha = sd[f"{m.lora_name}.alpha"]
        assert alpha.dtype == torch.float32 and float(alpha) == float(torch.tensor(0.3, dtype=torch.float32))
        down, up = sd[f"{m.lora_name}.lora_down.weight"], sd[f"{m.lora_name}.lora_up.weight"]
        assert down.dtype == up.dtype == torch.float16
        file_delta = dense_delta(down, up, float(alpha) / down.shape[0])
        mine = dense_delta(m.lora_down.weight, m.lora_up.weight, m.scale)
        assert m.scale == 0.3 / m.lora_dim and torch.allclose(file_delta, mine, rtol=1e-6, atol=0), m.lora_name
    assert json.loads(load_meta(path)["blora_spec"])["file_alpha"] == float(torch.tensor(0.3))


def load_meta(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def test_load_weights_restores_training_factors_before_or_after_apply(tmp_path):
    tes, unet = tiny_models("sd1")
    batch = synthetic_batch("sd1")
    source = trained_network(tes, unet, **MIXED)
    path = tmp_path / "a.safetensors"
    source.save_weights(path, None, {})
    for order in ("before", "after"):
        target = quiet_network(1.0, 8, 4.0, None, tes[0], unet, **MIXED)
        if order == "after":
            target.apply_to(tes[0], unet)
        info = target.load_weights(str(path))
        assert not info.missing_keys and not info.unexpected_keys
        for a, b in zip(source.state_dict().values(), target.state_dict().values()):
            assert torch.allclose(a, b, rtol=1e-6, atol=0), order
        for m_src, m_dst in zip(source.unet_loras, target.unet_loras):
            assert m_src.alpha_value == m_dst.alpha_value
            if m_src.alpha_value in (4.0, 16.0, 1.0):  # power-of-two fold: bit-exact
                assert torch.equal(m_src.lora_up.weight, m_dst.lora_up.weight)
    target.apply_to(tes[0], unet)
    target.eval()
    with torch.no_grad():
        out_target = predict("sd1", tes, unet, batch)
    target.remove_from()
    source.apply_to(tes[0], unet)
    source.eval()
    with torch.no_grad():
        assert torch.allclose(predict("sd1", tes, unet, batch), out_target, atol=1e-6)

    other = quiet_network(1.0, 8, 4.0, None, tes[0], unet)
    with pytest.raises(AdapterFileError, match="dim_from_weights"):
        other.load_weights(str(path))
    style = quiet_network(1.0, 8, 4.0, None, tes[0], unet, preset="style", block_ranks="in0=4,out3=2",
                          conv_dim="2", conv_alpha="0.5")
    info = style.load_weights(str(path))
    assert info.unexpected_keys and not info.missing_keys


def test_plain_load_state_dict_keeps_delta(tmp_path):
    """gen_img.py calls load_state_dict(weights_sd, False) on a network from create_network_from_weights."""
    tes, unet = tiny_models("sd1")
    source = trained_network(tes, unet, **MIXED)
    path = tmp_path / "a.safetensors"
    source.save_weights(path, None, {})
    network, weights_sd = create_network_from_weights(1.0, str(path), None, [tes[0]], unet, for_inference=True)
    network.apply_to([tes[0]], unet)
    network.load_state_dict(weights_sd, False)
    for m_src, m_dst in zip(source.unet_loras, network.unet_loras):
        assert torch.allclose(m_src.delta_weight(), m_dst.delta_weight(), rtol=1e-5, atol=1e-8)


def kohya_file(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """A hand-made kohya/LyCORIS-style state dict: mixed ranks and alphas, a missing alpha, a conv_in module."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1  # noqa: E731
    if arch == "sd1":
        return {
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": r(2, 32),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": r(32, 2),
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(0.5),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": r(3, 32),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": r(32, 3),
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(1.0),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": r(4, 32, 1, 1),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": r(32, 4, 1, 1),
            "lora_unet_up_blocks_3_resnets_0_conv1.lora_down.weight": r(5, 64, 3, 3),
            "lora_unet_up_blocks_3_resnets_0_conv1.lora_up.weight": r(32, 5, 1, 1),
            "lora_unet_up_blocks_3_resnets_0_conv1.alpha": torch.tensor(2.5, dtype=torch.float16),
            "lora_unet_conv_in.lora_down.weight": r(2, 4, 3, 3),
            "lora_unet_conv_in.lora_up.weight": r(32, 2, 1, 1),
            "lora_unet_conv_in.alpha": torch.tensor(1.0),
        }
    raise ValueError(arch)


def test_from_weights_takes_rank_and_alpha_per_module(tmp_path):
    tes, unet = tiny_models("sd1")
    sd = kohya_file("sd1")
    path = tmp_path / "k.safetensors"
    save_file(sd, str(path))
    network, weights_sd = create_network_from_weights(1.0, str(path), None, tes[0], unet)
    assert set(weights_sd) == set(sd)
    got = {m.lora_name: (m.lora_dim, m.alpha_value) for m in network.text_encoder_loras + network.unet_loras}
    assert got == {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (2, 0.5),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (3, 1.0),
        "lora_unet_down_blocks_0_attentions_0_proj_in": (4, 4.0),  # no alpha: alpha = rank
        "lora_unet_up_blocks_3_resnets_0_conv1": (5, 2.5),
        "lora_unet_conv_in": (2, 1.0),  # LyCORIS also adapts conv_in
    }
    network.apply_to(tes[0], unet)
    info = network.load_weights(str(path))
    assert not info.missing_keys and not info.unexpected_keys
    for m in network.unet_loras:
        down, up = sd[f"{m.lora_name}.lora_down.weight"], sd[f"{m.lora_name}.lora_up.weight"]
        assert torch.equal(m.lora_up.weight, up) and torch.equal(m.lora_down.weight, down)


def test_merge_to_adds_the_dense_delta(tmp_path):
    tes, unet = tiny_models("sd1")
    sd = kohya_file("sd1")
    path = tmp_path / "k.safetensors"
    save_file(sd, str(path))
    layers = {**{"lora_unet_" + n.replace(".", "_"): m for n, m in unet.named_modules()},
              **{"lora_te_" + n.replace(".", "_"): m for n, m in tes[0].named_modules()}}
    layers["lora_te_text_model_encoder_layers_0_self_attn_q_proj"] = tes[0].get_submodule(
        "text_model.encoder.layers.0.self_attn.q_proj" if hasattr(tes[0], "text_model") else
        "encoder.layers.0.self_attn.q_proj"
    )
    before = model_state(unet, tes[0])
    network, weights_sd = create_network_from_weights(0.8, str(path), None, tes[0], unet, for_inference=True)
    network.merge_to(tes[0], unet, weights_sd, torch.float32, "cpu")
    stems = {k.split(".")[0] for k in sd}
    expected_changes = set()
    for stem in stems:
        layer = layers[stem]
        down, up = sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"]
        alpha = float(sd.get(f"{stem}.alpha", torch.tensor(float(down.shape[0]))))
        old = before[0 if stem.startswith("lora_unet") else 1]
        prefix = "lora_unet_" if stem.startswith("lora_unet") else "lora_te_"
        key = next(k for k, m in (unet if prefix == "lora_unet_" else tes[0]).named_modules() if m is layer)
        delta = dense_delta(down, up, 0.8 * alpha / down.shape[0]).reshape(layer.weight.shape)
        assert torch.allclose(layer.weight.double(), old[f"{key}.weight"].double() + delta, atol=1e-6), stem
        expected_changes.add(f"{key}.weight")
    after = model_state(unet, tes[0])
    for old, new in zip(before, after):
        changed = {k for k in old if not torch.equal(old[k], new[k])}
        assert changed <= expected_changes


def test_from_weights_refusals(tmp_path):
    tes, unet = tiny_models("sd1")
    with pytest.raises(AdapterFileError, match="pickle"):
        create_network_from_weights(1.0, str(tmp_path / "x.ckpt"), None, tes[0], unet)
    loha = {"lora_unet_conv_in.hada_w1_a": torch.zeros(2, 2), "lora_unet_conv_in.alpha": torch.tensor(1.0)}
    with pytest.raises(AdapterFileError, match="hada_w1_a"):
        create_network_from_weights(1.0, None, None, tes[0], unet, weights_sd=loha)
    sdxl_names = {
        "lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(2, 64),
        "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(64, 2),
    }
    with pytest.raises(AdapterFileError, match="another architecture"):
        create_network_from_weights(1.0, None, None, tes[0], unet, weights_sd=sdxl_names)
    peft = {
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(2, 32),
        "unet.down_blocks.0.attentions.0.proj_in.lora_B.weight": torch.zeros(32, 2),
    }
    with pytest.raises(AdapterFileError, match="peft format"):
        create_network_from_weights(1.0, None, None, tes[0], unet, weights_sd=peft)
    orphan = {"lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0)}
    with pytest.raises(AdapterFileError, match="only some of lora_down/lora_up"):
        create_network_from_weights(1.0, None, None, tes[0], unet, weights_sd=orphan)
    wrong_shape = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(2, 7),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(32, 2),
    }
    with pytest.raises(AdapterFileError, match="another model"):
        create_network_from_weights(1.0, None, None, tes[0], unet, weights_sd=wrong_shape)


def test_sd2_conv_shaped_factors_load_into_linear_projections():
    """SD2 files come with 4-D (1×1 conv) or 2-D proj_in factors; both load into either model."""
    tes, unet = tiny_models("sd2")
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    layer = unet.get_submodule("down_blocks.0.attentions.0.proj_in")
    assert isinstance(layer, nn.Linear)
    sd = {f"{name}.lora_down.weight": torch.randn(2, 32, 1, 1), f"{name}.lora_up.weight": torch.randn(32, 2, 1, 1)}
    network, _ = create_network_from_weights(1.0, None, None, tes[0], unet, weights_sd=sd)
    network.load_factors(sd)
    module = network.unet_loras[0]
    assert torch.equal(module.lora_down.weight, sd[f"{name}.lora_down.weight"][:, :, 0, 0])


def test_arch_and_math_constants():
    assert math.isclose(LoRAModule.for_layer("m", nn.Linear(4, 4), 2, 0.5).scale, 0.25)
    assert text_encoder_arg("sd1", ["a"]) == "a" and text_encoder_arg("sdxl", ["a", "b"]) == ["a", "b"]


def test_import_needs_neither_sd_scripts_nor_diffusers():
    code = (
        "import sys, kohya_plugin.blockwise as b; "
        "assert callable(b.create_network) and callable(b.create_network_from_weights); "
        "heavy = [m for m in ('diffusers', 'transformers', 'library', 'networks') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_verbose_logs_the_blocks_and_network_is_mergeable(caplog):
    tes, unet = tiny_models("sd1")
    with caplog.at_level(logging.INFO, logger="kohya_plugin.network"):
        network = quiet_network(1.0, 4, 1.0, None, tes[0], unet, preset="style", verbose="true")
    assert "in0" in caplog.text and "out3" in caplog.text and "rank [4]" in caplog.text
    assert network.is_mergeable()
