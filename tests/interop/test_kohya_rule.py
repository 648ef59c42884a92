"""sd-scripts' `networks.lora` loading rule, restated as an independent oracle, against outputs on conv layers.

Restated (not copied) from kohya-ss/sd-scripts `networks/lora.py` at commit
02298e3c4a7e18b20eb1638169d30da013747053 — what `--base_weights`, `merge_lora.py` and `gen_img.py` run:

* `create_network_from_weights` reads only two kinds of key: a key containing `alpha` gives the module's alpha,
  a key containing `lora_down` gives its rank (`shape[0]`); a module without alpha gets alpha = rank. Modules
  with only `hada_*` / `lokr_*` / `diff` keys are never created; `lora_mid` is never read.
* `LoRANetwork.create_modules` creates a module only for a Linear/Conv2d inside its target classes
  (`Transformer2DModel`, `ResnetBlock2D`, `Downsample2D`, `Upsample2D`; `CLIPAttention`, `CLIPMLP`) whose name,
  `lora_unet_` + module path with `.` → `_`, is among those ranks: other names are skipped silently. Its U-Net is
  diffusers-named on SD1/SD2 and LDM-named (`SdxlUNet2DConditionModel`) on SDXL.
* `LoRAModule.__init__` builds `lora_down` as `Conv2d(in, r, kernel, stride, padding)` and `lora_up` as
  `Conv2d(r, out, (1, 1))` for a Conv2d layer, Linear ones otherwise; `load_weights` (`load_state_dict`) needs
  tensors of exactly those shapes. alpha None or 0 means alpha = rank; scale = alpha / rank.
* `LoRAInfModule.merge_to`: linear weight → `up @ down · scale`; a down factor with a 1×1 kernel → the squeezed
  product, unsqueezed to 1×1; otherwise `conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) · scale`.

The target layers come from `adapters.layers`, the tiny models' layers found by kohya's target rule
(`kohya_plugin.targets`, checked against kohya's own module manifests elsewhere).
"""

from __future__ import annotations

import pytest
import torch
from adapters import layers, make_adapter, relative_error
from interop_helpers import deltas as dense_deltas
from safetensors.torch import load_file, save_file

from blora_tools.adapter.model import open_adapter
from blora_tools.ops.convert import convert
from blora_tools.ops.lowrank import RankPlan
from blora_tools.ops.merge import Source, merge
from blora_tools.ops.resize import resize


class KohyaRefuses(AssertionError):
    """sd-scripts would fail loading the file (a factor shape its LoRAModule cannot take)."""


