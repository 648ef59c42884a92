"""The plugin's bad inputs: every invalid `--network_args` value is refused by `create_network` (a SpecError naming
the argument) and the models are exactly as they were; `load_weights` of a file that does not fit the network says
which modules do not fit, and leaves the network as it was.

tests/plugin/test_args.py checks the parser's messages one by one; here every key goes through `create_network`
itself, as sd-scripts calls it (string values, `neuron_dropout` from --network_dropout), on real tiny models.
"""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from adapters import make_adapter
from corrupt_files import FILE_CASES
from fake_trainer import tiny_models
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from blora_tools.errors import AdapterFileError, BloraError, SpecError
from kohya_plugin.args import KNOWN_KEYS, parse_network_args
from kohya_plugin.blockwise import create_network, create_network_from_weights
from kohya_plugin.network import BlockwiseWarning
from kohya_plugin.plan import plan_network
from kohya_plugin.targets import find_targets


@pytest.fixture(scope="module")
def sd1_models():
    return tiny_models("sd1")


@pytest.fixture(scope="module")
def sdxl_models():
    return tiny_models("sdxl")


def fingerprint(*models) -> dict:
    """Everything create_network could change: parameters and buffers (values and identity), module tree,
    instance-level forwards (the swap), hooks."""
    state = {}
    for i, model in enumerate(models):
        for name, tensor in model.state_dict(keep_vars=True).items():
            state[f"{i}:{name}"] = (id(tensor), tensor.detach().clone())
        for name, module in model.named_modules():
            state[f"{i}:{name}:module"] = (
                type(module).__name__,
                "forward" in vars(module),
                len(module._forward_hooks) + len(module._forward_pre_hooks) + len(module._backward_hooks),
            )
    return state


def assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if isinstance(value[1], torch.Tensor):
            assert value[0] == after[key][0] and torch.equal(value[1], after[key][1]), key
        else:
            assert value == after[key], key


def _create(tes, unet, dim=4, alpha=1.0, neuron_dropout=None, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BlockwiseWarning)
        return create_network(1.0, dim, alpha, None, tes[0], unet, neuron_dropout=neuron_dropout, **kwargs)


def _ones(n: int, value: str = "1") -> str:
    return ",".join([value] * n)


