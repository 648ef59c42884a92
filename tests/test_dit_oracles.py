"""The Flux/SD3 oracles (tests/dit_oracles.py) compute what they claim.

Every expectation here is computed from the file's own factors (ΔW = scale · up @ down, split or swapped by the
layouts in research tables: fused q|k|v and q|k|v|mlp rows, shift/scale halves), or is another oracle built on a
different source (diffusers' code against ComfyUI's restated rules), or is a golden manifest.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from dit_oracles import (
    Factored,
    comfy_delta,
    comfy_key_map,
    comfy_patches,
    diffusers_delta,
    diffusers_flux_convert,
    peft_lora_file,
)

TINY = {"flux": dict(hidden=64, depth=2, single_depth=2), "sd3": dict(hidden=64, depth=3, attn2=(0,))}
H = 64


def _random(seed: int):
    g = torch.Generator().manual_seed(seed)
    return lambda *shape: torch.randn(*shape, generator=g)


def _swap(delta: torch.Tensor) -> torch.Tensor:
    shift, scale = delta.chunk(2, dim=0)
    return torch.cat([scale, shift], dim=0)


def _peft_products(path) -> dict[str, torch.Tensor]:
    """`transformer.<layer>` -> lora_B @ lora_A (float64), read from the file."""
    state = load_file(path)
    return {key[: -len(".lora_A.weight")]: state[key.replace("lora_A", "lora_B")].double() @ value.double()
            for key, value in state.items() if key.endswith(".lora_A.weight")}


def _kohya(modules: dict[str, tuple[int, int, int, float | None]], seed: int = 0) -> dict[str, torch.Tensor]:
    """A kohya-dialect state dict: name -> (out, in, rank, alpha or None)."""
    rand = _random(seed)
    state = {}
    for name, (out, inp, rank, alpha) in modules.items():
        state[f"{name}.lora_down.weight"] = rand(rank, inp)
        state[f"{name}.lora_up.weight"] = rand(out, rank)
        if alpha is not None:
            state[f"{name}.alpha"] = torch.tensor(alpha)
    return state


def _kohya_delta(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    down, up = state[f"{name}.lora_down.weight"].double(), state[f"{name}.lora_up.weight"].double()
    alpha = state.get(f"{name}.alpha")
    scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
    return scale * (up.flatten(1) @ down.flatten(1)).reshape(up.shape[0], *down.shape[1:])


@pytest.fixture(scope="module")
def peft_files(tmp_path_factory):
    """Per family: a PEFT file with alpha = rank, diffusers' ΔW for it and ComfyUI's."""
    folder = tmp_path_factory.mktemp("peft")
    out = {}
    for family in ("flux", "sd3"):
        path = peft_lora_file(folder / f"{family}.safetensors", family, rank=2)
        out[family] = (path, diffusers_delta(path, family), comfy_delta(load_file(path), family, **TINY[family]))
    return out


# --- peft_lora_file -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_peft_file_holds_every_linear_with_nonzero_factors(family, peft_files):
    from blora_tools.models import build_flux_transformer, build_sd3_transformer

    path = peft_files[family][0]
    model = build_flux_transformer() if family == "flux" else build_sd3_transformer()
    linears = {f"transformer.{n}" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    state = load_file(path)
    assert {k.rsplit(".", 2)[0] for k in state} == linears
    assert {k.rsplit(".", 2)[1] for k in state} == {"lora_A", "lora_B"}
    assert all(t.dtype == torch.float32 and t.abs().sum() > 0 for t in state.values())
    with safe_open(path, "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert (config["transformer.r"], config["transformer.lora_alpha"]) == (2, 2)


def test_peft_file_is_deterministic_from_its_seed(tmp_path):
    """Same seed, same tensors and config (diffusers orders the metadata entries differently from run to run)."""
    a, b, c = (peft_lora_file(tmp_path / f"{n}.safetensors", "sd3", seed=s, targets="proj_out")
               for n, s in (("a", 3), ("b", 3), ("c", 4)))
    tensors = [load_file(p) for p in (a, b, c)]
    assert tensors[0].keys() == tensors[1].keys() == tensors[2].keys()
    assert all(torch.equal(tensors[0][k], tensors[1][k]) and not torch.equal(tensors[0][k], tensors[2][k])
               for k in tensors[0])
    configs = []
    for path in (a, b):
        with safe_open(path, "pt") as f:
            configs.append(json.loads(f.metadata()["lora_adapter_metadata"]))
    assert configs[0] == configs[1]
    without = peft_lora_file(tmp_path / "d.safetensors", "sd3", metadata=False, targets="proj_out")
    with safe_open(without, "pt") as f:
        assert "lora_adapter_metadata" not in (f.metadata() or {})


# --- diffusers_delta ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_diffusers_delta_of_a_peft_file_is_each_layers_product(family, peft_files):
    path, deltas, _ = peft_files[family]
    expected = _peft_products(path)
    assert set(deltas) == set(expected)
    for layer, delta in deltas.items():
        torch.testing.assert_close(delta, expected[layer], rtol=0, atol=1e-12)


def test_diffusers_reads_alpha_from_the_metadata_and_otherwise_uses_the_rank(tmp_path):
    with_config = peft_lora_file(tmp_path / "m.safetensors", "flux", rank=2, alpha=5.0, targets="proj_out")
    without = peft_lora_file(tmp_path / "n.safetensors", "sd3", rank=2, alpha=5.0, metadata=False,
                             targets="proj_out")
    for path, family, scale in ((with_config, "flux", 2.5), (without, "sd3", 1.0)):
        (layer, product), = _peft_products(path).items()
        delta = diffusers_delta(path, family)
        assert list(delta) == [layer]
        torch.testing.assert_close(delta[layer], scale * product, rtol=0, atol=1e-12)


def test_diffusers_splits_a_kohya_flux_double_block_into_q_k_v():
    name = "lora_unet_double_blocks_1_txt_attn_qkv"
    state = _kohya({name: (3 * H, H, 2, 1.0)})
    deltas = diffusers_delta(state, "flux")
    whole = _kohya_delta(state, name)
    prefix = "transformer.transformer_blocks.1.attn."
    assert set(deltas) == {prefix + p for p in ("add_q_proj", "add_k_proj", "add_v_proj")}
    for i, part in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
        torch.testing.assert_close(deltas[prefix + part], whole[i * H:(i + 1) * H], rtol=0, atol=1e-12)


def test_diffusers_loads_nothing_from_kohya_sd3_names():
    """diffusers' SD3LoraLoaderMixin.lora_state_dict does no kohya conversion (research/dit.md A.5)."""
    state = _kohya({"lora_unet_joint_blocks_0_x_block_attn_qkv": (3 * H, H, 2, 1.0)})
    assert diffusers_delta(state, "sd3") == {}


