"""The plugin on Flux.1 and SD3: kohya's targets and names (golden manifests), DiT selectors and kohya's own
lora_flux/lora_sd3 arguments, and the trainer contract replayed by the fake trainer on sd-scripts-shaped tiny models."""

from __future__ import annotations

import json
import re
import warnings
from collections import Counter
from functools import cache

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import dit_models
from blora_tools.dit_trees import build_dit, build_dit_text_encoders
from blora_tools.errors import SpecError
from blora_tools.spec import BlockSpec
from blora_tools.taxonomy.blocks import place
from blora_tools.taxonomy.selectors import resolve_selector
from fake_trainer import TrainerArgs, predict, synthetic_batch, text_encoder_arg, train
from kohya_plugin.blockwise import create_network, create_network_from_weights
from kohya_plugin.targets import embedder_slot, find_targets

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MANIFESTS = {  # manifest → (arch, SD3 variant)
    "flux_dev_lora": ("flux", None),
    "flux_dev_in_dims": ("flux", None),
    "flux_dev_te": ("flux", None),
    "sd3_medium_lora": ("sd3", "sd3-medium"),
    "sd3_medium_emb_dims": ("sd3", "sd3-medium"),
    "sd3_medium_te": ("sd3", "sd3-medium"),
    "sd35_medium_lora": ("sd3", "sd3.5-medium"),
    "sd35_large_lora": ("sd3", "sd3.5-large"),
}


@cache
def full(arch: str, variant: str | None):
    return build_dit_text_encoders(arch), build_dit(arch, variant)


@cache
def tiny(arch: str):
    return dit_models.build(arch)


def names(network) -> set[str]:
    return {m.lora_name for m in network.text_encoder_loras + network.unet_loras}


# --- targets and names against kohya's own create_network ---------------------------------------------------


@pytest.mark.parametrize("manifest_name", sorted(MANIFESTS))
def test_network_equals_kohya_manifest(manifest_name, load_manifest):
    """The plugin, given kohya's own arguments, builds exactly kohya's modules, shapes, ranks and alphas."""
    manifest = load_manifest(manifest_name)
    arch, variant = MANIFESTS[manifest_name]
    tes, model = full(arch, variant)
    kwargs = dict(manifest["create_network"]["kwargs"])
    given_tes = tes if any(m["component"] != "unet" for m in manifest["modules"]) else None
    network = create_network(1.0, 4, 1.0, None, given_tes, model, **kwargs)
    got = {m.lora_name: m for m in network.text_encoder_loras + network.unet_loras}
    expected = {m["name"]: m for m in manifest["modules"]}
    assert set(got) == set(expected), (sorted(set(expected) - set(got))[:4], sorted(set(got) - set(expected))[:4])
    for name, entry in expected.items():
        module = got[name]
        assert list(module.lora_down.weight.shape) == entry["down_shape"], name
        assert list(module.lora_up.weight.shape) == entry["up_shape"], name
        assert (module.lora_dim, module.alpha_value) == (entry["rank"], entry["alpha"]), name


def test_targets_place_every_module_in_its_block(load_manifest):
    tes, model = full("flux", None)
    arch, targets = find_targets(tes, model, include_conv=False)
    blocks = Counter(t.placement.block for t in targets)
    assert blocks["D00"] == 10 and blocks["S37"] == 3 and blocks["te1"] == 72 and blocks["te3"] == 168
    assert {t.name for t in targets if t.placement.block == "OTHER"} == {
        m["name"] for m in load_manifest("flux_dev_in_dims")["modules"] if embedder_slot(arch, m["name"]) is not None
    }


# --- DiT selectors and kohya's arguments ------------------------------------------------------------------------


def unet_ranks(arch: str, dim: int = 4, **kwargs) -> dict[str, int]:
    tes, model = tiny(arch)
    network = create_network(1.0, dim, 1.0, None, tes, model, **kwargs)
    return {m.lora_name: m.lora_dim for m in network.unet_loras}


