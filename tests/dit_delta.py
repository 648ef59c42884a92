"""Test-side oracle: the ΔW a Flux.1/SD3 LoRA file makes, per fused BFL weight, from its raw tensors.

Written independently of `blora_tools` (its own key parsing, its own BFL ↔ diffusers table restated from
sd-scripts `library/flux_utils.py` BFL_TO_DIFFUSERS_MAP and diffusers `single_file_utils.py`
`convert_sd3_transformer_checkpoint_to_diffusers`, its own alpha rule: `alpha` tensor, else the PEFT
`lora_adapter_metadata` alpha/rank, else 1), so a conversion is checked against arithmetic it does not share.
"""

from __future__ import annotations

import json
import re

import torch
from safetensors import safe_open

# diffusers path (regex) → (BFL path template, first row in widths, fused widths, swap halves when 2 widths)
_FLUX = [
    (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])", "double_blocks.{0}.img_attn.qkv", "qkv", 3),
    (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj", "double_blocks.{0}.txt_attn.qkv", "qkv", 3),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", "double_blocks.{0}.img_attn.proj", None, 1),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", "double_blocks.{0}.txt_attn.proj", None, 1),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", "double_blocks.{0}.img_mlp.0", None, 1),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", "double_blocks.{0}.img_mlp.2", None, 1),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", "double_blocks.{0}.txt_mlp.0", None, 1),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", "double_blocks.{0}.txt_mlp.2", None, 1),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", "double_blocks.{0}.img_mod.lin", None, 1),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", "double_blocks.{0}.txt_mod.lin", None, 1),
    (r"single_transformer_blocks\.(\d+)\.attn\.to_([qkv])", "single_blocks.{0}.linear1", "qkv", 7),
    (r"single_transformer_blocks\.(\d+)\.proj_mlp", "single_blocks.{0}.linear1", "mlp", 7),
    (r"single_transformer_blocks\.(\d+)\.proj_out", "single_blocks.{0}.linear2", None, 1),
    (r"single_transformer_blocks\.(\d+)\.norm\.linear", "single_blocks.{0}.modulation.lin", None, 1),
    (r"x_embedder", "img_in", None, 1),
    (r"context_embedder", "txt_in", None, 1),
    (r"time_text_embed\.timestep_embedder\.linear_1", "time_in.in_layer", None, 1),
    (r"time_text_embed\.timestep_embedder\.linear_2", "time_in.out_layer", None, 1),
    (r"time_text_embed\.text_embedder\.linear_1", "vector_in.in_layer", None, 1),
    (r"time_text_embed\.text_embedder\.linear_2", "vector_in.out_layer", None, 1),
    (r"time_text_embed\.guidance_embedder\.linear_1", "guidance_in.in_layer", None, 1),
    (r"time_text_embed\.guidance_embedder\.linear_2", "guidance_in.out_layer", None, 1),
    (r"proj_out", "final_layer.linear", None, 1),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", "swap", 1),
]
_SD3 = [
    (r"transformer_blocks\.(\d+)\.attn\.to_([qkv])", "joint_blocks.{0}.x_block.attn.qkv", "qkv", 3),
    (r"transformer_blocks\.(\d+)\.attn\.add_([qkv])_proj", "joint_blocks.{0}.context_block.attn.qkv", "qkv", 3),
    (r"transformer_blocks\.(\d+)\.attn2\.to_([qkv])", "joint_blocks.{0}.x_block.attn2.qkv", "qkv", 3),
    (r"transformer_blocks\.(\d+)\.attn\.to_out\.0", "joint_blocks.{0}.x_block.attn.proj", None, 1),
    (r"transformer_blocks\.(\d+)\.attn2\.to_out\.0", "joint_blocks.{0}.x_block.attn2.proj", None, 1),
    (r"transformer_blocks\.(\d+)\.attn\.to_add_out", "joint_blocks.{0}.context_block.attn.proj", None, 1),
    (r"transformer_blocks\.(\d+)\.ff\.net\.0\.proj", "joint_blocks.{0}.x_block.mlp.fc1", None, 1),
    (r"transformer_blocks\.(\d+)\.ff\.net\.2", "joint_blocks.{0}.x_block.mlp.fc2", None, 1),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.0\.proj", "joint_blocks.{0}.context_block.mlp.fc1", None, 1),
    (r"transformer_blocks\.(\d+)\.ff_context\.net\.2", "joint_blocks.{0}.context_block.mlp.fc2", None, 1),
    (r"transformer_blocks\.(\d+)\.norm1\.linear", "joint_blocks.{0}.x_block.adaLN_modulation.1", None, 1),
    (r"transformer_blocks\.(\d+)\.norm1_context\.linear", "joint_blocks.{0}.context_block.adaLN_modulation.1", "swap", 1),
    (r"pos_embed\.proj", "x_embedder.proj", None, 1),
    (r"context_embedder", "context_embedder", None, 1),
    (r"time_text_embed\.timestep_embedder\.linear_1", "t_embedder.mlp.0", None, 1),
    (r"time_text_embed\.timestep_embedder\.linear_2", "t_embedder.mlp.2", None, 1),
    (r"time_text_embed\.text_embedder\.linear_1", "y_embedder.mlp.0", None, 1),
    (r"time_text_embed\.text_embedder\.linear_2", "y_embedder.mlp.2", None, 1),
    (r"proj_out", "final_layer.linear", None, 1),
    (r"norm_out\.linear", "final_layer.adaLN_modulation.1", "swap", 1),
]
_XLABS = {"qkv_lora1": "img_attn.qkv", "proj_lora1": "img_attn.proj", "qkv_lora2": "txt_attn.qkv",
          "proj_lora2": "txt_attn.proj", "qkv_lora": "linear1", "proj_lora": "linear2"}