# --- diffusers_flux_convert ---------------------------------------------------------------------------------

def test_flux_convert_deltas_are_what_diffusers_applies():
    state = _kohya({"lora_unet_double_blocks_0_img_attn_qkv": (3 * H, H, 2, 1.0),
                    "lora_unet_double_blocks_1_img_mlp_0": (4 * H, H, 2, 8.0)})
    converted, deltas = diffusers_flux_convert(state)
    applied = diffusers_delta(state, "flux")
    assert set(deltas) == set(applied) and all(k.rsplit(".", 2)[0] in deltas for k in converted)
    for layer, delta in deltas.items():
        torch.testing.assert_close(delta.dense(), applied[layer], rtol=0, atol=1e-12)


def test_flux_convert_at_the_real_width_splits_fused_rows():
    """Flux.1's width (3072): linear1 is q|k|v|mlp (3072 x 3, 12288), a double qkv is q|k|v."""
    d = 3072
    state = _kohya({"lora_unet_single_blocks_5_linear1": (7 * d, d, 2, 1.0),
                    "lora_unet_double_blocks_18_img_attn_qkv": (3 * d, d, 1, None),
                    "lora_unet_single_blocks_37_linear2": (d, 5 * d, 1, 4.0)})
    _, deltas = diffusers_flux_convert(state)
    probe = _random(1)(d, 3).double()
    single = "transformer.single_transformer_blocks.5."
    parts = {single + "attn.to_q": (0, d), single + "attn.to_k": (d, d), single + "attn.to_v": (2 * d, d),
             single + "proj_mlp": (3 * d, 4 * d)}
    double = "transformer.transformer_blocks.18.attn."
    parts.update({double + f"to_{p}": (i * d, d) for i, p in enumerate("qkv")})
    for layer, (start, length) in parts.items():
        name = "lora_unet_single_blocks_5_linear1" if layer.startswith(single) else (
            "lora_unet_double_blocks_18_img_attn_qkv")
        down, up = state[f"{name}.lora_down.weight"].double(), state[f"{name}.lora_up.weight"].double()
        scale = float(state.get(f"{name}.alpha", down.shape[0])) / down.shape[0]
        expected = scale * (up[start:start + length] @ (down @ probe))
        torch.testing.assert_close(deltas[layer].apply(probe), expected, rtol=1e-10, atol=1e-10)
    wide = _random(2)(5 * d, 2).double()
    name = "lora_unet_single_blocks_37_linear2"
    expected = 4.0 * (state[f"{name}.lora_up.weight"].double() @ (state[f"{name}.lora_down.weight"].double() @ wide))
    torch.testing.assert_close(deltas["transformer.single_transformer_blocks.37.proj_out"].apply(wide), expected)