# (network_args, words the message must contain): at least one bad value for every key, as the strings
# sd-scripts passes.
BAD_ARGS = [
    ({"presets": "style"}, ["presets", "known keys"]),
    ({"preset": "styel"}, ["preset"]),
    ({"preset": ""}, ["preset"]),
    ({"blocks": "in9"}, ["blocks"]),
    ({"blocks": ""}, ["blocks"]),
    ({"blocks": "NOT"}, ["blocks"]),
    ({"blocks": "in3"}, ["blocks=in3", "no attention", "conv_dim"]),  # found once the U-Net is read, still unchanged
    ({"block_ranks": "in0=abc"}, ["block_ranks"]),
    ({"block_ranks": "in0=-1"}, ["block_ranks"]),
    ({"block_ranks": "in0=1.5"}, ["block_ranks", "whole number"]),
    ({"block_ranks": "in0"}, ["block_ranks"]),
    ({"block_ranks": "in0=inf"}, ["block_ranks"]),
    ({"block_alphas": "in0=-1"}, ["block_alphas"]),
    ({"block_alphas": "in0=nan"}, ["block_alphas"]),
    ({"block_alphas": "1,2"}, ["block_alphas"]),
    ({"block_alphas": _ones(24) + ",-1"}, ["block_alphas"]),
    ({"conv_dim": "x"}, ["conv_dim"]),
    ({"conv_dim": ""}, ["conv_dim"]),
    ({"conv_dim": "-1"}, ["conv_dim"]),
    ({"conv_dim": "2.5"}, ["conv_dim"]),
    ({"conv_dim": "4", "conv_alpha": "-1"}, ["conv_alpha"]),
    ({"conv_dim": "4", "conv_alpha": "inf"}, ["conv_alpha"]),
    ({"conv_alpha": "2"}, ["conv_alpha", "no convolution"]),
    ({"conv_block_ranks": "in0=x"}, ["conv_block_ranks"]),
    ({"conv_block_ranks": _ones(25)}, ["conv_block_ranks", "conv_block_dims"]),
    ({"conv_dim": "4", "conv_block_alphas": "in0=-2"}, ["conv_block_alphas"]),
    ({"te_dim": "-1"}, ["te_dim"]),
    ({"te_dim": "x"}, ["te_dim"]),
    ({"te_alpha": "-1"}, ["te_alpha"]),
    ({"te_alpha": "inf"}, ["te_alpha"]),
    ({"algo": "loha"}, ["algo", "lora, locon"]),
    ({"algo": ""}, ["algo"]),
    ({"algo": "lora", "conv_dim": "4"}, ["algo=lora", "conv_dim"]),
    ({"block_dims": _ones(24)}, ["block_dims", "25", "not 24"]),
    ({"block_dims": _ones(25, "a")}, ["block_dims"]),
    ({"block_dims": _ones(24) + ",-3"}, ["block_dims"]),
    ({"conv_block_dims": _ones(24) + ",x"}, ["conv_block_dims"]),
    ({"block_lr": "in0=-1"}, ["block_lr"]),
    ({"block_lr": "in0=x"}, ["block_lr"]),
    ({"block_lr": _ones(5)}, ["block_lr"]),
    ({"down_lr_weight": "sine+x"}, ["down_lr_weight"]),
    ({"down_lr_weight": "1,2,x"}, ["down_lr_weight"]),
    ({"down_lr_weight": _ones(13)}, ["down_lr_weight", "at most 12"]),
    ({"mid_lr_weight": "x"}, ["mid_lr_weight"]),
    ({"mid_lr_weight": "1,2"}, ["mid_lr_weight"]),
    ({"up_lr_weight": "linear+nan"}, ["up_lr_weight"]),
    ({"up_lr_weight": "-1"}, ["up_lr_weight"]),
    ({"block_lr_zero_threshold": "-1"}, ["block_lr_zero_threshold"]),
    ({"block_lr_zero_threshold": "x"}, ["block_lr_zero_threshold"]),
    ({"dropout": "1"}, ["dropout"]),
    ({"dropout": "-0.5"}, ["dropout"]),
    ({"dropout": "x"}, ["dropout"]),
    ({"rank_dropout": "2"}, ["rank_dropout"]),
    ({"module_dropout": "1.0"}, ["module_dropout"]),
    ({"module_dropout": "nan"}, ["module_dropout"]),
    ({"loraplus_lr_ratio": "0"}, ["loraplus_lr_ratio"]),
    ({"loraplus_unet_lr_ratio": "-1"}, ["loraplus_unet_lr_ratio"]),
    ({"loraplus_text_encoder_lr_ratio": "x"}, ["loraplus_text_encoder_lr_ratio"]),
    ({"verbose": "maybe"}, ["verbose"]),
    ({"verbose": "2"}, ["verbose"]),
    ({"preset": "style", "blocks": "in0"}, ["preset", "blocks"]),
    ({"block_lr": "all=0"}, ["trains nothing"]),
]


