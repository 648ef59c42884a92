"""render on Flux.1 (FluxPipeline) and SD3 (StableDiffusion3Pipeline), tiny pipelines built in code; adapters are
presented in diffusers' naming as `render.run` does.

Oracle: diffusers' own LoRA loading (`load_lora_weights` + `fuse_lora`, through PEFT) of a diffusers-dialect
file. The same adapter in kohya's fused naming is made here from the split one by test-side arithmetic (downs
stacked, ups block-diagonal: ΔW rows of the fused weight are the parts' rows in q, k, v(, mlp) order, sd-scripts
`flux_utils.BFL_TO_DIFFUSERS_MAP`), and ours must put the same ΔW into the same diffusers layers.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from blora_tools.adapter.model import open_adapter
from blora_tools.models import build_flux_pipeline, build_sd3_pipeline
from blora_tools.render.pipeline import RenderModel, WeightPatcher, attach_adapter
from blora_tools.render.plan import select_modules
from blora_tools.render.run import in_pipeline_naming

from dit_adapters import make_dit_adapter

PIPELINES = {"flux": build_flux_pipeline, "sd3": build_sd3_pipeline}

# diffusers split layer → (BFL fused layer, part index, parts): restated from sd-scripts' BFL_TO_DIFFUSERS_MAP
_FLUX_FUSED = {
    "attn.to_q": ("img_attn.qkv", 0, 3), "attn.to_k": ("img_attn.qkv", 1, 3), "attn.to_v": ("img_attn.qkv", 2, 3),
    "attn.add_q_proj": ("txt_attn.qkv", 0, 3), "attn.add_k_proj": ("txt_attn.qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn.qkv", 2, 3),
}
_FLUX_SINGLE = {"attn.to_q": 0, "attn.to_k": 1, "attn.to_v": 2, "proj_mlp": 3}


def _fuse_flux_doubles_and_singles(split: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the fused attention/linear1 layers, in kohya names, built from a diffusers-dialect file's parts."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
    for key in split:
        if not key.endswith(".lora_A.weight"):
            continue
        path = key[len("transformer."):-len(".lora_A.weight")]
        down, up = split[key], split[key.replace("lora_A", "lora_B")]
        if path.count(".") < 2:
            continue
        root, index, rest = path.split(".", 2)
        if root == "transformer_blocks" and rest in _FLUX_FUSED:
            fused, part, _ = _FLUX_FUSED[rest]
            groups.setdefault(f"lora_unet_double_blocks_{index}_{fused.replace('.', '_')}", {})[part] = (down, up)
        elif root == "single_transformer_blocks" and rest in _FLUX_SINGLE:
            groups.setdefault(f"lora_unet_single_blocks_{index}_linear1", {})[_FLUX_SINGLE[rest]] = (down, up)
    for stem, parts in groups.items():
        ordered = [parts[i] for i in sorted(parts)]
        downs = torch.cat([d for d, _ in ordered])
        rows = sum(u.shape[0] for _, u in ordered)
        up = torch.zeros(rows, downs.shape[0])
        r = c = 0
        for d, u in ordered:
            up[r : r + u.shape[0], c : c + d.shape[0]] = u
            r, c = r + u.shape[0], c + d.shape[0]
        out[f"{stem}.lora_down.weight"] = downs
        out[f"{stem}.lora_up.weight"] = up
        out[f"{stem}.alpha"] = torch.tensor(float(downs.shape[0]))  # scale 1, as the split file has
    return out


def _transformer_weights(pipe) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}


def _diffusers_fused(arch: str, path) -> dict[str, torch.Tensor]:
    """Transformer weights after diffusers loads and fuses the file (the oracle)."""
    pipe = PIPELINES[arch]()
    pipe.load_lora_weights(str(path), adapter_name="oracle")
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()
    return _transformer_weights(pipe)


def _ours(arch: str, path, weight: float = 1.0, blocks: str = "all") -> tuple[dict, dict, RenderModel]:
    pipe = PIPELINES[arch]()
    model = RenderModel.from_pipeline(pipe, None)
    before = _transformer_weights(pipe)
    adapter = in_pipeline_naming(open_adapter(path))
    selection = select_modules("x", adapter, blocks, adapter.arch)
    attached = attach_adapter(model, "x", adapter, selection.stems)
    patcher = WeightPatcher()
    patcher.apply([(attached, adapter.modules[s], weight) for s in selection.stems])
    after = _transformer_weights(pipe)
    patcher.restore()
    assert all(torch.equal(p, before[n]) for n, p in pipe.transformer.named_parameters()), "restored bit for bit"
    return before, after, model


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_split_file_applies_what_diffusers_applies(tmp_path, arch):
    path = make_dit_adapter(tmp_path / "split.safetensors", arch, "diffusers", alpha=None, rank=2, seed=3)
    expected = _diffusers_fused(arch, path)
    _, after, _ = _ours(arch, path)
    for name, value in expected.items():
        torch.testing.assert_close(after[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_fused_kohya_file_reaches_the_split_layers_with_the_same_delta(tmp_path):
    split_path = make_dit_adapter(tmp_path / "split.safetensors", "flux", "diffusers", alpha=None, rank=2, seed=5)
    split = load_file(str(split_path))
    fused = _fuse_flux_doubles_and_singles(split)
    save_file(fused, str(tmp_path / "fused.safetensors"))
    only_fused = {k: v for k, v in split.items()
                  if any(k.endswith(f"{p}.lora_A.weight") or k.endswith(f"{p}.lora_B.weight")
                         for p in list(_FLUX_FUSED) + list(_FLUX_SINGLE))}
    save_file(only_fused, str(tmp_path / "parts.safetensors"))
    expected = _diffusers_fused("flux", tmp_path / "parts.safetensors")
    _, after, _ = _ours("flux", tmp_path / "fused.safetensors")
    for name, value in expected.items():
        torch.testing.assert_close(after[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_final_modulation_halves_are_swapped_for_bfl_names(tmp_path):
    """BFL `final_layer.adaLN_modulation.1` rows are (shift, scale); diffusers' `norm_out.linear` holds (scale, shift)
    (diffusers `swap_scale_shift`, dit.md (b)): a kohya module must land with its halves swapped."""
    width = 64
    down, up = torch.randn(2, width), torch.randn(2 * width, 2)
    save_file({"lora_unet_final_layer_adaLN_modulation_1.lora_down.weight": down,
               "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": up,
               "lora_unet_final_layer_adaLN_modulation_1.alpha": torch.tensor(2.0),
               "lora_unet_single_blocks_0_linear2.lora_down.weight": torch.randn(2, 5 * width),
               "lora_unet_single_blocks_0_linear2.lora_up.weight": torch.zeros(width, 2)},
              str(tmp_path / "final.safetensors"))
    before, after, _ = _ours("flux", tmp_path / "final.safetensors")
    delta = (up @ down).double()
    expected = torch.cat((delta[width:], delta[:width]))
    got = (after["norm_out.linear.weight"] - before["norm_out.linear.weight"]).double()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_sub_selector_applies_only_its_rows(tmp_path):
    path = make_dit_adapter(tmp_path / "kohya.safetensors", "flux", "kohya", rank=2, seed=7)
    before, after, _ = _ours("flux", path, blocks="D01.img.k,S00.linear1.mlp")
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed == {"transformer_blocks.1.attn.to_k.weight", "single_transformer_blocks.0.proj_mlp.weight"}
    tensors = load_file(str(path))
    stem = "lora_unet_double_blocks_1_img_attn_qkv"
    delta = tensors[f"{stem}.lora_up.weight"].double() @ tensors[f"{stem}.lora_down.weight"].double()
    delta *= float(tensors[f"{stem}.alpha"]) / 2
    got = (after["transformer_blocks.1.attn.to_k.weight"] - before["transformer_blocks.1.attn.to_k.weight"]).double()
    torch.testing.assert_close(got, delta[64:128], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("arch", ["flux", "sd3"])
def test_render_command_on_a_saved_tiny_pipeline(runner, tmp_path, arch):
    from blora_tools.cli import main

    folder = tmp_path / "model"
    PIPELINES[arch]().save_pretrained(folder)
    lora = make_dit_adapter(tmp_path / "lora.safetensors", arch, "kohya", rank=2, seed=1)
    groups = "double|single" if arch == "flux" else "J00|J01-J02"
    out = tmp_path / "grid.png"
    result = runner.invoke(main, ["render", "--model", str(folder), "--lora", f"a={lora}", "--grid-x", f"a@none|{groups}",
                                  "--steps", "2", "--size", "32x32", "--prompt", "a cat", "--device", "cpu",
                                  "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.with_suffix(".json").read_text())
    assert doc["arch"] == arch and len(doc["cells"]) == 3
    from PIL import Image

    grid = np.asarray(Image.open(out))
    assert grid.ndim == 3