def test_diffusers_drops_kohya_flux_embedders_and_final_layer():
    """diffusers 0.42's kohya converter names img_in/final_layer parts without the `transformer.` prefix (so
    load_lora_weights never loads them) and converts final_layer without its alpha; pinned as found."""
    state = _kohya({"lora_unet_img_in": (H, H, 2, 1.0), "lora_unet_final_layer_adaLN_modulation_1": (2 * H, H, 2, 1.0),
                    "lora_unet_double_blocks_0_img_mod_lin": (6 * H, H, 2, 1.0)})
    _, deltas = diffusers_flux_convert(state)
    assert set(deltas) == {"x_embedder", "norm_out.linear", "transformer.transformer_blocks.0.norm1.linear"}
    unscaled = _kohya_delta(state, "lora_unet_final_layer_adaLN_modulation_1") * 2  # alpha 1 / rank 2 undone
    torch.testing.assert_close(deltas["norm_out.linear"].dense(), _swap(unscaled), rtol=0, atol=1e-12)
    assert set(diffusers_delta(state, "flux")) == {"transformer.transformer_blocks.0.norm1.linear"}


def test_factored_apply_is_the_dense_product():
    rand = _random(3)
    delta = Factored(rand(5, 2).double(), rand(2, 7).double())
    x = rand(7, 3).double()
    torch.testing.assert_close(delta.apply(x), delta.dense() @ x)


# --- ComfyUI ------------------------------------------------------------------------------------------------

def test_comfy_applies_kohya_names_to_the_bfl_weights_unsplit_and_unswapped():
    flux = _kohya({"lora_unet_double_blocks_1_img_attn_qkv": (3 * H, H, 2, 1.0),
                   "lora_unet_single_blocks_0_linear1": (7 * H, H, 4, None),
                   "lora_unet_final_layer_adaLN_modulation_1": (2 * H, H, 2, 3.0),
                   "lora_unet_guidance_in_in_layer": (H, 256, 2, 1.0)})
    sd3 = _kohya({"lora_unet_joint_blocks_2_context_block_adaLN_modulation_1": (2 * H, H, 2, 1.0),
                  "lora_unet_joint_blocks_0_x_block_attn2_qkv": (3 * H, H, 2, 1.0)})
    sd3.update({"lora_unet_x_embedder_proj.lora_down.weight": _random(5)(2, 16, 2, 2),
                "lora_unet_x_embedder_proj.lora_up.weight": _random(6)(H, 2, 1, 1),
                "lora_unet_x_embedder_proj.alpha": torch.tensor(1.0)})
    for family, state in (("flux", flux), ("sd3", sd3)):
        result = comfy_delta(state, family, **TINY[family])
        stems = {k.split(".")[0] for k in state}
        expected = {"diffusion_model." + _bfl_path(family, stem) + ".weight": _kohya_delta(state, stem)
                    for stem in stems}
        assert set(result.delta) == set(expected) and result.not_loaded == []
        for key, delta in expected.items():
            torch.testing.assert_close(result.delta[key], delta, rtol=0, atol=1e-12)