# Flux.1 / SD3 keys (kohya's lora_flux / lora_sd3 arguments and ours): (arch, network_args, words), run on the
# sd-scripts-shaped tiny models of tests/dit_models.py.
DIT_BAD_ARGS = [
    ("flux", {"img_attn_dim": "-1"}, ["img_attn_dim", "negative"]),
    ("flux", {"img_mlp_dim": "x"}, ["img_mlp_dim", "whole number"]),
    ("flux", {"img_mod_dim": "1.5"}, ["img_mod_dim", "whole number"]),
    ("flux", {"txt_attn_dim": "nan"}, ["txt_attn_dim"]),
    ("flux", {"txt_mlp_dim": "-2"}, ["txt_mlp_dim"]),
    ("flux", {"txt_mod_dim": ""}, ["txt_mod_dim"]),
    ("flux", {"single_dim": "abc"}, ["single_dim"]),
    ("flux", {"single_mod_dim": "-1"}, ["single_mod_dim"]),
    ("sd3", {"context_attn_dim": "-1"}, ["context_attn_dim"]),
    ("sd3", {"context_mlp_dim": "x"}, ["context_mlp_dim"]),
    ("sd3", {"context_mod_dim": "2.5"}, ["context_mod_dim"]),
    ("sd3", {"x_attn_dim": "inf"}, ["x_attn_dim"]),
    ("sd3", {"x_mlp_dim": "-3"}, ["x_mlp_dim"]),
    ("sd3", {"x_mod_dim": "y"}, ["x_mod_dim"]),
    ("sd3", {"emb_dims": "[1,2]"}, ["emb_dims", "6"]),
    ("flux", {"in_dims": "[1,2,3,4,x]"}, ["in_dims"]),
    ("flux", {"network_reg_dims": "double=x"}, ["network_reg_dims"]),
    ("flux", {"network_reg_lrs": "double=-1"}, ["network_reg_lrs"]),
    ("flux", {"split_qkv": "maybe"}, ["split_qkv", "boolean"]),
    ("flux", {"t5_dim": "-1", "train_t5xxl": "true"}, ["t5_dim"]),
    ("sd3", {"train_block_indices": "99"}, ["train_block_indices", "outside"]),
    ("flux", {"train_blocks": "triple"}, ["train_blocks", "all, single, double"]),
    ("flux", {"train_double_block_indices": "0-x"}, ["train_double_block_indices"]),
    ("flux", {"train_single_block_indices": "38"}, ["train_single_block_indices", "outside"]),
    ("flux", {"train_t5xxl": "perhaps"}, ["train_t5xxl", "boolean"]),
]


def test_every_key_has_a_bad_value_here():
    keys = {key for args, _ in BAD_ARGS for key in args} | {key for _, args, _ in DIT_BAD_ARGS for key in args}
    assert set(KNOWN_KEYS) <= keys


@pytest.mark.parametrize("arch, args, words", DIT_BAD_ARGS,
                         ids=[f"{a}-" + " ".join(f"{k}={v}"[:40] for k, v in args.items()) for a, args, _ in DIT_BAD_ARGS])
def test_bad_dit_network_args_are_refused_before_the_models_change(arch, args, words):
    import dit_models

    tes, model = dit_models.build(arch)
    before = fingerprint(*tes, model)
    with pytest.raises(SpecError) as caught:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BlockwiseWarning)
            create_network(1.0, 4, 1.0, None, tes, model, **args)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)
    assert_same(before, fingerprint(*tes, model))


@pytest.mark.parametrize("args, words", BAD_ARGS, ids=[" ".join(f"{k}={v}"[:40] for k, v in a.items()) for a, _ in BAD_ARGS])
def test_bad_network_args_are_refused_before_the_models_change(sd1_models, args, words):
    tes, unet = sd1_models
    before = fingerprint(*tes, unet)
    with pytest.raises(SpecError) as caught:
        _create(tes, unet, **args)
    message = str(caught.value)
    assert "\n" not in message
    for word in words:
        assert word in message, (word, message)
    assert isinstance(caught.value, ValueError)  # what sd-scripts and plain Python callers expect
    assert_same(before, fingerprint(*tes, unet))


@pytest.mark.parametrize(
    "dim, alpha, neuron_dropout, word",
    [("abc", 1.0, None, "network_dim"), (-1, 1.0, None, "network_dim"), (4, "x", None, "network_alpha"),
     (4, -1.0, None, "network_alpha"), (4, float("nan"), None, "network_alpha"), (4, 1.0, 1.5, "dropout"),
     (4, 1.0, -0.1, "dropout"), (0, 1.0, None, "trains nothing")],
)
def test_bad_trainer_numbers_are_refused(sd1_models, dim, alpha, neuron_dropout, word):
    tes, unet = sd1_models
    before = fingerprint(*tes, unet)
    with pytest.raises(SpecError, match=word):
        _create(tes, unet, dim, alpha, neuron_dropout)
    assert_same(before, fingerprint(*tes, unet))


def test_sdxl_positional_lengths_and_mid_slots(sdxl_models):
    tes, unet = sdxl_models
    before = fingerprint(*tes, unet)
    for args, word in [({"block_dims": _ones(25)}, "sdxl takes 23"), ({"mid_lr_weight": "1,1,1,1"}, "at most 3"),
                       ({"blocks": "in3"}, "blocks")]:
        with pytest.raises(SpecError, match=word):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", BlockwiseWarning)
                create_network(1.0, 4, 1.0, None, tes, unet, **args)
    assert_same(before, fingerprint(*tes, unet))