_FACTOR = re.compile(r"^(.*)\.(lora_down\.weight|lora_up\.weight|lora_A\.weight|lora_B\.weight|alpha)$")
_TE = re.compile(r"^(lora_te\d_|text_encoder(?:_\d)?\.|text_encoders\.\w+\.transformer\.)")


def _flat(path: str) -> str:
    return path.replace(".", "_")


def _read(path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    modules: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        for key in f.keys():
            x = re.match(r"^(double|single)_blocks\.(\d+)\.processor\.(\w+)\.(down|up)\.weight$", key)
            if x:
                name = f"xlabs:{x.group(1)}_blocks.{x.group(2)}.{_XLABS[x.group(3)]}"
                param = "down" if x.group(4) == "down" else "up"
            else:
                m = _FACTOR.match(key)
                assert m, key
                name, param = m.group(1), {"lora_down.weight": "down", "lora_A.weight": "down", "lora_up.weight": "up",
                                           "lora_B.weight": "up", "alpha": "alpha"}[m.group(2)]
            modules.setdefault(name, {})[param] = f.get_tensor(key)
    config = json.loads(metadata["lora_adapter_metadata"]) if "lora_adapter_metadata" in metadata else {}
    return modules, config


def _scale(name: str, t: dict, config: dict) -> float:
    rank = t["down"].shape[0]
    if "alpha" in t:
        return float(t["alpha"]) / rank
    root, _, path = name.partition(".")
    pattern = {k.split(".", 1)[1]: v for k, v in config.items() if k.startswith(root + ".")}
    if not pattern:
        return 1.0
    alpha = next((v for p, v in pattern.get("alpha_pattern", {}).items() if path.endswith(p)), pattern["lora_alpha"])
    r = next((v for p, v in pattern.get("rank_pattern", {}).items() if path.endswith(p)), pattern["r"])
    assert r == rank, (name, r, rank)
    return alpha / r


def _bfl_place(name: str, arch: str, out: int, fan_in: int) -> tuple[str, int, int, bool]:
    """(flattened BFL path, first row, total rows, swap) of a module name in any dialect."""
    if name.startswith("xlabs:"):
        path = name[len("xlabs:") :]
        if path.endswith("linear1"):
            return _flat(path), 0, 7 * fan_in, False
        return _flat(path), 0, out, False
    for prefix in ("transformer.", "lora_transformer_"):
        if name.startswith(prefix):
            dotted = name[len(prefix) :]
            table = _FLUX if arch == "flux" else _SD3
            for pattern, template, part, units in table:
                flat_pattern = pattern if prefix == "transformer." else pattern.replace(r"\.", "_")
                m = re.fullmatch(flat_pattern, dotted)
                if m:
                    target = _flat(template.format(*m.groups()))
                    if part == "qkv":
                        return target, "qkv".index(m.group(2)) * fan_in, units * fan_in, False
                    if part == "mlp":
                        return target, 3 * fan_in, 7 * fan_in, False
                    return target, 0, out, part == "swap" and out == 2 * fan_in
            raise AssertionError(f"no BFL layer for {name}")
    for prefix in ("lora_unet_", "diffusion_model."):
        if name.startswith(prefix):
            return _flat(name[len(prefix) :]), 0, out, False
    raise AssertionError(name)


def fused_deltas(path, arch: str) -> dict[str, torch.Tensor]:
    """Flattened BFL weight path (or text-encoder module name) → ΔW (float64) the file adds to it."""
    modules, config = _read(path)
    deltas: dict[str, torch.Tensor] = {}
    for name, t in modules.items():
        up = t["up"].double().reshape(t["up"].shape[0], -1)
        down = t["down"].double().reshape(t["down"].shape[0], -1)
        delta = _scale(name, t, config) * (up @ down)
        if _TE.match(name):
            deltas["te:" + _flat(_TE.sub("", name))] = delta
            continue
        target, row, rows, swap = _bfl_place(name, arch, up.shape[0], down.shape[1])
        if swap:
            half = up.shape[0] // 2
            delta = torch.cat([delta[half:], delta[:half]])
        total = deltas.setdefault(target, torch.zeros(rows, down.shape[1], dtype=torch.float64))
        total[row : row + delta.shape[0]] += delta
    return deltas


def assert_same_deltas(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 1e-5) -> None:
    """Same weights touched, same ΔW (weights present with ΔW zero on one side count as absent)."""
    keys = {k for k, v in a.items() if v.abs().max() > 0} | {k for k, v in b.items() if v.abs().max() > 0}
    for key in sorted(keys):
        assert key in a and key in b, f"{key} only in {'a' if key in a else 'b'}"
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-4, msg=lambda m: f"{key}: {m}")
