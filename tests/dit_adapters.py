"""Synthetic Flux.1 and SD3 adapter files in every dialect, at tiny widths, for tests.

Module names and shapes come from tiny copies of the taxonomy's family records (`TINY`: the real layer set,
width 64, 2 + 2 Flux blocks, 3 SD3 blocks), whose names the golden manifests pin to sd-scripts' and diffusers'
own. The factors are random. The expected ΔW of a test comes from an independent oracle, not from here.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from blora_tools.taxonomy.dit import BFL, DIFFUSERS, FLUX_RECORD, PART, SD3_RECORD, DiTLayer
from blora_tools.taxonomy.encoders import Component, T5Encoder, TextEncoder

TINY = {
    "flux": replace(
        FLUX_RECORD, width=64, double=2, single=2, pooled_width=32, context_width=32,
        text_encoders=(TextEncoder(Component.TE1, width=32, depth=1, mlp_width=64),
                       T5Encoder(Component.TE3, width=32, depth=1, heads=2, head_width=16, mlp_width=64)),
    ),
    "sd3": replace(
        SD3_RECORD, depth=3, width=64, pooled_width=80, context_width=96,
        text_encoders=(TextEncoder(Component.TE1, width=32, depth=2, mlp_width=64, projection=32),
                       TextEncoder(Component.TE2, width=48, depth=2, mlp_width=96, projection=48),
                       T5Encoder(Component.TE3, width=96, depth=1, heads=2, head_width=16, mlp_width=64)),
    ),
}
"""Tiny Flux and SD3 shaped like `blora_tools.models`' tiny diffusers transformers (FLUX_TINY: width 64, 2 double +
2 single blocks; SD3_TINY, variant sd35_medium: width 64, 3 joint blocks, `attn2` in J00 only, J02 pre-only)."""

DIALECTS = ("kohya", "diffusers", "comfyui", "onetrainer", "xlabs")


def dit_layers(arch: str, naming: str = BFL) -> list[DiTLayer]:
    """Every layer of the tiny `arch` model in one naming (`bfl`, `diffusers` or `part`), in table order.
    SD3's last block has no context attention output or MLP (pre-only) and a 2·width context modulation; only
    J00 has `attn2`."""
    record = TINY[arch]
    chosen = [layer for layer in record.layers() if layer.naming == naming]
    if arch == "sd3":
        last = f"J{record.depth - 1:02d}"
        chosen = [_pre_only(layer, record.width) if layer.block == last else layer
                  for layer in chosen if not (layer.block == last and _post_attention(layer))]
        chosen = [_single_attention(layer, record.width) for layer in chosen
                  if layer.block == "J00" or ".attn2" not in layer.path]
    return chosen


def _single_attention(layer: DiTLayer, width: int) -> DiTLayer:
    """Blocks without `attn2` have a 6·width image modulation (9·width with it)."""
    if layer.block not in (None, "J00") and layer.leaves[0].name == "x.mod":
        return replace(layer, shape=(6 * width, width))
    return layer


def _post_attention(layer: DiTLayer) -> bool:
    return ("context_block" in layer.fused) and (".attn.proj" in layer.fused or ".mlp." in layer.fused)


def _pre_only(layer: DiTLayer, width: int) -> DiTLayer:
    if layer.swappable and layer.block is not None:  # the last block's context modulation: shift, scale only
        return replace(layer, shape=(2 * width, width))
    return layer


def _key(layer: DiTLayer, param: str, dialect: str) -> str:
    kohya = {"lora_down.weight": "lora_down.weight", "lora_up.weight": "lora_up.weight", "alpha": "alpha"}[param]
    peft = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight", "alpha": "alpha"}[param]
    if dialect == "kohya":
        return f"{layer.stem}.{kohya}"
    if dialect == "onetrainer":
        return f"lora_transformer_{layer.path.replace('.', '_')}.{kohya}"
    if dialect == "comfyui":
        return f"diffusion_model.{layer.path}.{peft}"
    if dialect == "diffusers":
        return f"transformer.{layer.path}.{peft}"
    raise ValueError(dialect)


_XLABS = {"img_attn.qkv": "qkv_lora1", "img_attn.proj": "proj_lora1", "txt_attn.qkv": "qkv_lora2",
          "txt_attn.proj": "proj_lora2", "linear1_qkv": "qkv_lora", "linear2": "proj_lora"}


def _xlabs_key(layer: DiTLayer, param: str) -> str | None:
    if layer.block is None:
        return None
    kind, index, rest = layer.path.split(".", 2)
    processor = _XLABS.get(rest)
    if processor is None or param == "alpha":
        return None
    return f"{kind}.{index}.processor.{processor}.{'down' if param == 'lora_down.weight' else 'up'}.weight"


def make_dit_adapter(
    path: str | Path,
    arch: str = "flux",
    dialect: str = "kohya",
    *,
    blocks: set[str] | None = None,
    rank: int = 2,
    alpha: float | None = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write a random LoRA for the tiny `arch` model in `dialect` (`DIALECTS`).

    kohya, comfyui: BFL names (fused qkv, Flux's fused `linear1`); diffusers, onetrainer: diffusers names (split);
    xlabs (Flux only): the attention layers XLabs' processors adapt, no alpha. `blocks` limits the modules to those
    blocks (`D00`, `S01`, `J02`, None for BASE layers); `alpha` None writes no alpha.
    """
    if dialect == "xlabs":
        layers = [l for l in dit_layers(arch, BFL) + dit_layers(arch, PART) if _xlabs_key(l, "lora_down.weight")]
        alpha = None
    else:
        layers = dit_layers(arch, BFL if dialect in ("kohya", "comfyui") else DIFFUSERS)
    if blocks is not None:
        layers = [l for l in layers if l.block in blocks]
    gen = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in layers:
        out, fan_in = layer.shape[0], math.prod(layer.shape[1:])
        down_shape = (rank,) + tuple(layer.shape[1:])
        up_shape = (out, rank) + ((1, 1) if len(layer.shape) == 4 else ())
        params = {
            "lora_down.weight": torch.randn(down_shape, generator=gen) / math.sqrt(fan_in),
            "lora_up.weight": torch.randn(up_shape, generator=gen) * 0.1,
        }
        if alpha is not None:
            params["alpha"] = torch.tensor(float(alpha))
        for param, tensor in params.items():
            key = _xlabs_key(layer, param) if dialect == "xlabs" else _key(layer, param, dialect)
            if key is not None:
                tensors[key] = tensor.to(dtype).contiguous()
    path = Path(path)
    save_file(tensors, str(path), metadata=metadata)
    return path