def test_block_ranks_with_dit_selectors_and_a_fused_sub_selector():
    ranks = unet_ranks("flux", block_ranks="double=8,S10-S37=32,S10.linear1.mlp=2")
    assert Counter(ranks.values()) == Counter({8: 19 * 10, 4: 10 * 3, 32: 28 * 3 - 1, 2: 1})
    assert ranks["lora_unet_single_blocks_10_linear1"] == 2
    assert ranks["lora_unet_single_blocks_10_linear2"] == 32
    later = unet_ranks("flux", block_ranks="S10.linear1.mlp=2,single=16")
    assert later["lora_unet_single_blocks_10_linear1"] == 16, "a later whole-block term wins"


def test_blocks_sub_selector_trains_only_the_layers_holding_the_part():
    assert set(unet_ranks("flux", blocks="D05.img")) == {
        f"lora_unet_double_blocks_5_img_{p}" for p in ("mod_lin", "attn_qkv", "attn_proj", "mlp_0", "mlp_2")}
    assert set(unet_ranks("flux", blocks="D05.img.q,S03.linear1.mlp")) == {
        "lora_unet_double_blocks_5_img_attn_qkv", "lora_unet_single_blocks_3_linear1"}
    assert set(unet_ranks("sd3", blocks="J01.ctx")) == {
        f"lora_unet_joint_blocks_1_context_block_{p}"
        for p in ("adaLN_modulation_1", "attn_qkv", "attn_proj", "mlp_fc1", "mlp_fc2")}


def test_research_preset_trains_its_blocks():
    ranks = unet_ranks("flux", preset="splitflux-style")
    assert {place(n, "flux").block for n in ranks} == {f"S{i:02d}" for i in range(10, 38)}
    assert len(ranks) == 28 * 3


def test_kohya_block_indices_keep_their_meaning():
    """research/dit.md (d), verified on kohya: double "1" + single "0" → the 10 D01 modules and 3 S00 modules."""
    ranks = unet_ranks("flux", train_double_block_indices="1", train_single_block_indices="0")
    assert Counter(place(n, "flux").block for n in ranks) == Counter({"D01": 10, "S00": 3})
    assert {place(n, "flux").block for n in unet_ranks("flux", train_blocks="single")} == {
        f"S{i:02d}" for i in range(38)}
    assert {place(n, "sd3").block for n in unet_ranks("sd3", train_block_indices="0,2")} == {"J00", "J02"}


def test_kohya_type_dims_and_regex_dims():
    ranks = unet_ranks("flux", img_attn_dim="8", single_dim="0", txt_mod_dim="2",
                       network_reg_dims=r"double_blocks_3_img_attn_qkv=16")
    assert ranks["lora_unet_double_blocks_0_img_attn_qkv"] == 8
    assert ranks["lora_unet_double_blocks_0_img_attn_proj"] == 8
    assert ranks["lora_unet_double_blocks_3_img_attn_qkv"] == 16, "network_reg_dims wins over the type dims"
    assert ranks["lora_unet_double_blocks_0_txt_mod_lin"] == 2
    assert ranks["lora_unet_double_blocks_0_img_mlp_0"] == 4
    assert not any("linear" in n for n in ranks), "single_dim=0 skips linear1 and linear2"
    assert Counter(n.endswith("modulation_lin") for n in ranks if "single" in n) == Counter({True: 38})
    sd3 = unet_ranks("sd3", x_mlp_dim="8", context_attn_dim="0")
    assert sd3["lora_unet_joint_blocks_0_x_block_mlp_fc1"] == 8
    assert not any("context_block_attn" in n for n in sd3)


def test_embedder_dims_and_t5():
    tes, model = tiny("flux")
    network = create_network(1.0, 4, 1.0, None, tes, model, in_dims="[2,0,3,0,1]", train_t5xxl="True", t5_dim="2")
    other = {m.lora_name: m.lora_dim for m in network.unet_loras if place(m.lora_name, "flux").block == "OTHER"}
    assert other == {"lora_unet_img_in": 2, "lora_unet_vector_in_in_layer": 3, "lora_unet_vector_in_out_layer": 3,
                     "lora_unet_txt_in": 1}
    t5 = [m for m in network.text_encoder_loras if m.lora_name.startswith("lora_te3_")]
    assert t5 and {m.lora_dim for m in t5} == {2} and network.train_t5xxl
    assert not create_network(1.0, 4, 1.0, None, tes, model).train_t5xxl
    sd3_tes, sd3 = tiny("sd3")
    sd3_net = create_network(1.0, 4, 1.0, None, sd3_tes, sd3, emb_dims="0,0,2,0,0,0")
    assert [(m.lora_name, tuple(m.lora_down.weight.shape)) for m in sd3_net.unet_loras
            if "embedder" in m.lora_name] == [("lora_unet_x_embedder_proj", (2, 16, 2, 2))]