def test_missing_unet_is_refused(sd1_models):
    tes, _ = sd1_models
    with pytest.raises(SpecError, match="U-Net"):
        create_network(1.0, 4, 1.0, None, tes[0], None)


def test_good_values_of_other_types_still_work(sd1_models):
    """Python callers pass numbers, not strings; sd-scripts passes `dropout=None` along."""
    tes, unet = sd1_models
    network = _create(tes, unet, conv_dim=4, conv_alpha=1, dropout=None, verbose=False)
    assert network.unet_loras and network.spec.include_conv


# --- load_weights: a file that does not fit ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(sd1_models, tmp_path_factory):
    """A file saved by a network with ranks 4 everywhere (te and U-Net), and that network's parameters."""
    tes, unet = sd1_models
    network = _create(tes, unet, 4, 2.0)
    with torch.no_grad():
        for i, module in enumerate(network.text_encoder_loras + network.unet_loras):
            module.lora_up.weight.fill_(0.01 * (i + 1))
    path = tmp_path_factory.mktemp("saved") / "rank4.safetensors"
    network.save_weights(path, None, {})
    return path


def _state(network) -> dict:
    return {k: v.clone() for k, v in network.state_dict().items()}


def _load_refused(network, path, error=BloraError):
    before = _state(network)
    with pytest.raises(error) as caught:
        network.load_weights(str(path))
    after = _state(network)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before), "half-loaded"
    message = str(caught.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_other_ranks_name_the_first_modules_and_both_shapes(sd1_models, saved):
    tes, unet = sd1_models
    network = _create(tes, unet, 8, 2.0)
    message = _load_refused(network, saved, AdapterFileError)
    first = network.text_encoder_loras[0].lora_name
    assert first in message and "file [4, " in message and "network [8, " in message
    assert "dim_from_weights" in message


def test_a_file_for_another_architecture_names_modules_of_both(sd1_models, tmp_path):
    tes, unet = sd1_models
    network = _create(tes, unet)
    xl = make_adapter(tmp_path / "xl.safetensors", "sdxl", "lora", rank=4)
    message = _load_refused(network, xl, AdapterFileError)
    assert "lora_te1_" in message or "lora_unet_input_blocks" in message, message  # the file's names
    assert any(m.lora_name in message for m in network.text_encoder_loras + network.unet_loras), message


def test_a_file_for_other_blocks_loads_nothing_and_says_so(sd1_models, saved, tmp_path):
    tes, unet = sd1_models
    network = _create(tes, unet, preset="style")  # U-Net outer level only
    te_only = tmp_path / "te.safetensors"
    save_file({k: v for k, v in load_file(saved).items() if k.startswith("lora_te_")}, te_only)
    message = _load_refused(network, te_only, AdapterFileError)
    assert "lora_te_" in message and "lora_unet_" in message


def test_partial_overlap_loads_what_fits_and_reports_the_rest(sd1_models, saved, tmp_path):
    tes, unet = sd1_models
    network = _create(tes, unet, 4, 2.0, te_dim="0")  # the file also has text-encoder modules
    with pytest.warns(BlockwiseWarning, match="lora_te_"):
        info = network.load_weights(str(saved))
    assert info.unexpected_keys and all(k.startswith("lora_te_") for k in info.unexpected_keys)
    assert not info.missing_keys
    assert any(float(m.lora_up.weight.detach().abs().max()) > 0 for m in network.unet_loras)


@pytest.mark.parametrize("case", FILE_CASES, ids=lambda c: c.id)
def test_broken_files_are_adapter_file_errors(sd1_models, saved, tmp_path, case):
    tes, unet = sd1_models
    network = _create(tes, unet, 4, 2.0)
    bad = case.make(saved, tmp_path)
    _load_refused(network, bad, AdapterFileError)
    with pytest.raises(AdapterFileError):
        create_network_from_weights(1.0, str(bad), None, tes[0], unet)


@pytest.mark.parametrize(
    "edit, error, words",
    [
        (lambda t: {k: v.reshape(1) if k.endswith(".alpha") else v for k, v in t.items()}, None, []),
        (lambda t: {k: torch.stack([v, v]) if k.endswith(".alpha") else v for k, v in t.items()}, BloraError,
         ["alpha"]),
        (lambda t: {k: v for k, v in t.items() if not k.endswith("lora_down.weight")}, AdapterFileError,
         ["lora_down/lora_up"]),
        (lambda t: {**t, "lora_unet_x.hada_w1_a": torch.zeros(2, 2)}, AdapterFileError, ["plain LoRA/LoCon"]),
    ],
    ids=["one-element-alpha-works", "two-element-alpha", "up-without-down", "loha"],
)
def test_odd_modules_in_load_weights(sd1_models, saved, tmp_path, edit, error, words):
    tes, unet = sd1_models
    path = tmp_path / "edited.safetensors"
    save_file(edit(load_file(saved)), path)
    network = _create(tes, unet, 4, 2.0)
    if error is None:
        info = network.load_weights(str(path))
        assert not info.missing_keys and not info.unexpected_keys
        reference = _create(tes, unet, 4, 2.0)
        reference.load_weights(str(saved))
        assert all(torch.equal(a, b) for a, b in zip(_state(network).values(), _state(reference).values()))
        return
    message = _load_refused(network, path, error)
    for word in words:
        assert word in message, message
    with pytest.raises(error):
        create_network_from_weights(1.0, str(path), None, tes[0], unet)


def test_peft_file_says_to_convert(sd1_models, tmp_path):
    tes, unet = sd1_models
    network = _create(tes, unet)
    peft = make_adapter(tmp_path / "peft.safetensors", "sd1", "lora", fmt="peft", rank=4)
    message = _load_refused(network, peft, AdapterFileError)
    assert "convert" in message


# --- hostile numbers: refused before the models are touched, by the plugin and by `blora-tools plan` alike ---------

# (network_dim, network_alpha, network_args, words the message must contain)
HOSTILE = [
    (4, 1.0, {"block_ranks": "in0=1e30"}, ["rank", "above", "widest layer"]),
    (10**12, 1.0, {}, ["rank 1000000000000", "widest layer"]),
    (4, 1.0, {"conv_dim": 1e9}, ["conv_dim"]),
    (4, 1.0, {"conv_dim": 10**9}, ["conv rank 1000000000", "widest layer"]),
    (4, 1.0, {"te_dim": "100000"}, ["rank 100000 for te", "widest layer"]),
    (4, 1.0, {"block_dims": ",".join(["4"] * 24 + ["99999"])}, ["rank 99999 for OUT11"]),
    (4, 1.0, {"conv_block_ranks": "out3=123456"}, ["conv rank 123456"]),
    (4, float("inf"), {}, ["network_alpha"]),
    (4, 1.0, {"te_alpha": "nan"}, ["te_alpha"]),
    (4, 1.0, {"conv_dim": "4", "conv_alpha": "-inf"}, ["conv_alpha"]),
    (4, 1.0, {"block_alphas": "in0=inf"}, ["block_alphas"]),
    (4, 1.0, {"block_alphas": "out3=-2"}, ["block_alphas"]),
    (4, 1.0, {"block_lr": "in0=nan"}, ["block_lr"]),
    (4, 1.0, {"block_lr": "mid=inf"}, ["block_lr"]),
    (4, 1.0, {"down_lr_weight": "1,inf"}, ["down_lr_weight"]),
    (4, 1.0, {"mid_lr_weight": "nan"}, ["mid_lr_weight"]),
    (4, 1.0, {"up_lr_weight": "-1,1"}, ["up_lr_weight"]),
]


def _hostile_id(case) -> str:
    dim, alpha, args, _ = case
    return " ".join([f"dim={dim}"[:20], f"alpha={alpha}", *(f"{k}={v}"[:30] for k, v in args.items())])


@pytest.mark.parametrize("dim, alpha, args, words", HOSTILE, ids=[_hostile_id(c) for c in HOSTILE])
def test_hostile_numbers_are_refused_before_the_models_change(sd1_models, dim, alpha, args, words):
    tes, unet = sd1_models
    before = fingerprint(*tes, unet)
    with pytest.raises(SpecError) as caught:
        _create(tes, unet, dim, alpha, **args)
    for word in words:
        assert word in str(caught.value), (word, str(caught.value))
    assert "\n" not in str(caught.value)
    assert_same(before, fingerprint(*tes, unet))


def _widest(tes, unet) -> int:
    """The largest min(fan-out, fan-in·k·k) over the layers a LoCon network adapts, from the weights' shapes."""
    _, targets = find_targets(tes, unet, include_conv=True)
    return max(min(t.layer.weight.shape[0], t.layer.weight[0].numel()) for t in targets)


def test_rank_bound_is_the_widest_layer(sd1_models):
    tes, unet = sd1_models
    widest = _widest(tes, unet)
    network = _create(tes, unet, 4, 1.0, block_ranks=f"mid={widest}", te_dim="0")
    assert max(m.lora_dim for m in network.unet_loras) == widest  # the bound itself is allowed
    before = fingerprint(*tes, unet)
    with pytest.raises(SpecError, match=f"rank {widest + 1} for M00 is above {widest}"):
        _create(tes, unet, 4, 1.0, block_ranks=f"mid={widest + 1}", te_dim="0")
    assert_same(before, fingerprint(*tes, unet))


@pytest.mark.parametrize("multiplier", [float("nan"), float("inf"), "strong"])
def test_bad_multipliers_are_refused(sd1_models, saved, multiplier):
    tes, unet = sd1_models
    before = fingerprint(*tes, unet)
    with pytest.raises(SpecError, match="multiplier"):
        create_network(multiplier, 4, 1.0, None, tes[0], unet)
    with pytest.raises(SpecError, match="multiplier"):
        create_network_from_weights(multiplier, str(saved), None, tes[0], unet)
    assert_same(before, fingerprint(*tes, unet))
    network = _create(tes, unet)
    network.set_multiplier(0.5)
    with pytest.raises(SpecError, match="multiplier"):
        network.set_multiplier(multiplier)
    assert network.multiplier == 0.5
    assert {m.multiplier for m in network.text_encoder_loras + network.unet_loras} == {0.5}


PLAN_CASES = [(4, 1.0, args, words) for args, words in BAD_ARGS] + HOSTILE


@pytest.mark.parametrize("dim, alpha, args, words", PLAN_CASES,
                         ids=[_hostile_id(c)[:60] for c in PLAN_CASES])
def test_plan_refuses_exactly_what_the_plugin_refuses(sd1_models, dim, alpha, args, words):
    """`blora-tools plan` (full-size models on the meta device) and `create_network` (tiny models) share one
    validation path: every bad configuration fails in both. Where the failure does not depend on the model
    (the arguments alone are wrong) the messages are identical."""
    tes, unet = sd1_models
    with pytest.raises(SpecError) as plugin:
        _create(tes, unet, dim, alpha, **args)
    with pytest.raises(SpecError) as planned:
        plan_network("sd1", args, dim, alpha)
    try:
        parse_network_args(args, "sd1", dim, alpha)
    except SpecError as err:
        assert str(planned.value) == str(plugin.value) == str(err)
    else:
        assert str(planned.value).split(":")[0] == str(plugin.value).split(":")[0]


def test_plan_command_refuses_hostile_ranks_in_one_line(runner):
    from blora_tools.cli import main

    for args in ("block_ranks=in0=1e30", "te_alpha=nan", "block_lr=in0=inf"):
        result = runner.invoke(main, ["plan", "--arch", "sd1", "--network-args", args])
        assert result.exit_code != 0 and "Traceback" not in result.output, result.output
        message = [line for line in result.output.splitlines() if line.strip()]
        assert len(message) == 1, result.output


# --- files that are not usable: every failure an AdapterFileError naming the file, nothing changed ---------------


def _edited(saved, tmp_path, edit, metadata_edit=None, name="edited.safetensors"):
    with safe_open(str(saved), "pt") as f:
        metadata = dict(f.metadata())
    path = tmp_path / name
    save_file(edit(load_file(saved)), path, metadata_edit(metadata) if metadata_edit else metadata)
    return path


def _first_up(t):
    return next(k for k in t if k.endswith("lora_up.weight"))


FILE_EDITS = {
    "nan-factor": (lambda t: {**t, _first_up(t): torch.full_like(t[_first_up(t)], float("nan"))}, None,
                   "NaN or Inf"),
    "inf-factor": (lambda t: {**t, _first_up(t): t[_first_up(t)] * float("inf")}, None, "NaN or Inf"),
    "nan-alpha": (lambda t: {k: torch.tensor(float("nan")) if k.endswith(".alpha") else v for k, v in t.items()},
                  None, "alpha is nan"),
    "inf-alpha": (lambda t: {k: torch.tensor(float("inf")) if k.endswith(".alpha") else v for k, v in t.items()},
                  None, "alpha is inf"),
    "spec-not-json": (lambda t: t, lambda m: {**m, "blora_spec": "{not json"}, "blora_spec"),
    "spec-other-arch": (lambda t: t, lambda m: {**m, "blora_spec": m["blora_spec"].replace('"sd1"', '"sdxl"')},
                        "trained for sdxl"),
    "spec-bad-module-alpha": (lambda t: t, lambda m: {**m, "blora_spec": m["blora_spec"][:-1] +
                                                       ',"module_alphas":{"x":"NaN"}}'}, "module_alphas"),
    "spec-negative-alpha": (lambda t: t, lambda m: {**m, "blora_spec": m["blora_spec"].replace('"alpha":2.0',
                                                                                             '"alpha":-2.0')},
                            "blora_spec"),
    "factors-not-a-pair": (lambda t: {**t, _first_up(t): torch.zeros(32, 3)}, None, "not a rank-r pair"),
    "integer-factors": (lambda t: {k: v.to(torch.int32) if k.endswith("weight") else v for k, v in t.items()},
                        None, "not floating point"),
}


@pytest.mark.parametrize("case", list(FILE_EDITS), ids=list(FILE_EDITS))
def test_unusable_files_are_adapter_file_errors(sd1_models, saved, tmp_path, case):
    edit, metadata_edit, words = FILE_EDITS[case]
    path = _edited(saved, tmp_path, edit, metadata_edit)
    tes, unet = sd1_models
    before = fingerprint(*tes, unet)
    with pytest.raises(AdapterFileError) as caught:
        create_network_from_weights(1.0, str(path), None, tes[0], unet)
    assert str(path) in str(caught.value) and words in str(caught.value), str(caught.value)
    assert_same(before, fingerprint(*tes, unet))
    if not case.startswith("spec-"):  # load_weights reads tensors only; the spec is for building a network
        message = _load_refused(_create(tes, unet, 4, 2.0), path, AdapterFileError)
        assert words in message, message


def test_a_fifo_is_refused_without_blocking(sd1_models, tmp_path):
    tes, unet = sd1_models
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(AdapterFileError, match="not a regular file"):
        create_network_from_weights(1.0, str(fifo), None, tes[0], unet)
    _load_refused(_create(tes, unet), fifo, AdapterFileError)


def test_merge_to_refuses_nan_weights_before_writing(sd1_models, saved):
    tes, unet = sd1_models
    sd = load_file(saved)
    network, _ = create_network_from_weights(1.0, None, None, tes[0], unet, weights_sd=sd)
    key = _first_up(sd)
    before = fingerprint(*tes, unet)
    with pytest.raises(AdapterFileError, match="NaN or Inf"):
        network.merge_to(tes[0], unet, {**sd, key: torch.full_like(sd[key], float("nan"))}, None, "cpu")
    assert_same(before, fingerprint(*tes, unet))


def test_an_alpha_no_file_can_store_is_refused_before_writing(sd1_models, tmp_path):
    """Saving refuses the file's alpha when F32 overflows (1e39) or it is 0 (a loaded file's alpha 0: loaders
    disagree on it), naming the file; nothing is written."""
    tes, unet = sd1_models
    huge = _create(tes, unet, alpha=1e39)
    path = tmp_path / "huge.safetensors"
    with pytest.raises(BloraError, match="1e\\+39 cannot be stored as F16 or F32") as err:
        huge.save_weights(path, torch.float16, {})
    assert err.value.path == str(path)
    assert not path.exists()

    source = tmp_path / "zero.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(2, 32),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.ones(32, 2),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(0.0)}, str(source))
    zero, _ = create_network_from_weights(1.0, str(source), None, tes[0], unet)
    out = tmp_path / "zero_out.safetensors"
    with pytest.raises(BloraError, match="alpha 0: an alpha must be a positive"):
        zero.save_weights(out, None, {})
    assert not out.exists()