def _bfl_path(family: str, stem: str) -> str:
    """kohya stem -> BFL/SAI module path, for the modules the tests above use."""
    known = {"lora_unet_double_blocks_1_img_attn_qkv": "double_blocks.1.img_attn.qkv",
             "lora_unet_single_blocks_0_linear1": "single_blocks.0.linear1",
             "lora_unet_final_layer_adaLN_modulation_1": "final_layer.adaLN_modulation.1",
             "lora_unet_guidance_in_in_layer": "guidance_in.in_layer",
             "lora_unet_joint_blocks_2_context_block_adaLN_modulation_1":
                 "joint_blocks.2.context_block.adaLN_modulation.1",
             "lora_unet_joint_blocks_0_x_block_attn2_qkv": "joint_blocks.0.x_block.attn2.qkv",
             "lora_unet_x_embedder_proj": "x_embedder.proj"}
    return known[stem]


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_comfy_and_diffusers_agree_on_a_peft_file(family, peft_files):
    """Two sources, one answer: every layer diffusers changes lands in ComfyUI's fused weight at the row range
    ComfyUI maps it to (swapped where ComfyUI swaps); SD3.5's attn2 is the one part ComfyUI does not load."""
    path, deltas, comfy = peft_files[family]
    key_map = comfy_key_map(family, **TINY[family])
    covered: dict[str, torch.Tensor] = {}
    for layer, delta in deltas.items():
        if ".attn2." in layer:
            continue
        target = key_map[layer]
        rows = slice(None) if target.rows is None else slice(target.rows[0], sum(target.rows))
        torch.testing.assert_close(comfy.delta[target.model_key][rows], _swap(delta) if target.swap else delta,
                                   rtol=0, atol=1e-12)
        mask = covered.setdefault(target.model_key, torch.zeros(comfy.delta[target.model_key].shape[0]))
        mask[rows] += 1
    assert set(covered) == set(comfy.delta) and all(bool((m == 1).all()) for m in covered.values())
    attn2 = sorted(k for k in load_file(path) if ".attn2." in k)
    assert comfy.not_loaded == attn2 and (family == "flux") == (attn2 == [])


class _Checkpoint(dict):
    """An SAI checkpoint for diffusers' single-file converter: the given weights, zeros for any other key it pops."""

    def pop(self, key, *default):
        return super().pop(key) if key in self else torch.zeros(6 * H, dtype=torch.float64)


def test_comfy_sd3_rows_and_swaps_are_diffusers_single_file_layout(peft_files):
    """ComfyUI's SAI-layout ΔW, put through diffusers' own SAI -> diffusers converter
    (`convert_sd3_transformer_checkpoint_to_diffusers`: q|k|v chunks, swapped final and last-context modulation),
    is the ΔW diffusers applies for the same file: row order and both swaps come from diffusers, not from us."""
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    _, deltas, comfy = peft_files["sd3"]
    checkpoint = _Checkpoint({k[len("diffusion_model."):]: v for k, v in comfy.delta.items()})
    converted = convert_sd3_transformer_checkpoint_to_diffusers(checkpoint)
    compared = 0
    for layer, delta in deltas.items():
        if ".attn2." in layer:  # ComfyUI does not load these (see above)
            continue
        torch.testing.assert_close(converted[layer[len("transformer."):] + ".weight"], delta, rtol=0, atol=1e-12)
        compared += 1
    assert compared == len(deltas) - 4