@pytest.mark.parametrize(("arch", "kwargs", "message"), [
    ("flux", {"bogus": "1"}, "unknown key bogus"),
    ("flux", {"x_attn_dim": "4"}, "x_attn_dim is a SD3 argument"),
    ("sd3", {"train_double_block_indices": "1"}, "is a Flux.1 argument"),
    ("flux", {"block_dims": "4"}, "SD1/SD2/SDXL argument"),
    ("flux", {"preset": "style"}, "unknown value"),
    ("flux", {"train_double_block_indices": "19"}, "outside 0..18"),
    ("flux", {"in_dims": "[4,4]"}, "takes 5 comma-separated ranks"),
    ("flux", {"network_reg_dims": "double(=4"}, "not a regular expression"),
    ("flux", {"t5_dim": "4"}, "t5_dim needs train_t5xxl"),
    ("flux", {"blocks": "D05.bogus"}, "matches no part"),
    ("sd3", {"split_qkv": "maybe"}, "not a boolean"),
    # BASE's embedders get a module only through in_dims/emb_dims (sd-scripts 48d368f lora_flux.py, lora_sd3.py)
    ("flux", {"block_ranks": "BASE=8"}, "block_ranks gives BASE rank 8, but kohya trains BASE's layers only "
     "through in_dims=[img,time,vector,guidance,txt] and base.out.final never; add e.g. in_dims=[8,8,8,8,8]"),
    ("flux", {"block_ranks": "double=8,base.in.txt=2"}, "base.in.txt rank 2, but kohya trains BASE's layers only"),
    ("flux", {"block_ranks": "BASE=8", "in_dims": "0,0,0,0,0"}, "add e.g. in_dims=[8,8,8,8,8]"),
    ("flux", {"blocks": "BASE"}, "blocks=BASE selects BASE, but kohya trains BASE's layers only through in_dims"),
    ("flux", {"block_lr": "BASE=0.5"}, "block_lr gives BASE learning-rate weight 0.5, but"),
    ("flux", {"block_ranks": "base.out=8", "in_dims": "4,4,4,4,4"}, "kohya trains no such layer on flux"),
    ("sd3", {"block_ranks": "base.out=8"}, "but kohya trains BASE's layers only through "
     "emb_dims=[context,t,x,y,final_mod,final_linear]; add e.g. emb_dims=[8,8,8,8,8,8] or drop it"),
    ("sd3", {"block_alphas": "BASE=4", "emb_dims": "1,1,1,1,1,1"}, "emb_dims trains them with alpha --network_alpha"),
])
def test_bad_arguments_fail_before_the_model_is_touched(arch, kwargs, message):
    tes, model = tiny(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    forwards = [m.__dict__.get("forward") for m in model.modules()]
    with pytest.raises(SpecError, match=re.escape(message)):
        create_network(1.0, 4, 1.0, None, tes, model, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert forwards == [m.__dict__.get("forward") for m in model.modules()]


@pytest.mark.parametrize(("manifest_name", "extra"), [
    ("flux_dev_in_dims", {"block_ranks": "BASE=8", "preset": "all"}),
    ("sd3_medium_emb_dims", {"blocks": "BASE,joint", "block_lr": "BASE=0.5", "block_alphas": "BASE=0"}),
])
def test_base_values_pass_where_the_embedder_dims_train_them(manifest_name, extra, load_manifest):
    """With kohya's in_dims/emb_dims given, BASE terms pass without a message and the network is kohya's own:
    the embedders take the in_dims/emb_dims ranks and --network_alpha (the manifest), whatever BASE says."""
    manifest = load_manifest(manifest_name)
    arch, variant = MANIFESTS[manifest_name]
    _, model = full(arch, variant)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        network = create_network(1.0, 4, 1.0, None, None, model, **manifest["create_network"]["kwargs"], **extra)
    got = {m.lora_name: (m.lora_dim, m.alpha_value) for m in network.unet_loras}
    assert got == {m["name"]: (m["rank"], m["alpha"]) for m in manifest["modules"]}


def test_zero_base_values_and_wide_selections_pass_quietly():
    """A BASE value of 0 and selections that merely include BASE (`preset=all`, `blocks=all`, a 58-value LBW vector)
    are not refused or warned about, and build the default network's modules (a BASE rank or weight of 0 also drops
    the text encoders)."""
    tes, model = tiny("flux")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        default = names(create_network(1.0, 4, 1.0, None, tes, model))
        for kwargs in ({"preset": "all"}, {"blocks": "all"}, {"block_lr": ",".join(["1"] * 58)}):
            assert names(create_network(1.0, 4, 1.0, None, tes, model, **kwargs)) == default, kwargs
        for kwargs in ({"block_ranks": "BASE=0"}, {"block_lr": "BASE=0,double=1"}):
            no_base = names(create_network(1.0, 4, 1.0, None, tes, model, **kwargs))
            assert no_base == {n for n in default if n.startswith("lora_unet_")} != default, kwargs


def test_text_encoder_learning_rates_per_encoder_and_reg_lrs():
    tes, model = tiny("sd3")
    network = create_network(1.0, 4, 1.0, None, tes, model, train_t5xxl="true", block_lr="J01=0.5",
                             network_reg_lrs=r"joint_blocks_2_=0.003")
    network.apply_to(tes, model)
    groups, descriptions = network.prepare_optimizer_params_with_multiple_te_lrs([1e-4, 2e-4, 3e-4], 1e-3, 1e-2)
    by_lr = {g["lr"]: {id(p) for p in g["params"]} for g in groups}
    assert set(by_lr) == {1e-4, 2e-4, 3e-4, 1e-3, 5e-4, 0.003}
    for lr, prefix in ((1e-4, "lora_te1_"), (2e-4, "lora_te2_"), (3e-4, "lora_te3_"), (0.003, "lora_unet_joint_blocks_2_"),
                       (5e-4, "lora_unet_joint_blocks_1_")):
        expected = {id(p) for m in network.text_encoder_loras + network.unet_loras if m.lora_name.startswith(prefix)
                    for p in m.parameters()}
        assert by_lr[lr] == expected, (lr, descriptions)


# --- the trainer contract, replayed ----------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["flux", "sd3"])
def run(request, tmp_path_factory):
    """30 steps on a fresh tiny model: blocks of one group with per-block ranks, the file saved."""
    arch = request.param
    tes, model = dit_models.build(arch)
    batch = synthetic_batch(arch)
    blocks = "S10-S37" if arch == "flux" else "J01-J02"
    path = tmp_path_factory.mktemp(arch) / f"{arch}.safetensors"
    ranks = "S10=8,S37=2" if arch == "flux" else "J01=8,J02.ctx=2"
    args = TrainerArgs(network_dim=4, network_alpha=2, output=str(path), max_train_steps=30, learning_rate=2e-2,
                       network_args=[f"blocks={blocks}", f"block_ranks={ranks}", "block_alphas=J01=4"
                                     if arch == "sd3" else "block_alphas=S10=4"], network_train_unet_only=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train(arch, tes, model, batch, args)
    return {"arch": arch, "tes": tes, "model": model, "batch": batch, "result": result, "path": path,
            "before": before, "blocks": blocks}


def test_dit_loss_falls_and_only_selected_blocks_change(run):
    result, arch = run["result"], run["arch"]
    assert result.losses[-1] < 0.8 * result.losses[0], result.losses
    assert all(torch.equal(run["before"][k], v) for k, v in run["model"].state_dict().items())
    network = result.network
    assert not network.text_encoder_loras
    chosen = set(resolve_selector(run["blocks"], arch))
    assert {network.block_of(m.lora_name).block for m in network.unet_loras} == chosen
    assert all(float(m.lora_up.weight.abs().max()) > 0 for m in network.unet_loras), "every module learned"
    assert result.multiple_te_lrs


def test_dit_saved_file_holds_the_planned_modules_with_one_alpha(run):
    network, path = run["result"].network, run["path"]
    tensors = load_file(str(path))
    stems = {k.partition(".")[0] for k in tensors}
    assert stems == names(network)
    assert len({float(v) for k, v in tensors.items() if k.endswith(".alpha")}) == 1
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "kohya_plugin.blockwise"
    spec = BlockSpec.from_json(meta["blora_spec"])
    assert spec.arch.value == run["arch"]
    ranks = {m.lora_name: m.lora_dim for m in network.unet_loras}
    if run["arch"] == "flux":
        assert spec.blocks["S10"].rank == 8 and spec.blocks["S37"].rank == 2 and spec.blocks["D00"].rank == 0
        assert ranks["lora_unet_single_blocks_10_linear1"] == 8
    else:
        assert ranks["lora_unet_joint_blocks_2_context_block_attn_qkv"] == 2
        assert ranks["lora_unet_joint_blocks_2_x_block_attn_qkv"] == 4


def dense_delta(tensors: dict, stem: str) -> torch.Tensor:
    down, up = tensors[f"{stem}.lora_down.weight"].double(), tensors[f"{stem}.lora_up.weight"].double()
    scale = float(tensors[f"{stem}.alpha"]) / down.shape[0]
    return scale * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


def test_dit_file_reloads_for_resume_and_merges_like_the_dense_oracle(run):
    arch, path, network = run["arch"], run["path"], run["result"].network
    tes, model = dit_models.build(arch)
    text_encoder = text_encoder_arg(arch, tes)
    resumed, _ = create_network_from_weights(1.0, str(path), None, text_encoder, model)
    assert names(resumed) == names(network)
    assert {m.lora_name: m.alpha_value for m in resumed.unet_loras} == {
        m.lora_name: m.alpha_value for m in network.unet_loras}, "training alphas come back from blora_spec"
    resumed.apply_to(text_encoder, model)
    resumed.load_weights(str(path))
    for a, b in zip(sorted(network.unet_loras, key=lambda m: m.lora_name),
                    sorted(resumed.unet_loras, key=lambda m: m.lora_name)):
        torch.testing.assert_close(a.delta_weight(), b.delta_weight())
    resumed.eval()
    with torch.no_grad():
        adapted = predict(arch, tes, model, run["batch"])
    resumed.remove_from()

    tensors = load_file(str(path))
    merge_net, weights = create_network_from_weights(1.0, str(path), None, text_encoder, model, for_inference=True)
    originals = {m.lora_name: m.layer.weight.detach().double().clone() for m in merge_net.unet_loras}
    merge_net.merge_to(text_encoder, model, weights, torch.float32, "cpu")
    for module in merge_net.unet_loras:
        oracle = originals[module.lora_name] + dense_delta(tensors, module.lora_name)
        torch.testing.assert_close(module.layer.weight.double(), oracle, rtol=0, atol=1e-6)
    with torch.no_grad():
        merged = predict(arch, tes, model, run["batch"])
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)


def test_two_dit_networks_in_one_process_do_not_influence_each_other():
    tes, model = tiny("flux")
    first = names(create_network(1.0, 4, 1.0, None, tes, model, train_blocks="double", in_dims="1,1,1,1,1"))
    second = names(create_network(1.0, 4, 1.0, None, tes, model))
    assert not any("single" in n for n in first) and any("img_in" in n for n in first)
    assert sum("single" in n for n in second) == 38 * 3 and not any("img_in" in n for n in second)


def test_saved_spec_json_states_arch(run):
    with safe_open(str(run["path"]), "pt") as f:
        doc = json.loads(f.metadata()["blora_spec"])
    assert doc["arch"] == run["arch"] and "file_alpha" in doc


# --- split_qkv ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_split_qkv_trains_parts_and_saves_them_fused_with_the_right_alpha(arch, tmp_path):
    """Each part of a fused layer is its own rank-r LoRA with scale α/r; the saved fused factors (rank n·r) give,
    with the file's alpha, exactly the sum of the parts' ΔW (kohya #2204 keeps α and comes out n× too weak)."""
    tes, model = dit_models.build(arch)
    path = tmp_path / "split.safetensors"
    blocks = "D01,S02" if arch == "flux" else "J00"
    args = TrainerArgs(network_dim=2, network_alpha=1, output=str(path), max_train_steps=8, learning_rate=2e-2,
                       network_args=[f"blocks={blocks}", "split_qkv=true"], network_train_unet_only=True)
    result = train(arch, tes, model, synthetic_batch(arch), args)
    network = result.network
    assert result.losses[-1] < result.losses[0]
    split = {m.lora_name: m for m in network.unet_loras if m.row_parts}
    expected_split = ({"lora_unet_double_blocks_1_img_attn_qkv", "lora_unet_double_blocks_1_txt_attn_qkv",
                       "lora_unet_single_blocks_2_linear1"} if arch == "flux" else
                      {"lora_unet_joint_blocks_0_context_block_attn_qkv", "lora_unet_joint_blocks_0_x_block_attn_qkv",
                       "lora_unet_joint_blocks_0_x_block_attn2_qkv"})
    assert set(split) == expected_split
    tensors = load_file(str(path))
    for name, module in split.items():
        n = len(module.row_parts)
        assert (module.lora_dim, module.alpha_value) == (2 * n, 1.0 * n)
        down, up = module.lora_down.weight.detach().double(), module.lora_up.weight.detach().double()
        parts, start = [], 0
        for i, rows in enumerate(module.row_parts):  # each part alone: rows × its own 2 columns, scale α/r = 1/2
            parts.append(0.5 * up[start:start + rows, 2 * i:2 * i + 2] @ down[2 * i:2 * i + 2])
            assert float(up[start:start + rows].abs().sum()) > 0, "every part learned"
            start += rows
        assert float(up.abs().sum()) == pytest.approx(sum(float(up[s:s + r, 2 * i:2 * i + 2].abs().sum())
                                                          for i, (s, r) in enumerate(_starts(module.row_parts)))), \
            "off-diagonal blocks stay exactly 0"
        torch.testing.assert_close(dense_delta(tensors, name), torch.cat(parts), rtol=1e-5, atol=1e-7)
    resumed = create_network(1.0, 2, 1, None, None, model, blocks=blocks, split_qkv="true")
    resumed.load_weights(str(path))
    for module in resumed.unet_loras:
        torch.testing.assert_close(module.delta_weight(), dict((m.lora_name, m) for m in network.unet_loras)[
            module.lora_name].delta_weight())


def _starts(rows: tuple[int, ...]) -> list[tuple[int, int]]:
    out, start = [], 0
    for r in rows:
        out.append((start, r))
        start += r
    return out


def test_split_qkv_refuses_to_resume_a_dense_fused_file(tmp_path):
    from blora_tools.errors import AdapterFileError

    tes, model = tiny("flux")
    plain = create_network(1.0, 6, 1.0, None, None, model, blocks="D00.img.q")
    for module in plain.unet_loras:
        torch.nn.init.normal_(module.lora_up.weight)
    path = tmp_path / "dense.safetensors"
    plain.save_weights(str(path))
    split = create_network(1.0, 2, 1.0, None, None, model, blocks="D00.img.q", split_qkv="true")
    with pytest.raises(AdapterFileError, match="not block-diagonal"):
        split.load_weights(str(path))
    plain.load_weights(str(path))  # the same file resumes a fused network


def test_dit_saved_file_loads_through_comfyui_mapping(run):
    """ComfyUI's key map and patch arithmetic (tests/dit_oracles.py, restated from comfy/lora.py) put every module
    of the saved file on its BFL/SAI weight with the ΔW the file states."""
    from dit_oracles import comfy_delta

    arch, path = run["arch"], run["path"]
    tensors = load_file(str(path))
    if arch == "flux":
        size = dit_models.FluxSize()
        found = comfy_delta(tensors, "flux", size.hidden, size.double_blocks, size.single_blocks)
    else:
        size = dit_models.MMDiTSize()
        found = comfy_delta(tensors, "sd3", size.hidden, size.depth, attn2=size.attn2_blocks)
    assert found.not_loaded == []
    stems = {k.partition(".")[0] for k in tensors}
    assert len(found.delta) == len(stems)
    for stem in stems:
        weight = f"diffusion_model.{place(stem, arch).layer.path}.weight"
        torch.testing.assert_close(found.delta[weight], dense_delta(tensors, stem), rtol=1e-6, atol=1e-9)