def kohya_rule(path, arch: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(stem → ΔW with the layer's shape as `merge_to` adds it, stems that sd-scripts skips silently)."""
    weights = load_file(str(path))
    dims: dict[str, int] = {}
    alphas: dict[str, float] = {}
    for key, value in weights.items():
        if "." not in key:
            continue
        name = key.split(".")[0]
        if "alpha" in key:
            alphas[name] = float(value)
        elif "lora_down" in key:
            dims[name] = value.size()[0]
    targets = {layer.name: layer.shape for layer in layers(arch, True)}
    applied, skipped = {}, []
    for name, dim in dims.items():
        shape = targets.get(name)
        if shape is None:
            skipped.append(name)
            continue
        alpha = alphas.get(name, dim) or dim
        down = weights[f"{name}.lora_down.weight"].double()
        up = weights[f"{name}.lora_up.weight"].double()
        conv = len(shape) == 4
        want_down = (dim, shape[1], *shape[2:]) if conv else (dim, shape[1])
        want_up = (shape[0], dim, 1, 1) if conv else (shape[0], dim)
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            raise KohyaRefuses(f"{name}: lora_down {list(down.shape)} / lora_up {list(up.shape)}, LoRAModule has "
                               f"{list(want_down)} / {list(want_up)}")
        if not conv:
            delta = up @ down
        elif down.shape[2:4] == (1, 1):
            delta = (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3)
        else:
            delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
        applied[name] = delta * (alpha / dim)
    return applied, skipped


def assert_kohya_applies(out, want: dict[str, torch.Tensor], arch: str, tol: float = 1e-5) -> None:
    """Every module of `out` is created and loaded by sd-scripts, and applies the ΔW `want` says."""
    applied, skipped = kohya_rule(out, arch)
    assert not skipped, f"sd-scripts skips {len(skipped)} module(s), e.g. {skipped[0]}"
    assert set(applied) == set(want)
    for stem, delta in applied.items():
        assert relative_error(delta.reshape(delta.shape[0], -1), want[stem].reshape(delta.shape[0], -1)) < tol, stem


def _conv_and_linear(tmp_path, arch: str, kind: str, **kwargs):
    """One file with `kind` on linear layers and on 3×3 / 1×1 convolutions (LyCORIS's flattened conv form)."""
    tensors = {}
    for on in ("linear", "conv"):
        part = make_adapter(tmp_path / f"{kind}-{on}.safetensors", arch, kind, on=on, per_block=1, **kwargs)
        tensors.update(load_file(str(part)))
    path = tmp_path / f"{kind}.safetensors"
    save_file(tensors, str(path))
    return path


def test_the_rule_refuses_flattened_factors_on_a_conv_layer(tmp_path):
    """The oracle itself: 2-D factors on a 3×3 conv (what merge --method svd wrote before) do not load."""
    conv = next(l for l in layers("sd1", True) if l.kind == "conv3x3")
    out, fan_in = conv.shape[0], conv.shape[1] * 9
    path = tmp_path / "flat.safetensors"
    save_file({f"{conv.name}.lora_down.weight": torch.randn(4, fan_in), f"{conv.name}.lora_up.weight": torch.randn(out, 4),
               f"{conv.name}.alpha": torch.tensor(4.0)}, str(path))
    with pytest.raises(KohyaRefuses, match=r"lora_down \[4, \d+\]"):
        kohya_rule(path, "sd1")


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
@pytest.mark.parametrize("kind", ["loha", "lokr", "full", "tucker", "locon"])
def test_svd_merge_of_every_kind_writes_factors_sd_scripts_loads(tmp_path, arch, kind):
    """LoHa/LoKr/full convolutions (flattened factors), Tucker cores and LoCon become conv-shaped LoRA factors:
    `lora_down` [r, in, kh, kw], `lora_up` [out, r, 1, 1] — 1×1 convolutions included — with ΔW unchanged
    (lossless rank)."""
    rank = 2 if kind == "lokr" else 3
    src = _conv_and_linear(tmp_path, arch, kind, rank=rank) if kind in ("loha", "lokr", "full") else make_adapter(
        tmp_path / "src.safetensors", arch, kind, rank=rank, per_block=1)
    out = tmp_path / "svd.safetensors"
    merge([Source(open_adapter(src))], method="svd").save(out)
    assert_kohya_applies(out, dense_deltas(src), arch)
    shapes = {k: v.shape for k, v in load_file(str(out)).items()}
    convs = [l for l in layers(arch, True) if len(l.shape) == 4 and f"{l.name}.lora_down.weight" in shapes]
    assert any(l.kind == "conv3x3" for l in convs) and any(l.kind == "conv1x1" for l in convs)


@pytest.mark.parametrize("kind", ["loha", "tucker"])
def test_resize_writes_conv_shaped_factors(tmp_path, kind):
    src = _conv_and_linear(tmp_path, "sd1", kind) if kind == "loha" else make_adapter(
        tmp_path / "src.safetensors", "sd1", kind, per_block=1)
    out = tmp_path / "resized.safetensors"
    resize(open_adapter(src), RankPlan(default=64)).save(out)  # above every module's rank: lossless
    assert_kohya_applies(out, dense_deltas(src), "sd1")


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_concat_merge_convert_and_peft_round_trip_stay_loadable(tmp_path, arch):
    a = make_adapter(tmp_path / "a.safetensors", arch, "locon", rank=3, alpha=1.5, per_block=1)
    b = make_adapter(tmp_path / "b.safetensors", arch, "locon", rank=2, alpha=4.0, per_block=1, seed=1)
    merged = tmp_path / "ab.safetensors"
    merge([Source(open_adapter(a)), Source(open_adapter(b), ratio=-0.5)], method="concat").save(merged)
    da, db = dense_deltas(a), dense_deltas(b)
    assert_kohya_applies(merged, {s: da[s] - 0.5 * db[s] for s in da}, arch)
    peft = tmp_path / "peft.safetensors"
    convert(open_adapter(a), to="peft").save(peft)
    back = tmp_path / "back.safetensors"
    convert(open_adapter(peft), to="kohya").save(back)
    assert_kohya_applies(back, da, arch)


def test_sd_scripts_skips_ldm_named_sd1_modules_and_we_say_so(tmp_path):
    src = make_adapter(tmp_path / "src.safetensors", "sd1", "locon", per_block=1)
    ldm = tmp_path / "ldm.safetensors"
    result = convert(open_adapter(src), to="kohya", names="ldm")
    result.save(ldm)
    applied, skipped = kohya_rule(ldm, "sd1")
    assert skipped and all(s.startswith("lora_unet_") for s in skipped)
    assert not any(s.startswith("lora_unet_") for s in applied)
    assert any("sd-scripts" in w and f"{len(skipped)} U-Net module(s) have LDM names" in w for w in result.warnings)


def test_sd_scripts_drops_tucker_cores_and_we_say_so(tmp_path):
    """merge_to reads lora_down/lora_up only: a Tucker module's ΔW comes out wrong (1×1 product broadcast over
    the 3×3 kernel), so every writer that keeps Tucker modules warns."""
    from blora_tools.ops.prune import prune

    src = make_adapter(tmp_path / "src.safetensors", "sd1", "tucker", per_block=1)
    with pytest.raises(KohyaRefuses):  # its down factor is [r, in, 1, 1], LoRAModule's is [r, in, 3, 3]
        kohya_rule(src, "sd1")
    result = prune(open_adapter(src), frozenset({"te"}), keep=False)
    assert any("Tucker" in w and "sd-scripts" in w and "lora_mid" in w for w in result.warnings)