def test_comfy_flux_rows_and_swaps_are_diffusers_kohya_layout():
    """At Flux.1's width, diffusers' kohya converter splits linear1 into q|k|v|mlp and a double qkv into q|k|v and
    swaps the final modulation; ComfyUI's map, read back through its row ranges and swap, says the same."""
    d = 3072
    state = _kohya({"lora_unet_single_blocks_0_linear1": (7 * d, d, 2, 2.0),
                    "lora_unet_double_blocks_3_txt_attn_qkv": (3 * d, d, 1, 0.5),
                    "lora_unet_final_layer_adaLN_modulation_1": (2 * d, d, 2, 2.0)})  # alpha = rank: see above
    _, converted = diffusers_flux_convert(state)
    patches, not_loaded = comfy_patches(state, "flux", hidden=d, depth=19, single_depth=38)
    assert not_loaded == []
    by_weight = {p.target.model_key: p for p in patches}
    key_map = comfy_key_map("flux", hidden=d, depth=19, single_depth=38)
    probe = _random(7)(d, 2).double()
    for layer, delta in converted.items():
        target = key_map[layer if layer.startswith("transformer.") else "transformer." + layer]
        patch = by_weight[target.model_key]
        part = patch.scale * (patch.up.double() @ (patch.down.double() @ probe))
        if target.rows is not None:
            part = part[target.rows[0]:sum(target.rows)]
        torch.testing.assert_close(delta.apply(probe), _swap(part) if target.swap else part, rtol=1e-10, atol=1e-9)
    assert len(converted) == 4 + 3 + 1


def test_comfy_ignores_peft_metadata_alpha(tmp_path):
    """ComfyUI's load_lora reads only `<module>.alpha` tensors, so a PEFT file's lora_adapter_metadata alpha is
    lost there (scale 1) while diffusers applies it."""
    path = peft_lora_file(tmp_path / "a.safetensors", "flux", rank=2, alpha=6.0, targets="proj_out")
    (layer, product), = _peft_products(path).items()
    comfy = comfy_delta(load_file(path), "flux", **TINY["flux"])
    torch.testing.assert_close(comfy.delta["diffusion_model.final_layer.linear.weight"], product, rtol=0, atol=1e-12)
    torch.testing.assert_close(diffusers_delta(path, "flux")[layer], 3.0 * product, rtol=0, atol=1e-12)


@pytest.mark.parametrize("style", ["lora_transformer_", "lycoris_", "diffusion_model"])
def test_comfy_maps_every_dialect_prefix_alike(style, peft_files):
    """OneTrainer `lora_transformer_*`, SimpleTuner `lycoris_*` (diffusers names with `_`) and BFL
    `diffusion_model.*` keys give the ΔW of the same factors under `transformer.*`, scaled by their alpha."""
    path, _, reference = peft_files["flux"]
    state = load_file(path)
    key_map = comfy_key_map("flux", **TINY["flux"])
    renamed = {}
    for key, value in state.items():
        layer, param = key.rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        if style == "diffusion_model":
            target = key_map[layer]
            if target.rows is not None or target.swap:
                continue  # a BFL name has no way to say "rows of" or "swapped"
            stem, up, down = target.model_key[: -len(".weight")], "lora_B", "lora_A"
        else:
            stem, up, down = style + layer[len("transformer."):].replace(".", "_"), "lora_up", "lora_down"
        renamed[f"{stem}.{up if param == 'lora_B' else down}.weight"] = value
        renamed[f"{stem}.alpha"] = torch.tensor(4.0)  # rank 2: scale 2
    result = comfy_delta(renamed, "flux", **TINY["flux"])
    assert result.not_loaded == [] and result.delta
    for key, delta in result.delta.items():
        torch.testing.assert_close(delta, 2.0 * reference.delta[key], rtol=0, atol=1e-12)


