"""Test-side oracle for Flux.1/SD3 command tests: every module's dense ΔW straight from a file's raw tensors.

Independent of the library: keys are grouped by their own text (kohya `.lora_down/.lora_up/.alpha`, PEFT
`.lora_A/.lora_B`, XLabs `.down/.up`, LyCORIS `hada_*`/`diff`), the scale is alpha / rank with a missing alpha
meaning rank (kohya's rule, `networks/lora.py`), and ΔW is the factors' product. Blocks and row parts of the tiny
models (`dit_adapters.TINY`, whose widths say how many rows one q/k/v part has) are read from the key text by regular expressions.
`CASES` lists the (family, dialect) pairs every command is tested on.
"""

from __future__ import annotations

import re

import torch
from dit_adapters import TINY
from safetensors import safe_open

WIDTH = {arch: record.width for arch, record in TINY.items()}
"""The tiny models' widths (rows of one q/k/v part)."""

CASES = [("flux", d) for d in ("kohya", "diffusers", "comfyui", "onetrainer", "xlabs")] + [
    ("sd3", d) for d in ("kohya", "diffusers", "comfyui", "onetrainer")
]
"""(family, dialect) of every tiny file the command tests run on (XLabs wrote Flux LoRAs only)."""


def arch_args(arch: str, dialect: str) -> list[str]:
    """diffusers-named SD3 files with few blocks read as Flux by rule (`transformer_blocks` below 19): say sd3."""
    return ["--arch", "sd3"] if arch == "sd3" and dialect in ("diffusers", "onetrainer") else []

_FACTORS = ((".lora_down.weight", ".lora_up.weight"), (".lora_A.weight", ".lora_B.weight"), (".down.weight", ".up.weight"))


def read(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def deltas(path) -> dict[str, torch.Tensor]:
    """Key prefix → ΔW (out × in, float64) of every module in the file."""
    tensors = read(path)
    result = {}
    for key in tensors:
        for down_suffix, up_suffix in _FACTORS:
            if key.endswith(down_suffix):
                prefix = key[: -len(down_suffix)]
                down = tensors[key].double().flatten(1)
                up = tensors[prefix + up_suffix].double().flatten(1)
                alpha = tensors.get(prefix + ".alpha")
                scale = (float(alpha) if alpha is not None else down.shape[0]) / down.shape[0]
                result[prefix] = scale * up @ down
        if key.endswith(".hada_w1_a"):
            prefix = key[: -len(".hada_w1_a")]
            t = {p: tensors[f"{prefix}.{p}"].double() for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")}
            rank = t["hada_w1_b"].shape[0]
            alpha = tensors.get(prefix + ".alpha")
            scale = (float(alpha) if alpha is not None else rank) / rank
            result[prefix] = scale * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
        if key.endswith(".diff"):
            result[key[: -len(".diff")]] = tensors[key].double().flatten(1)
    return result


_BLOCK = (
    (re.compile(r"double_blocks[._](\d+)[._]"), "D"),
    (re.compile(r"single_blocks[._](\d+)[._]"), "S"),
    (re.compile(r"single_transformer_blocks[._](\d+)[._]"), "S"),
    (re.compile(r"joint_blocks[._](\d+)[._]"), "J"),
    (re.compile(r"(?<!single_)transformer_blocks[._](\d+)[._]"), None),
)


def block_of(prefix: str, arch: str) -> str:
    """`D05`, `S10`, `J03` or `BASE` for a key prefix of a tiny Flux/SD3 file."""
    for pattern, letter in _BLOCK:
        m = pattern.search(prefix)
        if m:
            return f"{letter or ('D' if arch == 'flux' else 'J')}{int(m.group(1)):02d}"
    return "BASE"


def rows_mask(prefix: str, out: int, parts: dict[str, tuple[int, int, float, float]]) -> torch.Tensor | None:
    """The per-row factor a selection applies to a module: `parts` maps a regular expression (searched in the
    prefix; the first match counts) to (first row, end row, weight inside, weight outside), end -1 meaning
    every row; None when no pattern matches."""
    for pattern, (start, stop, inside, outside) in parts.items():
        if re.search(pattern, prefix):
            mask = torch.full((out,), float(outside), dtype=torch.float64)
            mask[start : (out if stop == -1 else stop)] = inside
            return mask
    return None