def test_comfy_reports_keys_that_do_not_reach_the_model():
    state = _kohya({"lora_unet_double_blocks_2_img_attn_qkv": (3 * H, H, 2, 1.0),  # beyond depth 2
                    "lora_unet_no_such_layer": (H, H, 2, None),
                    "lora_te1_text_model_encoder_layers_0_mlp_fc1": (64, 32, 2, 1.0),
                    "lora_unet_img_in": (H, 64, 2, 1.0)})
    state["transformer.transformer_blocks.0.attn.to_q.lora_A.weight"] = torch.ones(2, H)  # no lora_B
    patches, not_loaded = comfy_patches(state, "flux", **TINY["flux"])
    assert [p.module for p in patches] == ["lora_unet_img_in"]
    assert not_loaded == sorted(k for k in state if not k.startswith(("lora_unet_img_in", "lora_te1")))


def test_comfy_refuses_kinds_it_does_not_restate():
    state = {"lora_unet_img_in.hada_w1_a": torch.ones(2, 2)}
    with pytest.raises(ValueError, match="hada_w1_a"):
        comfy_delta(state, "flux", **TINY["flux"])


# --- ComfyUI's map against the golden manifests (full size) --------------------------------------------------

FULL = [
    ("flux", "diffusers_flux_dev", "flux_dev_in_dims", dict(hidden=3072, depth=19, single_depth=38)),
    ("sd3", "diffusers_sd3_medium", "sd3_medium_emb_dims", dict(hidden=1536, depth=24)),
    ("sd3", "diffusers_sd35_medium", "sd35_medium_emb_dims", dict(hidden=1536, depth=24, attn2=tuple(range(13)))),
    ("sd3", "diffusers_sd35_large", "sd35_large_emb_dims", dict(hidden=2432, depth=38)),
]


@pytest.mark.parametrize("family, diffusers_name, kohya_name, shape", FULL)
def test_comfy_map_joins_diffusers_layers_to_kohya_modules(family, diffusers_name, kohya_name, shape, load_manifest):
    """At full size, ComfyUI's map sends every diffusers layer (diffusers' own module tree) onto a kohya module's
    weight (sd-scripts' own module tree), with row ranges that tile each fused weight exactly and matching widths;
    every kohya module is a ComfyUI key. SD3.5 Medium's attn2 layers are the ones ComfyUI leaves unmapped."""
    key_map = comfy_key_map(family, **shape)
    kohya = {m["name"]: m for m in load_manifest(kohya_name)["modules"]}
    assert set(kohya) <= set(key_map)
    bfl = {key_map[name].model_key: module for name, module in kohya.items()}
    rows: dict[str, list[tuple[int, int]]] = {}
    unmapped = []
    for layer in load_manifest(diffusers_name)["layers"]:
        target = key_map.get("transformer." + layer["name"])
        if target is None:
            unmapped.append(layer["name"])
            continue
        if target.model_key not in bfl:  # lora_flux makes no final-layer module
            assert family == "flux" and ".final_layer." in target.model_key, layer["name"]
            continue
        org = bfl[target.model_key]["org_shape"]
        assert layer["shape"][1:] == org[1:], layer["name"]
        start, length = target.rows or (0, org[0])
        assert length == layer["shape"][0], layer["name"]
        rows.setdefault(target.model_key, []).append((start, length))
    assert all(".attn2." in name for name in unmapped)
    assert len(unmapped) == 4 * len(shape.get("attn2", ()))
    for key, parts in rows.items():
        spans = sorted(parts)
        assert spans[0][0] == 0 and all(a + n == b for (a, n), (b, _) in zip(spans, spans[1:])), key
        assert sum(spans[-1]) == bfl[key]["org_shape"][0], key
    assert set(rows) == {k for k in bfl if ".attn2." not in k}  # kohya does train attn2
